"""What a checkpoint says about itself: the one record that training writes and every reader (sampling, resume, sweeps)
reads. A Lightning checkpoint of NiTModule holds, besides Lightning's own keys:

    checkpoint["nit_meta"]        CheckpointMeta.as_dict(): version, net_config, conditioning, codec, patch_size,
                                  latent_channels, data (the training data's inputs), step, has_ema, sampling,
                                  text_encoder, skipped_steps
    checkpoint["ema_state_dict"]  the EMA weights under exactly the keys of net.state_dict()

Paths inside the codec (and text encoder) descriptions are stored absolute, plus relative to the checkpoint's folder,
so a run folder moved to another machine or read from another working directory still finds them.
Older checkpoints still load: format 1 (no version; data under checkpoint["nit_inputs"], skipped steps under
checkpoint["nit_skipped_steps"]) and official NiT safetensors (`CheckpointMeta.for_official`).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from nit_lightning.records.settings import differences

log = logging.getLogger(__name__)

META_KEY = "nit_meta"
EMA_KEY = "ema_state_dict"
LEGACY_INPUTS_KEY = "nit_inputs"  # format 1: {"data": ...}
LEGACY_SKIPPED_KEY = "nit_skipped_steps"  # format 1
FORMAT_VERSION = 2
CONDITIONINGS = ("class", "text")
RELATIVE_SUFFIX = "_from_checkpoint"  # "path" -> also "path_from_checkpoint": relative to the checkpoint's folder


def anchor_paths(description: Mapping[str, Any] | None, checkpoint_dir: str | Path | None) -> dict[str, Any] | None:
    """A description with its `path` made absolute (as resolved from the working directory now) and, when the
    checkpoint's folder is known, also relative to it."""
    if description is None:
        return None
    out = dict(description)
    path = out.get("path")
    if isinstance(path, str) and path and _is_local(path):
        absolute = os.path.realpath(os.path.expanduser(path))
        out["path"] = absolute
        if checkpoint_dir is not None:
            out["path" + RELATIVE_SUFFIX] = os.path.relpath(absolute, os.path.realpath(checkpoint_dir))
    return out


def locate_paths(description: Mapping[str, Any] | None, checkpoint_path: str | Path | None) -> dict[str, Any] | None:
    """The description with `path` pointing at a file or folder that exists: the recorded absolute path, else the one
    relative to where the checkpoint is now (a moved run folder); unchanged (absolute) when neither exists."""
    if description is None:
        return None
    out = dict(description)
    relative = out.pop("path" + RELATIVE_SUFFIX, None)
    path = out.get("path")
    if isinstance(path, str) and not Path(path).exists() and relative and checkpoint_path is not None:
        moved = Path(checkpoint_path).resolve().parent / relative
        if moved.exists():
            log.info("%s: %s not found, using %s (relative to the checkpoint)", checkpoint_path, path, moved)
            out["path"] = str(moved.resolve())
    return out


def _is_local(path: str) -> bool:
    """A Hugging Face id ('owner/name') is not a local path: it stays as written."""
    return Path(path).expanduser().exists() or path.startswith(("/", ".", "~")) or path.count("/") != 1


@dataclass
class SamplingRecipe:
    """How to sample a checkpoint, as training knew it (`CheckpointMeta.sampling`): the sampler a config recommends
    (SamplerSettings keys, checked by generation/settings.py) and the token grids it was trained on.

    `trained_tokens` = [fewest, most] tokens of one training image (h·w at the patch size, from index.json lengths).
    `trained_side` is the side of a square of the most tokens: the training range as a RoPE length, beyond which
    `sample` interpolates positions by default (SPEC §1.1: s = test length / train length).
    """

    sampler: dict[str, Any] | None = None
    trained_tokens: list[int] | None = None

    def __post_init__(self) -> None:
        if self.trained_tokens is not None:
            low, high = (int(v) for v in self.trained_tokens)
            if not 1 <= low <= high:
                raise ValueError(f"trained_tokens {self.trained_tokens} must be [fewest, most] with 1 <= fewest <= most")
            self.trained_tokens = [low, high]
        if self.sampler is not None:
            self.sampler = dict(self.sampler)

    @property
    def trained_side(self) -> int | None:
        return math.isqrt(self.trained_tokens[1]) if self.trained_tokens else None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "SamplingRecipe":
        """The recipe of `CheckpointMeta.sampling` (None: nothing recorded); an unknown key is another version's."""
        values = dict(values or {})
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"the checkpoint's sampling recipe has keys this code does not know: {unknown}; it was "
                             "written by another nit-lightning version")
        return cls(**values)


