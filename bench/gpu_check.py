"""One prepared GPU check (issues 9, 15): backend correctness, NiT-XL/NiT-B training MFU per compile mode, sampling latency.

Usage: `python bench/gpu_check.py [--out outputs/gpu_check.json] [--jsonl outputs/gpu_check.jsonl] [--quick]
[--sections backends,packed,train,sampling,e2e] [--modes none,blocks,model] [--train-timeout 240] [--budget 330]`
(or `make gpu-check`). Every result is appended to the JSON-lines file the moment it exists, so a killed run still
leaves numbers; each training run is a child process with its own timeout. Prints one table last and writes JSON.
The fp32 backend checks run in true fp32 (TF32 off for cuBLAS, cuDNN and Triton, restored afterwards) against a
1e-4 tolerance. Without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

from nit_lightning.data.lengths import recipe_grids
from nit_lightning.diffusion.flow import FlowMatchingLoss
from nit_lightning.models import build_nit
from nit_lightning.models.attention import available_backends, packed_attention, reference_attention
from nit_lightning.models.flops import training_flops_per_token
from nit_lightning.training.compile import COMPILE_MODES, compile_net

# Dense bf16 peak of one H100/H200 SXM (no sparsity); override with --peak-tflops for other cards.
DEFAULT_PEAK_TFLOPS = 989.0


def packed_grid_sizes(total_tokens: int, seed: int = 0) -> list[tuple[int, int]]:
    """Recipe-mixture latent grids (native ImageNet-like + 8×8 + 16×16) whose token counts sum to at most total_tokens."""
    sizes, used = [], 0
    for h, w in recipe_grids(max(64, total_tokens // 16), seed=seed).tolist():
        if used + h * w > total_tokens:
            continue  # keep filling with smaller images: a near-full pack, as the packer would make
        sizes.append((h, w))
        used += h * w
    return sizes


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@contextlib.contextmanager
def true_fp32() -> Iterator[None]:
    """fp32 matmuls and convolutions in IEEE fp32: TF32 off (cuBLAS, cuDNN, Triton/Inductor kernels), then restored.

    With TF32 on (as training runs), fp32 attention is only ~1e-3 from float64 (TF32 keeps 10 mantissa bits); the
    1e-4 tolerance of the fp32 check assumes true fp32.
    """
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[0], saved[1]
        torch.set_float32_matmul_precision(saved[2])


def emit(jsonl: str | Path | None, section: str, record: dict) -> dict:
    """Append {"section", **record} as one JSON line now (flushed to disk): a killed run keeps what it measured."""
    if jsonl is not None:
        Path(jsonl).parent.mkdir(parents=True, exist_ok=True)
        with open(jsonl, "a") as handle:
            handle.write(json.dumps({"section": section, **record}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    return record


def check_backends(device: torch.device, dtype: torch.dtype, heads: int = 16, head_dim: int = 72,
                   tokens: int = 8192) -> list[dict]:
    """Every available backend vs a float64 reference written out by hand, forward and backward."""
    grids = packed_grid_sizes(tokens, seed=1)
    seqlens = torch.tensor([h * w for h, w in grids], device=device)
    cu = torch.zeros(len(grids) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(seqlens, 0)
    max_seqlen = int(seqlens.max())
    n = int(seqlens.sum())
    generator = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(n, heads, head_dim, device=device, generator=generator) for _ in range(3))
    grad_out = torch.randn(n, heads, head_dim, device=device, generator=generator)

    def run(backend: str, run_dtype: torch.dtype):
        # fresh leaves per run: .to() of a tensor already in run_dtype is the tensor itself, so .grad would accumulate
        leaves = [t.detach().to(run_dtype, copy=True).requires_grad_(True) for t in (q, k, v)]
        out = packed_attention(*leaves, cu, max_seqlen, backend=backend, seqlens=seqlens.tolist())
        out.backward(grad_out.to(run_dtype))
        return out.detach(), [t.grad.detach() for t in leaves]

    leaves = [t.detach().to(torch.float64, copy=True).requires_grad_(True) for t in (q, k, v)]
    ref_out = reference_attention(*leaves, seqlens.tolist())
    ref_out.backward(grad_out.double())
    ref_out, ref_grads = ref_out.detach(), [t.grad.detach() for t in leaves]
    rows = []
    for backend in available_backends(device, dtype, requires_grad=True):
        try:
            out, grads = run(backend, dtype)
            fwd = relative_error(out, ref_out)
            bwd = max(relative_error(g, r) for g, r in zip(grads, ref_grads))
            tolerance = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
            rows.append({"backend": backend, "dtype": str(dtype).split(".")[-1], "fwd_rel_err": fwd, "bwd_rel_err": bwd,
                         "tolerance": tolerance, "ok": fwd < tolerance and bwd < tolerance, **_tf32_state(dtype)})
        except Exception as error:  # a backend failing is a finding to report, not a reason to stop the check
            rows.append({"backend": backend, "dtype": str(dtype).split(".")[-1], "error": repr(error)[:200], "ok": False,
                         **_tf32_state(dtype)})
    return rows


def _tf32_state(dtype: torch.dtype) -> dict:
    """For fp32 rows: whether TF32 was on when they ran (the tolerance means true fp32 only when it was off)."""
    if dtype != torch.float32:
        return {}
    return {"tf32": bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
                         or torch.get_float32_matmul_precision() != "highest")}


def time_packed_vs_padded(device: torch.device, heads: int = 16, head_dim: int = 72, repeats: int = 10) -> dict:
    """fwd+bwd time of packed attention (best backend) vs the same images padded to the longest with a key mask."""
    grids = packed_grid_sizes(16384, seed=3)
    seqlens = [h * w for h, w in grids]
    n, longest, batch = sum(seqlens), max(seqlens), len(seqlens)
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(torch.tensor(seqlens, device=device), 0)
    dtype = torch.bfloat16
    backend = available_backends(device, dtype, requires_grad=True)[0]
    packed = [torch.randn(n, heads, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    padded = [torch.randn(batch, heads, longest, head_dim, device=device, dtype=dtype, requires_grad=True)
              for _ in range(3)]
    keep = torch.arange(longest, device=device)[None, :] < torch.tensor(seqlens, device=device)[:, None]
    mask = keep[:, None, None, :]  # (B, 1, 1, L): padded keys masked out

    def packed_step():
        packed_attention(*packed, cu, longest, backend=backend, seqlens=seqlens).sum().backward()

    def padded_step():
        torch.nn.functional.scaled_dot_product_attention(*padded, attn_mask=mask).sum().backward()

    timings = {}
    for name, step in (("packed", packed_step), ("padded", padded_step)):
        step()
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        torch.cuda.synchronize(device)
        timings[name] = (time.perf_counter() - start) / repeats
    return {"backend": backend, "tokens": n, "images": batch, "padded_tokens": batch * longest,
            "packed_s": timings["packed"], "padded_s": timings["padded"], "speedup": timings["padded"] / timings["packed"]}


def time_training(preset: str, tokens: int, device: torch.device, compile_mode: str, peak_tflops: float | None,
                  steps: int = 6, warmup: int = 3, backend: str = "inductor", profile: bool = True) -> dict:
    """tokens/s, images/s, MFU and peak memory of bf16-mixed training steps on one packed batch, for one compile mode.

    The step is NiTModule's: flow-matching loss under bf16 autocast, backward, grad clip 1.0, fused AdamW (CUDA); the
    compile modes are NiTModule's (training/compile.py). Device-generic so that CPU tests can run it on a tiny preset.
    """
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    net = build_nit(preset).to(device)
    with torch.no_grad():  # leave the zero-init: a zero network skips no FLOPs, but perturb so values are realistic
        for p in net.parameters():
            if p.ndim >= 2 and float(p.abs().sum()) == 0.0:
                p.normal_(0, 0.02)
    compile_net(net, compile_mode, backend=backend)
    loss_fn = FlowMatchingLoss()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, eps=1e-6,
                                  fused=cuda or None)
    grids = packed_grid_sizes(tokens, seed=2)
    hw = torch.tensor(grids, device=device)
    n = int(hw.prod(-1).sum())
    x0 = torch.randn(n, net.config.in_channels * net.config.patch_size ** 2, device=device)
    y = torch.randint(0, net.config.num_classes, (len(grids),), device=device)
    generator = torch.Generator(device).manual_seed(0)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = loss_fn(net, x0, y, hw, generator=generator)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()  # includes compiling
    sync()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    flops = training_flops_per_token(net.config, [h * w for h, w in grids]) * n
    row = {"preset": preset, "tokens": n, "images": len(grids), "compile": compile_mode,
           "first_step_s": first, "step_s": seconds, "tokens_per_s": n / seconds, "images_per_s": len(grids) / seconds,
           "mfu": flops / seconds / (peak_tflops * 1e12) if peak_tflops else None,
           "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None}
    if profile:  # after the timed steps, so the profiler's overhead is not in the figures above
        try:
            row["profile"] = profile_step(step, sync, cuda)
        except Exception as error:  # a profiler failure must not cost the timing row
            row["profile_error"] = repr(error)[:200]
    return row


KERNEL_KINDS = (  # (kind, substrings of a kernel or op name), first match wins; lower-case
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "mm", "linear")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("norm", ("norm",)),
    ("fused (triton)", ("triton",)),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(key in lowered for key in keys)), "other elementwise")


def profile_step(step, sync, cuda: bool, top: int = 8) -> dict:
    """One more step under torch.profiler: device time by kernel kind (matmul, attention, ...), the top kernels, and
    how much of the step's wall time the device was busy (below ~90% the host launches, not the GPU, set the pace)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        sync()
        wall_us = (time.perf_counter() - start) * 1e6
    device_type = "cuda" if cuda else "cpu"
    kernels = [e for e in prof.key_averages() if str(e.device_type).lower().endswith(device_type)]
    if not cuda:  # on CPU only leaf ops are comparable to kernels; cpu-side totals double count their children
        kernels = [e for e in kernels if e.self_cpu_time_total > 0]

    def self_us(event) -> float:
        return float(event.self_device_time_total if cuda else event.self_cpu_time_total)

    total = sum(self_us(e) for e in kernels) or 1.0
    kinds: dict[str, float] = {}
    for event in kernels:
        kinds[kernel_kind(event.key)] = kinds.get(kernel_kind(event.key), 0.0) + self_us(event)
    ranked = sorted(kernels, key=self_us, reverse=True)[:top]
    return {"busy_fraction": min(total / wall_us, 1.0) if cuda else None, "device_ms": total / 1e3,
            "wall_ms": wall_us / 1e3,
            "by_kind": {k: round(v / total, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"name": e.key[:90], "ms": round(self_us(e) / 1e3, 3), "share": round(self_us(e) / total, 3),
                     "calls": e.count} for e in ranked]}


