"""One schema for how to sample: `SamplerSettings` (solver, guidance, numerics) and sweep files of per-size settings.

A sweep file (experiments/sweeps/*.yaml) is a mapping
    name: resolution                       # optional
    published_model: NiT-XL, 1000K steps   # optional, printed above results tables
    defaults: {method: euler, steps: 50}   # optional, sampler keys that every setting inherits
    settings:
      - {size: 256x256, method: sde, steps: 250, cfg_scale: 2.25, cfg_interval: [0.0, 0.7],
         published: {fid: 2.16, ...}, paper: {...}}
or just the list under `settings:`. Keys of a setting: `size` (HxW pixels), the sampler keys of `SamplerSettings`
(aliases: cfg = cfg_scale, interval = cfg_interval), `published` (metrics to print beside ours) and `paper` (notes).
Anything else is an error: a misspelt key must not silently fall back to a default.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from nit_lightning.data.sizes import format_size, parse_size
from nit_lightning.diffusion.sampling import METHODS, model_calls
from nit_lightning.records.files import read_json
from nit_lightning.records.names import DTYPES, check_dtype_name, upgrade_dtype_names

PRECISIONS = ("float32", "bfloat16", "float16")  # model compute: autocast to this dtype (float32: none)
AUTO_PRECISION = {"cuda": "bfloat16"}  # "auto": bf16 autocast on a GPU (tensor cores), float32 elsewhere
INTEGRATION_DTYPES = ("float64", "float32")  # the sampler's state
KEY_ALIASES = {"cfg": "cfg_scale", "interval": "cfg_interval"}
RENAMED_KEYS = {"dtype": "integration_dtype"}  # sampler keys renamed when every setting got one spelling
NOTE_KEYS = ("published", "paper")


def upgrade_sampler_record(values: dict[str, Any]) -> dict[str, Any]:
    """Sampler keys as a record written before one spelling holds them (dtype, fp32/bf16) -> today's spelling. Used
    on records read from disk only (a resumed sample set, a finished sweep setting); user input is refused instead."""
    values = {RENAMED_KEYS.get(k, k): v for k, v in values.items()}
    return upgrade_dtype_names(values, ("precision", "integration_dtype"))


def parse_interval(value: str | Iterable[float]) -> tuple[float, float]:
    """"0,0.7" / [0, 0.7] -> (0.0, 0.7), checked 0 <= lo <= hi <= 1."""
    parts = [p for p in value.replace("[", "").replace("]", "").split(",") if p.strip()] if isinstance(value, str) \
        else list(value)
    if len(parts) != 2:
        raise ValueError(f"guidance interval {value!r} must be two numbers lo,hi (e.g. 0,0.7)")
    lo, hi = float(parts[0]), float(parts[1])
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"guidance interval [{lo}, {hi}] must satisfy 0 <= lo <= hi <= 1")
    return lo, hi


@dataclass(frozen=True)
class SamplerSettings:
    """How to integrate from noise to an image: solver and steps, CFG scale and interval, compute precision."""

    method: str = "euler"  # euler | heun | sde (SPEC §7)
    steps: int = 50  # NFE (network evaluations per image): euler / sde = steps, heun = 2·steps − 1 (see `nfe`)
    cfg_scale: float = 1.0  # 1 = no guidance
    cfg_interval: tuple[float, float] = (0.0, 1.0)  # guidance only for lo <= t <= hi
    precision: str = "auto"  # model compute: auto (bfloat16 on CUDA, else float32) | float32 | bfloat16 | float16
    integration_dtype: str = "float64"  # dtype of the sampler's state (x, velocities, time steps)
    # SPEC §1.1 linear position interpolation at sampling time (off, as in every published number): an image whose
    # longer side has more than this many tokens gets positions / s, s = its longer side / this (per image size).
    rope_interp_side: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {METHODS}")
        steps = int(self.steps)
        if steps != self.steps or steps < (2 if self.method == "sde" else 1):
            raise ValueError(f"steps={self.steps} must be an integer >= {2 if self.method == 'sde' else 1} for "
                             f"{self.method}")
        if not math.isfinite(float(self.cfg_scale)):
            raise ValueError(f"cfg scale {self.cfg_scale} is not a finite number")
        check_dtype_name(self.precision, ("auto", *PRECISIONS), "precision")
        check_dtype_name(self.integration_dtype, INTEGRATION_DTYPES, "integration_dtype")
        if self.rope_interp_side is not None and int(self.rope_interp_side) < 1:
            raise ValueError(f"rope_interp_side must be a positive token count or None, got {self.rope_interp_side}")
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "cfg_scale", float(self.cfg_scale))
        object.__setattr__(self, "cfg_interval", parse_interval(self.cfg_interval))

    def for_device(self, device: torch.device | str) -> "SamplerSettings":
        """These settings with precision "auto" resolved for the device (what provenance records and the model runs)."""
        if self.precision != "auto":
            return self
        return dataclasses.replace(self, precision=AUTO_PRECISION.get(torch.device(device).type, "float32"))

    def rope_interp_scale(self, grid: tuple[int, int]) -> float:
        """The position interpolation factor s >= 1 for a token grid (1 = none)."""
        if self.rope_interp_side is None:
            return 1.0
        return max(1.0, max(grid) / int(self.rope_interp_side))

    @property
    def state_dtype(self) -> torch.dtype:
        """The torch dtype of `integration_dtype`."""
        return DTYPES[self.integration_dtype]

    @property
    def nfe(self) -> tuple[int, int]:
        """(network evaluations per image, how many of them carry CFG's null branch on a doubled sequence)."""
        return model_calls(self.method, self.steps, self.cfg_scale, self.cfg_interval)

    @property
    def guided(self) -> bool:
        """Whether the null branch runs (somewhere in the interval): packs must hold the doubled sequence."""
        return self.cfg_scale != 1.0

    def describe(self) -> str:
        """"sde 250, cfg 2.25 in [0, 0.7]" for logs and tables."""
        guidance = f"cfg {self.cfg_scale:g} in [{self.cfg_interval[0]:g}, {self.cfg_interval[1]:g}]" if self.guided \
            else "no cfg"
        rope = f", RoPE interpolated beyond {self.rope_interp_side} tokens" if self.rope_interp_side else ""
        return f"{self.method} {self.steps}, {guidance}{rope}"

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cfg_interval"] = list(self.cfg_interval)
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str = "sampler settings") -> "SamplerSettings":
        """Keys of this class (or their aliases) only; an unknown key is an error naming it."""
        renamed = sorted(k for k in values if k in RENAMED_KEYS)
        if renamed:
            raise ValueError(f"{where}: key {renamed[0]!r} is now spelled {RENAMED_KEYS[renamed[0]]!r}")
        keys = {KEY_ALIASES.get(k, k): v for k, v in values.items()}
        unknown = sorted(set(keys) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; sampler keys are "
                             f"{[f.name for f in dataclasses.fields(cls)]} (aliases {KEY_ALIASES})")
        return cls(**keys)


