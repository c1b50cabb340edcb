"""Bench: fwd+bwd time of a NiT block stack on one packed batch per attention backend, vs a padded batch.

python bench/attention.py [--preset NiT-S] [--blocks 2] [--tokens 8192] [--pack native|fixed-256|fixed-512] [--reps 3]
                          [--backends loop,sdpa_mask,flex]
Configurations are timed round-robin (one warm-up each, then `reps` rounds); best and median are printed.
The padded alternative pads every image to the longest and runs the same weights as (B, Lmax, D) with SDPA and a
key-padding mask (what a DiT-style batch does with mixed sizes).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from nit_lightning.models import build_nit
from nit_lightning.models.attention import available_backends
from nit_lightning.models.rope import apply_rope


def imagenet_like_pack(tokens: int, seed: int, lo: int = 8, hi: int = 16) -> torch.Tensor:
    """hw (B, 2) of latent grids with sides lo..hi (256..512 px at f32), at most `tokens` in all (100 misses to stop)."""
    g = torch.Generator().manual_seed(seed)
    hw, total, misses = [], 0, 0
    while misses < 100:
        h, w = (int(torch.randint(lo, hi + 1, (1,), generator=g)) for _ in range(2))
        if total + h * w > tokens:
            misses += 1
            continue
        hw.append((h, w))
        total += h * w
    return torch.tensor(hw)


def padded_forward(net, x_ND, c_BD, hw, meta) -> torch.Tensor:
    """The same blocks on a padded (B, Lmax, D) batch with a key-padding mask; returns the valid tokens (N, D)."""
    seqlens = meta.seqlens_host
    B, L = len(seqlens), max(seqlens)
    valid_BL = torch.arange(L)[None] < torch.tensor(seqlens)[:, None]  # (B, L)
    x = x_ND.new_zeros(B, L, x_ND.shape[-1])
    x[valid_BL] = x_ND
    cos = meta.rope_cos.new_zeros(B, L, meta.rope_cos.shape[-1])
    sin = torch.zeros_like(cos)
    cos[valid_BL], sin[valid_BL] = meta.rope_cos, meta.rope_sin
    key_mask = valid_BL[:, None, None, :]  # (B, 1, 1, L): padded keys never attended
    for blk in net.blocks:
        mod = blk.adaLN_modulation(c_BD)[:, None]  # (B, 1, 6D) broadcast over the sequence
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=-1)
        a = blk.attn
        h = blk.norm1(x) * (1 + sc1) + sh1
        q, k, v = a.qkv(h).view(B, L, 3, a.num_heads, a.head_dim).unbind(2)  # (B, L, H, Dh)
        q = apply_rope(a.q_norm(q).flatten(0, 1), cos.flatten(0, 1), sin.flatten(0, 1)).view_as(q)
        k = apply_rope(a.k_norm(k).flatten(0, 1), cos.flatten(0, 1), sin.flatten(0, 1)).view_as(k)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask)
        x = x + g1 * a.proj(o.transpose(1, 2).reshape(B, L, -1))
        x = x + g2 * blk.mlp(blk.norm2(x) * (1 + sc2) + sh2)
    return x[valid_BL]


def row(name: str, train: bool, sec: tuple[float, float], tokens: int, pad: dict) -> None:
    """One markdown table row, printed as soon as it is measured."""
    kind = "fwd+bwd" if train else "fwd"
    speedup = pad[train][0] / sec[0]
    print(f"| {name} | {kind} | {sec[0]:.3f} | {sec[1]:.3f} | {tokens} | {speedup:.2f}× |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--preset", default="NiT-S")
    ap.add_argument("--blocks", type=int, default=2, help="blocks in the stack (NiT-S has 12; 2 keeps a 2-core CPU run short)")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--pack", default="native", choices=["native", "fixed-256", "fixed-512"],
                    help="native: random sides 8..16; fixed-256/512: all 8×8 / 16×16 grids (no padding needed)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backends", default=None,
                    help="comma list; default: all available here (on CPU without flex: eager, ~100 s a forward)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.float32
    net = build_nit(args.preset, depth=args.blocks).to(device)
    with torch.no_grad():  # leave zero-init: random adaLN so the blocks do real work and grads flow everywhere
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    if args.pack == "native":
        hw = imagenet_like_pack(args.tokens, args.seed).to(device)
    else:
        side = 8 if args.pack == "fixed-256" else 16
        hw = torch.tensor([[side, side]] * (args.tokens // side**2), device=device)
    seqlens = hw.prod(-1)
    n = int(seqlens.sum())
    x = torch.randn(n, net.config.hidden_size, device=device)
    t, y = torch.rand(len(hw), device=device), torch.randint(0, 1000, (len(hw),), device=device)
    meta = net.build_meta(hw, n)
    c = net.t_embedder(t) + net.y_embedder(y)
    c = c.detach()
    names = args.backends.split(",") if args.backends else available_backends(device, dtype, False)
    if not args.backends and device.type == "cpu":
        names.remove("flex")  # eager CPU flex materialises N² scores: ~100 s per 8192-token forward; ask for it by name
    grad_ok = set(available_backends(device, dtype, True))

    def packed_step(backend: str, train: bool):
        def step():
            xi = x.clone().requires_grad_(train)
            meta.cache.clear()  # mask building is part of a real forward
            with torch.set_grad_enabled(train):
                h = xi
                for blk in net.blocks:
                    blk.attn.backend = backend
                    h = blk(h, c, meta)
                if train:
                    h.square().mean().backward()
        return step

    def padded_step(train: bool):
        def step():
            xi = x.clone().requires_grad_(train)
            with torch.set_grad_enabled(train):
                out = padded_forward(net, xi, c, hw, meta)
                if train:
                    out.square().mean().backward()
        return step

    Lmax = max(meta.seqlens_host)
    print(f"# {args.preset} × {args.blocks} blocks, {args.pack} pack: {len(hw)} images, {n} tokens (max {Lmax}), "
          f"{device.type} {torch.__version__}, {torch.get_num_threads()} threads, {args.reps} reps", flush=True)
    print("| backend | pass | best (s) | median (s) | tokens computed | speed-up vs padded (best, same pass) |")
    print("|---|---|---|---|---|---|", flush=True)
    # Round-robin over configurations, so a shared machine's drifting load hits them all alike.
    configs = [("padded SDPA + key mask", tr, padded_step(tr), len(hw) * Lmax) for tr in (True, False)]
    for b in names:
        configs += [(b, tr, packed_step(b, tr), n) for tr in ((True, False) if b in grad_ok else (False,))]
    times: dict[int, list[float]] = {i: [] for i in range(len(configs))}
    for i, (_, _, fn, _) in enumerate(configs):
        fn()  # warm-up
    for _ in range(args.reps):
        for i, (_, _, fn, _) in enumerate(configs):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    best = {i: (min(v), statistics.median(v)) for i, v in times.items()}
    pad = {True: best[0], False: best[1]}
    for i, (name, train, _, tokens) in enumerate(configs):
        row(name, train, best[i], tokens, pad)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
