"""`sample` end to end on CPU with a debug net + PixelCodec(2): counts, labels, resume, provenance, ranks, loading."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.nets import random_debug_net, write_lightning_checkpoint
from nit_lightning import distributed
from nit_lightning.cli.sample import main
from nit_lightning.data.codecs import PixelCodec
from nit_lightning.generation import sample_set
from nit_lightning.generation.images import ImageRequest, NonFiniteSamples, generate
from nit_lightning.generation.pipeline import load_pipeline, to_uint8
from nit_lightning.generation.sample_set import SampleRun, run_sample
from nit_lightning.generation.settings import SamplerSettings, SizeSetting
from nit_lightning.models import build_nit
from nit_lightning.records import SettingsRecord

NUM_CLASSES = 3


def _fake_ckpt(path, *, ema=True, live_offset=0.0):
    return write_lightning_checkpoint(path, random_debug_net(NUM_CLASSES), ema=ema, live_offset=live_offset)


@pytest.fixture
def ckpt(tmp_path):
    return _fake_ckpt(tmp_path / "last.ckpt")


def _argv(ckpt, out, *extra):
    return ["--ckpt", str(ckpt), "--sizes", "8x8,4x12", "--num-samples", "5", "--method", "euler", "--steps", "3",
            "--cfg", "2.0", "--interval", "0,0.7", "--out", str(out), "--tokens-per-forward", "96", "--device", "cpu",
            "--no-progress", *extra]


def _pngs(folder):
    return sorted(p.name for p in folder.glob("*.png"))


def test_end_to_end_counts_labels_npz(ckpt, tmp_path):
    out = tmp_path / "samples"
    assert main(_argv(ckpt, out)) == 0
    for name, (h, w) in {"8x8": (8, 8), "4x12": (4, 12)}.items():
        folder = out / name
        assert _pngs(folder) == [f"{i:06d}.png" for i in range(5)]
        data = np.load(folder / f"samples_5x{h}x{w}x3.npz")
        assert data["arr_0"].shape == (5, h, w, 3) and data["arr_0"].dtype == np.uint8
        assert data["arr_1"].tolist() == [0, 1, 2, 0, 1]  # label i mod num_classes
        for i in range(5):
            np.testing.assert_array_equal(data["arr_0"][i], np.asarray(Image.open(folder / f"{i:06d}.png")))
        assert data["arr_0"].std() > 0  # a random net makes non-constant images
        record = SettingsRecord.read(folder / "provenance.json", "sample-set").settings
        assert record["sampler"]["cfg_scale"] == 2.0 and len(record["weights_sha256"]) == 64


def test_resume_regenerates_only_missing(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "samples"
    main(_argv(ckpt, out))
    folder = out / "8x8"
    before = {p.name: p.read_bytes() for p in folder.glob("*.png")}
    (folder / "000002.png").unlink()
    written = []
    real_save = sample_set.write_png
    monkeypatch.setattr(sample_set, "write_png", lambda image, path: (written.append(path.name), real_save(image, path)))
    main(_argv(ckpt, out))
    assert written == ["000002.png"]  # only the deleted one, and nothing for the complete 4x12 folder
    assert {p.name: p.read_bytes() for p in folder.glob("*.png")} == before  # regenerated bit-identically
    assert main(_argv(ckpt, out)[:-1] + ["--cfg", "3.0", "--no-progress"]) == 2  # other settings: refused


def test_ranks_and_pack_budget_do_not_change_samples(ckpt, tmp_path, monkeypatch):
    sampler = SamplerSettings(method="sde", steps=3, cfg_scale=2.0, cfg_interval=(0.0, 0.7))
    base = SampleRun(ckpt=str(ckpt), out=str(tmp_path / "one"), settings=[SizeSetting((8, 8), sampler),
                     SizeSetting((4, 12), sampler)], num_samples=5, device="cpu", progress=False, tokens_per_forward=1000)
    one = run_sample(base)
    # Two "ranks" with another pack budget: rank 1 makes its strided slice, then rank 0 the rest and the npz.
    two = dataclasses.replace(base, out=str(tmp_path / "two"), tokens_per_forward=32)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "unused")
    import contextlib

    # no process group: the two ranks run one after another
    monkeypatch.setattr(distributed, "process_group", lambda *a: contextlib.nullcontext())
    monkeypatch.setenv("RANK", "1")
    run_sample(two)
    assert _pngs(tmp_path / "two" / "8x8") == ["000001.png", "000003.png"]
    monkeypatch.setenv("RANK", "0")
    paths = run_sample(two)
    for name in ("8x8", "4x12"):
        a, b = np.load(one[name]), np.load(paths[name])
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])


def _rank_worker(rank, world, port, settings):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ranks = distributed.from_environment()
    with distributed.process_group(ranks, torch.device("cpu")):  # as the command opens it (cli/sample.py)
        run_sample(settings)


@pytest.mark.slow
def test_two_processes_gloo_match_one(ckpt, tmp_path):
    """Two real ranks (gloo process group, strided slices, rank 0 merges) give the one-process sample set."""
    import socket

    import torch.multiprocessing as mp

    base = SampleRun(ckpt=str(ckpt), out=str(tmp_path / "one"), num_samples=5, device="cpu", progress=False,
                     settings=[SizeSetting((8, 8), SamplerSettings(method="sde", steps=2))])
    one = run_sample(base)["8x8"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = dataclasses.replace(base, out=str(tmp_path / "two"))
    mp.spawn(_rank_worker, args=(2, port, two), nprocs=2, join=True)
    a, b = np.load(one), np.load(tmp_path / "two" / "8x8" / "samples_5x8x8x3.npz")
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])


def test_no_png_and_size_rounding(ckpt, tmp_path):
    out = tmp_path / "s"
    argv = ["--ckpt", str(ckpt), "--sizes", "9x6", "--num-samples", "2", "--steps", "2", "--out", str(out),
            "--device", "cpu", "--no-progress"]
    with pytest.raises(ValueError, match="9x6 is not a multiple of 2 .*10x6 \\(--round nearest\\) or 8x6"):
        run_sample(SampleRun(ckpt=str(ckpt), out=str(out), settings=[SizeSetting((9, 6))], num_samples=2))
    assert main(argv + ["--round", "floor", "--no-png"]) == 0
    assert _pngs(out / "8x6") == [] and np.load(out / "8x6" / "samples_2x8x6x3.npz")["arr_0"].shape == (2, 8, 6, 3)
    assert main(argv + ["--round", "floor", "--no-png"]) == 0  # complete: nothing regenerated, npz kept


def test_load_pipeline_weights_and_errors(tmp_path, caplog):
    path = _fake_ckpt(tmp_path / "a.ckpt", live_offset=1.0)
    ema = load_pipeline(path)
    live = load_pipeline(path, use_ema=False)
    assert ema.meta["weights"].startswith("ema") and live.meta["weights"].startswith("live")
    assert ema.meta["ignored_keys"] == 0 and live.meta["ignored_keys"] == 1
    w_e, w_l = ema.net.final_layer.linear.weight, live.net.final_layer.linear.weight
    torch.testing.assert_close(w_l, w_e + 1.0)
    assert isinstance(ema.codec, PixelCodec) and ema.size_multiple == 2 and not ema.net.training
    noema = load_pipeline(_fake_ckpt(tmp_path / "b.ckpt", ema=False))
    assert "no ema_state_dict" in noema.meta["weights"] and "no EMA weights" in caplog.text
    bad = torch.load(path, weights_only=True)
    bad["ema_state_dict"]["extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.ckpt")
    with pytest.raises(RuntimeError, match="extra.weight"):  # strict load names the stray key
        load_pipeline(tmp_path / "bad.ckpt")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="--codec dcae:"):
        load_pipeline(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="makes 48-channel latents but the net expects in_channels=12"):
        load_pipeline(path, codec="pixel:4")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pipeline(tmp_path / "nope.ckpt")


def test_uint8_rule():
    x = torch.tensor([-1.5, -1.0, -0.996, 0.0, 0.5, 1.0, 2.0])
    # (x + 1)·127.5 = [-63.75, 0, 0.51, 127.5, 191.25, 255, 382.5] -> round half to even, clamp
    assert to_uint8(x).tolist() == [0, 0, 1, 128, 191, 255, 255]


def test_sweep_file_settings_per_size(ckpt, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("defaults: {steps: 3}\nsettings:\n  - {size: 8x8, method: heun, steps: 2, cfg: 1.5, interval: [0, 0.7]}\n"
                     "  - {size: 4x12, method: sde}\n")
    out = tmp_path / "s"
    argv = ["--ckpt", str(ckpt), "--sweep", str(sweep), "--num-samples", "2", "--out", str(out), "--device", "cpu",
            "--no-progress"]
    assert main(argv) == 0
    a = SettingsRecord.read(out / "8x8" / "provenance.json").settings["sampler"]
    b = SettingsRecord.read(out / "4x12" / "provenance.json").settings["sampler"]
    assert (a["method"], a["steps"], a["cfg_scale"], a["cfg_interval"]) == ("heun", 2, 1.5, [0.0, 0.7])
    assert (b["method"], b["steps"], b["cfg_scale"]) == ("sde", 3, 1.0)  # the file's defaults fill what it leaves open
    assert main(argv + ["--steps", "5"]) == 2  # the sweep file sets the sampler: a solver flag beside it is refused


def test_a_replaced_checkpoint_is_refused_a_moved_one_resumes(ckpt, tmp_path, capsys):
    """Provenance is the weights' digest, not the path: new weights at the same path cannot join an old set."""
    out = tmp_path / "samples"
    argv = _argv(ckpt, out)
    assert main(argv) == 0
    (out / "8x8" / "000001.png").unlink()
    moved = tmp_path / "moved.ckpt"
    ckpt.rename(moved)
    assert main(_argv(moved, out)) == 0  # same weights elsewhere: resumes
    _fake_ckpt(ckpt, live_offset=0.0)
    state = torch.load(ckpt, weights_only=True)
    state["ema_state_dict"]["final_layer.linear.bias"] += 1.0  # another model saved as last.ckpt
    torch.save(state, ckpt)
    (out / "8x8" / "000002.png").unlink()
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "another model" in err and "weights_sha256" in err and "Traceback" not in err
    assert not (out / "8x8" / "000002.png").exists()  # nothing of the other model was written


