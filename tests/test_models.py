"""NiT network: presets, init, packed == per-image, isolation, gradients, host syncs, FLOP count."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers.nets import CountHostSyncs
from nit_lightning.models import PRESETS, NiT, NiTConfig, build_nit
from nit_lightning.models.flops import forward_flops, training_flops_per_token
from nit_lightning.models.nit import timestep_features

HW = [[3, 4], [1, 5], [5, 1], [2, 2], [1, 1]]  # includes 1×k, k×1 and a single token
SPEC_PARAMS = {"NiT-S": 32.9e6, "NiT-B": 130.3e6, "NiT-L": 457.9e6, "NiT-XL": 674.9e6, "NiT-XXL": 1.36e9}


def perturbed(name: str = "NiT-debug", seed: int = 0, **kw) -> NiT:
    """A net whose zero-initialised layers get random values, so the output is not trivially 0."""
    net = build_nit(name, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


def inputs(hw=HW, token_dim: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hw_t = torch.tensor(hw)
    n = int(hw_t.prod(-1).sum())
    return (torch.randn(n, token_dim, generator=g), torch.rand(len(hw), generator=g),
            torch.randint(0, 1000, (len(hw),), generator=g), hw_t)


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", sorted(SPEC_PARAMS))
def test_parameter_counts_match_spec(name):
    with torch.device("meta"):
        net = build_nit(name)
    count = sum(p.numel() for p in net.parameters())
    assert abs(count / SPEC_PARAMS[name] - 1) < 0.005, count


def test_presets_and_overrides():
    net = build_nit("NiT-debug", depth=3, num_classes=10, patch_size=2, in_channels=4)
    assert len(net.blocks) == 3 and net.null_class == 10
    assert net.y_embedder.embedding_table.weight.shape == (11, 64)
    assert net.x_embedder.proj.weight.shape == (64, 16) and net.final_layer.linear.weight.shape == (16, 64)
    assert build_nit("NiT-XXL", depth=1).blocks[0].adaLN_modulation[1].weight.shape == (512, 1536)
    assert NiT(NiTConfig(**dataclasses.asdict(net.config))).config == net.config
    with pytest.raises(ValueError, match="unknown NiT preset 'NiT-M'.*NiT-XL"):
        build_nit("NiT-M")
    with pytest.raises(ValueError, match=r"unknown NiTConfig field\(s\) \['heads'\].*num_heads"):
        build_nit("NiT-debug", heads=4)
    with pytest.raises(ValueError, match="attn_backend"):
        build_nit("NiT-debug", attn_backend="xformers")
    assert set(PRESETS) >= {"NiT-S", "NiT-B", "NiT-L", "NiT-XL", "NiT-XXL", "NiT-debug"}


def test_zero_init_output_is_exactly_zero():
    x, t, y, hw = inputs()
    out = build_nit("NiT-debug")(x, t, y, hw)
    assert out.shape == x.shape and torch.count_nonzero(out) == 0


def test_timestep_features_cos_then_sin_raw_t():
    f = timestep_features(torch.tensor([0.0, 0.5]))
    assert f.shape == (2, 256)
    torch.testing.assert_close(f[0, :128], torch.ones(128))  # cos(0)
    torch.testing.assert_close(f[1, 0], torch.cos(torch.tensor(0.5)))  # freq 1, t not ×1000
    torch.testing.assert_close(f[1, 128], torch.sin(torch.tensor(0.5)))


@pytest.mark.parametrize("kw", [{}, {"patch_size": 2, "in_channels": 4}, {"rope_layout": "reference"}])
def test_packed_equals_each_image_alone(kw):
    net = perturbed(**kw)
    x, t, y, hw = inputs(token_dim=net.config.token_dim)
    with torch.no_grad():
        packed = net(x, t, y, hw)
        assert packed.abs().max() > 1e-3
        for i, rows in enumerate(x.split(hw.prod(-1).tolist())):
            alone = net(rows, t[i : i + 1], y[i : i + 1], hw[i : i + 1])
            start = int(hw[:i].prod(-1).sum())
            assert _rel(packed[start : start + rows.shape[0]], alone) < 1e-5, i


def test_no_cross_contamination():
    net = perturbed()
    x, t, y, hw = inputs()
    n0 = 12  # image 0 is 3×4
    x2, t2, y2 = x.clone(), t.clone(), y.clone()
    x2[:n0] += 1.0
    t2[0], y2[0] = 0.9, (int(y[0]) + 1) % 1000
    with torch.no_grad():
        a, b = net(x, t, y, hw), net(x2, t2, y2, hw)
    assert (a[:n0] - b[:n0]).abs().max() > 1e-3
    assert (a[n0:] - b[n0:]).abs().max() <= 1e-6


def test_gradients_reach_every_parameter():
    net = perturbed(projector_dim=8).train()
    x, t, y, hw = inputs()
    v, h = net(x, t, y, hw, return_hidden_at=1)
    (v.pow(2).sum() + net.projector(h).pow(2).sum()).backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert dead == []


def test_return_hidden_at_is_after_block_k():
    net = perturbed()
    x, t, y, hw = inputs()
    with torch.no_grad():
        v, h = net(x, t, y, hw, return_hidden_at=1)
        meta = net.build_meta(hw, x.shape[0])
        c = net.t_embedder(t) + net.y_embedder(y)
        manual = net.blocks[0](net.x_embedder(x), c, meta)
        torch.testing.assert_close(h, manual)
        torch.testing.assert_close(v, net(x, t, y, hw, meta=meta))  # a prebuilt meta gives the same output
    with pytest.raises(ValueError, match="1..2"):
        net(x, t, y, hw, return_hidden_at=3)


def test_bad_inputs_are_clear_errors():
    net = build_nit("NiT-debug")
    x, t, y, hw = inputs()
    with pytest.raises(ValueError, match=r"\(N, 32\)"):
        net(x[:, :16], t, y, hw)
    with pytest.raises(ValueError, match="hw describes 27 tokens"):
        net(x[:-1], t, y, hw)
    with pytest.raises(ValueError, match="must be \\(B,\\)"):
        net(x, t[:2], y, hw)


def test_at_most_one_host_sync_per_forward(monkeypatch):
    net = perturbed(depth=3)
    x, t, y, hw = inputs()
    calls = []
    for name in ("item", "tolist", "__bool__", "cpu", "numpy", "__int__", "__float__", "__index__"):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    with torch.no_grad(), CountHostSyncs() as mode:
        net(x, t, y, hw)
    assert calls == ["tolist"] and mode.count <= 1, (calls, mode.count)  # hw.tolist() in PackedMeta.build
    meta = net.build_meta(hw, x.shape[0])
    calls.clear()
    with torch.no_grad(), CountHostSyncs() as mode:
        net(x, t, y, hw, meta=meta)
    assert calls == [] and mode.count == 0


def test_bf16_autocast_forward():
    net = perturbed()
    x, t, y, hw = inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, y, hw)
    with torch.no_grad():
        ref = net(x, t, y, hw)
    assert out.dtype == torch.bfloat16 and _rel(out.float(), ref) < 3e-2


@pytest.mark.parametrize("kw", [{}, {"modulation_rank": 16, "projector_dim": 8}])
def test_forward_flops_equal_flop_counter(kw, monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    import nit_lightning.models.attention as attention

    def einsum_attention(q, k, v, cu, max_seqlen, seqlens=None, **_):
        # FlopCounterMode does not see CPU's fused SDPA kernel; einsum's bmm it counts (2·L²·D per product).
        return reference_attention(q, k, v, seqlens).to(q.dtype)

    from nit_lightning.models.attention import reference_attention

    monkeypatch.setitem(attention._IMPL, "loop", einsum_attention)
    net = build_nit("NiT-debug", attn_backend="loop", **kw)
    x, t, y, hw = inputs(HW[:-1])  # a 1-token image's einsum becomes a mul, which the counter skips
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x, t, y, hw)
    assert forward_flops(net.config, hw.prod(-1)) == fc.get_total_flops()
    seqlens = hw.prod(-1).tolist()
    assert training_flops_per_token(net.config, seqlens) == 3 * forward_flops(net.config, seqlens) / sum(seqlens)


@pytest.mark.gpu
def test_cuda_bf16_packed_equals_each_image_alone():
    net = perturbed().cuda()
    x, t, y, hw = (a.cuda() for a in inputs())
    with torch.no_grad():
        ref = net(x, t, y, hw)  # fp32
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        packed = net(x, t, y, hw).float()
        for i, rows in enumerate(x.split(hw.prod(-1).tolist())):
            alone = net(rows, t[i : i + 1], y[i : i + 1], hw[i : i + 1]).float()
            start = int(hw[:i].prod(-1).sum())
            assert _rel(packed[start : start + rows.shape[0]], alone) < 2e-2, i
    assert _rel(packed, ref) < 5e-2
