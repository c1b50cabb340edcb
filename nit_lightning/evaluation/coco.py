"""The COCO-2014 zero-shot protocol's prompts: N validation images chosen reproducibly, one of their captions each.

Selection (the same N, seed and captions file give the same prompts on any machine, whatever the JSON's order):
  1. images = those of `images` with at least one non-empty caption in `annotations`, sorted by id;
  2. chosen = numpy default_rng(seed).choice(len(images), N, replace=False), then sorted by id (the file's order);
  3. one caption per chosen image, in that order: the image's captions sorted by annotation id (then text), index
     rng.integers(len(captions)) from the same generator; whitespace runs (COCO's captions end in newlines) become one
     space.
Every prompt asks for the same size (the paper: 1024 px) and carries its COCO image id and file for provenance; its
sampling seed is `sample_seed + k` for the k-th prompt.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PROTOCOL = ("images with a caption sorted by id; default_rng(seed).choice(N, no replacement) sorted by id; one caption "
            "each by rng.integers over the image's captions sorted by annotation id; whitespace collapsed")


@dataclass(frozen=True)
class CocoImage:
    """One validation image and its captions (sorted by annotation id)."""

    id: int
    file_name: str
    height: int
    width: int
    captions: tuple[str, ...]


def _bad(path: Path, what: str) -> ValueError:
    return ValueError(f"COCO captions file {str(path)!r}: {what}; expected captions_val2014.json's layout "
                      "(images [{id, file_name, height, width}], annotations [{image_id, caption}])")


def load_coco_captions(path: str | Path) -> tuple[list[CocoImage], int]:
    """(images with at least one caption, sorted by id; how many images had none) from a COCO captions JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO captions file {str(path)!r} not found; it is annotations/captions_val2014.json "
                                "of COCO's 2014 annotations (annotations_trainval2014.zip)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _bad(path, f"not valid JSON ({error})") from error
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list):
        raise _bad(path, "no 'images' and 'annotations' lists")
    images: dict[int, dict[str, Any]] = {}
    for k, row in enumerate(data["images"]):
        if not (isinstance(row, dict) and isinstance(row.get("id"), int) and isinstance(row.get("file_name"), str)
                and isinstance(row.get("height"), int) and isinstance(row.get("width"), int)):
            raise _bad(path, f"images[{k}] is {json.dumps(row)[:120]}")
        if row["id"] in images:
            raise _bad(path, f"images[{k}] repeats image id {row['id']}")
        images[row["id"]] = row
    captions: dict[int, list[tuple[Any, str]]] = {}
    for k, row in enumerate(data["annotations"]):
        if not (isinstance(row, dict) and isinstance(row.get("image_id"), int) and isinstance(row.get("caption"), str)):
            raise _bad(path, f"annotations[{k}] is {json.dumps(row)[:120]}")
        if row["image_id"] not in images:
            raise _bad(path, f"annotations[{k}] names image id {row['image_id']}, which is not among its images")
        text = " ".join(row["caption"].split())
        if text:
            key = row.get("id", k)  # annotation id (COCO has one); its position otherwise
            captions.setdefault(row["image_id"], []).append((key if isinstance(key, int) else k, text))
    chosen = [CocoImage(i, images[i]["file_name"], images[i]["height"], images[i]["width"],
                        tuple(text for _, text in sorted(captions[i]))) for i in sorted(captions)]
    return chosen, len(images) - len(chosen)


def choose_prompts(images: list[CocoImage], num: int, seed: int, size: tuple[int, int], *,
                   sample_seed: int = 0) -> list[dict[str, Any]]:
    """The protocol (module docstring): `num` prompt records {prompt, height, width, seed, coco_image_id, coco_file}."""
    if num < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num}")
    if num > len(images):
        raise ValueError(f"--num-samples {num} is more than the {len(images)} images with captions in the COCO file")
    rng = np.random.default_rng(seed)
    picked = sorted(int(i) for i in rng.choice(len(images), size=num, replace=False))
    records = []
    for k, index in enumerate(picked):
        image = images[index]
        caption = image.captions[int(rng.integers(len(image.captions)))]
        records.append({"prompt": caption, "height": int(size[0]), "width": int(size[1]), "seed": sample_seed + k,
                        "coco_image_id": image.id, "coco_file": image.file_name})
    return records


def coco_record(captions: str | Path, *, num: int, seed: int, size: tuple[int, int], sample_seed: int,
                available: int, without_captions: int) -> dict[str, Any]:
    """What made a prompts file (written beside it): the captions file by path and digest, and the settings."""
    from nit_lightning.data.saved import file_sha256

    return {"protocol": "COCO-2014 zero-shot prompts", "selection": PROTOCOL,
            "captions": os.path.realpath(captions), "captions_sha256": file_sha256(captions), "num": int(num),
            "seed": int(seed), "size": [int(size[0]), int(size[1])], "sample_seed": int(sample_seed),
            "images_with_captions": int(available), "images_without_captions": int(without_captions)}


def link_real_images(records: list[dict[str, Any]], images_dir: str | Path, out_dir: str | Path) -> int:
    """A folder of links to the chosen real images (the reference's --images); every one must exist."""
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"COCO image folder {str(images_dir)!r} not found (val2014/ of COCO's 2014 images)")
    missing = [r["coco_file"] for r in records if not (images_dir / r["coco_file"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(records)} chosen images are not in {str(images_dir)!r} "
                                f"(e.g. {missing[0]!r}); is it COCO's val2014 folder?")
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = {r["coco_file"] for r in records}
    stale = sorted(p.name for p in out_dir.iterdir() if p.name not in wanted)
    if stale:
        raise ValueError(f"{str(out_dir)!r} holds {len(stale)} files that are not chosen images (e.g. {stale[0]!r}); "
                         "the reference would read them: give an empty or new folder")
    for name in sorted(wanted):
        link, target = out_dir / name, (images_dir / name).resolve()
        if link.is_symlink() and link.resolve() == target:
            continue
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(target)
    return len(wanted)
