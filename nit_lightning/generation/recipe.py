"""How a checkpoint is sampled when the user does not say: its recorded recipe, then the defaults; and where each value
came from, so that `sample` can say it.

Order per sampler key: a flag > the checkpoint's recommended sampler (`model.sampler` of its training config) >
SamplerSettings' default. RoPE position interpolation (SPEC §1.1) is on by default beyond the trained range: an image
whose longer side has more tokens than the side of the largest training image (as a square) gets positions / s.
`rope_interp=False` (`--no-rope-interp`) turns that off; a flag or the recipe may also set `rope_interp_side` itself.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from nit_lightning.generation.settings import KEY_ALIASES, SamplerSettings
from nit_lightning.records.checkpoint import SamplingRecipe

FLAG = "flag"
RECIPE = "checkpoint recipe"
DEFAULT = "default"
MAX_DEFAULT_SAMPLES = 16  # `sample` without --num-samples: one image per class, at most this many (a grid to look at)
PAPER_PROTOCOL = "--num-samples 50000, or --sweep experiments/sweeps/resolution.yaml (the paper's settings per size)"


@dataclass(frozen=True)
class ResolvedSampler:
    """The sampler to run and, per key, where its value came from (flag / checkpoint recipe / default)."""

    sampler: SamplerSettings
    origins: dict[str, str]

    def describe(self) -> list[str]:
        """One line per key: 'method heun (checkpoint recipe)'."""
        values = self.sampler.as_dict()
        return [f"{key} {_show(values[key])} ({origin})" for key, origin in self.origins.items()]


def resolve_sampler(flags: Mapping[str, Any], recipe: SamplingRecipe | None, *,
                    rope_interp: bool = True) -> ResolvedSampler:
    """Flags (sampler keys the user gave) over the checkpoint's recipe (`CheckpointMeta.recipe`) over the defaults;
    see the module docstring."""
    flags = {KEY_ALIASES.get(k, k): v for k, v in flags.items()}
    recommended = {KEY_ALIASES.get(k, k): v for k, v in ((recipe.sampler if recipe is not None else None) or {}).items()}
    SamplerSettings.from_dict(recommended, where="the checkpoint's recommended sampler")  # another version's key fails
    if not rope_interp and flags.get("rope_interp_side") is not None:
        raise ValueError("--no-rope-interp and --rope-interp-side contradict each other: give one")
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for field in dataclasses.fields(SamplerSettings):
        key = field.name
        if key in flags:
            values[key], origins[key] = flags[key], FLAG
        elif key == "rope_interp_side":
            values[key], origins[key] = _rope_side(recommended, recipe, rope_interp)
        elif key in recommended:
            values[key], origins[key] = recommended[key], RECIPE
        else:
            origins[key] = DEFAULT
    return ResolvedSampler(SamplerSettings.from_dict(values, where="sample flags"), origins)


def _rope_side(recommended: dict[str, Any], recipe: SamplingRecipe | None, rope_interp: bool) -> tuple[int | None, str]:
    if not rope_interp:
        return None, "off: --no-rope-interp"
    if recommended.get("rope_interp_side") is not None:
        return recommended["rope_interp_side"], RECIPE
    side = recipe.trained_side if recipe is not None else None
    if side is None:
        return None, f"{DEFAULT}: off, the checkpoint records no trained token range"
    low, high = recipe.trained_tokens
    return side, f"{RECIPE}: trained on {low}..{high} tokens per image, i.e. up to a {side}x{side} token grid"


def default_num_samples(num_classes: int) -> int:
    """One image per class, at most MAX_DEFAULT_SAMPLES: a grid a person looks at, not an evaluation set."""
    return max(1, min(int(num_classes), MAX_DEFAULT_SAMPLES))


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def size_kind(grid: tuple[int, int], recipe: SamplingRecipe | None) -> str | None:
    """"seen" when a token grid's longer side lies within the trained range (the side of the largest training image
    as a square), "unseen" beyond it; None when the range is not recorded."""
    side = recipe.trained_side if recipe is not None else None
    if side is None:
        return None
    return "seen" if max(grid) <= side else "unseen"


def default_grid_sizes(recipe: SamplingRecipe | None, multiple: int) -> list[tuple[int, int]]:
    """Pixel sizes that show what NiT is about, from the trained side s (tokens): s/2 and s squares (seen), 1.5·s square
    and the 1:3 / 3:1 grids s/2 × 1.5·s (unseen). For the demo (s = 16 tokens of 8 px): 64², 128², 192², 64×192,
    192×64."""
    side = recipe.trained_side if recipe is not None else None
    if side is None:
        raise ValueError("no grid sizes given and the training data records no token range: set the callback's sizes")
    half, big = max(1, side // 2), side + max(1, side // 2)
    grids = [(half, half), (side, side), (big, big), (half, big), (big, half)]
    return list(dict.fromkeys((h * multiple, w * multiple) for h, w in grids))
