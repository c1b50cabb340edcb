"""Per-block memory traffic of NiT, before (the frozen 5b743b4 block) and after the issue-15 changes, side by side.

For one transformer block at NiT-S and NiT-XL widths on an ImageNet-like 4096-token pack, counts with a
TorchDispatchMode every aten op that computes (views excluded) and the bytes it reads and writes: inputs at their
real footprint (a broadcast operand counts once), outputs in full. That is the traffic an eager GPU run has, one
kernel per op; `torch.compile` fuses some of it away, which this CPU count cannot show. Also: bytes saved for
backward (activation memory per block, via saved-tensor hooks; shared storages counted once) and median wall time
with one thread.

    python bench/block_profile.py                      # NiT-S and NiT-XL widths, 4096 tokens, fp32 and bf16 autocast
    python bench/block_profile.py --widths NiT-S --tokens 1024 --reps 1 --detail
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from nit_lightning.models import PRESETS, NiTConfig
from nit_lightning.models.nit import NiTBlock
from nit_lightning.models.packed import PackedMeta



def _load_helper(name: str):
    """A module of tests/helpers/ loaded from its file: the "before" column is the frozen pre-change network, which
    lives with the equivalence tests. Loaded by path, so nothing of tests/ joins sys.path (no `helpers` package
    shadows another one)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "helpers" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"nit_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


nit_before = _load_helper("nit_before")
CudaAutocastPolicy = _load_helper("autocast").CudaAutocastPolicy


