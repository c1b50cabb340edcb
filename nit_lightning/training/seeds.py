"""Seeds of the training step's random draws (noise, times, label dropout), one stream per (rank, step, micro-batch)."""
from __future__ import annotations

import hashlib


def step_seed(seed: int, rank: int, step: int, micro: int = 0, stream: str = "train") -> int:
    """A 63-bit seed from (seed, rank, optimiser step, micro-batch): every rank and step draws different noise."""
    digest = hashlib.sha256(f"nit/{stream}/{seed}/{rank}/{step}/{micro}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
