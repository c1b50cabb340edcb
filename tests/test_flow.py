"""Flow-matching loss: hand-computed reductions, REPA term, non-finite handling, generator determinism."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nit_lightning.diffusion import FlowMatchingLoss, interpolate, sample_times
from nit_lightning.models import build_nit

HW = torch.tensor([[2, 3], [1, 1], [4, 2]])  # 6 + 1 + 8 = 15 tokens
SEQ = [6, 1, 8]


class AffineNet:
    """Stand-in net: v̂ = 0.5·x_t + t (per token); hidden = x_t; records its inputs."""

    def __call__(self, x, t, y, hw, return_hidden_at=None):
        self.x_t, self.t = x, t
        v = 0.5 * x + t.repeat_interleave(hw.prod(-1))[:, None]
        return v if return_hidden_at is None else (v, x)


def _data(seed=0, c=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(SEQ), c, generator=g), torch.tensor([3, 1, 4])


def _hand(x0, seed, P_mean=0.0, P_std=1.0):
    """Draw t and ε in the documented order (t first, then ε) and return v̂, v, t per token."""
    g = torch.Generator().manual_seed(seed)
    t = torch.sigmoid(torch.randn(3, generator=g) * P_std + P_mean)
    eps = torch.randn(x0.shape, generator=g)
    t_tok = torch.cat([t[i].repeat(n) for i, n in enumerate(SEQ)])[:, None]
    x_t = (1 - t_tok) * x0 + t_tok * eps
    return 0.5 * x_t + t_tok, eps - x0, t, x_t


def test_token_reduction_matches_hand_computation():
    x0, y = _data()
    net = AffineNet()
    out = FlowMatchingLoss(direction_weight=0.5)(net, x0, y, HW, generator=torch.Generator().manual_seed(7))
    v_hat, v, t, x_t = _hand(x0, 7)
    torch.testing.assert_close(out.t, t)
    torch.testing.assert_close(net.x_t, x_t)
    mse = ((v_hat - v) ** 2).mean(-1)  # (N,)
    cos = (v_hat * v).sum(-1) / (v_hat.norm(dim=-1) * v.norm(dim=-1))
    torch.testing.assert_close(out.parts["mse"], mse.mean())
    torch.testing.assert_close(out.parts["direction"], (1 - cos).mean())
    torch.testing.assert_close(out.loss, mse.mean() + 0.5 * (1 - cos).mean())


def test_image_reduction_matches_hand_computation():
    x0, y = _data()
    out = FlowMatchingLoss(reduction="image", direction_weight=0.0)(
        AffineNet(), x0, y, HW, generator=torch.Generator().manual_seed(3)
    )
    v_hat, v, _, _ = _hand(x0, 3)
    per_token = ((v_hat - v) ** 2).mean(-1)
    per_image = torch.stack([c.mean() for c in per_token.split(SEQ)])
    torch.testing.assert_close(out.loss, per_image.mean())
    assert "direction" not in out.parts
    assert not torch.allclose(per_image.mean(), per_token.mean())  # the reductions really differ here


def test_repa_term():
    x0, y = _data(c=4)
    z = torch.randn(sum(SEQ), 4, generator=torch.Generator().manual_seed(9))
    proj = torch.nn.Identity()
    out = FlowMatchingLoss(repa_weight=2.0, repa_layer=1, direction_weight=0.0)(
        AffineNet(), x0, y, HW, generator=torch.Generator().manual_seed(1), repa_projector=proj, repa_z=z
    )
    v_hat, v, _, x_t = _hand(x0, 1)
    repa = (1 - F.cosine_similarity(x_t, z, dim=-1)).mean()
    torch.testing.assert_close(out.parts["repa"], repa)
    torch.testing.assert_close(out.loss, ((v_hat - v) ** 2).mean() + 2.0 * repa)
    loss_fn = FlowMatchingLoss(repa_weight=1.0, repa_layer=1)
    with pytest.raises(ValueError, match="repa_projector and repa_z"):
        loss_fn(AffineNet(), x0, y, HW)
    with pytest.raises(ValueError, match="one feature row per token"):
        loss_fn(AffineNet(), x0, y, HW, repa_projector=proj, repa_z=z[:3])
    with pytest.raises(ValueError, match="repa_layer"):
        FlowMatchingLoss(repa_weight=1.0)


def test_nonfinite_raises_or_reports_never_zeroed():
    x0, y = _data()
    x0[2, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="mse"):
        FlowMatchingLoss()(AffineNet(), x0, y, HW, generator=torch.Generator().manual_seed(0))
    out = FlowMatchingLoss(on_nonfinite="report")(AffineNet(), x0, y, HW, generator=torch.Generator().manual_seed(0))
    assert torch.isnan(out.loss) and float(out.parts["nonfinite"]) == 1.0
    ok = FlowMatchingLoss(on_nonfinite="report")(AffineNet(), *_data(), HW)
    assert float(ok.parts["nonfinite"]) == 0.0


def test_generator_determinism():
    x0, y = _data()
    loss_fn = FlowMatchingLoss()
    a = loss_fn(AffineNet(), x0, y, HW, generator=torch.Generator().manual_seed(5)).loss
    b = loss_fn(AffineNet(), x0, y, HW, generator=torch.Generator().manual_seed(5)).loss
    c = loss_fn(AffineNet(), x0, y, HW, generator=torch.Generator().manual_seed(6)).loss
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sample_times_logit_normal_and_interpolate():
    t = sample_times(20000, torch.Generator().manual_seed(0), "cpu", P_mean=0.5, P_std=2.0)
    logit = torch.log(t / (1 - t))
    assert abs(float(logit.mean()) - 0.5) < 0.05 and abs(float(logit.std()) - 2.0) < 0.05
    x0, noise = torch.zeros(3, 2), torch.ones(3, 2)
    torch.testing.assert_close(interpolate(x0, noise, torch.tensor([0.0, 0.25, 1.0])),
                               torch.tensor([[0.0, 0.0], [0.25, 0.25], [1.0, 1.0]]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="reduction 'sample'.*token"):
        FlowMatchingLoss(reduction="sample")
    with pytest.raises(ValueError, match="on_nonfinite"):
        FlowMatchingLoss(on_nonfinite="skip")


def test_with_real_net_backward():
    net = build_nit("NiT-debug", projector_dim=16)
    x0 = torch.randn(sum(SEQ), 32)
    out = FlowMatchingLoss(repa_weight=0.5, repa_layer=2)(
        net, x0, torch.tensor([1, 2, 3]), HW, generator=torch.Generator().manual_seed(0),
        repa_projector=net.projector, repa_z=torch.randn(sum(SEQ), 16),
    )
    out.loss.backward()
    # zero-init output: v̂ = 0, so mse = E[(ε − x0)²] ≈ 2 and the direction term is exactly 1 (cos(0, v) = 0)
    torch.testing.assert_close(out.parts["direction"], torch.tensor(1.0))
    assert net.final_layer.linear.weight.grad.abs().sum() > 0


class PatchNet:
    """Stand-in net for tokens of (C, p, p): a fixed per-token linear map, different on each channel and sub-position."""

    def __init__(self, dim: int) -> None:
        self.weight = torch.randn(dim, dim, generator=torch.Generator().manual_seed(11))

    def __call__(self, x, t, y, hw, return_hidden_at=None):
        self.v = x @ self.weight + t.repeat_interleave(hw.prod(-1))[:, None]
        return self.v


@pytest.mark.parametrize("reduction", ["token", "image"])
def test_direction_at_patch_2_is_a_cosine_per_latent_pixel(reduction):
    # The official code takes the cosine over the C channels of each latent pixel (each of the p×p sub-positions of a
    # token), then averages; the whole C·p·p token is not one vector. Direct formula: unpatchify v̂ and v to (C, H, W)
    # latents with models/patching.py and average 1 − cos over C at every pixel.
    from nit_lightning.models.patching import unpack_latents

    C, p = 3, 2
    x0 = torch.randn(sum(SEQ), C * p * p, generator=torch.Generator().manual_seed(2))
    net = PatchNet(C * p * p)
    loss_fn = FlowMatchingLoss(reduction=reduction, patch_size=p)
    out = loss_fn(net, x0, torch.tensor([3, 1, 4]), HW, generator=torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(4)
    sample_times(3, generator, "cpu")  # the loss draws t first, then ε
    v = torch.randn(x0.shape, generator=generator) - x0
    per_image = [1 - F.cosine_similarity(a, b, dim=0)  # (H, W): one cosine per latent pixel, over C
                 for a, b in zip(unpack_latents(net.v, HW, C, p), unpack_latents(v, HW, C, p))]
    if reduction == "token":  # every token has p² pixels: the token mean of pixel means is the pixel mean
        expected = torch.cat([d.flatten() for d in per_image]).mean()
    else:
        expected = torch.stack([d.mean() for d in per_image]).mean()
    torch.testing.assert_close(out.parts["direction"], expected)
    whole_token = 1 - F.cosine_similarity(net.v, v, dim=-1)  # the old rule: visibly another number here
    assert not torch.allclose(whole_token.mean(), expected, atol=1e-3)


def test_direction_at_patch_1_is_bitwise_the_plain_cosine():
    x0, y = _data()
    net = PatchNet(4)
    out = FlowMatchingLoss()(net, x0, y, HW, generator=torch.Generator().manual_seed(8))
    generator = torch.Generator().manual_seed(8)
    sample_times(3, generator, "cpu")
    v = (torch.randn(x0.shape, generator=generator) - x0).float()
    assert torch.equal(out.parts["direction"], (1 - F.cosine_similarity(net.v.float(), v, dim=-1)).mean())
    with pytest.raises(ValueError, match="patch_size"):
        FlowMatchingLoss(patch_size=0)


def test_module_passes_the_nets_patch_size_to_the_loss():
    from nit_lightning.training.module import NiTModule

    module = NiTModule(net={"name": "NiT-debug", "in_channels": 3, "patch_size": 2, "num_classes": 10})
    assert module.loss_fn.patch_size == 2
