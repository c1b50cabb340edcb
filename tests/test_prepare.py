"""prepare: resize rules with exact sizes, broken inputs counted, every good image once, resume, ranks, labels, flip."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nit_lightning.cli.prepare import main as prepare_main
from nit_lightning.data.codecs import PixelCodec
from nit_lightning.data.imageops import BadImage, center_crop_adm, native_size, resize_native, to_rgb
from nit_lightning.data.listing import list_labelled_images
from nit_lightning.data.prepare import PrepareSettings, reindex, run_prepare
from nit_lightning.data.shard_reader import ShardReader
from nit_lightning.data.shards import load_index
from nit_lightning.data.synthetic import SynthSettings, write_synthetic

# ---- resize rules (pure geometry, exact sizes) ----

def test_native_sizes_exact():
    assert native_size((100, 50), 32) == ((96, 32), ["resize-to-multiple-of-32 100x50->96x32"])
    assert native_size((64, 96), 32) == ((64, 96), [])
    # 3000×4000 = 12e6 px ≥ 2048²: scale √(4194304/12e6) = 0.59121 -> 1774×2365 -> down to 1760×2336.
    size, ops = native_size((3000, 4000), 32)
    assert size == (1760, 2336) and ops[0] == "area-rescale 3000x4000->1774x2365"
    assert native_size((2048, 2048), 32)[0] == (2048, 2048)  # area exactly 2048²: scale 1
    # 200000×40: the area rescale (×0.7241) squeezes 40 to 29 < 32: that side keeps one multiple.
    assert native_size((200000, 40), 32)[0] == (144800, 32)
    assert native_size((300, 200), 8, max_area=100 * 100)[0] == (120, 80)  # 122.5×81.6 -> 122×82 -> 120×80
    with pytest.raises(BadImage, match="16×40 has a side under one multiple"):
        native_size((16, 40), 32)
    image, change = resize_native(Image.new("RGB", (50, 100)), 32)
    assert image.size == (32, 96) and change.final_hw == (96, 32) and change.orig_hw == (100, 50)


@pytest.mark.parametrize(
    "hw, size, final_ops",
    [
        ((500, 375), 256, ["bicubic-short-side-to-256 500x375->341x256", "centre-crop 341x256->256x256 at (42, 0)"]),
        ((1200, 1600), 256, ["box-halve 1200x1600->600x800", "box-halve 600x800->300x400",
                             "bicubic-short-side-to-256 300x400->256x341", "centre-crop 256x341->256x256 at (0, 42)"]),
        ((1024, 1024), 512, ["box-halve 1024x1024->512x512"]),
        ((128, 96), 256, ["bicubic-short-side-to-256 128x96->341x256", "centre-crop 341x256->256x256 at (42, 0)"]),
    ],
)
def test_fixed_adm_centre_crop_exact(hw, size, final_ops):
    image, change = center_crop_adm(Image.new("RGB", (hw[1], hw[0])), size, multiple=32)
    assert image.size == (size, size) and change.final_hw == (size, size) and change.ops == final_ops
    # Token counts with a factor-32 codec: 256² -> 8×8 = 64 tokens, 512² -> 16×16 = 256 tokens.
    assert (size // 32) ** 2 == {256: 64, 512: 256}[size]


def test_to_rgb_conversions():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    assert to_rgb(rgba)[0].getpixel((0, 0)) == (255, 255, 255) and to_rgb(rgba)[1] == "alpha"
    assert to_rgb(Image.new("CMYK", (4, 4)))[1] == "cmyk"
    assert to_rgb(Image.new("L", (4, 4), 7)) [0].getpixel((1, 1)) == (7, 7, 7)
    grey16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_rgb(grey16)[0].getpixel((0, 0)) == (255, 255, 255) and to_rgb(grey16)[1] == "greyscale-16bit"
    assert to_rgb(Image.new("P", (4, 4)))[1] == "palette"


# ---- prepare on a folder with broken files ----

GOOD = 12
BROKEN = {  # file -> how prepare must count it
    "c001-ring-1/truncated.png": ("skipped", "unreadable"),
    "c001-ring-1/text.jpg": ("skipped", "unreadable"),
    "c002-stripes-2/tiny.png": ("skipped", "too-small"),
    "c000-disc-0/cmyk.jpg": ("converted", "cmyk"),
    "c000-disc-0/grey.png": ("converted", "greyscale"),
    "c002-stripes-2/rgba.png": ("converted", "alpha"),
}


def _make_folder(root: Path, seed: int = 0) -> Path:
    write_synthetic(SynthSettings(out=str(root), num_images=GOOD, num_classes=3, min_side=32, max_side=96, seed=seed))
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(png, "PNG")
    (root / "c001-ring-1/truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (root / "c001-ring-1/text.jpg").write_text("this is not a JPEG")
    Image.new("RGB", (40, 16), (1, 2, 3)).save(root / "c002-stripes-2/tiny.png")
    Image.new("CMYK", (64, 40), (0, 255, 255, 0)).save(root / "c000-disc-0/cmyk.jpg", quality=95)
    Image.new("L", (33, 70), 90).save(root / "c000-disc-0/grey.png")
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[:, 32:] = (0, 0, 255, 255)  # left half transparent (-> white), right half opaque blue
    Image.fromarray(rgba, "RGBA").save(root / "c002-stripes-2/rgba.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _make_folder(tmp_path_factory.mktemp("images"))


def _settings(folder: Path, out: Path, **overrides) -> PrepareSettings:
    base = dict(input=str(folder), output=str(out), mode="native", codec="pixel:32", samples_per_shard=4,
                flip=True, batch_size=3)
    return PrepareSettings(**dict(base, **overrides))


def _samples(out: Path) -> list:
    reader = ShardReader()
    return [sample for tar in sorted(out.glob("*.tar")) for sample in reader.samples(tar)]


def _members(tar: Path) -> bytes:
    return tar.read_bytes()  # shards are byte-identical between runs (mtime 0, fixed plan)


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    result = run_prepare(_settings(folder, out))
    return out, result


def test_counts_every_good_image_once(folder, prepared):
    out, result = prepared
    index = load_index(out)
    counts = index["counts"]
    assert counts["listed"] == GOOD + len(BROKEN) and counts["written"] == GOOD + 3
    assert counts["skipped"] == {"too-small": 1, "unreadable": 2}
    assert counts["converted"] == {"alpha": 1, "cmyk": 1, "greyscale": 1}
    assert counts["ignored_files"] == 1 and index["ignored_files"] == ["synth.json"]
    assert {e["source"]: e["reason"] for e in index["skipped"]} == {
        k: r for k, (kind, r) in BROKEN.items() if kind == "skipped"}
    samples = _samples(out)
    keys = [s.key for s in samples]
    assert len(keys) == len(set(keys)) == index["num_samples"] == GOOD + 3
    good = {p.relative_to(folder).as_posix() for p in folder.rglob("*.png")} | {"c000-disc-0/cmyk.jpg"}
    good -= {k for k, (kind, _) in BROKEN.items() if kind == "skipped"}
    assert sorted(s.meta["source"] for s in samples) == sorted(good)
    classes = json.loads((out / "classes.json").read_text())
    assert all(classes[s.cls] == s.meta["source"].split("/")[0] for s in samples)
    assert index["codec"] == PixelCodec(32).describe() and index["latent_channels"] == 3072
    assert index["num_shards"] == 5 and result["encoded"] == 5  # 18 listed / 4 per shard
    assert sum(index["length_histogram"].values()) == GOOD + 3


def test_native_sizes_and_conversions_in_shards(prepared):
    out, _ = prepared
    for sample in _samples(out):
        h, w = sample.meta["orig_size"]
        assert tuple(32 * s for s in sample.meta["latent_hw"]) == native_size((h, w), 32)[0]
        assert sample.latent.dtype == torch.float16
        if sample.meta["source"].endswith("rgba.png"):
            image = PixelCodec(32).decode(sample.latent[None].float())[0]  # (3, 64, 64)
            assert torch.allclose(image[:, :, :32], torch.ones(3, 64, 32))  # transparent -> white
            assert torch.allclose(image[:, :, 32:], torch.tensor([-1.0, -1.0, 1.0])[:, None, None].expand(3, 64, 32))
            assert sample.meta["converted"] == ["alpha"]


def test_flip_latent_is_the_codec_of_the_mirrored_image(prepared):
    out, _ = prepared
    codec = PixelCodec(32)
    for sample in _samples(out):
        image = codec.decode(sample.latent[None].float())
        mirrored = codec.encode(torch.flip(image, dims=[-1]))[0].to(torch.float16)
        assert torch.equal(sample.latent_flip, mirrored)


def test_resume_redoes_only_the_missing_shard(folder, prepared):
    out, _ = prepared
    before = {p.name: (_members(p), p.stat().st_mtime_ns) for p in sorted(out.glob("*.tar"))}
    index_before = load_index(out)
    (out / "shard-000002.tar").unlink()
    (out / "shard-000002.json").unlink()
    result = run_prepare(_settings(folder, out))
    assert result["encoded"] == 1 and result["already_complete"] == 4
    after = {p.name: (_members(p), p.stat().st_mtime_ns) for p in sorted(out.glob("*.tar"))}
    assert all(after[n][0] == before[n][0] for n in before)  # same members, same bytes per member
    assert all(after[n][1] == before[n][1] for n in before if n != "shard-000002.tar")  # others untouched
    assert load_index(out) == index_before
    again = run_prepare(_settings(folder, out))
    assert again["encoded"] == 0 and again["already_complete"] == 5


def test_other_settings_on_the_same_output_are_refused(folder, prepared):
    out, _ = prepared
    with pytest.raises(ValueError, match=r"holds shards made with other settings \(dtype 'float16' -> 'bfloat16'\)"):
        run_prepare(_settings(folder, out, latent_dtype="bfloat16"))


def test_rerun_with_another_prefix_is_refused_and_the_index_keeps_one_run(folder, prepared):
    # Before: the new prefix's shards were written beside the old ones and index.json listed every image twice.
    out, _ = prepared
    index_before = load_index(out)
    with pytest.raises(ValueError, match=r"holds 5 shards that are not part of this plan.*shard-000000.tar.*--prefix"):
        run_prepare(_settings(folder, out, prefix="other"))
    assert not list(out.glob("other-*")) and load_index(out) == index_before


def test_index_lists_only_the_plan_shards(folder, prepared, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared[0], out)
    shutil.copy(out / "shard-000000.tar", out / "stray.tar")
    shutil.copy(out / "shard-000000.json", out / "stray.json")
    with pytest.raises(ValueError, match="holds 1 shards that are not part of this plan .*stray.tar"):
        reindex(out)
    assert prepare_main(["--output", str(out), "--reindex"]) == 2
    (out / "stray.tar").unlink()
    assert reindex(out)["num_samples"] == GOOD + 3


def test_another_input_folder_with_the_same_names_is_refused(folder, prepared, tmp_path):
    # Same file names and count, other pixels: before, the finished shards were kept and new ones mixed in.
    out, _ = prepared
    other = _make_folder(tmp_path / "other", seed=1)
    assert sorted(p.relative_to(other) for p in other.rglob("*")) == sorted(p.relative_to(folder) for p in folder.rglob("*"))
    with pytest.raises(ValueError, match=r"other settings \(files_sha1 \(another input folder, or input files rewritten"):
        run_prepare(_settings(other, out))
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)  # copy2 keeps sizes and times: the same files elsewhere resume
    again = run_prepare(_settings(moved, out))
    assert again["encoded"] == 0 and again["already_complete"] == 5


def test_rank_sharding_matches_single_run(folder, prepared, tmp_path, monkeypatch):
    out, _ = prepared
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    first = run_prepare(_settings(folder, tmp_path))
    assert first["encoded"] == 2 and first["index"] is None  # shards 1, 3; rank 0 not done yet
    monkeypatch.setenv("RANK", "0")
    last = run_prepare(_settings(folder, tmp_path))
    assert last["encoded"] == 3 and last["index"] is not None  # shards 0, 2, 4; the last one writes the index
    for tar in sorted(out.glob("*.tar")):
        assert _members(tmp_path / tar.name) == _members(tar)
    drop = ("source",)
    assert {k: v for k, v in load_index(tmp_path).items() if k not in drop} == \
        {k: v for k, v in load_index(out).items() if k not in drop}


def test_fixed_256_gives_64_tokens_and_command_line(folder, tmp_path):
    code = prepare_main(["--input", str(folder), "--output", str(tmp_path), "--mode", "fixed-256", "--codec",
                         "pixel:32", "--samples-per-shard", "10", "--latent-dtype", "bfloat16"])
    assert code == 0
    index = load_index(tmp_path)
    assert index["length_histogram"] == {"64": GOOD + 3} and index["mode"] == "fixed-256"
    assert index["counts"]["skipped"] == {"too-small": 1, "unreadable": 2}
    sample = _samples(tmp_path)[0]
    assert sample.latent.dtype == torch.bfloat16 and sample.latent.shape == (3072, 8, 8)
    assert prepare_main(["--output", str(tmp_path), "--reindex"]) == 0
    assert load_index(tmp_path) == index
    assert prepare_main(["--input", str(folder), "--output", str(tmp_path / "x"), "--mode", "fixed-100",
                         "--codec", "pixel:32"]) == 2


def test_flat_folder_with_labels_file(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]):
        Image.new("RGB", (48, 40), colour).save(flat / f"img{i}.png")
    (tmp_path / "labels.txt").write_text("# file\tclass\nimg0.png\tzebra\nimg1.png,apple\nimg2.png\tzebra\n"
                                         "gone.png\tapple\n")
    listing = list_labelled_images(flat, tmp_path / "labels.txt")
    assert listing.items == [("img0.png", 1), ("img1.png", 0), ("img2.png", 1)] and listing.classes == ["apple", "zebra"]
    out = tmp_path / "out"
    run_prepare(PrepareSettings(input=str(flat), output=str(out), labels=str(tmp_path / "labels.txt"), codec="pixel:8"))
    index = load_index(out)
    assert index["counts"]["skipped"] == {"missing-file": 1, "no-label": 1} and index["num_samples"] == 3
    assert json.loads((out / "classes.json").read_text()) == ["apple", "zebra"]
    assert {s.meta["source"]: s.cls for s in _samples(out)} == {"img0.png": 1, "img1.png": 0, "img2.png": 1}
    assert _samples(out)[0].latent.shape == (192, 5, 6)  # 40×48 at factor 8


def test_folder_without_classes_needs_labels(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="no class sub-folders; for a flat folder pass --labels"):
        list_labelled_images(tmp_path)


def _shard_bytes(out: Path) -> dict[str, bytes]:
    """Every shard and sidecar of a run (prepare.json and index.json name the run's own settings: left out)."""
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*"))}


@pytest.mark.slow
@pytest.mark.parametrize("workers, batch", [(2, 5), (0, 1), (1, 64)])
def test_shards_do_not_depend_on_batch_size_or_workers(folder, prepared, tmp_path, workers, batch):
    out, _ = prepared  # batch 3, decoded in this process
    result = run_prepare(_settings(folder, tmp_path, num_workers=workers, batch_size=batch))
    assert result["encoded"] == 5 and not result["failed"]
    assert _shard_bytes(tmp_path) == _shard_bytes(out)  # tars and sidecars, byte for byte


def _bench():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "prepare.py"
    spec = importlib.util.spec_from_file_location("bench_prepare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_same_bytes_as_todays_per_window_path(folder, prepared, tmp_path):
    # bench/prepare.py keeps the per-shard loop of before the pipeline: the pipeline must write exactly its bytes.
    out, _ = prepared
    result = _bench().run_today(_settings(folder, tmp_path), processes=0)
    assert result["images"] == GOOD + 3 and _shard_bytes(tmp_path) == _shard_bytes(out)


def _two_sizes(root: Path, count: int = 12) -> Path:
    """`count` images alternating 64×96 and 96×64 (A B A B …): the worst case for grouping consecutive images."""
    (root / "c0").mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (96, 64) if i % 2 else (64, 96), (i * 20, 0, 0)).save(root / "c0" / f"{i:03d}.png")
    return root


def test_equal_sizes_share_codec_calls_across_the_shard(tmp_path):
    images = _two_sizes(tmp_path / "in")
    settings = dict(input=str(images), codec="pixel:32", samples_per_shard=100)
    # batch 4: 6 of each size -> calls of 4 + 2 per size = 4 calls; today's windows of 4 (A B A B) made 2 per window = 6.
    new = run_prepare(PrepareSettings(output=str(tmp_path / "new"), batch_size=4, **settings))
    today = _bench().run_today(PrepareSettings(output=str(tmp_path / "today"), batch_size=4, **settings), processes=0)
    assert (new["codec_calls"], today["codec_calls"]) == (4, 6) and new["images_encoded"] == 12
    # With --flip an image and its mirror share one call: batch 12 holds 6 images of a size and their 6 mirrors.
    flipped = run_prepare(PrepareSettings(output=str(tmp_path / "flip"), batch_size=12, flip=True, **settings))
    assert flipped["codec_calls"] == 2
    assert _shard_bytes(tmp_path / "new") == _shard_bytes(tmp_path / "today")


def test_memory_cap_flushes_early_and_keeps_the_bytes(folder, prepared, tmp_path, monkeypatch):
    from nit_lightning.data import encode

    monkeypatch.setattr(encode, "MAX_PENDING_BYTES", 1)  # nothing may wait: every image goes to the codec at once
    result = run_prepare(_settings(folder, tmp_path))
    assert result["codec_calls"] == result["images_encoded"] == GOOD + 3  # one call per image (and its mirror)
    assert _shard_bytes(tmp_path) == _shard_bytes(prepared[0])


def test_a_codec_failure_fails_its_shard_only(folder, tmp_path, monkeypatch):
    from nit_lightning.data import encode

    real = encode.BucketEncoder.encode

    def failing(self, bucket):
        if bucket[0].shard == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, bucket)

    monkeypatch.setattr(encode.BucketEncoder, "encode", failing)
    result = run_prepare(_settings(folder, tmp_path, num_workers=2))
    assert list(result["failed"]) == [2] and "CUDA out of memory" in result["failed"][2] and result["encoded"] == 4
    assert not (tmp_path / "shard-000002.tar").exists() and not list(tmp_path.glob("*.tmp"))


