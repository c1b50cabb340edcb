"""Shared test settings: deterministic CPU runs, GPU tests skipped cleanly without CUDA."""
from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# One intra-op thread: the tests' tensors are tiny, and on a 2-core machine two OpenMP threads made a NiT-debug
# forward 40x slower under load (0.66 s vs 16 ms). One thread is also the reproducible setting.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
