"""Training-step throughput of NiT: a packed batch vs the same images padded to the longest (DiT-style), as a ratio.

One step = flow-matching forward + backward + AdamW, exactly as NiTModule runs it. "Padded" gives every image
L_max = max(h·w) tokens, as a (B, L_max) batch with a key-padding mask would: the pads go through every Linear and
attention (masking removes their effect, not their cost), so it runs the same kernels on B·L_max tokens and isolates
the cost of padding. Throughput counts real tokens only. On CPU use few blocks (--depth) and say so; on CUDA the
best backend, bf16 autocast and MFU = achieved FLOP/s ÷ the GPU's bf16 peak (models/flops.py).

    python bench/train_step.py                       # CPU: NiT-S, 2 blocks, 4096-token pack
    python bench/train_step.py --device cuda         # GPU: NiT-S, all 12 blocks, 65536-token pack, bf16
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

from nit_lightning.diffusion.flow import FlowMatchingLoss
from nit_lightning.models import PRESETS, build_nit
from nit_lightning.models.attention import resolve_backend
from nit_lightning.models.flops import training_flops
from nit_lightning.training.callbacks import detect_peak_flops


def imagenet_like_grids(budget: int, seed: int) -> list[tuple[int, int]]:
    """Token grids of native ImageNet images under DC-AE f32 (sides 256–512 px → 8–16 tokens), filling `budget`."""
    g = torch.Generator().manual_seed(seed)
    grids, total = [], 0
    while True:
        short = int(torch.randint(8, 13, (1,), generator=g))  # short side 256..384 px, ImageNet's typical range
        ratio = 1.0 + 0.5 * float(torch.rand(1, generator=g))  # aspect 1:1 .. 3:2 (most ImageNet photos are 4:3)
        long = min(16, round(short * ratio))
        h, w = (short, long) if float(torch.rand(1, generator=g)) < 0.7 else (long, short)  # landscape 70%
        if total + h * w > budget:
            return grids
        grids.append((h, w))
        total += h * w


def make_step(net, loss_fn, x, y, hw, device: torch.device, dtype):
    """One training step (forward + backward + AdamW) as a closure; its optimiser state is its own."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, eps=1e-6,
                                  fused=device.type == "cuda" or None)
    generator = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = loss_fn(net, x, y, hw, generator=generator)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_interleaved(steps: dict, rounds: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds per step of each variant, timed alternately so that load drift on a shared machine hits all."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="NiT-S", choices=sorted(PRESETS))
    parser.add_argument("--depth", type=int, default=None, help="blocks (default: 2 on CPU, the preset's on CUDA)")
    parser.add_argument("--tokens", type=int, default=None, help="pack budget (default: 4096 CPU, 65536 CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: 5 CPU, 20 CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 CPU, 5 CUDA)")
    parser.add_argument("--backend", default="auto", help="attention backend (auto picks the best available)")
    parser.add_argument("--latent-channels", type=int, default=32)
    parser.add_argument("--peak-flops", type=float, default=None, help="GPU bf16 peak FLOP/s (default: from its name)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    depth = args.depth or (PRESETS[args.model]["depth"] if cuda else 2)
    tokens = args.tokens or (65536 if cuda else 4096)
    steps, warmup = args.steps or (20 if cuda else 5), args.warmup if args.warmup is not None else (5 if cuda else 1)
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    net = build_nit(args.model, depth=depth, in_channels=args.latent_channels, attn_backend=args.backend).to(device)
    loss_fn = FlowMatchingLoss()

    grids = imagenet_like_grids(tokens, args.seed)
    lengths = [h * w for h, w in grids]
    B, n_real, l_max = len(grids), sum(lengths), max(lengths)
    C = net.config.token_dim
    y = torch.randint(0, 1000, (B,), device=device)
    variants, steps_fn = {"packed": grids, "padded": [(1, l_max)] * B}, {}
    for name, hw_list in variants.items():
        hw = torch.tensor(hw_list, dtype=torch.long, device=device)
        x = torch.randn(int(hw.prod(1).sum()), C, device=device)
        steps_fn[name] = make_step(net, loss_fn, x, y, hw, device, dtype)
    medians = time_interleaved(steps_fn, steps, warmup, device)
    rows = [(name, sum(h * w for h, w in variants[name]), medians[name], n_real / medians[name]) for name in variants]
    peak = args.peak_flops if args.peak_flops is not None else detect_peak_flops(device)
    # Useful FLOPs are those of the real tokens only: the padded run does more work for the same images.
    useful = training_flops(net.config, lengths)

    where = torch.cuda.get_device_name(device) if cuda else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    print(f"# {args.model} train step, depth {depth}{' (reduced for CPU)' if depth != PRESETS[args.model]['depth'] else ''},"
          f" {B} images, {n_real} real tokens (L_max {l_max}), {dtype}, backend "
          f"{resolve_backend(args.backend, device, dtype, True)}")
    print(f"# {where}, torch {torch.__version__}; median of {steps} alternating timed steps each, after {warmup} warm-up")
    print("| batch | tokens computed | s/step | real tokens/s | images/s |" + (" MFU |" if peak else ""))
    print("|---|---|---|---|---|" + ("---|" if peak else ""))
    for name, n, seconds, rate in rows:
        mfu = f" {useful / seconds / peak:.1%} |" if peak else ""
        print(f"| {name} | {n} | {seconds:.3f} | {rate:,.0f} | {B / seconds:.1f} |{mfu}")
    print(f"\npacked / padded throughput: {rows[0][3] / rows[1][3]:.2f}x "
          f"(padding computes {rows[1][1] / rows[0][1]:.2f}x the tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
