"""Image sizes for sampling: parse "HxW", check they fit the codec × patch grid, round only when asked, sweep settings."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

ROUND_MODES = ("nearest", "floor")
METHODS = ("euler", "heun", "sde")


def parse_size(text: str | int | Iterable[int]) -> tuple[int, int]:
    """"320x960" / "320×960" / "256" / 256 / (320, 960) -> (H, W) in pixels."""
    if isinstance(text, int):
        h = w = text
    elif isinstance(text, str):
        parts = text.strip().lower().replace("×", "x").split("x")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"size {text!r} is not of the form HxW (e.g. 320x960) or a single side (e.g. 256)")
        h, w = (int(parts[0]), int(parts[-1]))
    else:
        values = [int(v) for v in text]
        if len(values) != 2:
            raise ValueError(f"size {text!r} must have two entries (H, W)")
        h, w = values
    if h <= 0 or w <= 0:
        raise ValueError(f"size {h}x{w} must be positive")
    return h, w


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """"256x256,320x960" -> [(256, 256), (320, 960)]; duplicates are an error (they would share one output folder)."""
    sizes = [parse_size(part) for part in text.split(",") if part.strip()]
    if not sizes:
        raise ValueError(f"no sizes in {text!r}; pass e.g. --sizes 256x256,320x960")
    dupes = sorted({s for s in sizes if sizes.count(s) > 1})
    if dupes:
        raise ValueError(f"sizes {[format_size(s) for s in dupes]} are listed more than once in {text!r}")
    return sizes


def format_size(size: tuple[int, int]) -> str:
    """(320, 960) -> "320x960" (the folder name of that size's samples)."""
    return f"{int(size[0])}x{int(size[1])}"


def _round_side(side: int, multiple: int, mode: str) -> int:
    down = (side // multiple) * multiple
    if mode == "floor":
        return max(down, multiple)  # a side below one multiple cannot floor to 0: it becomes one multiple
    up = down + multiple
    # Ties go up (250 with multiple 4 -> 252): the larger image keeps all requested pixels.
    if down == 0 or side - down >= up - side:
        return up
    return down


def validate_size(size: tuple[int, int], multiple: int, *, round: str | None = None) -> tuple[int, int]:
    """Check that both sides are multiples of `multiple` (codec factor × patch size); round only when asked, and log it."""
    h, w = parse_size(size)
    if multiple <= 0:
        raise ValueError(f"size multiple must be positive, got {multiple}")
    if h % multiple == 0 and w % multiple == 0:
        return h, w
    nearest = (_round_side(h, multiple, "nearest"), _round_side(w, multiple, "nearest"))
    floor = (_round_side(h, multiple, "floor"), _round_side(w, multiple, "floor"))
    if round is None:
        raise ValueError(
            f"image size {h}x{w} is not a multiple of {multiple} (codec factor × patch size); nearest valid sizes: "
            f"{format_size(nearest)} (--round nearest) or {format_size(floor)} (--round floor); or request one of them"
        )
    if round not in ROUND_MODES:
        raise ValueError(f"round={round!r} is not one of {ROUND_MODES}")
    out = nearest if round == "nearest" else floor
    log.warning("size %dx%d is not a multiple of %d: rounded (%s) to %s", h, w, multiple, round, format_size(out))
    return out


def token_grid_of(size: tuple[int, int], codec_factor: int, patch_size: int) -> tuple[int, int]:
    """Pixel size -> token grid (h, w) = size / (codec factor × patch size); the size must already be valid."""
    m = codec_factor * patch_size
    h, w = validate_size(size, m)
    return h // m, w // m


@dataclass
class SweepSetting:
    """One sampling setting: a pixel size and the solver / guidance used there."""

    size: tuple[int, int]
    method: str = "euler"
    steps: int = 50
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    extra: dict[str, Any] = field(default_factory=dict)  # other keys of the sweep file, kept for the caller

    def __post_init__(self) -> None:
        self.size = parse_size(self.size)
        self.cfg_interval = parse_interval(self.cfg_interval)
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} for size {format_size(self.size)} is not one of {METHODS}")
        if int(self.steps) < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps} for size {format_size(self.size)}")
        self.steps = int(self.steps)
        self.cfg_scale = float(self.cfg_scale)

    @property
    def name(self) -> str:
        return format_size(self.size)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = self.name
        d["cfg_interval"] = list(self.cfg_interval)
        return d


def parse_interval(value: str | Iterable[float]) -> tuple[float, float]:
    """"0,0.7" / [0, 0.7] -> (0.0, 0.7), checked 0 <= lo <= hi <= 1."""
    if isinstance(value, str):
        parts = [p for p in value.replace("[", "").replace("]", "").split(",") if p.strip()]
    else:
        parts = list(value)
    if len(parts) != 2:
        raise ValueError(f"guidance interval {value!r} must be two numbers lo,hi (e.g. 0,0.7)")
    lo, hi = float(parts[0]), float(parts[1])
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"guidance interval [{lo}, {hi}] must satisfy 0 <= lo <= hi <= 1")
    return lo, hi


