"""The prompts of a text-to-image sample folder: DIR/prompts.jsonl, one line per image, written by `sample --prompts`.

Each line is a JSON object with at least "file" (relative to DIR) and "prompt"; "height", "width", "seed" and any other
key (e.g. the COCO image id that `coco-prompts` carries through) are read past. The listed files must be exactly the
folder's images, apart from the folder's own grid.png (the picture `sample --prompts` draws of it): FID and the CLIP
score both read the listed images, so both see the same set (never silently more or fewer).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from nit_lightning.data.imageops import read_rgb
from nit_lightning.data.listing import list_images
from nit_lightning.generation.prompt_set import GRID_NAME, PROMPTS_NAME

PROMPTS_FILE = PROMPTS_NAME


@dataclass(frozen=True)
class SamplePrompt:
    """One generated image and the prompt it was made from."""

    file: Path
    prompt: str


def read_sample_prompts(folder: str | Path) -> list[SamplePrompt]:
    """DIR/prompts.jsonl as (image path, prompt) in the file's order; a missing or inconsistent file is one line."""
    folder = Path(folder)
    path = folder / PROMPTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found: the CLIP score needs the prompt of every image; a folder "
                                "written by `sample --prompts FILE` has it (one JSON line per image: file, prompt)")
    records, seen = [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            raise ValueError(f"{path}:{number} is empty; every line of {PROMPTS_FILE} describes one image")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not JSON ({error.msg}); expected {{\"file\": ..., \"prompt\": ...}}"
                             ) from error
        if not isinstance(row, dict) or not isinstance(row.get("file"), str) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{number} needs a string \"file\" and a string \"prompt\", got "
                             f"{line.strip()[:120]}")
        if row["file"] in seen:
            raise ValueError(f"{path}:{number} lists {row['file']!r} a second time")
        seen.add(row["file"])
        records.append(SamplePrompt(folder / row["file"], row["prompt"]))
    if not records:
        raise ValueError(f"{path} lists no images")
    missing = [r.file for r in records if not r.file.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images listed in {path} are not in the folder (e.g. "
                                f"{missing[0].relative_to(folder).as_posix()!r})")
    unlisted = sorted({p.relative_to(folder).as_posix() for p in list_images(folder)} - seen - {GRID_NAME})
    if unlisted:
        raise ValueError(f"{len(unlisted)} images of {str(folder)!r} have no line in {PROMPTS_FILE} (e.g. "
                         f"{unlisted[0]!r}); FID would count them and the CLIP score could not: remove them or list "
                         "them")
    return records


def iter_prompt_batches(records: list[SamplePrompt], batch_size: int = 64
                        ) -> Iterator[tuple[list[np.ndarray], list[str]]]:
    """(images at their own sizes as uint8 (H, W, 3), prompts) batches in the records' order."""
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        yield [read_rgb(r.file) for r in chunk], [r.prompt for r in chunk]