def test_user_errors_are_one_line(ckpt, tmp_path, capsys):
    out = str(tmp_path / "s")
    cases = {
        "not a multiple": ["--sizes", "9x6"],
        "num_samples": ["--sizes", "8x8", "--num-samples", "0"],
        "steps=0": ["--sizes", "8x8", "--steps", "0"],
        "does not exist": ["--sizes", "8x8", "--ckpt", str(tmp_path / "missing.ckpt")],
        "0 <= lo <= hi <= 1": ["--sizes", "8x8", "--interval", "0.7,0.2"],
        "not a finite number": ["--sizes", "8x8", "--cfg", "nan"],
        "makes 48-channel latents": ["--sizes", "8x8", "--codec", "pixel:4"],
        "is now spelled --num-samples": ["--sizes", "8x8", "--num_samples", "3"],
    }
    if not torch.cuda.is_available():
        cases["CUDA is not available"] = ["--sizes", "8x8", "--device", "cuda"]
    for message, extra in cases.items():
        argv = ["--ckpt", str(ckpt), "--out", out, "--no-progress", "--device", "cpu", *extra]
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse's own errors
            code = stop.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (message, err)


def test_non_finite_samples_raise_naming_the_images(ckpt):
    pipeline = load_pipeline(ckpt)
    with torch.no_grad():
        pipeline.net.final_layer.linear.bias[0] = float("nan")
    requests = [ImageRequest(i, (8, 8), i % NUM_CLASSES, i) for i in (4, 9)]
    with pytest.raises(NonFiniteSamples, match=r"2 of 2 images .*indices \[4, 9\]"):
        next(generate(pipeline, requests, SamplerSettings(steps=2)))


