"""One prepared GPU check (issue 9): backend correctness, NiT-XL/NiT-B training throughput and MFU, sampling latency.

Usage: `python bench/gpu_check.py [--out outputs/gpu_check.json] [--quick]` (or `make gpu-check`).
Designed to finish inside 8 minutes on one H100/H200; without CUDA it says so and exits 0.
Prints one table last and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


from nit_lightning.data.lengths import recipe_grids
from nit_lightning.diffusion.flow import FlowMatchingLoss
from nit_lightning.diffusion.sampling import sample
from nit_lightning.models import build_nit
from nit_lightning.models.attention import available_backends, packed_attention, reference_attention
from nit_lightning.models.flops import training_flops_per_token

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
                         "ok": fwd < tolerance and bwd < tolerance})
        except Exception as error:  # a backend failing is a finding to report, not a reason to stop the check
            rows.append({"backend": backend, "dtype": str(dtype).split(".")[-1], "error": repr(error)[:200], "ok": False})
    return rows


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


def time_training(preset: str, tokens: int, device: torch.device, compile_blocks: bool, peak_tflops: float,
                  steps: int = 6, warmup: int = 3) -> dict:
    """tokens/s, images/s, MFU and peak memory of bf16-mixed training steps on one packed batch."""
    torch.cuda.reset_peak_memory_stats(device)
    net = build_nit(preset).to(device)
    with torch.no_grad():  # leave the zero-init: a zero network skips no FLOPs, but perturb so values are realistic
        for p in net.parameters():
            if p.ndim >= 2 and float(p.abs().sum()) == 0.0:
                p.normal_(0, 0.02)
    if compile_blocks:
        for index, block in enumerate(net.blocks):
            net.blocks[index] = torch.compile(block)
    loss_fn = FlowMatchingLoss()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, eps=1e-6,
                                  fused=True)
    grids = packed_grid_sizes(tokens, seed=2)
    hw = torch.tensor(grids, device=device)
    n = int(hw.prod(-1).sum())
    x0 = torch.randn(n, net.config.in_channels * net.config.patch_size ** 2, device=device)
    y = torch.randint(0, net.config.num_classes, (len(grids),), device=device)
    generator = torch.Generator(device).manual_seed(0)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = loss_fn(net, x0, y, hw, generator=generator)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    flops = training_flops_per_token(net.config, [h * w for h, w in grids]) * n
    return {"preset": preset, "tokens": n, "images": len(grids), "compile": compile_blocks,
            "step_s": seconds, "tokens_per_s": n / seconds, "images_per_s": len(grids) / seconds,
            "mfu": flops / seconds / (peak_tflops * 1e12),
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def time_sampling(device: torch.device, sizes: list[tuple[int, int]], batch: int, steps: int = 50,
                  cfg_scale: float = 2.0) -> dict:
    """Wall time of Euler sampling with CFG for a batch of latents of the given grid sizes, packed in one call."""
    net = build_nit("NiT-XL").to(device, torch.bfloat16).eval()
    grids = [sizes[i % len(sizes)] for i in range(batch)]
    hw = torch.tensor(grids, device=device)
    n = int(hw.prod(-1).sum())
    noise = torch.randn(n, net.config.in_channels, device=device, dtype=torch.bfloat16)
    y = torch.arange(batch, device=device) % net.config.num_classes

    def model_fn(x, t, labels, grid):
        return net(x.to(torch.bfloat16), t.to(torch.bfloat16), labels, grid)

    with torch.no_grad():
        sample(model_fn, noise, y, hw, method="euler", steps=2, cfg_scale=cfg_scale, null_class=net.null_class,
               dtype=torch.float32)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        sample(model_fn, noise, y, hw, method="euler", steps=steps, cfg_scale=cfg_scale, cfg_interval=(0.0, 0.7),
               null_class=net.null_class, dtype=torch.float32)
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"sizes": "+".join(f"{h * 32}x{w * 32}" for h, w in sorted(set(grids))), "batch": batch, "steps": steps,
            "seconds": seconds, "images_per_s": batch / seconds}


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"GPU check on {results['device']}")
    for column in ("check", "setting", "result"):
        table.add_column(column)
    for row in results["backends"]:
        result = (f"fwd {row['fwd_rel_err']:.1e} bwd {row['bwd_rel_err']:.1e}" if "error" not in row else row["error"])
        table.add_row("attention vs fp64", f"{row['backend']} {row['dtype']}", ("ok " if row["ok"] else "FAIL ") + result)
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
        table.add_row("train step", f"{row['preset']} {row['tokens']} tok compile={row['compile']}",
                      f"{row['tokens_per_s']:,.0f} tok/s, {row['images_per_s']:.0f} img/s, MFU {row['mfu']:.1%}, "
                      f"{row['peak_mem_gib']:.1f} GiB")
    for row in results["sampling"]:
        if "error" in row:
            table.add_row("sampling", row.get("sizes", "?"), row["error"])
            continue
        table.add_row("sampling Euler-50 CFG", f"{row['sizes']} ×{row['batch']}",
                      f"{row['seconds']:.2f} s, {row['images_per_s']:.2f} img/s")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/gpu_check.json")
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                        help="dense bf16 peak of the card, for MFU (H100/H200 SXM: 989)")
    parser.add_argument("--quick", action="store_true", help="skip torch.compile and NiT-B (for a short lease)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (CPU paths are covered by `make test` and bench/).")
        return 0
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    results: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                     "peak_tflops": args.peak_tflops, "backends": [], "training": [], "sampling": []}
    for dtype in (torch.bfloat16, torch.float32):
        results["backends"] += check_backends(device, dtype)
    try:
        results["packed_vs_padded"] = time_packed_vs_padded(device)
    except Exception as error:
        results["packed_vs_padded"] = {"error": repr(error)[:300]}
    runs = [("NiT-XL", 16384, False)] + ([] if args.quick else [("NiT-XL", 16384, True), ("NiT-B", 65536, False)])
    for preset, tokens, compile_blocks in runs:
        try:
            results["training"].append(time_training(preset, tokens, device, compile_blocks, args.peak_tflops))
        except Exception as error:  # report and go on: one failing setting must not hide the others
            results["training"].append({"preset": preset, "compile": compile_blocks, "error": repr(error)[:300]})
        torch.cuda.empty_cache()
    for sizes, batch in (([(8, 8)], 32), ([(16, 16)], 16), ([(8, 8), (16, 16), (10, 30), (30, 10), (24, 24)], 40)):
        try:
            results["sampling"].append(time_sampling(device, sizes, batch))
        except Exception as error:
            results["sampling"].append({"sizes": str(sizes), "error": repr(error)[:300]})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results)
    print(f"wrote {args.out}")
    return 0 if all(row.get("ok") for row in results["backends"]) else 1


if __name__ == "__main__":
    sys.exit(main())