@dataclass
class CheckpointMeta:
    """Everything needed to rebuild, resume, sample from and trace a trained NiT (`nit_meta`)."""

    net_config: dict[str, Any]
    conditioning: str = "class"  # "class": labels (C2I); "text": captions (T2I)
    codec: dict[str, Any] | None = None  # Codec.describe() of the latents it was trained on
    patch_size: int = 1
    latent_channels: int | None = None
    data: dict[str, Any] | None = None  # the training data's inputs (sources with absolute paths, budget, seed ...)
    step: int | None = None
    has_ema: bool = False
    sampling: dict[str, Any] | None = None  # SamplingRecipe.as_dict(): a recommended sampler, the token grids trained on
    text_encoder: dict[str, Any] | None = None  # T2I: the text encoder's description
    skipped_steps: int = 0  # optimiser steps skipped for a non-finite loss (on_nonfinite=skip)
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning {self.conditioning!r} is not one of {CONDITIONINGS}")
        if self.latent_channels is None:
            self.latent_channels = int(self.net_config.get("in_channels", 0)) or None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def recipe(self) -> SamplingRecipe:
        """The sampling recipe training recorded (empty for official weights and checkpoints from before it)."""
        return SamplingRecipe.from_dict(self.sampling)

    def net_differences(self, net_config: Mapping[str, Any], *, ignore: frozenset[str] = frozenset()
                        ) -> dict[str, tuple[Any, Any]]:
        """{key: (recorded, now)} for the network config keys this checkpoint and `net_config` both have and disagree
        on (a key only one side knows is a version apart, not a difference): what a resume refuses."""
        return differences(self.net_config, net_config, only_shared=True, ignore=ignore)

    # ---- writing -------------------------------------------------------------------------------------------------
    def store(self, checkpoint: dict[str, Any], checkpoint_dir: str | Path | None = None) -> None:
        """Put this record into a checkpoint dict being saved (paths anchored to `checkpoint_dir`)."""
        record = self.as_dict()
        record["codec"] = anchor_paths(self.codec, checkpoint_dir)
        record["text_encoder"] = anchor_paths(self.text_encoder, checkpoint_dir)
        record["has_ema"] = EMA_KEY in checkpoint
        checkpoint[META_KEY] = record

    # ---- reading -------------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any], path: str | Path | None = None) -> "CheckpointMeta":
        """The record of a loaded checkpoint dict (format 2 or 1); paths located relative to `path` if moved."""
        where = f"{path}" if path is not None else "the checkpoint"
        raw = checkpoint.get(META_KEY) if isinstance(checkpoint, Mapping) else None
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where} has no '{META_KEY}': it is not a checkpoint written by NiTModule "
                             "(docs/architecture.md); official NiT weights are .safetensors files")
        raw = dict(raw)
        version = int(raw.pop("version", 1))
        if version > FORMAT_VERSION:
            raise ValueError(f"{where} has checkpoint format {version}; this code reads up to {FORMAT_VERSION}: "
                             "update nit-lightning")
        if "net_config" not in raw:
            raise ValueError(f"{where}: '{META_KEY}' has no net_config; the checkpoint cannot rebuild its network")
        if version == 1:
            raw.setdefault("data", (checkpoint.get(LEGACY_INPUTS_KEY) or {}).get("data"))
            raw.setdefault("skipped_steps", int(checkpoint.get(LEGACY_SKIPPED_KEY, 0)))
            raw.setdefault("has_ema", checkpoint.get(EMA_KEY) is not None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{where}: '{META_KEY}' has keys this code does not know: {unknown}; it was written by "
                             "another nit-lightning version")
        if raw.get("step") is None and "global_step" in checkpoint:
            raw["step"] = int(checkpoint["global_step"])
        meta = cls(**raw, version=FORMAT_VERSION)
        meta.codec = locate_paths(meta.codec, path)
        meta.text_encoder = locate_paths(meta.text_encoder, path)
        return meta

    @classmethod
    def for_official(cls, net_config: dict[str, Any]) -> "CheckpointMeta":
        """Official NiT safetensors: EMA weights, no codec or data recorded (SPEC §9)."""
        return cls(net_config=dict(net_config), patch_size=int(net_config.get("patch_size", 1)), has_ema=True)


def ema_weights(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The EMA weights of a checkpoint dict, or None when it has none."""
    return checkpoint.get(EMA_KEY)


def store_ema_weights(checkpoint: dict[str, Any], state: Mapping[str, Any]) -> None:
    """Write the EMA weights (keys exactly those of net.state_dict(): no `module.` / `_orig_mod.`)."""
    checkpoint[EMA_KEY] = dict(state)


META_FIELDS = tuple(f.name for f in fields(CheckpointMeta))
__all__ = ["CheckpointMeta", "EMA_KEY", "META_KEY", "META_FIELDS", "SamplingRecipe", "anchor_paths", "ema_weights",
           "locate_paths", "store_ema_weights"]