def run_training_child(config: dict, timeout_s: float, jsonl: str | Path | None) -> dict:
    """`time_training(**config)` in a child process with a timeout; its record, or one saying why there is none.

    A child per run: a compile that runs past its time or a CUDA OOM ends that run only, the next starts on a clean
    device, and the record reaches the JSON-lines file before the next run begins.
    """
    command = [sys.executable, str(Path(__file__).resolve()), "--train-one", json.dumps(config)]
    label = {k: config[k] for k in ("preset", "tokens", "compile_mode")}
    done = run_child(command, timeout_s)
    if done is None:
        record = {**label, "compile": config["compile_mode"], "error": f"timeout after {timeout_s:.0f} s"}
    else:
        results = [line[len("RESULT "):] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode == 0 and results:
            record = json.loads(results[-1])
        else:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            record = {**label, "compile": config["compile_mode"], "error": f"exit {done.returncode}: {' | '.join(tail)}"[:400]}
    return emit(jsonl, "train", record)


def time_sampling(device: torch.device, size: tuple[int, int], num: int, tokens_per_forward: int = 16384,
                  steps: int = 50) -> dict:
    """NiT-XL (random weights) images/s through `generation.generate`'s packing and sampler at the `sample` command's
    defaults (16384 tokens per pack, precision auto = bf16 autocast on CUDA), Euler-50 + CFG 1.5 on [0, 0.7]; the
    decode is left out (the end-to-end section times a real `sample` run with DC-AE)."""
    from nit_lightning.diffusion.sampling import SampleRequest, derive_seed, plan_sample_packs, sample_pack
    from nit_lightning.generation.pipeline import NetModelFn
    from nit_lightning.generation.settings import SamplerSettings

    net = build_nit("NiT-XL").to(device).eval().requires_grad_(False)
    sampler = SamplerSettings(method="euler", steps=steps, cfg_scale=1.5, cfg_interval=(0.0, 0.7)).for_device(device)
    grid = (size[0] // 32, size[1] // 32)
    requests = [SampleRequest(i, grid, i % 1000, derive_seed(0, i)) for i in range(num)]
    packs = plan_sample_packs(requests, tokens_per_forward, cfg=sampler.guided)

    def run(pack, pack_steps):
        return sample_pack(NetModelFn(net, sampler.precision), pack, net.config.token_dim, device=device,
                           method=sampler.method, steps=pack_steps, cfg_scale=sampler.cfg_scale,
                           cfg_interval=sampler.cfg_interval, null_class=net.null_class,
                           dtype=sampler.state_dtype)

    with torch.no_grad():
        run(packs[0], 2)  # warm-up: kernels, allocator
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for pack in packs:
            run(pack, steps)
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"sizes": f"{size[0]}x{size[1]}", "batch": num, "packs": len(packs), "tokens_per_forward": tokens_per_forward,
            "precision": sampler.precision, "steps": steps, "seconds": seconds, "images_per_s": num / seconds}


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"GPU check on {results['device']}")
    for column in ("check", "setting", "result"):
        table.add_column(column)
    for row in results["backends"]:
        result = (f"fwd {row['fwd_rel_err']:.1e} bwd {row['bwd_rel_err']:.1e}" if "error" not in row else row["error"])
        setting = f"{row['backend']} {row['dtype']}" + ({True: " (TF32 ON)", False: " (TF32 off)"}.get(row.get("tf32"), ""))
        table.add_row("attention vs fp64", setting, ("ok " if row["ok"] else "FAIL ") + result)
    row = results.get("packed_vs_padded", {})
    if "error" in row:
        table.add_row("packed vs padded attn", "", row["error"])
    elif row:
        table.add_row("packed vs padded attn", f"{row['backend']} bf16, {row['images']} images, {row['tokens']} tok",
                      f"{row['packed_s'] * 1e3:.1f} ms vs {row['padded_s'] * 1e3:.1f} ms: {row['speedup']:.2f}x "
                      f"(target >= 1.5x)")
    for row in results["training"]:
        if "error" in row:
            table.add_row("train step", f"{row['preset']} compile={row['compile']}", row["error"])
            continue
        mfu = f"MFU {row['mfu']:.1%}" if row.get("mfu") is not None else "MFU n/a"
        mem = f", {row['peak_mem_gib']:.1f} GiB" if row.get("peak_mem_gib") is not None else ""
        table.add_row("train step", f"{row['preset']} {row['tokens']} tok compile={row['compile']}",
                      f"{row['step_s']:.3f} s, {row['tokens_per_s']:,.0f} tok/s, {row['images_per_s']:.0f} img/s, {mfu}"
                      f"{mem} (first step {row['first_step_s']:.0f} s)")
        if row.get("profile"):
            prof = row["profile"]
            busy = f"GPU busy {prof['busy_fraction']:.0%} of the step; " if prof.get("busy_fraction") is not None else ""
            kinds = ", ".join(f"{k} {v:.0%}" for k, v in list(prof["by_kind"].items())[:4])
            table.add_row("  profile", f"{row['preset']} compile={row['compile']}", busy + kinds)
    for row in results["sampling"]:
        if "error" in row:
            table.add_row("sampling", row.get("sizes", "?"), row["error"])
            continue
        table.add_row("sampling Euler-50 CFG (no decode)", f"NiT-XL {row['sizes']} ×{row['batch']} in {row['packs']} "
                      f"packs of {row['tokens_per_forward']} tok, {row['precision']}",
                      f"{row['seconds']:.2f} s, {row['images_per_s']:.1f} img/s (target 256²: 150, 512²: 40)")
    for row in results.get("e2e", []):
        detail = {k: v for k, v in row.items() if k not in ("section", "time")}
        table.add_row("end to end", row["section"].removeprefix("e2e-"), json.dumps(detail)[:160])
    console.print(table)


