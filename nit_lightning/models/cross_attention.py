"""Packed cross-attention (NiT-T2I): image i's tokens attend only to caption i's tokens; no padding on either side.

Queries are the packed image tokens (offsets cu_q), keys and values the packed caption tokens (offsets cu_k): the
varlen kernels' separate query and key offsets. Backends and their selection are models/attention.py's
(`resolve_backend`, `available_backends`): the same names run the same kernels with two offset tables.

Attention over zero keys (the null caption, length 0) is defined as 0 in every backend: the softmax-weighted mean over
an empty set has no value, and 0 is what flash-attn and FlexAttention write for such rows. The per-image loop writes the
zeros itself; the fused kernels are followed by a `where` on "has keys", so no backend depends on a kernel's handling
of empty rows; when no image has a key at all the result is q·0 (zeros that keep q, k and v in the autograd graph, so
DDP sees every parameter used).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from nit_lightning.models import attention as _attention
from nit_lightning.models.attention import cached, doc_ids, equal_length_runs, resolve_backend, run_flex


def _has_keys(cu_q, cu_k, n, cache):
    """(N, 1, 1) bool: the query token's caption has at least one token."""
    return cached(cache, "cross_has_keys", lambda: (torch.diff(cu_k) > 0)[doc_ids(cu_q, n)][:, None, None])


def _cross_flash(q, k, v, cu_q, cu_k, max_q, max_k, cache=None, **_):
    out = _attention._flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k)
    return torch.where(_has_keys(cu_q, cu_k, q.shape[0], cache), out, 0.0)


def _cross_varlen(q, k, v, cu_q, cu_k, max_q, max_k, cache=None, **_):
    out = _attention._torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k)
    return torch.where(_has_keys(cu_q, cu_k, q.shape[0], cache), out, 0.0)


def _cross_flex(q, k, v, cu_q, cu_k, max_q, max_k, cache=None, **_):
    n, m = q.shape[0], k.shape[0]

    def make_mask():
        q_doc, k_doc = doc_ids(cu_q, n), doc_ids(cu_k, m)

        def same_image(b, h, qi, ki):
            return q_doc[qi] == k_doc[ki]

        cuda = q.device.type == "cuda"  # compiled on CUDA so the N×M mask is never materialised
        return _attention._create_block_mask(same_image, None, None, n, m, device=q.device, _compile=cuda)

    # A query row with no allowed key comes out as 0 (FlexAttention's rule for fully masked rows).
    return run_flex(q, k, v, cached(cache, "cross_flex_block_mask", make_mask))


def _cross_loop(q, k, v, cu_q, cu_k, max_q, max_k, q_lens=None, k_lens=None, cache=None, **_):
    def make_runs():  # standalone use: read lengths once here (TextMeta pre-fills the runs, so the model never does)
        ql = q_lens if q_lens is not None else torch.diff(cu_q).tolist()
        kl = k_lens if k_lens is not None else torch.diff(cu_k).tolist()
        return equal_length_runs(list(zip(ql, kl)))

    runs = cached(cache, "cross_loop_runs", make_runs)
    q_parts = q.split([count * lq for count, (lq, _) in runs])
    k_parts, v_parts = (t.split([count * lk for count, (_, lk) in runs]) for t in (k, v))
    outs = []
    for (count, (lq, lk)), qi, ki, vi in zip(runs, q_parts, k_parts, v_parts):
        if lk == 0:  # null captions: attention over no key is 0
            outs.append(qi.new_zeros(qi.shape))
            continue
        # (count·L, H, Dh) -> (count, H, L, Dh): a run of equal (image, caption) lengths is one batched SDPA call
        qb = qi.view(count, lq, *qi.shape[1:]).transpose(1, 2)
        kb, vb = (t.view(count, lk, *t.shape[1:]).transpose(1, 2) for t in (ki, vi))
        o = F.scaled_dot_product_attention(qb, kb, vb)
        outs.append(o.transpose(1, 2).reshape(count * lq, *q.shape[1:]))
    return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]


def _cross_sdpa_mask(q, k, v, cu_q, cu_k, max_q, max_k, cache=None, **_):
    n, m = q.shape[0], k.shape[0]
    mask = cached(cache, "cross_dense_mask", lambda: (doc_ids(cu_q, n)[:, None] == doc_ids(cu_k, m)[None, :])[None, None])
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask
    )[0].transpose(0, 1)
    return torch.where(_has_keys(cu_q, cu_k, n, cache), out, 0.0)  # SDPA's fully masked rows: 0 on CPU, not promised


_IMPL = {
    "flash": _cross_flash,
    "varlen": _cross_varlen,
    "flex": _cross_flex,
    "loop": _cross_loop,
    "sdpa_mask": _cross_sdpa_mask,
}


def packed_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    backend: str = "auto",
    q_lens: list[int] | None = None,
    k_lens: list[int] | None = None,
    *,
    cache: dict[str, Any] | None = None,
) -> torch.Tensor:
    """q (N, H, Dh) image tokens, k, v (M, H, Dh) caption tokens -> (N, H, Dh); image i sees caption i only."""
    if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape or k.shape[1:] != q.shape[1:]:
        raise ValueError(f"q must be (N, H, Dh) and k, v (M, H, Dh) with the same H, Dh; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_q {tuple(cu_q.shape)} and cu_k {tuple(cu_k.shape)} must both be (B+1,): one caption per image")
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    name = resolve_backend(backend, q.device, q.dtype, needs_grad)
    if k.shape[0] == 0:  # every caption is null: zeros that keep q, k, v (so every parameter) in the autograd graph
        return q * 0 + (k.sum() + v.sum()) * 0
    return _IMPL[name](q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, q_lens=q_lens,
                       k_lens=k_lens, cache=cache)


def reference_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lens: list[int],
                              k_lens: list[int]) -> torch.Tensor:
    """Slow float64 per-image reference: softmax(q_i·k_iᵀ/√Dh)·v_i written out by hand, 0 for a caption of length 0."""
    outs = []
    for qi, ki, vi in zip(q.double().split(q_lens), k.double().split(k_lens), v.double().split(k_lens)):
        if ki.shape[0] == 0:
            outs.append(torch.zeros_like(qi))
            continue
        s = torch.einsum("qhd,khd->hqk", qi, ki) / qi.shape[-1] ** 0.5
        outs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vi))
    return torch.cat(outs, dim=0)
