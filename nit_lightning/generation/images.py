"""The one way from a pipeline to images: requests -> token-budget packs -> sampler -> decoded uint8 images.

Every caller goes through `generate`: the `sample` command and the sweeps (via sample_set.py), the sample-grid and
evaluation callbacks during training, and the demo. A request carries its own seed, so an image does not depend on
which pack, rank or batch size made it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from nit_lightning.data.sizes import format_size, validate_size
from nit_lightning.diffusion.sampling import SampleRequest, derive_seed, plan_sample_packs, sample_pack
from nit_lightning.generation.pipeline import Pipeline
from nit_lightning.generation.settings import SamplerSettings


class NonFiniteSamples(ValueError):
    """Sampling produced NaN or Inf for some images (they would become black PNGs); the message names them."""


@dataclass(frozen=True)
class ImageRequest:
    """One image to make: its index in the set (names its file), its pixel size (H, W), class label and seed; for a
    NiT-T2I pipeline its prompt (the label is then unused)."""

    index: int
    size: tuple[int, int]
    label: int
    seed: int
    prompt: str | None = None


@dataclass
class ImageBatch:
    """The images of one pack, in the pack's order: requests[i] made images[i], uint8 (3, H, W) on the CPU."""

    requests: list[ImageRequest]
    images: list[torch.Tensor]


def class_balanced(indices: Iterable[int], size: tuple[int, int], num_classes: int, seed: int) -> list[ImageRequest]:
    """Image i has label i mod num_classes and seed derive_seed(seed, i): the same set on 1 or 64 GPUs."""
    return [ImageRequest(int(i), size, int(i) % num_classes, derive_seed(seed, int(i))) for i in indices]


def generate(pipeline: Pipeline, requests: Sequence[ImageRequest], sampler: SamplerSettings, *,
             tokens_per_forward: int = 16384, device: torch.device | str | None = None) -> Iterator[ImageBatch]:
    """Sample every request in packs of at most `tokens_per_forward` model tokens (CFG's null branch counts twice).

    Sizes must be multiples of the pipeline's codec factor × patch size; a non-finite image raises NonFiniteSamples.
    """
    indices = [r.index for r in requests]
    if len(set(indices)) != len(indices):
        raise ValueError("image requests must have distinct indices (they name the outputs and derive the seeds)")
    _check_conditions(pipeline, requests)
    m = pipeline.size_multiple
    by_index = {r.index: r for r in requests}
    # Images whose RoPE positions are interpolated by the same factor share packs (one table per pack), so an image
    # never depends on which others it was packed with.
    groups: dict[float, list[SampleRequest]] = {}
    for r in requests:
        grid = _grid(r.size, m)
        groups.setdefault(sampler.rope_interp_scale(grid), []).append(SampleRequest(r.index, grid, r.label, r.seed))
    device = device if device is not None else next(pipeline.net.parameters()).device
    sampler = sampler.for_device(device)
    packs = [(scale, pack) for scale, group in sorted(groups.items())
             for pack in plan_sample_packs(group, tokens_per_forward, cfg=sampler.guided)]
    for scale, pack in packs:
        model_fn = pipeline.model_fn(sampler.precision, rope_interp_scale=None if scale == 1.0 else scale)
        text = (pipeline.encode_prompts([by_index[r.index].prompt for r in pack], device)
                if pipeline.conditioning == "text" else None)
        try:
            x_ND = sample_pack(model_fn, pack, pipeline.token_dim, device=device, condition=text,
                               method=sampler.method, steps=sampler.steps, cfg_scale=sampler.cfg_scale,
                               cfg_interval=sampler.cfg_interval, null_class=pipeline.null_class,
                               dtype=sampler.state_dtype)
        except (MemoryError, RuntimeError) as error:
            if not _is_out_of_memory(error):
                raise
            raise _out_of_memory(pack, sampler, tokens_per_forward, device) from error
        _check_finite(x_ND, pack, sampler)
        hw = torch.tensor([list(r.hw) for r in pack])
        yield ImageBatch([by_index[r.index] for r in pack], pipeline.decode(x_ND, hw))


def _check_conditions(pipeline: Pipeline, requests: Sequence[ImageRequest]) -> None:
    """A NiT-T2I pipeline needs a prompt per request; a class-conditional one takes none."""
    prompted = sum(r.prompt is not None for r in requests)
    if pipeline.conditioning == "text" and prompted != len(requests):
        raise ValueError(f"{len(requests) - prompted} of {len(requests)} image requests have no prompt: this checkpoint "
                         "is text-to-image (NiT-T2I); sample it with --prompts FILE")
    if pipeline.conditioning == "class" and prompted:
        raise ValueError("this checkpoint is class-conditional (NiT): it takes class labels, not prompts")


class SamplingOutOfMemory(MemoryError):
    """A pack did not fit in memory: the message says which budget to lower."""

    user_error = True  # one line for the user (cli/common.py)


def _is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's "can't allocate memory"."""
    text = str(error).lower()
    return isinstance(error, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def _out_of_memory(pack: Sequence[SampleRequest], sampler: SamplerSettings, budget: int, device) -> MemoryError:
    tokens = sum(r.tokens for r in pack) * (2 if sampler.guided else 1)
    largest = max(r.tokens for r in pack) * (2 if sampler.guided else 1)
    what = (f"lower --tokens-per-forward (now {budget}; down to {largest}, one image of this size)"
            if len(pack) > 1 else "one image of this size alone does not fit: sample a smaller size")
    return SamplingOutOfMemory(
        f"out of memory on {device} sampling a pack of {len(pack)} images ({tokens} model tokens"
        f"{', CFG doubles each' if sampler.guided else ''}, token grid {format_size(pack[0].hw)}): {what}, or use "
        "a device with more memory")


def _grid(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    h, w = validate_size(size, multiple)
    return h // multiple, w // multiple


def _check_finite(x_ND: torch.Tensor, pack: Sequence[SampleRequest], sampler: SamplerSettings) -> None:
    """One reduction per pack (a single host read); on failure, find which images went bad."""
    if bool(torch.isfinite(x_ND).all()):
        return
    rows = torch.isfinite(x_ND).all(dim=1).cpu()
    bad, start = [], 0
    for r in pack:
        if not bool(rows[start:start + r.tokens].all()):
            bad.append(r.index)
        start += r.tokens
    size = format_size((pack[0].hw[0], pack[0].hw[1]))
    raise NonFiniteSamples(
        f"{len(bad)} of {len(pack)} images of this pack came out NaN/Inf (indices {bad[:10]}{' ...' if len(bad) > 10 else ''}"
        f", token grid {size}) with {sampler.describe()}, precision {sampler.precision}: check the checkpoint's weights, "
        "lower the cfg scale or use precision float32"
    )