def test_pixels_become_the_same_floats_by_table_and_by_arithmetic():
    from nit_lightning.data.imageops import _UNIT, image_to_tensor, pixels_to_unit

    values = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pixels_to_unit(values), _UNIT)  # the CPU path is the table's definition, value by value
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 256, size=(2, 3, 37, 53), dtype=np.uint8))
    assert torch.equal(pixels_to_unit(pixels), _UNIT[pixels.long()])  # what a GPU computes, by gather
    image = Image.fromarray(pixels[0].permute(1, 2, 0).numpy())
    old = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).to(torch.float32) / 127.5 - 1.0
    assert torch.equal(image_to_tensor(image), old)  # the conversion of before the pipeline


def test_a_failing_shard_is_reported_and_the_rest_finish(folder, tmp_path, monkeypatch):
    import nit_lightning.data.prepare as prepare_module

    real = prepare_module.close_shard

    def flaky(state, *args):
        if state.shard == 1:
            raise RuntimeError("simulated out-of-memory")
        return real(state, *args)

    monkeypatch.setattr(prepare_module, "close_shard", flaky)
    result = run_prepare(_settings(folder, tmp_path))
    assert list(result["failed"]) == [1] and "simulated out-of-memory" in result["failed"][1]
    assert result["encoded"] == 4 and result["index"] is None and not (tmp_path / "index.json").exists()
    assert not list(tmp_path.glob("*.tmp"))  # the failed shard left nothing half-written
    monkeypatch.setattr(prepare_module, "close_shard", real)
    again = run_prepare(_settings(folder, tmp_path))
    assert again["encoded"] == 1 and load_index(tmp_path)["num_samples"] == GOOD + 3


