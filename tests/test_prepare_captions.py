"""prepare --captions (NiT-T2I data): beside .txt files and a JSONL manifest reach the shards and the packs; missing
captions skipped and counted or kept empty; bad manifests are one line; changed captions refuse a resume; C2I unchanged."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from helpers.shards import write_latent_shards
from nit_lightning.cli.prepare import main as prepare_main
from nit_lightning.data.batch import PackedBatch
from nit_lightning.data.datamodule import NativeLatentDataModule
from nit_lightning.data.prepare import PrepareSettings, run_prepare
from nit_lightning.data.shard_reader import ShardReader, ShardReadError
from nit_lightning.data.shards import load_index
from nit_lightning.data.synthetic_captions import CaptionedSynthSettings, write_captioned_synthetic

NUM = 8  # images of the set: 16..32 px at pixel:8, 4..16 tokens each


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """Flat: NNNNNNN.png + NNNNNNN.txt, captions.jsonl and synth.json at the top."""
    out = tmp_path_factory.mktemp("synth")
    write_captioned_synthetic(CaptionedSynthSettings(out=str(out), num_images=NUM, min_side=16, max_side=32))
    return out


def _copy(synth: Path, to: Path) -> Path:
    shutil.copytree(synth, to)  # copy2: same times, so files_sha1 equals the original's
    return to


def _samples(out: Path) -> list:
    reader = ShardReader()
    return [sample for tar in sorted(out.glob("*.tar")) for sample in reader.samples(tar)]


def _truth(folder: Path) -> dict[str, str]:
    """source (relative to the set's top) -> caption, from the set's own captions.jsonl."""
    lines = (folder / "captions.jsonl").read_text().splitlines()
    return {entry["file"]: entry["caption"] for entry in map(json.loads, lines)}


def _prepare(*args: str) -> int:
    return prepare_main([*args, "--codec", "pixel:8", "--samples-per-shard", "3"])


def _packs(out: Path, **options) -> list[PackedBatch]:
    dm = NativeLatentDataModule(sources=[{"path": str(out)}], tokens_per_pack=64, num_workers=0, seed=0,
                                buffer_size=0, **options)
    dm.override_distributed(0, 1)
    return list(dm.train_dataloader())


def _check_packs(out: Path, truth: dict[str, str], **options) -> int:
    """Every image's caption in every pack, in batch order, equals the caption of its source; returns images seen."""
    by_key = {s.key: s.meta["source"] for s in _samples(out)}
    seen = 0
    for batch in _packs(out, **options):
        assert batch.captions is not None and len(batch.captions) == batch.num_images
        assert batch.captions == [truth[by_key[key.rsplit("/", 1)[-1]]] for key in batch.keys]
        seen += batch.num_images
    return seen


def test_beside_captions_reach_the_shards_and_the_packs(synth, tmp_path):
    out = tmp_path / "out"
    assert _prepare("--input", str(synth), "--output", str(out), "--captions", "beside", "--flip") == 0
    index, truth = load_index(out), _truth(synth)
    assert index["captions"] == "beside" and index["num_samples"] == NUM and index["num_classes"] == 0
    assert index["counts"]["skipped"] == {} and index["counts"]["empty_captions"] == 0
    # The .txt files are the captions, not noise; the manifest and synth.json are the only other files.
    assert index["ignored_files"] == ["captions.jsonl", "synth.json"]
    samples = _samples(out)
    assert {s.meta["source"]: s.caption for s in samples} == truth and all(s.cls == 0 for s in samples)
    assert json.loads((out / "classes.json").read_text()) == []
    assert _check_packs(out, truth, flip_prob=1.0) == NUM  # mirrored latents keep their caption


def test_captions_travel_to_decode_workers_and_give_the_same_bytes(synth, tmp_path):
    here, workers = tmp_path / "here", tmp_path / "workers"
    assert _prepare("--input", str(synth), "--output", str(here), "--captions", "beside") == 0
    assert _prepare("--input", str(synth), "--output", str(workers), "--captions", "beside", "--num-workers", "2") == 0
    assert {p.name: p.read_bytes() for p in here.glob("shard-*")} == \
        {p.name: p.read_bytes() for p in workers.glob("shard-*")}


def test_a_manifest_of_a_split_set_captions_its_own_folder(tmp_path):
    # captions.jsonl lies at the set's top, its files in train/ and val/: --input train/ takes train's entries only.
    root = tmp_path / "split"
    write_captioned_synthetic(CaptionedSynthSettings(out=str(root), num_images=NUM, min_side=16, max_side=32,
                                                     val_fraction=0.25))
    out = tmp_path / "out"
    assert _prepare("--input", str(root / "train"), "--output", str(out), "--captions",
                    str(root / "captions.jsonl")) == 0
    index = load_index(out)
    train = {k.removeprefix("train/"): v for k, v in _truth(root).items() if k.startswith("train/")}
    assert index["captions"] == "manifest" and index["num_samples"] == len(train) == NUM - 2
    assert index["ignored_files"] == [f"{name[:-4]}.txt" for name in sorted(train)]  # beside files: unused here
    assert {s.meta["source"]: s.caption for s in _samples(out)} == train
    assert _check_packs(out, train) == len(train)


def test_a_missing_caption_is_skipped_and_counted_or_kept_empty(synth, tmp_path):
    folder = _copy(synth, tmp_path / "in")
    (folder / "0000001.txt").unlink()
    (folder / "0000004.txt").write_text("  \n")  # empty after stripping: no caption either
    out = tmp_path / "skip"
    assert _prepare("--input", str(folder), "--output", str(out), "--captions", "beside") == 0
    index = load_index(out)
    assert index["counts"]["skipped"] == {"no-caption": 2} and index["num_samples"] == NUM - 2
    assert {(e["source"], e["detail"]) for e in index["skipped"]} == {
        ("0000001.png", "no 0000001.txt beside it"), ("0000004.png", "0000004.txt is empty")}
    assert index["counts"]["listed"] == NUM and "0000004.txt" not in index["ignored_files"]

    kept = tmp_path / "empty"
    assert _prepare("--input", str(folder), "--output", str(kept), "--captions", "beside",
                    "--missing-caption", "empty") == 0
    index = load_index(kept)
    assert index["counts"]["skipped"] == {} and index["counts"]["empty_captions"] == 2
    captions = {s.meta["source"]: s.caption for s in _samples(kept)}
    assert captions["0000001.png"] == captions["0000004.png"] == "" and len(captions) == NUM
    truth = {**_truth(synth), "0000001.png": "", "0000004.png": ""}
    assert _check_packs(kept, truth) == NUM


def test_manifest_entries_without_an_image_are_counted(synth, tmp_path):
    manifest = tmp_path / "m.jsonl"
    lines = [json.dumps({"file": f"in/{f}", "caption": c}) for f, c in _truth(synth).items()]
    manifest.write_text("\n".join(lines[1:] + [json.dumps({"file": "in/gone.png", "caption": "x"})]) + "\n")
    _copy(synth, tmp_path / "in")
    out = tmp_path / "out"
    assert _prepare("--input", str(tmp_path / "in"), "--output", str(out), "--captions", str(manifest)) == 0
    index = load_index(out)
    assert index["counts"]["skipped"] == {"missing-file": 1, "no-caption": 1}
    assert index["counts"]["listed"] == NUM + 1 and index["num_samples"] == NUM - 1


@pytest.mark.parametrize("line, message", [
    ('{"file": "0000000.png", "caption": "a red disc"', "m.jsonl:2: not JSON"),
    ('{"file": "0000000.png", "text": "a red disc"}', 'm.jsonl:2: needs the string keys "file" and "caption"'),
    ('{"file": "0000000.png", "caption": 7}', 'm.jsonl:2: needs the string keys "file" and "caption"'),
    ('{"file": "0000001.png", "caption": "another"}', "m.jsonl:2: '0000001.png' has two captions (the other on line 1)"),
])
def test_a_bad_manifest_line_is_one_line_and_exit_2(synth, tmp_path, capsys, line, message):
    folder = _copy(synth, tmp_path / "in")
    manifest = folder / "m.jsonl"  # its "file" paths are relative to its own folder
    manifest.write_text('{"file": "0000001.png", "caption": "a red disc"}\n' + line + "\n")
    code = _prepare("--input", str(folder), "--output", str(tmp_path / "out"), "--captions", str(manifest))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "index.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--captions", "beside", "--labels", "x.txt"], "--labels x.txt and --captions beside exclude each other"),
    (["--missing-caption", "empty"], "--missing-caption empty is for captioned folders: pass --captions"),
    (["--captions", "nowhere.jsonl"], "--captions nowhere.jsonl: no such manifest file"),
    (["--captions", "{elsewhere}"], "none of the 1 entries of"),
])
def test_option_errors_are_one_line(synth, tmp_path, capsys, args, message):
    (tmp_path / "m.jsonl").write_text('{"file": "0000001.png", "caption": "a red disc"}\n')
    args = [arg.format(elsewhere=tmp_path / "m.jsonl") for arg in args]  # beside the folder, not inside it
    code = _prepare("--input", str(synth), "--output", str(tmp_path / "out"), *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_a_changed_caption_refuses_the_resume(synth, tmp_path):
    folder = _copy(synth, tmp_path / "in")
    out = tmp_path / "out"
    settings = PrepareSettings(input=str(folder), output=str(out), codec="pixel:8", samples_per_shard=3,
                               captions="beside")
    assert run_prepare(settings)["encoded"] == 3
    assert run_prepare(settings)["already_complete"] == 3  # the same captions resume
    text = folder / "0000002.txt"
    stat = text.stat()
    text.write_text("a green disc\n")
    os.utime(text, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # only the text changed, not the images
    with pytest.raises(ValueError, match=r"listing_sha1 \(images added, removed, relabelled or recaptioned\)"):
        run_prepare(settings)


def test_class_conditional_prepare_and_packs_carry_no_captions(synth, tmp_path):
    folder = tmp_path / "classes"
    (folder / "a").mkdir(parents=True)
    for name in ("0000000", "0000001", "0000002"):
        shutil.copy2(synth / f"{name}.png", folder / "a" / f"{name}.png")
    out = tmp_path / "out"
    assert _prepare("--input", str(folder), "--output", str(out)) == 0
    index = load_index(out)
    assert index["captions"] is None and "empty_captions" not in index["counts"]
    assert all(s.caption is None and "caption" not in s.meta for s in _samples(out))
    assert all(batch.captions is None for batch in _packs(out))


def test_a_pack_of_captioned_and_class_samples_is_refused(synth, tmp_path):
    captioned, plain = tmp_path / "captioned", tmp_path / "plain"
    assert _prepare("--input", str(synth), "--output", str(captioned), "--captions", "beside") == 0
    write_latent_shards(plain, num_samples=4, per_shard=4, channels=192, sides=(2, 3))  # pixel:8's channels
    dm = NativeLatentDataModule(sources=[{"path": str(captioned)}, {"path": str(plain)}], tokens_per_pack=1024,
                                num_workers=0, seed=0, buffer_size=0)
    dm.override_distributed(0, 1)
    with pytest.raises(ShardReadError, match=r"a pack mixes captioned samples .* and samples without a caption"):
        list(dm.train_dataloader())


def test_packed_batch_captions_follow_the_batch():
    hw = torch.tensor([[1, 2], [2, 1]])
    batch = PackedBatch(x=torch.zeros(4, 3), hw=hw, y=torch.zeros(2, dtype=torch.long), seqlens=hw.prod(1),
                        captions=["a red disc", ""])
    assert batch.to("cpu").captions == ["a red disc", ""]
    if torch.cuda.is_available():
        assert batch.pin_memory().captions == ["a red disc", ""]
    with pytest.raises(ValueError, match="1 captions for 2 images"):
        PackedBatch(x=torch.zeros(4, 3), hw=hw, y=torch.zeros(2, dtype=torch.long), seqlens=hw.prod(1), captions=["x"])