# SPEC §7: the per-resolution settings published for NiT-XL (1000K steps). ODE 50 = Euler with 50 steps (NFE 50).
PUBLISHED_SETTINGS: dict[str, dict[str, Any]] = {
    "256x256": {"method": "sde", "steps": 250, "cfg_scale": 2.25, "cfg_interval": (0.0, 0.7)},
    "512x512": {"method": "sde", "steps": 250, "cfg_scale": 2.05, "cfg_interval": (0.0, 0.7)},
    "768x768": {"method": "euler", "steps": 50, "cfg_scale": 3.0, "cfg_interval": (0.0, 0.7)},
    "1024x1024": {"method": "euler", "steps": 50, "cfg_scale": 3.0, "cfg_interval": (0.0, 0.8)},
    "1536x1536": {"method": "euler", "steps": 50, "cfg_scale": 3.5, "cfg_interval": (0.0, 0.9)},
    "2048x2048": {"method": "euler", "steps": 50, "cfg_scale": 4.5, "cfg_interval": (0.0, 0.9)},
    "320x960": {"method": "euler", "steps": 50, "cfg_scale": 4.0, "cfg_interval": (0.0, 0.9)},
    "416x768": {"method": "euler", "steps": 50, "cfg_scale": 2.75, "cfg_interval": (0.0, 0.7)},
    "480x640": {"method": "euler", "steps": 50, "cfg_scale": 2.75, "cfg_interval": (0.0, 0.7)},
    "640x480": {"method": "euler", "steps": 50, "cfg_scale": 2.5, "cfg_interval": (0.0, 0.7)},
    "768x416": {"method": "euler", "steps": 50, "cfg_scale": 2.85, "cfg_interval": (0.0, 0.7)},
    "960x320": {"method": "euler", "steps": 50, "cfg_scale": 4.5, "cfg_interval": (0.0, 0.9)},
}

_KEY_ALIASES = {"cfg": "cfg_scale", "interval": "cfg_interval", "guidance_interval": "cfg_interval", "solver": "method"}


def setting_from_dict(entry: dict[str, Any], defaults: dict[str, Any] | None = None) -> SweepSetting:
    """One sweep-file entry -> SweepSetting (keys: size, method, steps, cfg/cfg_scale, interval/cfg_interval, published)."""
    entry = {_KEY_ALIASES.get(k, k): v for k, v in entry.items()}
    if "size" not in entry:
        raise ValueError(f"sweep entry {entry} has no 'size' (e.g. size: 320x960)")
    size = parse_size(entry["size"])
    # Precedence: the entry's own keys > the published table (entry `published: true`) > the file's `defaults:`.
    merged: dict[str, Any] = {_KEY_ALIASES.get(k, k): v for k, v in (defaults or {}).items()}
    if entry.get("published") is True:  # a mapping under `published:` (metrics, as in experiments/sweeps) is kept
        entry.pop("published")
        if format_size(size) not in PUBLISHED_SETTINGS:
            raise ValueError(f"no published setting for {format_size(size)}; known: {sorted(PUBLISHED_SETTINGS)}")
        merged.update(PUBLISHED_SETTINGS[format_size(size)])
    merged.update(entry)
    known = {"size", "method", "steps", "cfg_scale", "cfg_interval"}
    extra = {k: v for k, v in merged.items() if k not in known}
    return SweepSetting(**{k: v for k, v in merged.items() if k in known}, extra=extra)


def load_sweep(path: str | Path, defaults: dict[str, Any] | None = None) -> list[SweepSetting]:
    """Read a sweep file (YAML or JSON): a list of entries, or a mapping with `settings:` (+ optional `defaults:`).

    `defaults` (e.g. solver flags given on the command line) fill only what neither the entry nor the file sets.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    merged_defaults = {_KEY_ALIASES.get(k, k): v for k, v in (defaults or {}).items()}
    if isinstance(data, dict):
        merged_defaults.update({_KEY_ALIASES.get(k, k): v for k, v in (data.get("defaults") or {}).items()})
        data = data.get("settings")
    if not isinstance(data, list) or not data:
        raise ValueError(f"sweep file {path} must hold a non-empty list of settings (or a mapping with 'settings:')")
    settings = [setting_from_dict(dict(e) if isinstance(e, dict) else {"size": e}, merged_defaults) for e in data]
    names = [s.name for s in settings]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"sweep file {path} lists sizes {dupes} more than once")
    return settings
