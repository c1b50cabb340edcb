"""`evaluate` and `sweep`: metrics of a sample set, per-setting resume, failure isolation, the real sample command."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml

from helpers.nets import random_debug_net, write_lightning_checkpoint
from nit_lightning.cli import evaluate as evaluate_cmd
from nit_lightning.cli import sweep as sweep_cmd
from nit_lightning.evaluation.arrays import nhwc_to_tensor
from nit_lightning.evaluation.evaluate import evaluate_samples
from nit_lightning.evaluation.extractors import load_feature_extractor
from nit_lightning.evaluation.featurenet import FeatureNet, FeatureNetConfig, save_featurenet
from nit_lightning.evaluation.reference import Reference, save_reference
from nit_lightning.evaluation.sweep import run_sweep, write_results
from nit_lightning.generation.settings import load_sweep


@pytest.fixture
def features(tmp_path) -> str:
    torch.manual_seed(0)
    # narrow widths: 64-d pool, 128-d spatial keep scipy sqrtm fast (256-d: 0.75 s a call here)
    save_featurenet(FeatureNet(FeatureNetConfig(num_classes=3, size=16, widths=[8, 16, 32, 64])), tmp_path / "fnet.pt",
                    classes=["a", "b", "c"], report={})
    return f"featurenet:{tmp_path / 'fnet.pt'}"


def _images(n: int, h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def _reference(path, spec: str, h: int, w: int, n: int = 40, seed: int = 0) -> None:
    """A reference batch made directly from random images with `spec`'s extractor."""
    extractor = load_feature_extractor(spec)
    images = _images(n, h, w, seed)
    f = extractor(nhwc_to_tensor(images))
    pool, spatial = f["pool"].double().numpy(), f["spatial"].double().numpy()
    save_reference(path, Reference(mu=pool.mean(0), sigma=np.cov(pool, rowvar=False), mu_s=spatial.mean(0),
                                   sigma_s=np.cov(spatial, rowvar=False), images=images,
                                   meta={"extractor": extractor.name, "size": [h, w]}))


def test_evaluate_cli_json_and_sanity(tmp_path, features):
    _reference(tmp_path / "ref.npz", features, 16, 24)
    np.savez(tmp_path / "same.npz", arr_0=_images(40, 16, 24, 0))  # the very images of the reference
    np.savez(tmp_path / "other.npz", arr_0=np.zeros((30, 16, 24, 3), np.uint8) + 200)
    assert evaluate_cmd.main(["--samples", str(tmp_path / "same.npz"), "--ref", str(tmp_path / "ref.npz"),
                              "--features", features, "--out", str(tmp_path / "res.json")]) == 0
    res = json.loads((tmp_path / "res.json").read_text())
    assert abs(res["fid"]) < 1e-3 and abs(res["sfid"]) < 1e-3 and res["num_samples"] == 40
    assert res["precision"] == 1.0 and res["recall"] == 1.0 and "NOT the FID Inception" in res["warning"]
    assert res["settings"]["features"] == features
    other = evaluate_samples(tmp_path / "other.npz", tmp_path / "ref.npz", load_feature_extractor(features))
    assert other["fid"] > 100 * abs(res["fid"]) + 1e-9 and other["num_samples"] == 30  # untrained net: small scale
    np.savez(tmp_path / "big.npz", arr_0=_images(4, 32, 32, 1))
    with pytest.raises(ValueError, match="samples are 32x32 but reference"):
        evaluate_samples(tmp_path / "big.npz", tmp_path / "ref.npz", load_feature_extractor(features))


def test_evaluate_png_folder_equals_npz(tmp_path, features):
    from PIL import Image

    _reference(tmp_path / "ref.npz", features, 16, 16)
    images = _images(12, 16, 16, 5)
    np.savez(tmp_path / "s.npz", arr_0=images)
    (tmp_path / "pngs").mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "pngs" / f"{i:06d}.png")
    extractor = load_feature_extractor(features)
    a = evaluate_samples(tmp_path / "s.npz", tmp_path / "ref.npz", extractor)
    b = evaluate_samples(tmp_path / "pngs", tmp_path / "ref.npz", extractor)
    assert a["fid"] == pytest.approx(b["fid"]) and a["is"] == pytest.approx(b["is"])


