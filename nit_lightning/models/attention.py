"""Packed (varlen) attention: softmax(q·kᵀ/√Dh)·v inside each image only, with several interchangeable backends."""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F

try:  # optional CUDA package; absent on CPU machines
    from flash_attn import flash_attn_varlen_func as _flash_varlen
except Exception:  # noqa: BLE001 - any import failure (missing package, ABI mismatch) means "not available"
    _flash_varlen = None

try:
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen
except Exception:  # noqa: BLE001
    _torch_varlen = None

try:
    from torch.nn.attention.flex_attention import create_block_mask as _create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as _flex_attention
except Exception:  # noqa: BLE001
    _flex_attention = _create_block_mask = None

BACKENDS = ("flash", "varlen", "flex", "loop", "sdpa_mask")
_HALF = (torch.float16, torch.bfloat16)
_compiled_flex: Callable | None = None


def _why_unavailable(name: str, device: torch.device, dtype: torch.dtype, requires_grad: bool) -> str | None:
    """None when `name` can run on (device, dtype, requires_grad); otherwise the reason in words."""
    cuda = device.type == "cuda"
    if name == "flash":
        if _flash_varlen is None:
            return "the flash-attn package is not installed (pip install flash-attn)"
        if not cuda or dtype not in _HALF:
            return f"flash-attn needs CUDA with float16/bfloat16, got {device.type}/{dtype}"
    elif name == "varlen":
        if _torch_varlen is None:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
        if not cuda or dtype not in _HALF:
            return f"varlen_attn needs CUDA with float16/bfloat16, got {device.type}/{dtype}"
    elif name == "flex":
        if _flex_attention is None:
            return f"torch {torch.__version__} has no FlexAttention"
        if not cuda and requires_grad:
            return "FlexAttention has no backward on CPU (forward-only there); use 'loop' for training on CPU"
    elif name not in BACKENDS:
        return f"unknown backend; valid: {list(BACKENDS)} or 'auto'"
    return None


def available_backends(device: torch.device | str, dtype: torch.dtype, requires_grad: bool) -> list[str]:
    """Backends that can run here, in the order `auto` prefers them."""
    device = torch.device(device)
    return [b for b in BACKENDS if _why_unavailable(b, device, dtype, requires_grad) is None]


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype, requires_grad: bool) -> str:
    """Map `auto` to a concrete backend; a named one that cannot run here is an error saying why."""
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cuda":
            order = ("flash", "varlen", "flex") if dtype in _HALF else ("flex", "sdpa_mask")
        else:
            order = ("loop",)
        for b in order:
            if _why_unavailable(b, device, dtype, requires_grad) is None:
                return b
        return "sdpa_mask"
    why = _why_unavailable(backend, device, dtype, requires_grad)
    if why is not None:
        ok = available_backends(device, dtype, requires_grad)
        raise ValueError(
            f"attention backend {backend!r} is unavailable: {why}. "
            f"Available for {device.type}/{str(dtype).replace('torch.', '')}"
            f"{' with grad' if requires_grad else ''}: {ok} (or 'auto')"
        )
    return backend


