"""The demo's one config file (experiments/demo.yaml): its sections, `extends:` another file, and `${name}` fills."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

SECTIONS = ("seed", "threads", "images", "codec", "shards", "runs", "ablation", "fit", "sample", "evaluate")
# `kind: t2i` (experiments/demo_t2i.yaml): the NiT-T2I demo (demo/t2i.py), one run, a text encoder, no ablation.
T2I_SECTIONS = ("kind", "seed", "threads", "images", "codec", "shards", "text_encoder", "fit", "sample", "evaluate")


def load_config(path: str | Path) -> dict[str, Any]:
    """The YAML, with `extends: OTHER.yaml` resolved (this file's keys merged over the other's, recursively)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"demo config {str(path)!r} not found; run from the repository root or pass --config")
    config = yaml.safe_load(path.read_text()) or {}
    base = config.pop("extends", None)
    if base is not None:
        config = _merge(load_config(path.parent / base), config)
    kind = config.get("kind", "c2i")
    if kind not in ("c2i", "t2i"):
        raise ValueError(f"demo config {path}: kind {kind!r} is not c2i (the default) or t2i")
    sections = T2I_SECTIONS if kind == "t2i" else SECTIONS
    unknown, missing = sorted(set(config) - set(sections)), sorted(set(sections) - set(config))
    if unknown or missing:
        raise ValueError(f"demo config {path}: unknown sections {unknown}, missing sections {missing}")
    return config


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def fill(value: Any, **names: Any) -> Any:
    """Replace "${name}" in every string of a nested config; a string that is exactly "${name}" takes its value."""
    if isinstance(value, dict):
        return {k: fill(v, **names) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, **names) for v in value]
    if isinstance(value, str):
        for name, replacement in names.items():
            if value == f"${{{name}}}":
                return replacement
            value = value.replace(f"${{{name}}}", str(replacement))
    return value
