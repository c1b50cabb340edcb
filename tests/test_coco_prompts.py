"""`coco-prompts`: the COCO-2014 zero-shot prompts from a tiny fake captions JSON: reproducible, provenance, errors."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from nit_lightning.__main__ import main
from nit_lightning.evaluation.coco import choose_prompts, load_coco_captions
from nit_lightning.evaluation.sample_prompts import read_sample_prompts


def fake_coco(tmp_path, shuffle_seed: int | None = None):
    """12 images (id 100..111), 2-5 captions each, image 105 with none; optionally in another JSON order."""
    images = [{"id": 100 + k, "file_name": f"COCO_val2014_{100 + k:012d}.jpg", "height": 480, "width": 640,
               "license": 3} for k in range(12)]
    annotations, ann_id = [], 1
    for k in range(12):
        if k == 5:
            continue
        for c in range(2 + k % 4):
            annotations.append({"image_id": 100 + k, "id": ann_id, "caption": f"  image {100 + k} caption {c}\n"})
            ann_id += 1
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(images)
        random.Random(shuffle_seed).shuffle(annotations)
    path = tmp_path / f"captions_{shuffle_seed}.json"
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return path


def test_choice_is_reproducible_whatever_the_json_order(tmp_path):
    images, without = load_coco_captions(fake_coco(tmp_path))
    assert without == 1 and [i.id for i in images] == [100 + k for k in range(12) if k != 5]
    assert images[0].captions == ("image 100 caption 0", "image 100 caption 1")  # whitespace collapsed
    first = choose_prompts(images, 6, seed=3, size=(1024, 1024))
    shuffled, _ = load_coco_captions(fake_coco(tmp_path, shuffle_seed=7))
    assert choose_prompts(shuffled, 6, seed=3, size=(1024, 1024)) == first
    ids = [r["coco_image_id"] for r in first]
    assert ids == sorted(ids) and len(set(ids)) == 6 and 105 not in ids
    assert all(r["prompt"].startswith(f"image {r['coco_image_id']} caption ") for r in first)
    assert [r["seed"] for r in first] == list(range(6)) and {(r["height"], r["width"]) for r in first} == {(1024,) * 2}
    assert choose_prompts(images, 6, seed=4, size=(1024, 1024)) != first
    # The rule by hand: choice of positions, sorted, then one caption index each from the same generator.
    rng = np.random.default_rng(3)
    picked = sorted(rng.choice(11, size=6, replace=False))
    assert ids == [images[p].id for p in picked]
    assert [r["prompt"] for r in first] == [images[p].captions[rng.integers(len(images[p].captions))] for p in picked]


def test_command_writes_prompts_provenance_list_and_real_links(tmp_path, capsys):
    captions = fake_coco(tmp_path)
    val = tmp_path / "val2014"
    val.mkdir()
    for k in range(12):
        (val / f"COCO_val2014_{100 + k:012d}.jpg").write_bytes(b"jpeg")
    out = tmp_path / "eval" / "prompts.jsonl"
    argv = ["coco-prompts", "--captions", str(captions), "--num-samples", "4", "--seed", "1", "--size", "512x768",
            "--out", str(out), "--list", str(tmp_path / "chosen.txt"), "--images", str(val),
            "--real-dir", str(tmp_path / "real")]
    assert main(argv) == 0
    assert "4 prompts at 512x768 from 11 captioned images (1 without a caption left out)" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all(r["height"] == 512 and r["width"] == 768 for r in rows)
    meta = json.loads((tmp_path / "eval" / "prompts.jsonl.meta.json").read_text())
    assert meta["num"] == 4 and meta["seed"] == 1 and meta["size"] == [512, 768] and len(meta["captions_sha256"]) == 64
    chosen = (tmp_path / "chosen.txt").read_text().split()
    assert chosen == [r["coco_file"] for r in rows]
    links = sorted(p.name for p in (tmp_path / "real").iterdir())
    assert links == sorted(chosen) and all((tmp_path / "real" / n).resolve() == (val / n) for n in links)
    assert main(argv) == 0  # again: the same files, the links kept
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows


def test_prompts_file_keeps_unknown_keys_readable_by_the_sample_folder_reader(tmp_path):
    """coco_image_id / coco_file ride along to the samples' prompts.jsonl; the CLIP reader reads past them."""
    images, _ = load_coco_captions(fake_coco(tmp_path))
    folder = tmp_path / "samples"
    folder.mkdir()
    with open(folder / "prompts.jsonl", "w") as f:
        for k, r in enumerate(choose_prompts(images, 3, seed=0, size=(64, 64))):
            (folder / f"{k:05d}.png").write_bytes(b"png")
            f.write(json.dumps({"file": f"{k:05d}.png", **r}) + "\n")
    assert [r.file.name for r in read_sample_prompts(folder)] == ["00000.png", "00001.png", "00002.png"]


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    captions = fake_coco(tmp_path)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    no_lists = tmp_path / "nolists.json"
    no_lists.write_text(json.dumps({"images": []}))
    bad_image = tmp_path / "badimage.json"
    bad_image.write_text(json.dumps({"images": [{"id": "x"}], "annotations": []}))
    orphan = tmp_path / "orphan.json"
    orphan.write_text(json.dumps({"images": [], "annotations": [{"image_id": 1, "caption": "a"}]}))
    out = ["--out", str(tmp_path / "p.jsonl")]
    cases = {
        f"captions file '{tmp_path / 'absent.json'}' not found": ["--captions", str(tmp_path / "absent.json")],
        "not valid JSON": ["--captions", str(bad_json)],
        "no 'images' and 'annotations' lists": ["--captions", str(no_lists)],
        "images[0] is {\"id\": \"x\"}": ["--captions", str(bad_image)],
        "annotations[0] names image id 1, which is not among its images": ["--captions", str(orphan)],
        "--num-samples 50 is more than the 11 images with captions": ["--captions", str(captions), "--num-samples",
                                                                       "50"],
        "--num-samples must be >= 1": ["--captions", str(captions), "--num-samples", "0"],
        "size '10y' is not of the form HxW": ["--captions", str(captions), "--size", "10y"],
        "--real-dir and --images go together": ["--captions", str(captions), "--real-dir", str(tmp_path / "r")],
        "chosen images are not in": ["--captions", str(captions), "--num-samples", "2", "--images", str(tmp_path),
                                     "--real-dir", str(tmp_path / "r")],
    }
    for message, argv in cases.items():
        assert main(["coco-prompts", *argv, *out]) == 2, message
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1, (message, err)
    assert not (tmp_path / "p.jsonl").exists()
    with pytest.raises(SystemExit):
        main(["coco-prompts", "--captions", str(captions), "--num", "3", *out])
    assert "--num is now spelled --num-samples" in capsys.readouterr().err