SECTION_KEYS = {"train": "training", "sampling": "sampling", "e2e": "e2e"}
MIN_STEP_S = 30.0  # a training child or the end-to-end section needs at least this to produce a number


class Budget:
    """Seconds left of one wall-clock budget; `timeout(cap)` = what the next step may use, or None to skip it."""

    def __init__(self, total_s: float, clock=time.perf_counter) -> None:
        self.total_s, self.clock, self.start = total_s, clock, clock()

    def left(self) -> float:
        return self.total_s - (self.clock() - self.start)

    def timeout(self, cap_s: float) -> float | None:
        left = self.left()
        return None if left < MIN_STEP_S else min(cap_s, left)


def plan_steps(sections: set[str], modes: list[str]) -> list[tuple[str, dict]]:
    """The budgeted steps in priority order: eager training (the baseline), sampling, the end-to-end user path, then
    each compiled mode for both presets."""
    presets = (("NiT-XL", 16384), ("NiT-B", 65536))
    steps: list[tuple[str, dict]] = []
    train = [m for m in modes if m in COMPILE_MODES] if "train" in sections else []
    if "none" in train:
        steps += [("train", {"preset": p, "tokens": n, "compile": "none"}) for p, n in presets]
    if "sampling" in sections:  # 2 packs each at the default 16384 tokens with CFG
        steps += [("sampling", {"size": (256, 256), "num": 256}), ("sampling", {"size": (512, 512), "num": 64})]
    if "e2e" in sections:
        steps.append(("e2e", {"sizes": "synth -> prepare -> fit -> sample"}))
    for mode in (m for m in train if m != "none"):
        steps += [("train", {"preset": p, "tokens": n, "compile": mode}) for p, n in presets]
    return steps


