"""Prompt files of NiT-T2I sampling: what `sample --prompts FILE` reads and how it becomes image requests.

A prompts file is either plain text, one prompt per line, or JSONL (a `.jsonl` file, or one whose first line starts
with `{`): one object per line with `prompt` and optional `height`, `width` (pixels, both or neither) and `seed`.
Other keys (e.g. a COCO image id) are kept and written back beside the image in prompts.jsonl under "meta". A blank
line inside the file, bad JSON, a missing prompt or a bad size is an error naming file:line; nothing is skipped.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from nit_lightning.data.sizes import format_size, validate_size
from nit_lightning.diffusion.sampling import derive_seed
from nit_lightning.generation.images import ImageRequest

RESERVED = ("file", "prompt", "height", "width", "seed")


@dataclass(frozen=True)
class PromptSpec:
    """One line of a prompts file: the prompt, its own size and seed when given, and any other keys."""

    prompt: str
    line: int
    size: tuple[int, int] | None = None
    seed: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def read_prompts(path: str | Path) -> list[PromptSpec]:
    """Every prompt of the file, in order; one-line errors (ValueError) naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"prompts file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    while lines and not lines[-1].strip():  # trailing blank lines: the end of the file, not a missing prompt
        lines.pop()
    if not lines:
        raise ValueError(f"prompts file {path} is empty")
    jsonl = path.suffix == ".jsonl" or lines[0].lstrip().startswith("{")
    specs = []
    for number, raw in enumerate(lines, 1):
        where = f"{path}:{number}"
        if not raw.strip():
            raise ValueError(f"{where}: empty line (one prompt per line; an empty prompt is not a prompt)")
        specs.append(_parse_json(raw, where, number) if jsonl else PromptSpec(raw.strip(), number))
    return specs


def _parse_json(raw: str, where: str, number: int) -> PromptSpec:
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with 'prompt', got {type(row).__name__}")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
    height, width = row.get("height"), row.get("width")
    if (height is None) != (width is None):
        raise ValueError(f"{where}: give both 'height' and 'width' or neither, got height={height!r} width={width!r}")
    size = None
    if height is not None:
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (height, width)):
            raise ValueError(f"{where}: 'height' and 'width' must be positive integers (pixels), got {height!r}, "
                             f"{width!r}")
        size = (height, width)
    seed = row.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"{where}: 'seed' must be a non-negative integer, got {seed!r}")
    meta = {k: v for k, v in row.items() if k not in RESERVED}
    return PromptSpec(prompt.strip(), number, size, seed, meta)


def prompt_requests(specs: Sequence[PromptSpec], sizes: Sequence[tuple[int, int]], *, per_prompt: int = 1,
                    seed: int = 0, multiple: int = 1, source: str = "prompts",
                    round: str | None = None) -> list[ImageRequest]:
    """Image requests in file order: each prompt at its own size, else at every one of `sizes`, `per_prompt` times.

    Image i (its index names its file) gets the prompt's seed (+ k for its k-th repeat), else derive_seed(seed, i):
    the set is the same on any number of GPUs. A size that is not a multiple of `multiple` is an error naming the line.
    """
    if per_prompt < 1:
        raise ValueError(f"--num-samples {per_prompt}: images per prompt and size must be >= 1")
    requests: list[ImageRequest] = []
    for spec in specs:
        if spec.size is None and not sizes:
            raise ValueError(f"{source}:{spec.line}: the prompt has no height/width and no --sizes were given")
        for size in [spec.size] if spec.size is not None else sizes:
            try:
                size = validate_size(size, multiple, round=round)
            except ValueError as error:
                raise ValueError(f"{source}:{spec.line}: size {format_size(size)}: {error}") from None
            for k in range(per_prompt):
                i = len(requests)
                image_seed = spec.seed + k if spec.seed is not None else derive_seed(seed, i)
                requests.append(ImageRequest(i, size, 0, image_seed, prompt=spec.prompt))
    return requests


def prompts_digest(specs: Sequence[PromptSpec]) -> str:
    """What decides the requests besides sizes and seed: a resumed folder must have been made from the same prompts."""
    rows = [[s.prompt, list(s.size) if s.size else None, s.seed] for s in specs]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()