def test_make_eval_t2i_chains_the_commands_with_flags_they_accept(tmp_path):
    """`make -n eval-t2i`: coco-prompts -> sample --prompts -> reference build -> evaluate --clip-model, in that order;
    every command but sample (another branch's) parses its line."""
    import shlex
    import shutil
    import subprocess
    from pathlib import Path

    from nit_lightning.cli import coco_prompts, evaluate, reference

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run(["make", "-n", "-s", "eval-t2i", "STAMP=", "CKPT=t2i.ckpt", "COCO_CAPTIONS=cap.json",
                          "COCO_IMAGES=val2014", "CLIP=clip-vit-l14", f"OUT={tmp_path}", "N=100", "SIZE=512"],
                         cwd=repo, capture_output=True, text=True, check=True)
    lines = [shlex.split(line) for line in run.stdout.splitlines() if "-m nit_lightning" in line]
    assert [line[3] for line in lines] == ["coco-prompts", "sample", "reference", "evaluate"]
    prompts = coco_prompts.build_parser().parse_args(lines[0][4:])
    assert (prompts.num_samples, prompts.size, prompts.real_dir) == (100, "512", f"{tmp_path}/real")
    assert lines[1][4:8] == ["--ckpt", "t2i.ckpt", "--prompts", prompts.out]
    ref = reference.build_parser().parse_args(lines[2][4:])
    assert ref.images == prompts.real_dir and ref.size == "512"
    ev = evaluate.build_parser().parse_args(lines[3][4:])
    assert ev.ref == ref.out and ev.clip_model == "clip-vit-l14" and ev.samples == lines[1][lines[1].index("--out") + 1]