def test_official_safetensors_plumbing(tmp_path):
    """An official-named safetensors file loads strictly with the reference RoPE layout; its size is read off the file."""
    from safetensors.torch import save_file

    from nit_lightning.models import official_state_dict

    src = build_nit("NiT-debug", in_channels=12, rope_layout="reference")
    for p in src.parameters():
        p.data.normal_(0, 0.1)
    save_file({k: v.contiguous() for k, v in official_state_dict(src).items()}, str(tmp_path / "model.safetensors"))
    gen = load_pipeline(tmp_path / "model.safetensors", codec="pixel:2")
    assert gen.net.config.rope_layout == "reference" and gen.meta["weights"].startswith("official")
    assert (gen.net.config.depth, gen.net.config.hidden_size, gen.net.config.num_heads) == (2, 64, 2)
    for (k, a), b in zip(src.state_dict().items(), gen.net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_temporary_files_are_per_process(ckpt, tmp_path):
    """Another run's temporary files in the folder (same names, other process id) neither collide nor get touched."""
    out = tmp_path / "s"
    folder = out / "8x8"
    folder.mkdir(parents=True)
    foreign = [folder / "samples_2x8x8x3.npz.99999.tmp", folder / "000000.png.99999.tmp"]
    for path in foreign:
        path.write_bytes(b"another process is writing this")
    argv = ["--ckpt", str(ckpt), "--sizes", "8x8", "--num-samples", "2", "--steps", "2", "--out", str(out),
            "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    assert all(path.read_bytes() == b"another process is writing this" for path in foreign)
    assert np.load(folder / "samples_2x8x8x3.npz")["arr_0"].shape == (2, 8, 8, 3)


def test_a_codec_passed_by_hand_must_be_the_recorded_one(tmp_path):
    """Before: a codec of another kind with the same channel count was taken without a word (the images are noise)."""
    from nit_lightning.data.tinyae import TinyAE, TinyAEConfig, save_tinyae

    ckpt = write_lightning_checkpoint(tmp_path / "a.ckpt", random_debug_net())  # trained on pixel:2 (12 channels)
    torch.manual_seed(1)
    save_tinyae(TinyAE(TinyAEConfig(latent_channels=12, factor=2, width=8, blocks=0)), tmp_path / "ae.pt",
                scaling_factor=1.0, report={})
    with pytest.raises(ValueError, match=r"--codec tinyae is not the codec .*a.ckpt was trained with \(.*type 'pixel' "
                                         r"-> 'tinyae'"):
        load_pipeline(ckpt, codec=f"tinyae:{tmp_path / 'ae.pt'}")
    assert load_pipeline(ckpt, codec="pixel:2").codec.describe() == PixelCodec(2).describe()  # the same one: fine


def test_a_sample_folder_of_the_format_before_records_still_resumes(ckpt, tmp_path):
    """provenance.json written before records (a flat dict; sampler `dtype`, precision `fp32`) is read in today's words."""
    import json

    out = tmp_path / "samples"
    assert main(_argv(ckpt, out)) == 0
    path = out / "8x8" / "provenance.json"
    record = SettingsRecord.read(path, "sample-set")
    sampler = dict(record.settings["sampler"])
    sampler["dtype"], sampler["precision"] = sampler.pop("integration_dtype"), "fp32"
    path.write_text(json.dumps({**record.settings, "sampler": sampler, **record.info}))
    (out / "8x8" / "000003.png").unlink()
    assert main(_argv(ckpt, out)) == 0 and (out / "8x8" / "000003.png").exists()
