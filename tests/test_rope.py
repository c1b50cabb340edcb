"""Axial 2D RoPE: frequencies, layouts, fp32 tables, rotation and the relative-position property."""
from __future__ import annotations

import pytest
import torch

from nit_lightning.models.packed import PackedMeta
from nit_lightning.models.rope import (
    _rope_complex,
    _rope_real,
    apply_rope,
    axis_frequencies,
    qk_norm_rope,
    rope_cis,
    rope_sin_signed,
    rope_tables,
    token_positions,
)


def _positions(hw: list[list[int]], layout: str) -> torch.Tensor:
    hw_t = torch.tensor(hw)
    seqlens = hw_t.prod(-1)
    ids = torch.repeat_interleave(torch.arange(len(hw)), seqlens)
    starts = torch.cumsum(seqlens, 0) - seqlens
    return token_positions(hw_t, ids, starts, layout)


def test_frequencies_match_formula():
    # Dh = 16 -> d = 8 channels per axis -> ω_j = 10000^(−2j/8), j = 0..3
    expected = torch.tensor([10000.0 ** (-2 * j / 8) for j in range(4)])
    torch.testing.assert_close(axis_frequencies(16), expected)
    with pytest.raises(ValueError, match="divisible by 4"):
        axis_frequencies(18)


def test_rowcol_layout_is_row_major_and_restarts_per_image():
    pos = _positions([[2, 3], [1, 2]], "rowcol")
    expected = [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2], [0, 0], [0, 1]]
    assert pos.tolist() == expected


