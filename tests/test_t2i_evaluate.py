"""`evaluate --clip-model`: FID against a reference built from real images at native sizes, plus the CLIP score."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers.clip import clip_folder
from nit_lightning.cli import evaluate as evaluate_cmd
from nit_lightning.cli import reference as reference_cmd
from nit_lightning.evaluation.featurenet import FeatureNet, FeatureNetConfig, save_featurenet

pytest.importorskip("transformers")
PROMPTS = ["a red triangle", "a small blue ring", "an orange disc", "a cat on the table", "green", "a disc"]


@pytest.fixture
def setup(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    save_featurenet(FeatureNet(FeatureNetConfig(num_classes=3, size=16, widths=[8, 16, 32, 64])), tmp_path / "fnet.pt",
                    classes=["a", "b", "c"], report={})
    rng = np.random.default_rng(0)
    real = tmp_path / "real"  # real images at their native sizes and aspect ratios, in sub-folders (like COCO's)
    (real / "sub").mkdir(parents=True)
    for k, (h, w) in enumerate([(48, 64), (64, 40), (30, 30), (80, 50), (33, 47), (40, 100)] * 2):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            real / ("sub" if k % 2 else "") / f"COCO_val2014_{k:012d}.jpg")
    samples = tmp_path / "samples"  # what `sample --prompts` writes: one size here (FID reads one size)
    samples.mkdir()
    with open(samples / "prompts.jsonl", "w") as f:
        for k, prompt in enumerate(PROMPTS):
            Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(samples / f"{k:05d}.png")
            f.write(json.dumps({"file": f"{k:05d}.png", "prompt": prompt, "height": 16, "width": 24, "seed": k,
                                "coco_image_id": 100 + k}) + "\n")
    return tmp_path, f"featurenet:{tmp_path / 'fnet.pt'}", clip_folder(tmp_path)


def test_evaluate_adds_the_clip_score_and_records_the_clip_folder(setup, capsys):
    tmp_path, features, clip = setup
    ref = tmp_path / "ref.npz"
    assert reference_cmd.main(["build", "--images", str(tmp_path / "real"), "--size", "16x24", "--out", str(ref),
                               "--features", features, "--subset", "8", "--device", "cpu"]) == 0
    links = tmp_path / "links"  # a folder of links to real images (coco-prompts --real-dir) reads like the files
    links.mkdir()
    for image in sorted((tmp_path / "real").glob("*.jpg"))[:3]:
        (links / image.name).symlink_to(image)
    assert reference_cmd.main(["build", "--images", str(links), "--size", "16x24", "--out", str(tmp_path / "l.npz"),
                               "--features", features, "--subset", "3", "--device", "cpu"]) == 0
    assert "wrote" in capsys.readouterr().out and np.load(tmp_path / "l.npz")["arr_0"].shape == (3, 16, 24, 3)
    out = tmp_path / "res.json"
    assert evaluate_cmd.main(["--samples", str(tmp_path / "samples"), "--ref", str(ref), "--features", features,
                              "--clip-model", str(clip), "--batch-size", "4", "--device", "cpu",
                              "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["num_samples"] == 6 and np.isfinite(res["fid"]) and res["reference_meta"]["num_images"] == 12
    assert res["clip_score_n"] == 6 and 0 <= res["clip_score"] <= 1 and res["clip_prompts_truncated"] == 0
    assert res["clip_score_x100"] == pytest.approx(100 * res["clip_score"])
    assert res["clip_model"]["path"] == str(clip) and res["settings"]["clip_model"] == str(clip)
    # The CLIP score alone (no --ref): the same number, no FID.
    assert evaluate_cmd.main(["--samples", str(tmp_path / "samples"), "--clip-model", str(clip), "--device", "cpu",
                              "--out", str(tmp_path / "clip.json")]) == 0
    alone = json.loads((tmp_path / "clip.json").read_text())
    assert "fid" not in alone and alone["clip_score"] == pytest.approx(res["clip_score"], abs=1e-6)


def test_evaluate_clip_errors_are_one_line(setup, capsys):
    tmp_path, features, clip = setup
    samples = tmp_path / "samples"
    cases = {
        "--ref REF.npz is required (or --clip-model DIR": ["--samples", str(samples)],
        "CLIP model folder": ["--samples", str(samples), "--clip-model", str(tmp_path / "absent")],
        "needs --samples to be a folder": ["--samples", str(tmp_path / "s.npz"), "--clip-model", str(clip)],
        "prompts.jsonl' not found": ["--samples", str(samples), "--clip-model", str(clip)],
    }
    for message, argv in cases.items():
        if message == "prompts.jsonl' not found":
            (samples / "prompts.jsonl").rename(tmp_path / "prompts.bak")
        assert evaluate_cmd.main(argv + ["--device", "cpu"]) == 2, message
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1, (message, err)


def test_a_sample_prompts_folder_evaluates_with_its_grid_beside_the_samples(setup, tmp_path_factory):
    """The real writer and the real reader joined: `sample --prompts` output (PNGs, prompts.jsonl, grid.png) ->
    evaluate: FID and the CLIP score read the listed samples, not the grid."""
    from helpers.fit import run_command
    from test_t2i_sampling import write_t2i_checkpoint

    tmp_path, features, clip = setup
    ckpt = write_t2i_checkpoint(tmp_path_factory.mktemp("ckpt"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:4]) + "\n")
    out = tmp_path / "made"
    assert run_command(["sample", "--ckpt", str(ckpt), "--prompts", str(prompts), "--sizes", "16x24", "--out",
                        str(out), "--num-samples", "2", "--no-progress"]) == 0
    assert (out / "grid.png").is_file()
    ref = tmp_path / "ref.npz"
    assert reference_cmd.main(["build", "--images", str(tmp_path / "real"), "--size", "16x24", "--out", str(ref),
                               "--features", features, "--subset", "8", "--device", "cpu"]) == 0
    result = tmp_path / "res.json"
    assert evaluate_cmd.main(["--samples", str(out), "--ref", str(ref), "--features", features, "--clip-model",
                              str(clip), "--device", "cpu", "--out", str(result)]) == 0
    res = json.loads(result.read_text())
    assert res["num_samples"] == 8 and res["clip_score_n"] == 8 and np.isfinite(res["fid"])