def doc_ids(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """(N,) image index of every token, from cu_seqlens, without a host sync (empty segments own no token: right=True
    skips them)."""
    return torch.searchsorted(cu_seqlens.to(torch.long), torch.arange(n, device=cu_seqlens.device), right=True) - 1


def cached(cache: dict[str, Any] | None, key: str, make: Callable[[], Any]) -> Any:
    """cache[key], made by `make` on first use: one mask per pack, shared by every block."""
    if cache is None:
        return make()
    if key not in cache and torch.compiler.is_compiling():
        # No write from inside a compiled region: under activation checkpointing Dynamo cannot keep a side effect in
        # the recomputed forward and would fall back to eager for the whole block. PackedMeta.build pre-fills what it can.
        return make()
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _attn_flash(q, k, v, cu, max_seqlen, **_):
    return _flash_varlen(q, k, v, cu, cu, max_seqlen, max_seqlen)


def _attn_varlen(q, k, v, cu, max_seqlen, **_):
    return _torch_varlen(q, k, v, cu, cu, max_seqlen, max_seqlen)


def run_flex(q_NHD: torch.Tensor, k_MHD: torch.Tensor, v_MHD: torch.Tensor, block_mask: Any) -> torch.Tensor:
    """FlexAttention over packed (tokens, H, Dh) tensors: compiled on CUDA (the fused kernel), eager on the CPU."""
    global _compiled_flex
    qf, kf, vf = (t.transpose(0, 1)[None] for t in (q_NHD, k_MHD, v_MHD))  # (N, H, Dh) -> (1, H, N, Dh)
    if q_NHD.device.type == "cuda":  # eager flex materialises scores; compiled flex is the fused kernel
        if _compiled_flex is None:
            _compiled_flex = torch.compile(_flex_attention, dynamic=True)
        out = _compiled_flex(qf, kf, vf, block_mask=block_mask)
    else:
        with warnings.catch_warnings():  # eager on CPU on purpose: compiling costs more than it saves there
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            out = _flex_attention(qf, kf, vf, block_mask=block_mask)
    return out[0].transpose(0, 1)


def _attn_flex(q, k, v, cu, max_seqlen, cache=None, **_):
    n = q.shape[0]

    def make_mask():
        doc = doc_ids(cu, n)

        def same_image(b, h, qi, ki):
            return doc[qi] == doc[ki]

        # Compiled on CUDA so the N×N mask is never materialised (65536² bools would be 4 GiB).
        cuda = q.device.type == "cuda"
        return _create_block_mask(same_image, None, None, n, n, device=q.device, _compile=cuda)

    return run_flex(q, k, v, cached(cache, "flex_block_mask", make_mask))


def equal_length_runs(seqlens: list) -> list[tuple]:
    """Consecutive images of equal length as (count, length) runs: [64, 64, 64, 100] -> [(3, 64), (1, 100)].

    Lengths may be tuples: cross-attention batches images whose (image length, caption length) pairs are equal."""
    runs: list[tuple] = []
    for length in seqlens:
        if runs and runs[-1][1] == length:
            runs[-1] = (runs[-1][0] + 1, length)
        else:
            runs.append((1, length))
    return runs


def _attn_loop(q, k, v, cu, max_seqlen, seqlens=None, cache=None, **_):
    if seqlens is None:  # standalone use: read lengths once here (PackedMeta passes them, so the model never does)
        seqlens = torch.diff(cu).tolist()
    # A run of equal-length images is one batched SDPA call on a free view: a fixed-256 pack (128 × 64 tokens)
    # is 1 call per block instead of 128.
    runs = cached(cache, "loop_runs", lambda: equal_length_runs(seqlens))
    outs = []
    sizes = [count * length for count, length in runs]
    for (count, length), qi, ki, vi in zip(runs, q.split(sizes), k.split(sizes), v.split(sizes)):
        # (count·L, H, Dh) -> (count, H, L, Dh)
        qb, kb, vb = (t.view(count, length, *t.shape[1:]).transpose(1, 2) for t in (qi, ki, vi))
        o = F.scaled_dot_product_attention(qb, kb, vb)
        outs.append(o.transpose(1, 2).reshape(count * length, *q.shape[1:]))
    return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]


def _attn_sdpa_mask(q, k, v, cu, max_seqlen, cache=None, **_):
    n = q.shape[0]

    def make_mask():
        doc = doc_ids(cu, n)
        return (doc[:, None] == doc[None, :])[None, None]  # (1, 1, N, N) bool: O(N²) memory

    mask = cached(cache, "dense_mask", make_mask)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask
    )
    return out[0].transpose(0, 1)


_IMPL = {
    "flash": _attn_flash,
    "varlen": _attn_varlen,
    "flex": _attn_flex,
    "loop": _attn_loop,
    "sdpa_mask": _attn_sdpa_mask,
}


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    backend: str = "auto",
    seqlens: list[int] | None = None,
    *,
    cache: dict[str, Any] | None = None,
) -> torch.Tensor:
    """q, k, v (N, H, Dh) -> (N, H, Dh), each token attending only to its own image's tokens."""
    if q.ndim != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be (N, H, Dh); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    name = resolve_backend(backend, q.device, q.dtype, needs_grad)
    return _IMPL[name](q, k, v, cu_seqlens.to(torch.int32), max_seqlen, seqlens=seqlens, cache=cache)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
    """Slow float64 per-image reference: softmax(q·kᵀ/√Dh)·v written out by hand."""
    outs = []
    for qi, ki, vi in zip(q.double().split(seqlens), k.double().split(seqlens), v.double().split(seqlens)):
        s = torch.einsum("qhd,khd->hqk", qi, ki) / qi.shape[-1] ** 0.5
        outs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vi))
    return torch.cat(outs, dim=0)
