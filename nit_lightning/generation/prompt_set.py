"""Prompted sample folders of NiT-T2I: prompts -> PNGs at their sizes + prompts.jsonl, resumable, rank-sliced.

Layout: DIR/<index:06d>.png (one image per prompt, size and repeat, in the prompts file's order), DIR/prompts.jsonl
(one line per image: {"file", "prompt", "height", "width", "seed"} + "meta" for any other keys of the input line),
DIR/provenance.json (weights, text encoder, sampler, seed, prompts: a resume with anything else is refused, naming
the difference), DIR/grid.png (sizes x the first prompts) and DIR/done.json (written last). Rank r of W makes images
r, r + W, ...; every image has its own seed, so the set is the same on any number of GPUs.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from nit_lightning import distributed
from nit_lightning.data.sizes import format_size
from nit_lightning.generation.grid import write_grid
from nit_lightning.generation.images import ImageRequest, generate
from nit_lightning.generation.pipeline import Pipeline, load_pipeline
from nit_lightning.generation.prompts import PromptSpec, prompt_requests, prompts_digest
from nit_lightning.generation.recipe import resolve_sampler
from nit_lightning.generation.sample_set import UINT8_RULE, png_path, read_png, write_png
from nit_lightning.generation.settings import SamplerSettings
from nit_lightning.records import SettingsRecord, folder_lock, write_json, write_text

log = logging.getLogger(__name__)
PROMPTS_NAME = "prompts.jsonl"
GRID_NAME = "grid.png"  # the one image of the folder that is not a sample (evaluation reads past it)
GRID_PROMPTS, GRID_SIZES = 8, 6  # the grid shows at most this many prompts (columns) and sizes (rows)


@dataclass
class PromptRun:
    """Everything `run_prompts` needs: a NiT-T2I checkpoint, the prompts, where to write, how to sample."""

    ckpt: str
    out: str
    specs: list[PromptSpec]
    prompts_file: str | None = None
    sizes: list[tuple[int, int]] = field(default_factory=list)  # for prompts without their own height/width
    sampler_flags: dict[str, Any] = field(default_factory=dict)
    rope_interp: bool = True
    per_prompt: int = 1  # images per prompt and size (seeds: the prompt's seed + k, else derived per image)
    seed: int = 0
    tokens_per_forward: int = 16384
    codec: str | None = None
    device: str = "auto"
    use_ema: bool = True
    round: str | None = None


def run_prompts(run: PromptRun, pipeline: Pipeline | None = None) -> Path:
    """Load the pipeline (unless given), resolve the sampler (flags > checkpoint recipe > defaults), write the set."""
    ranks = distributed.current()
    device = distributed.device_for(run.device, ranks.local_rank)
    with folder_lock(run.out, "sample", enabled=ranks.is_main):
        pipe = pipeline or load_pipeline(run.ckpt, use_ema=run.use_ema, device=device, codec=run.codec)
        if pipe.conditioning != "text":
            raise ValueError(f"{run.ckpt} is class-conditional (NiT): --prompts needs a NiT-T2I checkpoint; sample it "
                             "with --sizes")
        requests = prompt_requests(run.specs, run.sizes, per_prompt=run.per_prompt, seed=run.seed,
                                   multiple=pipe.size_multiple, source=run.prompts_file or "prompts", round=run.round)
        metas = [spec.meta for spec in run.specs for _ in range(run.per_prompt * (1 if spec.size else len(run.sizes)))]
        resolved = resolve_sampler(run.sampler_flags, pipe.record.recipe, rope_interp=run.rope_interp)
        log.info("sampler (flag > checkpoint recipe > default): %s", "; ".join(resolved.describe()))
        return write_prompt_set(pipe, run.specs, requests, metas, resolved.sampler, Path(run.out), seed=run.seed,
                                tokens_per_forward=run.tokens_per_forward, ranks=ranks, source=run.ckpt,
                                prompts_file=run.prompts_file)


def prompt_rows(requests: Sequence[ImageRequest], metas: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lines of prompts.jsonl: which file holds which prompt at which size and seed (+ the input's other keys)."""
    rows = []
    for r, meta in zip(requests, metas):
        row = {"file": png_path(Path(""), r.index).name, "prompt": r.prompt, "height": r.size[0], "width": r.size[1],
               "seed": r.seed}
        rows.append({**row, "meta": meta} if meta else row)
    return rows