def _sweep_file(path, sizes) -> None:
    settings = [{"size": s, "method": "euler", "steps": 2, "cfg_scale": 1.5, "cfg_interval": [0.0, 0.7],
                 "published": {"fid": 1.0, "sfid": 2.0, "is": 3.0, "precision": 0.5, "recall": 0.5}} for s in sizes]
    path.write_text(yaml.safe_dump({"name": "toy", "settings": settings}))


def test_sweep_resume_failure_isolation_and_tables(tmp_path, features):
    """A stubbed run_sample: one setting lacks its reference and fails, the other finishes and is reused later."""
    _sweep_file(tmp_path / "toy.yaml", ["16x16", "16x32"])
    (tmp_path / "refs").mkdir()
    _reference(tmp_path / "refs" / "16x16.npz", features, 16, 16)
    calls = []

    def stub(setting, out_dir):
        calls.append(setting.name)
        h, w = setting.size
        path = out_dir / setting.name / "samples.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, arr_0=_images(10, h, w, 9))
        return path

    extractor = load_feature_extractor(features)
    kwargs = dict(ref_dir=tmp_path / "refs", out=tmp_path / "out", num=10, extractor=extractor, sample_fn=stub)
    summary = run_sweep(load_sweep(tmp_path / "toy.yaml"), **kwargs)
    assert summary["results"]["16x16"]["status"] == "ok"
    assert summary["results"]["16x32"]["status"] == "failed" and "16x32.npz" in summary["results"]["16x32"]["error"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| 16x16 | euler 2 | 2 (1 with CFG) | 1.5 | [0, 0.7] | 10 |" in table and "(1.00)" in table and "failed" in table
    assert json.loads((tmp_path / "out" / "results.json").read_text())["num"] == 10
    assert list((tmp_path / "out" / "tb").iterdir())
    _reference(tmp_path / "refs" / "16x32.npz", features, 16, 32)
    calls.clear()
    summary = run_sweep(load_sweep(tmp_path / "toy.yaml"), **kwargs)
    assert calls == ["16x32"]  # the finished 16x16 was reused, not resampled
    assert all(r["status"] == "ok" for r in summary["results"].values())
    calls.clear()
    run_sweep(load_sweep(tmp_path / "toy.yaml").select(["16x32"]), **kwargs)
    assert calls == []
    # an extra metric is a column and a TensorBoard scalar; adding one redoes the settings (their record differs)
    summary = run_sweep(load_sweep(tmp_path / "toy.yaml"), **kwargs,
                        extra_metrics={"mean_px": lambda npz: np.load(npz)["arr_0"].mean() / 255})
    assert calls == ["16x16", "16x32"]
    assert all(0 < r["metrics"]["mean_px"] < 1 for r in summary["results"].values())
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| Rec | mean_px |" in table and table.count("|---") == 12


@pytest.mark.slow
def test_sweep_cli_end_to_end_with_the_sample_command(tmp_path, features, capsys):
    write_lightning_checkpoint(tmp_path / "last.ckpt", random_debug_net())
    _sweep_file(tmp_path / "toy.yaml", ["16x16", "8x24"])
    (tmp_path / "refs").mkdir()
    _reference(tmp_path / "refs" / "16x16.npz", features, 16, 16)
    _reference(tmp_path / "refs" / "8x24.npz", features, 8, 24)
    argv = ["--sweep", str(tmp_path / "toy.yaml"), "--ckpt", str(tmp_path / "last.ckpt"), "--ref-dir",
            str(tmp_path / "refs"), "--num-samples", "6", "--out", str(tmp_path / "out"), "--features", features,
            "--device", "cpu"]
    assert sweep_cmd.main(argv) == 0
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    for size in ("16x16", "8x24"):
        metrics = summary["results"][size]["metrics"]
        assert metrics["num_samples"] == 6 and np.isfinite(metrics["fid"]) and 0 <= metrics["precision"] <= 1
    assert (tmp_path / "out" / "samples" / "8x24").is_dir()
    assert sweep_cmd.main(argv + ["--sizes", "8x24"]) == 0  # reused, nothing resampled
    for old, new in (("--ref-dir", "--ref_dir"), ("--num-samples", "--num")):  # the old spellings name the new ones
        with pytest.raises(SystemExit) as stop:
            sweep_cmd.main([new if a == old else a for a in argv])
        assert stop.value.code == 2 and f"{new} is now spelled {old}" in capsys.readouterr().err


def test_evaluation_callback_logs_metrics_and_is_rank_count_invariant(tmp_path, features):
    """The training callback with a stub trainer: EMA swapped in, metrics logged, ranks 0+1 == one rank."""
    from types import SimpleNamespace

    from nit_lightning.data.codecs import PixelCodec
    from nit_lightning.distributed import Ranks
    from nit_lightning.evaluation.evaluate import sample_feature_stats
    from nit_lightning.generation.pipeline import Pipeline
    from nit_lightning.generation.settings import setting_from_dict
    from nit_lightning.training.periodic_eval import EvaluationCallback

    net = random_debug_net()
    (tmp_path / "refs").mkdir()
    _reference(tmp_path / "refs" / "8x8.npz", features, 8, 8)
    setting = {"size": "8x8", "method": "euler", "steps": 2, "cfg_scale": 1.5, "cfg_interval": [0.0, 0.7]}
    extractor = load_feature_extractor(features)
    pipeline = Pipeline(net=net.eval(), codec=PixelCodec(2))
    one = sample_feature_stats(pipeline, setting_from_dict(setting), extractor, num=6)
    parts = [sample_feature_stats(pipeline, setting_from_dict(setting), extractor, num=6, ranks=Ranks(r, 2))
             for r in (0, 1)]
    torch.testing.assert_close(parts[0].pool_total + parts[1].pool_total, one.pool_total)
    assert int(parts[0].count + parts[1].count) == 6

    swaps, logged = [], []

    class FakeEMA:
        def swapped_in(self, module):
            swaps.append(module)
            return __import__("contextlib").nullcontext()

    logger = SimpleNamespace(log_metrics=lambda scalars, step: logged.append((step, scalars)))
    trainer = SimpleNamespace(global_step=5, global_rank=0, world_size=1, is_global_zero=True, loggers=[logger],
                              callbacks=[FakeEMA()], datamodule=SimpleNamespace(codec_description=PixelCodec(2).describe()))
    module = SimpleNamespace(net=net)
    cb = EvaluationCallback(str(tmp_path / "refs"), every_n_steps=5, settings=[setting], num_samples=6,
                            features=features)
    cb.setup(trainer, module, "fit")
    cb.on_train_batch_end(trainer, module, None, None, 0)
    assert swaps == [module] and logged[0][0] == 5
    assert set(logged[0][1]) == {f"quality/8x8/{k}" for k in ("fid", "sfid", "is", "precision", "recall")}
    assert cb.last_results["8x8"]["num_samples"] == 6
    with pytest.raises(FileNotFoundError, match="16x16.npz"):
        EvaluationCallback(str(tmp_path / "refs"), settings=[{**setting, "size": "16x16"}]).setup(trainer, module, "fit")


def test_evaluate_user_errors_are_one_line(tmp_path, features, capsys):
    """Bad inputs name the file and what is wrong, exit 2, no traceback (issue 13)."""
    _reference(tmp_path / "ref.npz", features, 16, 16)
    np.savez(tmp_path / "s.npz", arr_0=_images(8, 16, 16, 1))
    (tmp_path / "text.npz").write_text("not an archive")
    ref = dict(np.load(tmp_path / "ref.npz"))
    ref["sigma"] = ref["sigma"] * np.nan
    np.savez(tmp_path / "nan_ref.npz", **ref)
    (tmp_path / "pngs").mkdir()
    (tmp_path / "pngs" / "000000.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    base = ["--features", features, "--device", "cpu"]
    cases = {
        "is not a readable .npz": ["--samples", str(tmp_path / "text.npz"), "--ref", str(tmp_path / "ref.npz")],
        "hold NaN or Inf": ["--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "nan_ref.npz")],
        "--batch-size must be >= 1": ["--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"),
                                      "--batch-size", "0"],
        "000000.png": ["--samples", str(tmp_path / "pngs"), "--ref", str(tmp_path / "ref.npz")],
    }
    for message, argv in cases.items():
        assert evaluate_cmd.main(argv + base) == 2, message
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (message, err)


# ---- several runs into one sweep folder: every finished row stays (real processes, finishing together) ---------------
def _one_setting(out, refs, sweep_file, spec, size, barrier, errors) -> None:
    """A process that runs the sweep for one size, like an array task of slurm/sample_eval.sbatch."""
    try:
        def stub(setting, out_dir):
            h, w = setting.size
            path = out_dir / setting.name / "samples.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, arr_0=_images(10, h, w, 9))
            barrier.wait(timeout=120)  # evaluate and write the tables at the same moment as the others
            return path

        run_sweep(load_sweep(sweep_file).select([size]), ref_dir=refs, out=out, num=10,
                  extractor=load_feature_extractor(spec), sample_fn=stub, tb=False)
    except BaseException as error:  # noqa: BLE001  (reported to the parent)
        errors.put(f"{size}: {type(error).__name__}: {error}")
        raise


@pytest.mark.slow
def test_partial_runs_and_parallel_tasks_keep_every_finished_row(tmp_path, features):
    import multiprocessing

    sizes = ["8x8", "16x16", "16x32", "32x16"]
    _sweep_file(tmp_path / "toy.yaml", sizes)
    (tmp_path / "refs").mkdir()
    for size in sizes:
        _reference(tmp_path / "refs" / f"{size}.npz", features, *(int(v) for v in size.split("x")))
    out = tmp_path / "out"
    context = multiprocessing.get_context("spawn")
    barrier, errors = context.Barrier(1), context.Queue()
    _one_setting(out, tmp_path / "refs", tmp_path / "toy.yaml", features, "8x8", barrier, errors)  # an earlier run
    barrier = context.Barrier(3)
    tasks = [context.Process(target=_one_setting, args=(out, tmp_path / "refs", tmp_path / "toy.yaml", features, size,
                                                         barrier, errors)) for size in sizes[1:]]
    for task in tasks:
        task.start()
    for task in tasks:
        task.join(300)
    assert errors.empty(), errors.get()
    assert [task.exitcode for task in tasks] == [0, 0, 0]
    summary = json.loads((out / "results.json").read_text())
    assert sorted(summary["results"]) == sorted(sizes)  # each task used to rewrite the table with its own row only
    assert all(record["status"] == "ok" for record in summary["results"].values())
    rows = re.findall(r"^\| (\d+x\d+) \|", (out / "results.md").read_text(), flags=re.MULTILINE)
    assert rows == ["8x8", "16x16", "16x32", "32x16"]  # one row each, by height then width
    assert not list(out.glob("*.tmp"))

    # a second task of the same setting that failed (e.g. on the sample folder's lock) does not replace the finished
    # row; a failure with other settings does (its row says what this sweep now is)
    finished = summary["results"]["8x8"]
    failed = {"status": "failed", "config": finished["config"], "error": "RuntimeError: locked by another run"}
    merged = write_results(out, {**summary, "results": {"8x8": failed}}, [])
    assert merged["results"]["8x8"] == finished and merged["results"].keys() == summary["results"].keys()
    other = {**failed, "config": {**finished["config"], "num": 20}}
    assert write_results(out, {**summary, "results": {"8x8": other}}, [])["results"]["8x8"]["status"] == "failed"


def _evaluate_on_rank_zero_only(rank, port, npz, ref, spec, results) -> None:
    """Rank 0 evaluates a whole sample set while rank 1 waits at a barrier (sweep under srun/torchrun)."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    try:
        if rank == 0:
            results.put(evaluate_samples(npz, ref, load_feature_extractor(spec))["fid"])
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_one_rank_evaluates_without_waiting_for_the_others(tmp_path, features):
    """The metrics of a sample set read by one process: no collective over the other ranks, which are sampling the
    next setting (the sharded sweep used to deadlock: an all_gather on rank 0, a barrier on rank 1)."""
    import multiprocessing
    import socket

    _reference(tmp_path / "ref.npz", features, 16, 16)
    np.savez(tmp_path / "s.npz", arr_0=_images(12, 16, 16, 3))
    alone = evaluate_samples(tmp_path / "s.npz", tmp_path / "ref.npz", load_feature_extractor(features))["fid"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ranks = [context.Process(target=_evaluate_on_rank_zero_only,
                             args=(rank, port, tmp_path / "s.npz", tmp_path / "ref.npz", features, results))
             for rank in (0, 1)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(120)
    assert [p.exitcode for p in ranks] == [0, 0]
    assert results.get(timeout=5) == alone
