"""NiT-T2I network: packed forward = per-image forward (float64), caption isolation, null captions, backends, init,
parameter count of the preset, metadata and errors."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers.nets import CountHostSyncs
from nit_lightning.models import NiTConfig, build_nit
from nit_lightning.models.attention import available_backends
from nit_lightning.models.nit_t2i import (
    T2I_PRESETS,
    NiTT2I,
    NiTT2IConfig,
    build_nit_t2i,
    matching_modulation_rank,
)
from nit_lightning.models.text import PackedText

HW = [[2, 3], [1, 1], [3, 3], [2, 3], [1, 4]]  # a single-token image, and two images of equal size
CAPTION_LENGTHS = [3, 0, 5, 3, 1]  # a null caption and a one-token caption
TEXT_DIM = 32


def perturbed(dtype=torch.float32, seed=0, **overrides) -> NiTT2I:
    """NiT-T2I-debug with every weight moved off its init (zero-initialised gates and outputs would hide bugs)."""
    torch.manual_seed(seed)
    net = build_nit_t2i("NiT-T2I-debug", **{"in_channels": 4, "attn_backend": "loop", **overrides})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return net.to(dtype)


def inputs(hw=HW, lengths=CAPTION_LENGTHS, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hw_t = torch.tensor(hw)
    x = torch.randn(int(hw_t.prod(-1).sum()), 4, generator=g).to(dtype)
    t = torch.rand(len(hw), generator=g).to(dtype)
    text = PackedText(torch.randn(sum(lengths), TEXT_DIM, generator=g).to(dtype), torch.tensor(lengths))
    return x, t, text, hw_t


def test_untrained_net_predicts_exactly_zero():
    net = build_nit_t2i("NiT-T2I-debug", in_channels=4)
    x, t, text, hw = inputs()
    assert torch.equal(net(x, t, text, hw), torch.zeros_like(x))


def test_packed_forward_equals_per_image_forward_float64():
    net = perturbed(torch.float64)
    x, t, text, hw = inputs(dtype=torch.float64)
    with torch.no_grad():
        packed = net(x, t, text, hw)
        rows = x.split(hw.prod(-1).tolist())
        singles = [net(xi, t[i:i + 1], PackedText(ci, text.lengths[i:i + 1]), hw[i:i + 1])
                   for i, (xi, ci) in enumerate(zip(rows, text.split()))]
    torch.testing.assert_close(packed, torch.cat(singles), rtol=1e-12, atol=1e-12)
    assert packed.abs().max() > 0.1  # a real output, not zeros


@pytest.fixture()
def threads(request):
    """Run at `request.param` intra-op threads, then restore (an earlier test, e.g. the demo's, may have changed it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


# A caption of another length changes the row count of the caption-side matmuls (kv, caption embedder); with several
# threads BLAS may split a matmul of another row count differently, so another caption's rows can differ in the last
# bit. At one thread every case is bitwise; at two, the same-length change is (same shapes, same split).
@pytest.mark.parametrize("change,threads", [("content", 1), ("length", 1), ("null", 1), ("content", 2)],
                         indirect=["threads"])
def test_changing_one_caption_leaves_every_other_image_bitwise_unchanged(change, threads):
    net = perturbed()
    x, t, text, hw = inputs()
    j = 2  # image 2 has 5 caption tokens; images 0 and 3 share a size and a caption length (one batched SDPA call)
    captions = text.split()
    g = torch.Generator().manual_seed(9)
    new = {"content": torch.randn(5, TEXT_DIM, generator=g), "length": torch.randn(2, TEXT_DIM, generator=g),
           "null": torch.zeros(0, TEXT_DIM)}[change]
    changed = PackedText.from_list([new if i == j else c for i, c in enumerate(captions)])
    with torch.no_grad():
        before, after = net(x, t, text, hw), net(x, t, changed, hw)
    rows = hw.prod(-1).tolist()
    for i, (a, b) in enumerate(zip(before.split(rows), after.split(rows))):
        if i == j:
            assert not torch.equal(a, b)
        else:
            assert torch.equal(a, b), f"image {i} changed when caption {j} changed ({change})"


def test_null_caption_cross_attention_outputs_its_bias_and_all_null_packs_train():
    net = perturbed()
    x, t, text, hw = inputs()
    meta = net.build_meta(hw, x.shape[0], text.lengths, text.tokens.shape[0])
    block = net.blocks[0]
    with torch.no_grad():
        h = net.x_embedder(x)
        out = block.cross_attn(h, net.text_embedder(text.tokens), meta.image, meta.text)
    rows = hw.prod(-1).tolist()
    null_image = out.split(rows)[1]  # caption 1 is null: attention over no key is 0, so proj(0) = its bias
    assert torch.equal(null_image, block.cross_attn.proj.bias.expand_as(null_image))
    null = net.null_text(len(HW))
    v = net(x, t, null, hw)
    v.pow(2).sum().backward()
    no_grad = [name for name, p in net.named_parameters() if p.grad is None]
    assert no_grad == []  # every parameter is in the graph (DDP), even with no caption token in the pack


@pytest.mark.parametrize("backend", [b for b in available_backends("cpu", torch.float64, False) if b != "loop"])
def test_model_backends_agree_in_float64(backend):
    net = perturbed(torch.float64)
    other = perturbed(torch.float64, attn_backend=backend)
    x, t, text, hw = inputs(dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(other(x, t, text, hw), net(x, t, text, hw), rtol=1e-12, atol=1e-12)


def test_gradients_reach_every_parameter_and_match_between_backends():
    x, t, text, hw = inputs()
    grads = []
    for backend in ("loop", "sdpa_mask"):
        net = perturbed(attn_backend=backend)
        v, h = net(x, t, text, hw, return_hidden_at=1)
        (v.pow(2).sum() + h.sum()).backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
    assert all(g is not None and g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5)


def test_one_host_read_per_forward_and_none_with_a_built_meta(monkeypatch):
    net = perturbed()
    x, t, text, hw = inputs()
    calls = []
    for name in ("item", "tolist", "__bool__", "cpu", "numpy", "__int__", "__float__", "__index__"):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    with torch.no_grad(), CountHostSyncs() as mode:
        net(x, t, text, hw)
    assert calls == ["tolist"] and mode.count <= 1, (calls, mode.count)  # hw and caption lengths read together
    meta = net.build_meta(hw, x.shape[0], text.lengths, text.tokens.shape[0])
    calls.clear()
    with torch.no_grad(), CountHostSyncs() as mode:
        net(x, t, text, hw, meta=meta)
    assert calls == [] and mode.count == 0


def test_preset_parameter_count_matches_the_paper_on_the_meta_device(capsys):
    with torch.device("meta"):
        t2i, xl = build_nit_t2i("NiT-T2I"), build_nit("NiT-XL")
    count = sum(p.numel() for p in t2i.parameters())
    print(f"NiT-T2I parameters: {count:,}")  # 675,149,896
    assert abs(count / 673e6 - 1) < 0.01, count
    block_t2i = sum(p.numel() for p in t2i.blocks[0].parameters())
    block_xl = sum(p.numel() for p in xl.blocks[0].parameters())
    # r = 230 is the rank whose block count is closest to a C2I XL block's: one rank step is 10D + 1 parameters.
    assert T2I_PRESETS["NiT-T2I"]["modulation_rank"] == matching_modulation_rank(1152, 16) == 230
    assert abs(block_t2i - block_xl) <= (10 * 1152 + 1) // 2, (block_t2i, block_xl)
    assert T2I_PRESETS["NiT-T2I-debug"]["modulation_rank"] == matching_modulation_rank(64, 2)
    assert t2i.blocks[0].adaLN_modulation[2].weight.shape == (9 * 1152, 230)


def test_rank_arithmetic_equals_built_blocks():
    for d, heads, qk in [(64, 2, True), (384, 6, False), (1152, 16, True)]:
        r = matching_modulation_rank(d, heads, qk)
        with torch.device("meta"):
            t2i = build_nit_t2i("NiT-T2I-debug", depth=1, hidden_size=d, num_heads=heads, cross_qk_norm=qk,
                                modulation_rank=r)
            c2i = build_nit("NiT-debug", depth=1, hidden_size=d, num_heads=heads)
        counts = [sum(p.numel() for p in net.blocks[0].parameters()) for net in (t2i, c2i)]
        assert abs(counts[0] - counts[1]) <= (10 * d + 1) // 2, (d, counts)


def test_config_round_trip_presets_and_errors():
    net = build_nit_t2i("NiT-T2I-debug", depth=3, text_dim=48, modulation_rank=None)
    assert len(net.blocks) == 3 and net.blocks[0].adaLN_modulation[1].weight.shape == (9 * 64, 64)
    assert NiTT2I(NiTT2IConfig(**dataclasses.asdict(net.config))).config == net.config
    assert [f.name for f in dataclasses.fields(NiTConfig)][:3] == ["depth", "hidden_size", "num_heads"]
    with pytest.raises(ValueError, match="unknown NiT-T2I preset"):
        build_nit_t2i("NiT-XL")
    with pytest.raises(ValueError, match=r"unknown NiTT2IConfig field\(s\) \['num_classes'\]"):
        build_nit_t2i("NiT-T2I-debug", num_classes=10)
    with pytest.raises(ValueError, match="modulation_rank"):
        build_nit_t2i("NiT-T2I-debug", modulation_rank=0)


def test_bad_inputs_are_clear_errors():
    net = build_nit_t2i("NiT-T2I-debug", in_channels=4)
    x, t, text, hw = inputs()
    with pytest.raises(ValueError, match="text_dim=32"):
        net(x, t, PackedText(torch.zeros(12, 16), text.lengths), hw)
    with pytest.raises(ValueError, match="caption lengths sum to 12 tokens but the packed caption tokens have 11"):
        net(x, t, PackedText(text.tokens[:-1], text.lengths), hw)
    with pytest.raises(ValueError, match="4 caption lengths for 5 images"):
        net(x, t, PackedText(text.tokens, text.lengths[:-1]), hw)
    with pytest.raises(ValueError, match="hw describes"):
        net(x[:-1], t, text, hw)
    with pytest.raises(TypeError, match="PackedText"):
        net(x, t, torch.zeros(5, dtype=torch.long), hw)
    with pytest.raises(ValueError, match="caption lengths must be >= 0"):
        net(x, t, PackedText(text.tokens, torch.tensor([3, 0, 6, 3, -1])), hw)
    meta = net.build_meta(hw, x.shape[0], text.lengths, text.tokens.shape[0])
    with pytest.raises(ValueError, match="rebuild it for this pack"):
        net(x, t, PackedText(text.tokens[:3], torch.tensor([3, 0, 0, 0, 0])), hw, meta=meta)


def test_bf16_autocast_forward_is_close():
    net = perturbed()
    x, t, text, hw = inputs()
    with torch.no_grad():
        ref = net(x, t, text, hw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, t, text, hw)
    assert out.dtype == torch.bfloat16
    assert float((out.float() - ref).norm() / ref.norm()) < 3e-2


def test_t2i_forward_flops_equal_flop_counter(monkeypatch):
    """Self-attention, cross-attention (a null caption included), LoRA modulation and the caption embedder, counted."""
    from torch.utils.flop_counter import FlopCounterMode

    import nit_lightning.models.attention as attention
    import nit_lightning.models.cross_attention as cross
    from nit_lightning.models.attention import reference_attention
    from nit_lightning.models.cross_attention import reference_cross_attention
    from nit_lightning.models.flops import forward_flops

    # FlopCounterMode does not see CPU's fused SDPA kernel; the float64 references' einsums it counts.
    monkeypatch.setitem(attention._IMPL, "loop", lambda q, k, v, cu, m, seqlens=None, **_:
                        reference_attention(q, k, v, seqlens).to(q.dtype))
    monkeypatch.setitem(cross._IMPL, "loop", lambda q, k, v, cu_q, cu_k, mq, mk, q_lens=None, k_lens=None, **_:
                        reference_cross_attention(q, k, v, q_lens, k_lens).to(q.dtype))
    net = build_nit_t2i("NiT-T2I-debug", in_channels=4, text_dim=32, attn_backend="loop")
    hw = torch.tensor([[2, 3], [4, 2], [3, 3]])
    lengths = torch.tensor([5, 0, 3])
    x = torch.randn(int(hw.prod(-1).sum()), 4)
    text = PackedText(torch.randn(int(lengths.sum()), 32), lengths)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x, torch.rand(3), text, hw)
    assert forward_flops(net.config, hw.prod(-1), text_lengths=lengths) == fc.get_total_flops()
    with pytest.raises(ValueError, match="text_lengths"):
        forward_flops(net.config, hw.prod(-1))
