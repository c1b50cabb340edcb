"""bench/gpu_check.py: says so and exits 0 without CUDA; its device-generic parts (backend check in true fp32, JSON lines,
training per compile mode, the child process with its timeout) run on the CPU."""
from __future__ import annotations

import importlib.util
import json
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
    assert gpu_check.main(["--out", str(tmp_path / "gpu.json"), "--jsonl", str(tmp_path / "gpu.jsonl")]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "gpu.json").exists() and not (tmp_path / "gpu.jsonl").exists()  # GPU sections skipped


def test_grid_sizes_fill_the_budget_without_exceeding_it(gpu_check):
    grids = gpu_check.packed_grid_sizes(16384, seed=0)
    used = sum(h * w for h, w in grids)
    assert used <= 16384 and used > 0.95 * 16384 and len(set(grids)) > 3  # a near-full pack of many sizes


def test_backend_check_runs_on_cpu_and_every_backend_passes(gpu_check):
    rows = gpu_check.check_backends(torch.device("cpu"), torch.float32, heads=2, head_dim=8, tokens=512)
    assert {row["backend"] for row in rows} >= {"loop", "sdpa_mask"}
    assert all(row["ok"] for row in rows), rows


def test_true_fp32_turns_tf32_off_and_restores_it(gpu_check):
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        with pytest.raises(RuntimeError, match="inside"):
            with gpu_check.true_fp32():
                assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
                assert torch.get_float32_matmul_precision() == "highest"
                rows = gpu_check.check_backends(torch.device("cpu"), torch.float32, heads=2, head_dim=8, tokens=256)
                assert rows and all(row["tf32"] is False and row["tolerance"] == 1e-4 for row in rows)
                raise RuntimeError("inside")  # restored on the way out of an error too
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
        rows = gpu_check.check_backends(torch.device("cpu"), torch.float32, heads=2, head_dim=8, tokens=256)
        assert all(row["tf32"] is True for row in rows)  # said so when TF32 was on
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[0], saved[1]
        torch.set_float32_matmul_precision(saved[2])


def test_emit_appends_one_json_line_per_result_at_once(gpu_check, tmp_path):
    path = tmp_path / "out" / "check.jsonl"
    gpu_check.emit(path, "train", {"preset": "NiT-XL", "mfu": 0.3})
    assert json.loads(path.read_text()) == {"section": "train", "preset": "NiT-XL", "mfu": 0.3}  # on disk already
    gpu_check.emit(path, "sampling", {"images_per_s": 27.0})
    assert [json.loads(line)["section"] for line in path.read_text().splitlines()] == ["train", "sampling"]


def test_training_runs_in_every_compile_mode_on_cpu(gpu_check):
    torch._dynamo.reset()
    for mode in ("none", "blocks", "model"):
        row = gpu_check.time_training("NiT-debug", 256, torch.device("cpu"), mode, peak_tflops=None, steps=1, warmup=1,
                                      backend="aot_eager")
        assert row["compile"] == mode and row["tokens"] <= 256 and row["tokens_per_s"] > 0
        assert row["mfu"] is None and row["peak_mem_gib"] is None  # no peak FLOP/s or CUDA memory on a CPU
    torch._dynamo.reset()


def test_training_child_leaves_a_record_or_says_why(gpu_check, tmp_path):
    jsonl = tmp_path / "check.jsonl"
    config = {"preset": "NiT-debug", "tokens": 256, "compile_mode": "none", "peak_tflops": None, "device": "cpu",
              "steps": 1, "warmup": 1}
    row = gpu_check.run_training_child(config, timeout_s=300, jsonl=jsonl)
    assert "error" not in row and row["tokens_per_s"] > 0
    late = gpu_check.run_training_child(config, timeout_s=0.05, jsonl=jsonl)  # killed: the record says so
    assert late["error"].startswith("timeout after") and late["compile"] == "none"
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [("error" in line, line["section"]) for line in lines] == [(False, "train"), (True, "train")]


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
    assert rows["e2e-prepare"]["images"] == 40 and rows["e2e-fit"]["perf/tokens_per_s"] > 0
    assert rows["e2e-fit"]["fit_vs_raw"] > 0 and rows["e2e-sample"]["images_per_s"] > 0


def test_budget_orders_the_steps_and_skips_what_does_not_fit(gpu_check):
    steps = gpu_check.plan_steps({"train", "sampling", "e2e"}, ["none", "blocks", "model"])
    kinds = [(kind, detail.get("compile")) for kind, detail in steps]
    # the eager baseline, sampling and the user path come before any compiled run
    assert kinds[:5] == [("train", "none"), ("train", "none"), ("sampling", None), ("sampling", None), ("e2e", None)]
    assert kinds[5:] == [("train", "blocks")] * 2 + [("train", "model")] * 2
    assert [k for k, _ in gpu_check.plan_steps({"sampling"}, ["none"])] == ["sampling", "sampling"]
    now = [0.0]
    budget = gpu_check.Budget(100.0, clock=lambda: now[0])
    assert budget.timeout(240) == 100.0 and budget.timeout(40) == 40
    now[0] = 75.0
    assert budget.timeout(240) is None  # 25 s left: less than a step needs, so it is skipped and said so


def test_a_child_past_its_timeout_is_killed_with_its_own_children(gpu_check, tmp_path):
    import sys
    import time

    marker = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            f"open({str(marker)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    started = time.perf_counter()
    assert gpu_check.run_child([sys.executable, "-c", code], timeout=3) is None
    assert time.perf_counter() - started < 20
    pid = int(marker.read_text())
    time.sleep(0.5)
    status = Path(f"/proc/{pid}/status")
    assert not status.exists() or "zombie" in status.read_text()  # the grandchild went with the group
    done = gpu_check.run_child([sys.executable, "-c", "print('ok')"], timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == "ok"