@dataclass(frozen=True)
class SizeSetting:
    """One size and how to sample it, with published numbers to print beside ours."""

    size: tuple[int, int]
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    notes: dict[str, Any] = field(default_factory=dict)  # `published` metrics, `paper` remarks

    @property
    def name(self) -> str:
        return format_size(self.size)

    @property
    def published(self) -> dict[str, float]:
        return dict(self.notes.get("published") or {})

    def as_dict(self) -> dict[str, Any]:
        return {"size": self.name, **self.sampler.as_dict(), **self.notes}


def setting_from_dict(entry: dict[str, Any], defaults: dict[str, Any] | None = None, *,
                      where: str = "sweep setting") -> SizeSetting:
    """{size, sampler keys..., published?, paper?} (sampler keys missing from the entry come from `defaults`)."""
    if not isinstance(entry, dict) or "size" not in entry:
        raise ValueError(f"{where}: {entry!r} is not a mapping with a 'size' (e.g. {{size: 320x960, steps: 50}})")
    size = parse_size(entry["size"])
    notes = {k: entry[k] for k in NOTE_KEYS if k in entry}
    sampler = {**(defaults or {}), **{k: v for k, v in entry.items() if k != "size" and k not in NOTE_KEYS}}
    return SizeSetting(size, SamplerSettings.from_dict(sampler, where=f"{where} {format_size(size)}"), notes)


@dataclass(frozen=True)
class Sweep:
    """A named list of settings, one per size (sizes are unique: each has its own output folder)."""

    settings: tuple[SizeSetting, ...]
    name: str | None = None
    published_model: str | None = None

    def __post_init__(self) -> None:
        if not self.settings:
            raise ValueError("a sweep needs at least one setting")
        names = [s.name for s in self.settings]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"sizes {dupes} are listed more than once (each size has one output folder)")

    def select(self, sizes: Iterable[str | tuple[int, int]] | None) -> "Sweep":
        """The settings of these sizes only (all when None); an unknown size is an error listing the known ones."""
        if sizes is None:
            return self
        wanted = [format_size(parse_size(s)) for s in sizes]
        known = {s.name: s for s in self.settings}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise ValueError(f"sizes {unknown} are not in the sweep (it has {sorted(known)})")
        return dataclasses.replace(self, settings=tuple(known[w] for w in dict.fromkeys(wanted)))


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep file (YAML or JSON) in the schema of this module's docstring."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {str(path)!r} does not exist (see experiments/sweeps/)")
    if path.suffix == ".json":
        data = read_json(path, "sweep file")
    else:
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:  # one line naming the file and the place, not a parser traceback
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"sweep file {str(path)!r} is not valid YAML{where}: "
                             f"{getattr(error, 'problem', None) or error}") from error
    if isinstance(data, list):
        data = {"settings": data}
    if not isinstance(data, dict) or not isinstance(data.get("settings"), list) or not data["settings"]:
        raise ValueError(f"sweep file {str(path)!r} needs a non-empty 'settings' list")
    unknown = sorted(set(data) - {"name", "published_model", "defaults", "settings"})
    if unknown:
        raise ValueError(f"sweep file {str(path)!r}: unknown top-level key(s) {unknown}")
    defaults = data.get("defaults") or {}
    settings = tuple(setting_from_dict(entry, defaults, where=f"sweep file {path.name}") for entry in data["settings"])
    return Sweep(settings, name=data.get("name"), published_model=data.get("published_model"))
