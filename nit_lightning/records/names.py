"""One spelling per setting. Dtypes are torch's names everywhere (float32, float16, bfloat16, float64), in flags,
configs, sweep files and records; the short forms used before (fp32, bf16, ...) are refused with the name to use.
Records written before keep loading: `upgrade_dtype_names` rewrites their old spellings when they are read.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

# Where every loader of a file the suite never downloads (official NiT weights, DC-AE, FID Inception, ADM reference
# batches, ImageNet) points when the file is missing: the links as the official projects publish them, and recipes.
WEIGHTS_DOCS = "README.md, section 'Real weights and data'"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
OLD_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}


def check_dtype_name(name: str, allowed: Iterable[str], where: str) -> str:
    """`name` if it is one of `allowed`; an old spelling or another value is a ValueError naming what to write."""
    allowed = tuple(allowed)
    if name in allowed:
        return name
    if name in OLD_DTYPE_NAMES and OLD_DTYPE_NAMES[name] in allowed:
        raise ValueError(f"{where} {name!r} is now spelled {OLD_DTYPE_NAMES[name]!r} (dtypes use torch's names)")
    raise ValueError(f"{where} {name!r} is not one of {list(allowed)}")


def dtype_from_name(name: str, allowed: Iterable[str], where: str) -> torch.dtype:
    return DTYPES[check_dtype_name(name, allowed, where)]


def upgrade_dtype_names(values: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """A copy of a record read from disk with the old dtype spellings of `keys` rewritten (resumes stay possible)."""
    out = dict(values)
    for key in keys:
        if isinstance(out.get(key), str):
            out[key] = OLD_DTYPE_NAMES.get(out[key], out[key])
    return out