def write_prompt_set(pipeline: Pipeline, specs: Sequence[PromptSpec], requests: Sequence[ImageRequest],
                     metas: Sequence[dict[str, Any]], sampler: SamplerSettings, folder: Path, *, seed: int,
                     tokens_per_forward: int = 16384, ranks: distributed.Ranks = distributed.Ranks(),
                     source: str | None = None, prompts_file: str | None = None) -> Path:
    """Make this rank's missing images; rank 0 then writes prompts.jsonl, the grid and done.json. Returns prompts.jsonl."""
    if pipeline.conditioning != "text":
        raise ValueError("--prompts needs a text-to-image (NiT-T2I) checkpoint; this one is class-conditional: "
                         "sample it with --sizes")
    folder.mkdir(parents=True, exist_ok=True)
    device = next(pipeline.net.parameters()).device
    sampler = sampler.for_device(device)
    record = SettingsRecord("prompt-set", settings={
        "weights_sha256": pipeline.meta.get("weights_sha256"), "text_encoder": pipeline.text_encoder.describe(),
        "sampler": sampler.as_dict(), "seed": seed, "prompts_sha256": prompts_digest(specs),
        "sizes": sorted({format_size(r.size) for r in requests}), "num_images": len(requests),
        "codec": pipeline.codec.describe(), "uint8_rule": UINT8_RULE,
    }, info={"source": str(Path(source).resolve()) if source else None, "prompts_file": prompts_file,
             "weights": pipeline.meta.get("weights")})
    record.check(folder / "provenance.json", what="samples", ignore={"source", "prompts_file", "weights"},
                 write=ranks.is_main, remedy=f"use another --out or delete {folder}")
    done, path = folder / "done.json", folder / PROMPTS_NAME
    lines = "".join(json.dumps(row) + "\n" for row in prompt_rows(requests, metas))
    complete = done.exists() and path.is_file() and path.read_text(encoding="utf-8") == lines
    if complete and all(png_path(folder, r.index).exists() for r in requests):
        log.info("%s: complete (%d images), nothing to do", folder, len(requests))
        return path
    if done.exists() and ranks.is_main:
        done.unlink()
    todo = [r for r in requests[ranks.rank::ranks.world] if not png_path(folder, r.index).exists()]
    log.info("%s: rank %d/%d makes %d of %d images with %s", folder, ranks.rank, ranks.world, len(todo),
             len(requests), sampler.describe())
    start = time.perf_counter()
    for batch in generate(pipeline, todo, sampler, tokens_per_forward=tokens_per_forward):
        for r, image in zip(batch.requests, batch.images):
            write_png(image, png_path(folder, r.index))
    if todo:
        seconds = time.perf_counter() - start
        log.info("rank %d made %d images in %.1f s = %.2f images/s", ranks.rank, len(todo), seconds, len(todo) / seconds)
    distributed.barrier()
    if ranks.is_main:
        missing = [r.index for r in requests if not png_path(folder, r.index).exists()]
        if missing:
            raise RuntimeError(f"{folder}: {len(missing)} of {len(requests)} PNGs missing after sampling "
                               f"(first: {missing[:5]})")
        write_text(path, lines)
        grid = write_prompt_grid(folder / GRID_NAME, folder, requests, title=f"{Path(source or '').name}: "
                                 f"{sampler.describe()}")
        write_json(done, {"num_images": len(requests), "prompts": PROMPTS_NAME})
        log.info("%s: %d images, %s, grid %s", folder, len(requests), path.name, grid.name)
    distributed.barrier()
    return path


def write_prompt_grid(path: Path, folder: Path, requests: Sequence[ImageRequest], title: str | None = None) -> Path:
    """One row per size, one column per prompt (the first GRID_PROMPTS prompts, GRID_SIZES sizes); a gap where a
    prompt was not sampled at that size."""
    prompts = list(dict.fromkeys(r.prompt for r in requests))[:GRID_PROMPTS]
    sizes = list(dict.fromkeys(r.size for r in requests))[:GRID_SIZES]
    first: dict[tuple[str, tuple[int, int]], ImageRequest] = {}
    for r in requests:
        first.setdefault((r.prompt, r.size), r)
    rows = []
    for size in sizes:
        cells = [first.get((p, size)) for p in prompts]
        rows.append((format_size(size), [read_png(png_path(folder, r.index), r.size) if r else None for r in cells]))
    return write_grid(path, rows, prompts, title)
