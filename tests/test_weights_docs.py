"""A path to real weights and data (issue 22, item 6): the README's "Real weights and data" gives the official links and
recipes, every loader of a file the suite never downloads names that section when the file is missing, and the Make
targets pass THREADS on."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers.fit import REPO
from nit_lightning.records.names import WEIGHTS_DOCS

SECTION = "Real weights and data"


def _section() -> str:
    text = (REPO / "README.md").read_text()
    assert f"\n## {SECTION}\n" in text
    return text.split(f"\n## {SECTION}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_section_links_every_file_as_its_project_publishes_it():
    section = _section()
    for link in ("https://huggingface.co/GoodEnough/NiT-XL-Models/resolve/main/model_1000K.safetensors",
                 "https://github.com/WZDTHU/NiT",
                 "https://huggingface.co/mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers",
                 "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
                 "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz",
                 "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/512/VIRTUAL_imagenet512.npz"):
        assert link in section, link
    assert "Recipe 1: official checkpoint" in section and "Recipe 2: ImageNet folder" in section
    for command in ("sample --ckpt", "evaluate --samples", "prepare --input", "fit --config"):
        assert command in section, command
    assert SECTION in WEIGHTS_DOCS


@pytest.mark.parametrize("load", ["dcae", "inception-unset", "inception-missing", "reference", "official", "pipeline",
                                  "images", "sweep-reference"])
def test_a_missing_file_names_the_readme_section(load, tmp_path, monkeypatch):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError) as error:
        if load == "dcae":
            from nit_lightning.data.codecs import DCAECodec

            DCAECodec(str(missing))
        elif load.startswith("inception"):
            from nit_lightning.evaluation.inception import WEIGHTS_ENV, resolve_weights_path

            monkeypatch.delenv(WEIGHTS_ENV, raising=False)
            resolve_weights_path(None if load == "inception-unset" else str(missing))
        elif load == "reference":
            from nit_lightning.evaluation.reference import load_reference

            load_reference(missing / "256x256.npz")
        elif load == "official":
            from nit_lightning.models import build_nit, load_official_checkpoint

            load_official_checkpoint(build_nit("NiT-debug"), missing / "model_1000K.safetensors")
        elif load == "pipeline":
            from nit_lightning.generation.pipeline import load_pipeline

            load_pipeline(missing / "model_1000K.safetensors", codec="pixel:2")
        elif load == "images":
            from nit_lightning.data.listing import list_labelled_images

            list_labelled_images(missing / "imagenet" / "train")
        else:
            from nit_lightning.evaluation.sweep import run_sweep
            from nit_lightning.generation.settings import SamplerSettings, SizeSetting, Sweep

            class Extractor:
                name = "inception-test"

            summary = run_sweep(Sweep((SizeSetting((16, 16), SamplerSettings()),)), ref_dir=missing, out=tmp_path / "o",
                                num=2, extractor=Extractor(), sample_fn=lambda *_: None, tb=False)
            raise FileNotFoundError(summary["results"]["16x16"]["error"])
    assert "README.md, section 'Real weights and data'" in str(error.value), str(error.value)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("target, extra, expected", [
    ("demo", [], "--threads 1"),
    ("demo-ablation", [], "--threads 1"),
    ("eval-res-sweep", [], "--threads 1"),
    ("eval-ar-sweep", ["CKPT=x.ckpt"], "--threads 1"),
    ("test", [], "OMP_NUM_THREADS=1"),
    ("bench", [], "OMP_NUM_THREADS=1"),
])  # fmt: skip
def test_make_targets_pass_threads_on(target, extra, expected):
    def dry_run(*args: str) -> list[str]:
        out = subprocess.run(["make", "-n", "-B", target, *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return [line for line in out.stdout.splitlines() if "nit_lightning" in line or "pytest" in line
                or "bench/" in line]

    with_threads = dry_run("THREADS=1", *extra)
    assert with_threads and all(expected in line for line in with_threads), with_threads
    assert not any(re.search(r"--threads|OMP_NUM_THREADS", line) for line in dry_run(*extra))