def imagenet_like_grids(budget: int, seed: int = 0) -> list[tuple[int, int]]:
    """Token grids of native ImageNet images under DC-AE f32 (sides 8..16 tokens = 256..512 px) up to `budget`."""
    g = torch.Generator().manual_seed(seed)
    grids, total = [], 0
    while True:
        h, w = (int(v) for v in torch.randint(8, 17, (2,), generator=g))
        if total + h * w > budget:
            return grids
        grids.append((h, w))
        total += h * w


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes an op has to touch for `t`: broadcast (stride-0) dimensions count once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class TrafficCounter(TorchDispatchMode):
    """Counts computing aten ops and the bytes they read and write; views and metadata ops are free."""

    FREE = {"aten::detach", "aten::lift_fresh", "aten::_local_scalar_dense", "aten::sym_size", "aten::sym_stride"}

    def __init__(self) -> None:
        super().__init__()
        self.ops, self.read, self.written = 0, 0, 0
        self.by_op: Counter[str] = Counter()
        self.bytes_by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if _is_view(func) or name in self.FREE:
            return out
        # Factories like new_zeros/zeros_like take a tensor for its metadata only: they read nothing.
        factory = name.startswith("aten::new_") or name.endswith("_like")
        ins = [] if factory else [a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        read = sum(tensor_bytes(a) for a in ins)
        written = sum(o.numel() * o.element_size() for o in outs)
        self.ops += 1
        self.read += read
        self.written += written
        self.by_op[name] += 1
        self.bytes_by_op[name] += read + written
        return out


class SavedBytes:
    """Bytes of the tensors autograd saves for backward during a forward (each storage once)."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def build_blocks(preset: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module, NiTConfig]:
    """The new block and the frozen block with the same weights (zero-initialised layers made non-zero)."""
    cfg = NiTConfig(**{**PRESETS[preset], "attn_backend": "loop"})
    torch.manual_seed(seed)
    new = NiTBlock(cfg)
    with torch.no_grad():
        for p in new.parameters():
            p.normal_(0, 0.02) if p.ndim >= 2 else p.uniform_(-0.1, 0.1)
    old = nit_before.NiTBlock(cfg)
    old.load_state_dict(new.state_dict(), strict=True)  # same keys and shapes: also a check
    return new, old, cfg


def make_run(block, meta, x, c, dtype: torch.dtype, backward: bool, cuda_policy: bool = True):
    """A closure running the block once (forward, or forward + backward of sum(y)); returns the saved-for-backward bytes."""
    autocast = dtype != torch.float32
    policy = CudaAutocastPolicy if autocast and cuda_policy else contextlib.nullcontext

    def run() -> int:
        xi = x.detach().requires_grad_(backward)
        block.zero_grad(set_to_none=True)
        saved = SavedBytes()
        with torch.autocast("cpu", dtype=dtype, enabled=autocast), policy(), torch.set_grad_enabled(backward), \
                torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            y = block(xi, c, meta)
        if backward:
            y.backward(torch.ones_like(y))
        return saved.total

    return run


def count(run) -> dict:
    """ops, bytes read/written and saved-for-backward bytes of one run (after a warm-up run)."""
    run()
    with TrafficCounter() as counter:
        saved = run()
    return {"ops": counter.ops, "read": counter.read, "written": counter.written, "saved": saved,
            "by_op": counter.by_op, "bytes_by_op": counter.bytes_by_op}


def time_alternating(runs: list, reps: int) -> list[float]:
    """Median seconds of each run, timed in alternation so that load on a shared machine hits all of them alike."""
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(reps):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            run()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


# ---- the packed-adaLN lever alone: three ways to apply per-image (B, 3D) shift/scale/gate to N tokens ----------------


def _mod_gather_6d(x, y, mod_B3D, ids, runs):
    """Before: one (N, 3D) gather, chunks are strided views, 1 + scale per token."""
    shift, scale, gate = mod_B3D.index_select(0, ids).chunk(3, dim=-1)
    return x + gate * (x * (1 + scale) + shift) * y


def _mod_gather_chunks(x, y, mod_B3D, ids, runs):
    """After: each (B, D) chunk gathered where used, 1 + scale on B rows."""
    shift, scale, gate = mod_B3D.chunk(3, dim=-1)
    h = x * (1 + scale).index_select(0, ids) + shift.index_select(0, ids)
    return x + gate.index_select(0, ids) * (h * y)


def _mod_runs(x, y, mod_B3D, ids, runs):
    """Contiguous-run broadcasting: no gather; per run of equal-length images a (count, L, D) view (a Python loop)."""
    outs, start, image = [], 0, 0
    for count, length in runs:
        xs = x[start:start + count * length].view(count, length, -1)
        ys = y[start:start + count * length].view(count, length, -1)
        shift, scale, gate = mod_B3D[image:image + count, None].chunk(3, dim=-1)
        outs.append((xs + gate * ((xs * (1 + scale) + shift) * ys)).flatten(0, 1))
        start, image = start + count * length, image + count
    return torch.cat(outs)


def modulation_variants(width: int, tokens: int, reps: int) -> None:
    """ops, MB and time of fwd+bwd of modulate + gated residual, for a native pack and a fixed-size one."""
    from nit_lightning.models.attention import equal_length_runs

    print(f"\n# packed adaLN alone: x + gate·((x·(1 + scale) + shift)·y), D {width}, fp32 fwd+bwd (grads of x, y, mod)")
    print("| pack | images | runs | variant | ops | MB | s |")
    print("|---|---|---|---|---|---|---|")
    side = 8
    packs = {"native (sides 8..16)": imagenet_like_grids(tokens), f"fixed {side}x{side}": [(side, side)] * (tokens // 64)}
    for pack, grids in packs.items():
        hw = torch.tensor(grids)
        meta = PackedMeta.build(hw, int(hw.prod(-1).sum()), 64)
        runs = equal_length_runs(meta.seqlens_host)
        g = torch.Generator().manual_seed(0)
        x, y = (torch.randn(meta.num_tokens, width, generator=g) for _ in range(2))
        mod = torch.randn(len(grids), 3 * width, generator=g) * 0.1
        variants = {"(N, 3D) gather [before]": _mod_gather_6d, "per-chunk gather [after]": _mod_gather_chunks,
                    "run broadcast": _mod_runs}

        def make(fn):
            def run():
                leaves = [t.detach().requires_grad_(True) for t in (x, y, mod)]
                fn(*leaves, meta.instance_ids, runs).sum().backward()
            return run

        closures = [make(fn) for fn in variants.values()]
        counts = []
        for run in closures:
            run()
            with TrafficCounter() as counter:
                run()
            counts.append(counter)
        seconds = time_alternating(closures, reps)
        for name, counter, secs in zip(variants, counts, seconds):
            print(f"| {pack} | {len(grids)} | {len(runs)} | {name} | {counter.ops} | "
                  f"{(counter.read + counter.written) / 1e6:,.0f} | {secs:.4f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--widths", default="NiT-S,NiT-XL", help="presets whose block width to profile")
    parser.add_argument("--tokens", type=int, default=4096, help="pack budget (ImageNet-like native grids)")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per setting (median)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--autocast-policy", choices=("cuda", "cpu"), default="cuda",
                        help="bf16 rows: CUDA's autocast policy emulated (layer_norm in fp32, as on the GPU) or CPU's own")
    parser.add_argument("--detail", action="store_true", help="also print the ops with the most bytes, per column")
    parser.add_argument("--no-modulation", action="store_true", help="skip the packed-adaLN variants table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    grids = imagenet_like_grids(args.tokens)
    hw = torch.tensor(grids)
    n = int(hw.prod(-1).sum())
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    print(f"# one NiT block, pack of {len(grids)} ImageNet-like images = {n} tokens; {platform.machine()} CPU, "
          f"{args.threads} thread(s), torch {torch.__version__}; before = frozen 5b743b4 block, after = this tree")
    print("# MB = 1e6 bytes read + written by the aten ops of the block (views free); saved = activation bytes kept for "
          f"backward; bf16 rows: {args.autocast_policy.upper()} autocast policy"
          + (" (emulated on CPU: layer_norm in fp32)" if args.autocast_policy == "cuda" else ""))
    print("| width | precision | pass | ops before | ops after | MB before | MB after | after/before | "
          "saved MB before | saved MB after | s before | s after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    details = []
    for preset in args.widths.split(","):
        new, old, cfg = build_blocks(preset)
        meta_new = PackedMeta.build(hw, n, cfg.head_dim)
        meta_old = nit_before.MetaBefore.build(hw, n, cfg.head_dim)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(n, cfg.hidden_size, generator=g)
        c = torch.randn(len(grids), cfg.hidden_size, generator=g)
        for dname in args.dtypes.split(","):
            dtype = dtypes[dname]
            # Under autocast the residual stream entering a block is bf16 (the patch embedding's Linear output).
            xin = x.to(dtype)
            for backward in (False, True):
                cuda_policy = args.autocast_policy == "cuda"
                run_before = make_run(old, meta_old, xin, c, dtype, backward, cuda_policy)
                run_after = make_run(new, meta_new, xin, c, dtype, backward, cuda_policy)
                before, after = count(run_before), count(run_after)
                before["seconds"], after["seconds"] = time_alternating([run_before, run_after], args.reps)
                mb_b, mb_a = (before["read"] + before["written"]) / 1e6, (after["read"] + after["written"]) / 1e6
                saved = (f"{before['saved'] / 1e6:.0f} | {after['saved'] / 1e6:.0f}" if backward else "- | -")
                print(f"| {preset} (D {cfg.hidden_size}) | {dname}{' autocast' if dtype != torch.float32 else ''} | "
                      f"{'fwd+bwd' if backward else 'fwd'} | {before['ops']} | {after['ops']} | {mb_b:,.0f} | "
                      f"{mb_a:,.0f} | {mb_a / mb_b:.2f} | {saved} | {before['seconds']:.3f} | {after['seconds']:.3f} |",
                      flush=True)
                details.append((preset, dname, backward, before, after))
    if not args.no_modulation:
        modulation_variants(PRESETS[args.widths.split(",")[-1]]["hidden_size"], args.tokens, args.reps)
    if args.detail:
        for preset, dname, backward, before, after in details:
            print(f"\n## {preset} {dname} {'fwd+bwd' if backward else 'fwd'}: MB by op (before -> after)")
            names = sorted(set(before["bytes_by_op"]) | set(after["bytes_by_op"]),
                           key=lambda k: -(before["bytes_by_op"][k] + after["bytes_by_op"][k]))
            for name in names[:16]:
                print(f"  {name:40s} {before['by_op'][name]:4d} ops {before['bytes_by_op'][name] / 1e6:9.1f} MB -> "
                      f"{after['by_op'][name]:4d} ops {after['bytes_by_op'][name] / 1e6:9.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
