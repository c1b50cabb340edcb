"""Packed cross-attention (NiT-T2I): every backend against the float64 per-image reference, null captions (length 0)
in every backend, the all-null pack, equal-length runs of the loop, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nit_lightning.models.attention import available_backends
from nit_lightning.models.cross_attention import packed_cross_attention, reference_cross_attention

Q_LENS = [1, 7, 16, 3, 40, 5]  # image tokens (a single-token image included)
K_LENS = [4, 0, 9, 1, 0, 6]  # caption tokens: two null captions, a one-token caption
H, DH = 3, 16


def _cu(lens, device="cpu"):
    return F.pad(torch.tensor(lens).cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)


def _qkv(q_lens=Q_LENS, k_lens=K_LENS, dtype=torch.float32, device="cpu", requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), H, DH, generator=g)
    k, v = (torch.randn(sum(k_lens), H, DH, generator=g) for _ in range(2))
    return [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (q, k, v)]


def _call(q, k, v, backend, q_lens=Q_LENS, k_lens=K_LENS, **kw):
    dev = q.device
    return packed_cross_attention(q, k, v, _cu(q_lens, dev), _cu(k_lens, dev), max(q_lens), max(k_lens), backend,
                                  q_lens, k_lens, **kw)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _null_rows(q_lens=Q_LENS, k_lens=K_LENS) -> torch.Tensor:
    """(N,) bool: query tokens whose caption is null."""
    return torch.repeat_interleave(torch.tensor(k_lens) == 0, torch.tensor(q_lens))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("backend", available_backends("cpu", torch.float32, False))
def test_cpu_backend_forward_matches_float64_reference(backend, dtype, tol):
    q, k, v = _qkv(dtype=dtype)
    with torch.no_grad():
        out = _call(q, k, v, backend)
    assert out.shape == q.shape and out.dtype == dtype
    assert _rel(out, reference_cross_attention(q, k, v, Q_LENS, K_LENS)) < tol
    assert torch.equal(out[_null_rows()], torch.zeros_like(out[_null_rows()]))  # attention over no key is exactly 0


@pytest.mark.parametrize("backend", available_backends("cpu", torch.float32, True))
def test_cpu_backend_gradients_match_float64_reference(backend):
    q, k, v = _qkv(requires_grad=True)
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    (_call(q, k, v, backend) * w).sum().backward()
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    (reference_cross_attention(qd, kd, vd, Q_LENS, K_LENS) * w.double()).sum().backward()
    for ours, ref in zip((q.grad, k.grad, v.grad), (qd.grad, kd.grad, vd.grad)):
        assert _rel(ours, ref) < 1e-5
    assert torch.equal(q.grad[_null_rows()], torch.zeros_like(q.grad[_null_rows()]))


@pytest.mark.parametrize("backend", available_backends("cpu", torch.float32, False))
def test_all_null_pack_is_zero_and_keeps_q_in_the_graph(backend):
    k_lens = [0] * len(Q_LENS)
    q, k, v = _qkv(k_lens=k_lens)
    with torch.no_grad():
        out = _call(q, k, v, backend, k_lens=k_lens)
    assert torch.equal(out, torch.zeros_like(q)) and k.shape[0] == 0
    q.requires_grad_(True)
    out = packed_cross_attention(q, k, v, _cu(Q_LENS), _cu(k_lens), max(Q_LENS), 0, "loop")
    out.sum().backward()  # every parameter behind q gets a (zero) gradient: DDP sees it used
    assert q.grad is not None and torch.equal(q.grad, torch.zeros_like(q))


def test_loop_batches_runs_of_equal_length_pairs_and_reads_lengths_itself():
    q_lens, k_lens = [4, 4, 4, 9, 1, 1, 4, 4], [2, 2, 3, 3, 0, 0, 2, 2]
    q, k, v = _qkv(q_lens, k_lens, requires_grad=True)
    cache: dict = {}
    out = packed_cross_attention(q, k, v, _cu(q_lens), _cu(k_lens), 9, 3, "loop", cache=cache)  # no host lengths
    assert cache["cross_loop_runs"] == [(2, (4, 2)), (1, (4, 3)), (1, (9, 3)), (2, (1, 0)), (2, (4, 2))]
    assert _rel(out, reference_cross_attention(q, k, v, q_lens, k_lens)) < 1e-5
    out.pow(2).sum().backward()
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    reference_cross_attention(qd, kd, vd, q_lens, k_lens).pow(2).sum().backward()
    for ours, ref in zip((q.grad, k.grad, v.grad), (qd.grad, kd.grad, vd.grad)):
        assert _rel(ours, ref) < 1e-5


def test_image_attends_only_to_its_own_caption():
    q, k, v = _qkv()
    ref = _call(q, k, v, "loop")
    k2, v2 = k.clone(), v.clone()
    k2[:4] += 1.0  # caption 0's keys and values only
    v2[:4] -= 2.0
    out = _call(q, k2, v2, "loop")
    assert torch.equal(out[1:], ref[1:]) and not torch.equal(out[:1], ref[:1])


def test_bad_inputs_are_clear_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"k, v \(M, H, Dh\)"):
        packed_cross_attention(q, k[:, :2], v, _cu(Q_LENS), _cu(K_LENS), 40, 9, "loop")
    with pytest.raises(ValueError, match="one caption per image"):
        packed_cross_attention(q, k, v, _cu(Q_LENS), _cu(K_LENS[:-1]), 40, 9, "loop")
    with pytest.raises(ValueError, match="'flash' is unavailable"):
        _call(q, k, v, "flash")
    with pytest.raises(ValueError, match="no backward on CPU"):
        _call(*_qkv(requires_grad=True), "flex")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_backends_match_reference_with_null_captions(dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    names = available_backends("cuda", dtype, True)
    assert names, "no CUDA backend available"
    for backend in names:
        q, k, v = _qkv(dtype=dtype, device="cuda", requires_grad=True)
        out = _call(q, k, v, backend)
        assert _rel(out, reference_cross_attention(q, k, v, Q_LENS, K_LENS)) < tol, backend
        null = _null_rows().cuda()
        assert torch.equal(out[null], torch.zeros_like(out[null])), backend
        out.float().pow(2).sum().backward()
        qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
        reference_cross_attention(qd, kd, vd, Q_LENS, K_LENS).pow(2).sum().backward()
        for ours, ref in zip((q.grad, k.grad, v.grad), (qd.grad, kd.grad, vd.grad)):
            assert ours.isfinite().all() and _rel(ours, ref) < 10 * tol, backend


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_backends_all_null_pack(dtype):
    k_lens = [0] * len(Q_LENS)
    for backend in available_backends("cuda", dtype, False):
        q, k, v = _qkv(k_lens=k_lens, dtype=dtype, device="cuda")
        assert torch.equal(_call(q, k, v, backend, k_lens=k_lens), torch.zeros_like(q)), backend