def test_reference_layout_is_transposed_meshgrid():
    # token k of an h×w image gets (k mod h, k div h): h = 2, w = 3
    pos = _positions([[2, 3]], "reference")
    assert pos.tolist() == [[k % 2, k // 2] for k in range(6)]
    # square images: the quirk is a transpose, (k mod h, k div h) = (col, row)
    sq = _positions([[3, 3]], "reference")
    assert sq.tolist() == [[k % 3, k // 3] for k in range(9)]
    with pytest.raises(ValueError, match="valid"):
        _positions([[2, 2]], "colrow")


def test_apply_rope_equals_complex_rotation():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 16, generator=g, dtype=torch.float64)
    pos = torch.randint(0, 50, (5, 2), generator=g).float()
    cos, sin = rope_tables(pos, 16)
    got = apply_rope(x.float(), cos, sin).double()
    omega = axis_frequencies(16).double()
    ang = torch.cat([pos[:, :1].double() * omega, pos[:, 1:].double() * omega], dim=-1)  # (N, 8) one per pair
    xc = torch.view_as_complex(x.reshape(5, 3, 8, 2).contiguous())
    ref = torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)[:, None]).reshape(5, 3, 16)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_first_half_row_second_half_column():
    cos, sin = rope_tables(torch.tensor([[3.0, 0.0], [0.0, 5.0]]), 16)
    assert torch.all(sin[0, 8:] == 0) and torch.all(sin[0, :8] != 0)
    assert torch.all(sin[1, :8] == 0) and torch.all(sin[1, 8:] != 0)
    assert torch.equal(cos[0, 0::2], cos[0, 1::2])  # one frequency per adjacent channel pair


def test_dot_product_depends_only_on_offset():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 1, 32, generator=g), torch.randn(1, 1, 32, generator=g)

    def score(pq, pk):
        cq, sq = rope_tables(torch.tensor([pq], dtype=torch.float32), 32)
        ck, sk = rope_tables(torch.tensor([pk], dtype=torch.float32), 32)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    base = score((2, 7), (5, 1))
    for shift in [(1, 0), (0, 3), (10, 20), (31, 4)]:
        moved = score((2 + shift[0], 7 + shift[1]), (5 + shift[0], 1 + shift[1]))
        torch.testing.assert_close(moved, base, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(score((2, 7), (5, 2)), base, atol=1e-3)  # a different offset does change it


def test_tables_are_fp32_under_autocast():
    pos = torch.tensor([[40.0, 63.0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos, sin = rope_tables(pos, 64)
    assert cos.dtype == torch.float32 and sin.dtype == torch.float32
    torch.testing.assert_close(cos[0, 0], torch.cos(torch.tensor(40.0)))


def test_ntk_and_interpolation_scaling():
    d = 32 // 2
    omega, omega_ntk = axis_frequencies(32), axis_frequencies(32, ntk_scale=4.0)
    torch.testing.assert_close(omega_ntk[0], omega[0])  # highest frequency kept
    torch.testing.assert_close(omega_ntk[-1], omega[-1] / 4.0)  # lowest stretched by s: θ'^(−(d−2)/d) = θ^(…)/s
    assert d == 16
    pos = torch.tensor([[6.0, 10.0]])
    c2, s2 = rope_tables(pos, 32, interp_scale=2.0)
    c1, s1 = rope_tables(pos / 2, 32)
    torch.testing.assert_close((c2, s2), (c1, s1))
    with pytest.raises(ValueError, match="ntk"):
        axis_frequencies(32, ntk_scale=0.5)


def test_packed_meta_tables_and_ids():
    hw = torch.tensor([[2, 3], [4, 1]])
    meta = PackedMeta.build(hw, 10, 16)
    assert meta.cu_seqlens.dtype == torch.int32 and meta.cu_seqlens.tolist() == [0, 6, 10]
    assert meta.max_seqlen == 6 and meta.seqlens_host == [6, 4]
    assert meta.instance_ids.tolist() == [0] * 6 + [1] * 4
    assert meta.rope_cos.shape == (10, 16) and meta.rope_cos.dtype == torch.float32
    assert meta.rope_sin_signed.shape == (10, 16) and meta.rope_sin_signed.dtype == torch.float32
    assert meta.rope_cis.shape == (10, 8) and meta.rope_cis.dtype == torch.complex64
    with pytest.raises(ValueError, match="describes 10 tokens"):
        PackedMeta.build(hw, 11, 16)
    with pytest.raises(ValueError, match="at least 1×1"):
        PackedMeta.build(torch.tensor([[0, 3]]), 0, 16)


def test_both_rotation_bodies_equal_apply_rope():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, 16, generator=g)
    cos, sin = rope_tables(torch.randint(0, 64, (40, 2), generator=g).float(), 16)
    ref = apply_rope(x, cos, sin)
    assert torch.equal(_rope_real(x, cos, rope_sin_signed(sin)), ref)  # the same products and sums, bit for bit
    torch.testing.assert_close(_rope_complex(x, rope_cis(cos, sin)), ref, rtol=1e-6, atol=1e-6)


def _qkv_and_norms(dtype=torch.float32, n=30, h=2, dh=8, seed=4):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, 3, h, dh, generator=g).to(dtype)
    params = [torch.randn(dh, generator=g) * 0.1 + 1, torch.randn(dh, generator=g) * 0.1,
              torch.randn(dh, generator=g) * 0.1 + 1, torch.randn(dh, generator=g) * 0.1]
    cos, sin = rope_tables(torch.randint(0, 64, (n, 2), generator=g).float(), dh)
    return qkv, params, (cos, rope_sin_signed(sin), rope_cis(cos, sin)), sin


def test_qk_norm_rope_equals_norm_then_apply_rope():
    qkv, (qw, qb, kw, kb), tables, sin = _qkv_and_norms()
    q, k, v = qk_norm_rope(qkv, qw, qb, kw, kb, *tables)
    ref_q = apply_rope(torch.nn.functional.layer_norm(qkv[:, 0], (8,), qw, qb, 1e-5), tables[0], sin)
    ref_k = apply_rope(torch.nn.functional.layer_norm(qkv[:, 1], (8,), kw, kb, 1e-5), tables[0], sin)
    torch.testing.assert_close(q, ref_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, ref_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(v, qkv[:, 2])


def test_qk_norm_rope_compiled_body_equals_eager():
    qkv, params, tables, _ = _qkv_and_norms()
    eager = qk_norm_rope(qkv, *params, *tables)
    compiled = torch.compile(qk_norm_rope, backend="aot_eager", fullgraph=True)(qkv, *params, *tables)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_qk_norm_rope_is_fp32_inside_and_rounds_once_for_bf16():
    qkv, params, tables, _ = _qkv_and_norms(torch.bfloat16)
    q, k, v = qk_norm_rope(qkv, *params, *tables)
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16
    ref_q, ref_k, _ = qk_norm_rope(qkv.float(), *params, *tables)  # the same math on the same (bf16) values in fp32
    assert torch.equal(q, ref_q.to(torch.bfloat16)) and torch.equal(k, ref_k.to(torch.bfloat16))
