"""Packed attention backends against a float64 per-image reference; availability and error messages."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nit_lightning.models.attention import available_backends, packed_attention, reference_attention, resolve_backend

SEQLENS = [1, 7, 16, 3, 40]  # includes a single-token image
H, DH = 3, 16


def _qkv(dtype=torch.float32, device="cpu", requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(SEQLENS)
    qkv = [torch.randn(n, H, DH, generator=g).to(device=device, dtype=dtype) for _ in range(3)]
    return [t.requires_grad_(requires_grad) for t in qkv]


def _cu(device="cpu"):
    return F.pad(torch.tensor(SEQLENS).cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("backend", available_backends("cpu", torch.float32, False))
def test_cpu_backend_forward_matches_float64_reference(backend):
    q, k, v = _qkv()
    ref = reference_attention(q, k, v, SEQLENS)
    with torch.no_grad():
        out = packed_attention(q, k, v, _cu(), max(SEQLENS), backend, SEQLENS)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize("backend", available_backends("cpu", torch.float32, True))
def test_cpu_backend_gradients_match_float64_reference(backend):
    q, k, v = _qkv(requires_grad=True)
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    (packed_attention(q, k, v, _cu(), max(SEQLENS), backend, SEQLENS) * w).sum().backward()
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    (reference_attention(qd, kd, vd, SEQLENS) * w.double()).sum().backward()
    for ours, ref in zip((q.grad, k.grad, v.grad), (qd.grad, kd.grad, vd.grad)):
        assert _rel(ours, ref) < 1e-5


def test_cpu_availability_and_auto():
    assert available_backends("cpu", torch.float32, True) == ["loop", "sdpa_mask"]
    assert "flex" in available_backends("cpu", torch.float32, False)
    assert resolve_backend("auto", torch.device("cpu"), torch.float32, True) == "loop"
    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16, True) == "loop"


def test_flex_backward_on_cpu_is_a_clear_error():
    q, k, v = _qkv(requires_grad=True)
    with pytest.raises(ValueError, match="no backward on CPU.*Available.*loop"):
        packed_attention(q, k, v, _cu(), max(SEQLENS), "flex", SEQLENS)


@pytest.mark.parametrize("backend", ["flash", "varlen"])
def test_cuda_only_backend_on_cpu_says_why(backend):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=rf"'{backend}' is unavailable: .*Available for cpu/float32: \["):
        packed_attention(q, k, v, _cu(), max(SEQLENS), backend, SEQLENS)


def test_unknown_backend():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown backend"):
        packed_attention(q, k, v, _cu(), max(SEQLENS), "xformers", SEQLENS)


def test_loop_without_host_lengths_and_mask_cache():
    q, k, v = _qkv()
    ref = reference_attention(q, k, v, SEQLENS)
    assert _rel(packed_attention(q, k, v, _cu(), max(SEQLENS), "loop"), ref) < 1e-5  # lengths read from cu_seqlens
    cache: dict = {}
    packed_attention(q, k, v, _cu(), max(SEQLENS), "sdpa_mask", cache=cache)
    mask = cache["dense_mask"]
    packed_attention(q, k, v, _cu(), max(SEQLENS), "sdpa_mask", cache=cache)
    assert cache["dense_mask"] is mask  # built once per pack, reused by every block


def test_loop_batches_runs_of_equal_lengths():
    from nit_lightning.models.attention import equal_length_runs

    seqlens = [4, 4, 4, 9, 1, 1, 4]
    assert equal_length_runs(seqlens) == [(3, 4), (1, 9), (2, 1), (1, 4)]
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(sum(seqlens), H, DH, generator=g).requires_grad_(True) for _ in range(3))
    cu = F.pad(torch.tensor(seqlens).cumsum(0), (1, 0)).to(torch.int32)
    out = packed_attention(q, k, v, cu, 9, "loop", seqlens)
    assert _rel(out, reference_attention(q, k, v, seqlens)) < 1e-5
    out.pow(2).sum().backward()
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    reference_attention(qd, kd, vd, seqlens).pow(2).sum().backward()
    for ours, ref in zip((q.grad, k.grad, v.grad), (qd.grad, kd.grad, vd.grad)):
        assert _rel(ours, ref) < 1e-5


def test_bf16_loop_is_close():
    q, k, v = _qkv(torch.bfloat16)
    out = packed_attention(q, k, v, _cu(), max(SEQLENS), "loop", SEQLENS)
    assert out.dtype == torch.bfloat16 and _rel(out, reference_attention(q, k, v, SEQLENS)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_backends_match_reference(dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    names = available_backends("cuda", dtype, True)
    assert names, "no CUDA backend available"
    for backend in names:
        q, k, v = _qkv(dtype, "cuda", requires_grad=True)
        out = packed_attention(q, k, v, _cu("cuda"), max(SEQLENS), backend, SEQLENS)
        assert _rel(out, reference_attention(q, k, v, SEQLENS)) < tol, backend
        out.float().pow(2).sum().backward()
        qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
        reference_attention(qd, kd, vd, SEQLENS).pow(2).sum().backward()
        for ours, ref in zip((q.grad, k.grad, v.grad), (qd.grad, kd.grad, vd.grad)):
            assert _rel(ours, ref) < 10 * tol, backend


@pytest.mark.gpu
def test_cuda_auto_prefers_fused_kernels():
    assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16, True) in ("flash", "varlen", "flex")
    assert resolve_backend("auto", torch.device("cuda"), torch.float32, True) in ("flex", "sdpa_mask")
