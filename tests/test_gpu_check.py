"""bench/gpu_check.py: says so and exits 0 without CUDA; its device-generic parts run on the CPU."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_says_so_and_exits_0(gpu_check, capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the real check would run")
    assert gpu_check.main(["--out", str(tmp_path / "gpu.json")]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "gpu.json").exists()


def test_grid_sizes_fill_the_budget_without_exceeding_it(gpu_check):
    grids = gpu_check.packed_grid_sizes(16384, seed=0)
    used = sum(h * w for h, w in grids)
    assert used <= 16384 and used > 0.95 * 16384 and len(set(grids)) > 3  # a near-full pack of many sizes


def test_backend_check_runs_on_cpu_and_every_backend_passes(gpu_check):
    rows = gpu_check.check_backends(torch.device("cpu"), torch.float32, heads=2, head_dim=8, tokens=512)
    assert {row["backend"] for row in rows} >= {"loop", "sdpa_mask"}
    assert all(row["ok"] for row in rows), rows


@pytest.mark.slow
def test_end_to_end_section_runs_the_user_path_on_cpu(tmp_path):
    """bench/gpu_e2e.py --tiny: synth -> prepare -> fit (the NiT-B ablation config, overrides only) -> sample, as
    subprocesses, each result a JSON line written as soon as it exists."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_e2e.py"
    out = tmp_path / "e2e.jsonl"
    done = subprocess.run([sys.executable, str(script), "--tiny", "--device", "cpu", "--work", str(tmp_path / "w"),
                           "--out", str(out), "--raw-tokens-per-s", "1000"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    rows = {row["section"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"e2e-synth", "e2e-prepare", "e2e-fit", "e2e-sample"}
    assert all(row["rc"] == 0 for row in rows.values())
    assert rows["e2e-prepare"]["images"] == 40 and rows["e2e-fit"]["perf/tokens_per_sec"] > 0
    assert rows["e2e-fit"]["fit_vs_raw"] > 0 and rows["e2e-sample"]["images_per_s"] > 0