def test_exif_orientation_is_applied_and_counted(tmp_path):
    from nit_lightning.data.imageops import load_rgb

    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    loaded, conversions = load_rgb(tmp_path / "rotated.jpg")
    assert loaded.size == (20, 40) and conversions == ["exif-orientation"]
    Image.new("RGB", (40, 20)).save(tmp_path / "plain.jpg")
    assert load_rgb(tmp_path / "plain.jpg")[1] == []


def test_max_area_below_one_latent_pixel_is_refused_up_front(folder, tmp_path, capsys):
    # Before: every shard failed with "math domain error" (√ of a negative area) and the command exited 1.
    code = prepare_main(["--input", str(folder), "--output", str(tmp_path / "out"), "--codec", "pixel:32",
                         "--max-area", "-5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--max-area -5 is below one latent pixel (32² = 1024 pixels)" in err[0]
    assert not (tmp_path / "out").exists()


def test_zero_samples_written_is_an_error_and_leaves_no_index(tmp_path, capsys):
    # Before: every image skipped, exit code 0 and an index.json of 0 samples that looked like a prepared folder.
    (tmp_path / "in" / "c0").mkdir(parents=True)
    Image.new("RGB", (40, 16)).save(tmp_path / "in" / "c0" / "tiny.png")
    (tmp_path / "in" / "c0" / "text.jpg").write_text("not a JPEG")
    code = prepare_main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--codec", "pixel:32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "prepare wrote 0 samples: all 2 listed images were skipped (too-small: 1, unreadable: 1)" in err[0]
    assert not (tmp_path / "out" / "index.json").exists()


@pytest.mark.slow
def test_bench_runs_both_paths_and_checks_their_bytes(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "bench" / "prepare.py"), "--images", "8", "--samples-per-shard",
                          "4", "--repeats", "1", "--workers", "2"], capture_output=True, text=True, cwd=tmp_path,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)}, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    table = [line for line in run.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 6 and all(line.endswith("| yes |") for line in table[1:])  # header + 5 runs, same bytes


def test_a_class_folder_that_is_a_link_is_followed_and_a_link_loop_is_counted(tmp_path):
    """Before, a linked class folder was listed in classes.json while none of its images was counted."""
    root, elsewhere = tmp_path / "images", tmp_path / "elsewhere" / "dogs"
    (root / "cats").mkdir(parents=True)
    elsewhere.mkdir(parents=True)
    for folder, n in ((root / "cats", 2), (elsewhere, 3)):
        for i in range(n):
            Image.new("RGB", (64, 32), (i * 40, 0, 0)).save(folder / f"{i}.png")
    (root / "dogs").symlink_to(elsewhere, target_is_directory=True)
    (root / "cats" / "again").symlink_to(root, target_is_directory=True)  # a loop: images/cats/again -> images
    listing = list_labelled_images(root)
    assert listing.classes == ["cats", "dogs"]
    assert [rel for rel, _ in listing.items] == ["cats/0.png", "cats/1.png", "dogs/0.png", "dogs/1.png", "dogs/2.png"]
    assert [(s["source"], s["reason"]) for s in listing.skipped] == [("cats/again", "symlink-loop")]
    result = run_prepare(_settings(root, tmp_path / "out"))
    counts = result["index"]["counts"]
    assert result["index"]["num_samples"] == 5 and counts["skipped"] == {"symlink-loop": 1}