def skipped_row(kind: str, detail: dict, args: argparse.Namespace) -> dict:
    """The record of a step the budget left out, in the shape its table row reads."""
    why = f"skipped: the {args.budget:.0f} s budget was spent (rerun with --sections {kind})"
    if kind == "sampling":
        return {"sizes": str(detail["size"]), "error": why}
    if kind == "e2e":
        return {"section": "e2e-skipped", "error": why}
    return {**detail, "error": why}


def run_child(command: list[str], timeout: float) -> subprocess.CompletedProcess | None:
    """Run a child in its own process group; on timeout kill the whole group (its compile workers and commands too)
    and return None."""
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return None
    return subprocess.CompletedProcess(command, child.returncode, stdout, stderr)


def run_e2e(args: argparse.Namespace, training: list[dict], timeout: float) -> list[dict]:
    """bench/gpu_e2e.py in a child with the time left; its rows from the JSON lines it appended."""
    raw = [r for r in training if r.get("preset") == "NiT-B" and r.get("compile") == "none" and "tokens_per_s" in r]
    command = [sys.executable, str(Path(__file__).with_name("gpu_e2e.py")), "--work", args.e2e_work,
               "--out", args.jsonl] + (["--raw-tokens-per-s", str(raw[0]["tokens_per_s"])] if raw else [])
    before = Path(args.jsonl).read_text().count("\n") if Path(args.jsonl).is_file() else 0
    done = run_child(command, timeout)
    if done is None:
        emit(args.jsonl, "e2e-timeout", {"error": f"end-to-end section stopped after {timeout:.0f} s"})
    elif done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        emit(args.jsonl, "e2e-failed", {"error": f"exit {done.returncode}: {tail}"[:400]})
    lines = Path(args.jsonl).read_text().splitlines()[before:]
    return [row for row in map(json.loads, lines) if row.get("section", "").startswith("e2e-")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--out", default="outputs/gpu_check.json")
    parser.add_argument("--jsonl", default="outputs/gpu_check.jsonl", help="results appended as they come")
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                        help="dense bf16 peak of the card, for MFU (H100/H200 SXM: 989)")
    parser.add_argument("--quick", action="store_true", help="training in eager mode only (for a short lease)")
    parser.add_argument("--sections", default="backends,packed,train,sampling,e2e")
    parser.add_argument("--e2e-work", default="/tmp/nit_gpu_e2e", help="scratch folder of the end-to-end section")
    parser.add_argument("--e2e-timeout", type=float, default=420.0, help="seconds for the whole end-to-end section")
    parser.add_argument("--modes", default=",".join(COMPILE_MODES), help="compile modes of the training section")
    parser.add_argument("--train-timeout", type=float, default=240.0, help="seconds per training run (a child process)")
    parser.add_argument("--budget", type=float, default=330.0,
                        help="wall-clock seconds for the whole check (default 330: the table is out within 6 min)")
    parser.add_argument("--train-one", default=None, help=argparse.SUPPRESS)  # child mode: one time_training run
    args = parser.parse_args(argv)
    if args.train_one is not None:
        config = json.loads(args.train_one)
        config["device"] = torch.device(config.get("device", "cuda"))
        if config["device"].type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        print("RESULT " + json.dumps(time_training(**config)), flush=True)
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (CPU paths are covered by `make test` and bench/).")
        return 0
    budget = Budget(args.budget)
    sections = set(args.sections.split(","))
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    results: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                     "peak_tflops": args.peak_tflops, "backends": [], "training": [], "sampling": []}
    emit(args.jsonl, "start", {k: results[k] for k in ("device", "torch", "peak_tflops")})
    if "backends" in sections:
        results["backends"] += [emit(args.jsonl, "backends", r) for r in check_backends(device, torch.bfloat16)]
        with true_fp32():
            results["backends"] += [emit(args.jsonl, "backends", r) for r in check_backends(device, torch.float32)]
    if "packed" in sections:
        try:
            results["packed_vs_padded"] = time_packed_vs_padded(device)
        except Exception as error:
            results["packed_vs_padded"] = {"error": repr(error)[:300]}
        emit(args.jsonl, "packed_vs_padded", results["packed_vs_padded"])
    # Everything after the quick in-process checks runs in priority order under one budget: the eager training runs,
    # sampling and the end-to-end user path first, the compiled modes with the time left. A step that would start
    # with less than MIN_STEP_S left is recorded as skipped, so the table still says what was not measured.
    for kind, detail in plan_steps(sections, ["none"] if args.quick else args.modes.split(",")):
        timeout = budget.timeout(args.train_timeout if kind == "train" else args.e2e_timeout if kind == "e2e" else 120)
        if timeout is None:
            results.setdefault(SECTION_KEYS[kind], []).append(emit(args.jsonl, kind, skipped_row(kind, detail, args)))
            continue
        if kind == "train":
            torch.cuda.empty_cache()  # the children need the memory this process cached in the sections above
            config = {"preset": detail["preset"], "tokens": detail["tokens"], "compile_mode": detail["compile"],
                      "peak_tflops": args.peak_tflops, "device": "cuda"}
            results["training"].append(run_training_child(config, timeout, args.jsonl))
        elif kind == "sampling":
            try:
                row = time_sampling(device, detail["size"], detail["num"])
            except Exception as error:
                row = {"sizes": str(detail["size"]), "error": repr(error)[:300]}
            results["sampling"].append(emit(args.jsonl, "sampling", row))
            torch.cuda.empty_cache()
        else:  # the user path, each step a real command (bench/gpu_e2e.py), results in the same JSON lines
            results["e2e"] = run_e2e(args, results["training"], timeout)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results)
    print(f"wrote {args.out} and {args.jsonl}")
    return 0 if all(row.get("ok") for row in results["backends"]) else 1


if __name__ == "__main__":
    sys.exit(main())
