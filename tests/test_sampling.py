"""Samplers against a closed-form oracle, CFG interval arithmetic, per-sample seeds, packing plans and size checks."""
from __future__ import annotations

import pytest
import torch

from nit_lightning.data.sizes import parse_size, parse_sizes, validate_size
from nit_lightning.diffusion.sampling import (
    SampleRequest,
    StackedGenerator,
    derive_seed,
    per_sample_noise,
    plan_sample_packs,
    sample,
    sample_pack,
)

# x0 ~ N(m, s²) per channel; x_t = (1−t)x0 + tε is Gaussian with mean (1−t)m and variance σ² = (1−t)²s² + t².
# Cov(x0, x_t) = (1−t)s², Cov(ε, x_t) = t, so E[x0|x_t] = m + (1−t)s²/σ²·(x_t − (1−t)m), E[ε|x_t] = t/σ²·(x_t − (1−t)m)
# and the exact velocity E[ε − x0 | x_t] = (t − (1−t)s²)/σ² · (x_t − (1−t)m) − m.
M = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
S = torch.tensor([0.5, 1.5, 1.0], dtype=torch.float64)  # s ≥ 0.5: ending the SDE at t = 0.04 biases std by ≤ 1% here


def oracle(x, t, y, hw):
    t = t[0].to(torch.float64)
    var = (1 - t) ** 2 * S**2 + t**2
    return (t - (1 - t) * S**2) / var * (x.to(torch.float64) - (1 - t) * M) - M


def _oracle_noise():
    hw = torch.tensor([[100, 200], [100, 200]])  # 40k tokens = 40k samples per channel
    noise = per_sample_noise([1, 2], hw, 3, dtype=torch.float64)
    # Moment-matched start (mean 0, std 1 exactly): the ODE test then measures solver error, not Monte Carlo error.
    return (noise - noise.mean(0)) / noise.std(0), hw


@pytest.mark.parametrize(
    "method,steps,mean_tol,std_tol", [("heun", 50, 0.01, 0.01), ("euler", 200, 0.02, 0.02), ("sde", 250, 0.01, 0.04)]
)
def test_oracle_reproduces_gaussian(method, steps, mean_tol, std_tol):
    noise, hw = _oracle_noise()
    x = sample(oracle, noise, torch.zeros(2, dtype=torch.long), hw, method=method, steps=steps,
               generator=StackedGenerator([1, 2], stream=1))
    mean_err = ((x.mean(0) - M).abs() / M.abs()).max().item()
    std_err = ((x.std(0) - S).abs() / S).max().item()
    assert mean_err < mean_tol and std_err < std_tol, (method, mean_err, std_err)


def test_nfe_per_method():
    calls = []

    def f(x, t, y, hw):
        calls.append(x.shape[0])
        return torch.zeros_like(x)

    hw, y = torch.tensor([[2, 3]]), torch.tensor([0])
    for method, nfe in [("euler", 7), ("heun", 13), ("sde", 7)]:
        calls.clear()
        sample(f, torch.randn(6, 2), y, hw, method=method, steps=7, generator=StackedGenerator([0]))
        assert len(calls) == nfe, method


def _label_model(calls):
    """v = 1 for real labels, 0 for the null class (label 10); records (t, labels) of every call."""

    def f(x, t, y, hw):
        calls.append((float(t[0]), y.tolist()))
        rows = torch.repeat_interleave((y != 10).to(x.dtype), hw[:, 0] * hw[:, 1])
        return rows[:, None].expand_as(x).clone()

    return f


@pytest.mark.parametrize("scale,interval", [(3.0, (0.0, 0.7)), (2.5, (0.3, 0.6)), (4.0, (0.0, 1.0)), (1.0, (0.0, 0.7))])
def test_cfg_interval_moves_x_by_predicted_amount(scale, interval):
    calls: list = []
    steps, lo, hi = 20, *interval
    hw, y = torch.tensor([[2, 2], [1, 3]]), torch.tensor([4, 7])
    x1 = torch.zeros(7, 3, dtype=torch.float64)
    x0 = sample(_label_model(calls), x1, y, hw, method="euler", steps=steps, cfg_scale=scale, cfg_interval=interval,
                null_class=10)
    ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    # Inside [lo, hi]: v̂ = 0 + s·(1 − 0) = s; outside: v̂ = 1 (conditional only). x moves by Σ (t_{k+1} − t_k)·v̂.
    inside = [scale != 1.0 and lo <= t <= hi for t in ts[:-1]]
    expected = sum((ts[k + 1] - ts[k]) * (scale if inside[k] else 1.0) for k in range(steps))
    torch.testing.assert_close(x0, torch.full_like(x0, expected), rtol=0, atol=1e-12)
    for (t, labels), guided in zip(calls, inside):  # the null branch exists exactly inside the interval
        assert labels == ([4, 7, 10, 10] if guided else [4, 7]), (t, labels)


def test_heun_matches_slow_reference_with_guidance():
    torch.manual_seed(1)
    W = torch.randn(4, 4, dtype=torch.float64) * 0.3

    def f(x, t, y, hw):  # nonlinear, label- and time-dependent, per token
        lab = torch.repeat_interleave(y.to(x.dtype), hw[:, 0] * hw[:, 1])[:, None]
        return torch.tanh(x @ W) * (1 + lab) + t[0] * x

    hw, y, null = torch.tensor([[2, 2], [1, 2]]), torch.tensor([1, 2]), 0
    x1 = torch.randn(6, 4, dtype=torch.float64)
    steps, s, (lo, hi) = 6, 2.0, (0.2, 0.7)
    got = sample(f, x1, y, hw, method="heun", steps=steps, cfg_scale=s, cfg_interval=(lo, hi), null_class=null)

    def v(x, t, guide):
        vc = f(x, torch.full((2,), t, dtype=torch.float64), y, hw)
        if not guide:
            return vc
        vu = f(x, torch.full((2,), t, dtype=torch.float64), torch.full_like(y, null), hw)
        return vu + s * (vc - vu)

    ts, x = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist(), x1.clone()
    for k in range(steps):
        g = lo <= ts[k] <= hi
        d = v(x, ts[k], g)
        xn = x + (ts[k + 1] - ts[k]) * d
        if k < steps - 1:
            xn = x + (ts[k + 1] - ts[k]) * 0.5 * (d + v(xn, ts[k + 1], g))
        x = xn
    torch.testing.assert_close(got, x, rtol=0, atol=1e-12)


def test_sde_matches_score_form_reference():
    """Our drift x + (2−t)v equals REPA's v − ½g²·s with s = −(x + (1−t)v)/t, g² = 2t; last step without noise."""
    f = lambda x, t, y, hw: torch.sin(x) - 0.3 * t[0] * x  # noqa: E731
    hw, y, steps = torch.tensor([[3, 2]]), torch.tensor([0]), 9
    x1 = torch.randn(6, 3, dtype=torch.float64)
    xi = torch.randn(steps - 1, 6, 3, dtype=torch.float64)
    got = sample(f, x1, y, hw, method="sde", steps=steps, sde_noise=xi)
    ts = torch.linspace(1, 0.04, steps, dtype=torch.float64).tolist() + [0.0]
    x = x1.clone()
    for k in range(steps):
        t, dt = ts[k], ts[k + 1] - ts[k]
        vel = f(x, torch.tensor([t], dtype=torch.float64), y, hw)
        score = -(x + (1 - t) * vel) / t
        drift = vel - 0.5 * (2 * t) * score
        x = x + drift * dt + ((2 * t) ** 0.5 * abs(dt) ** 0.5 * xi[k] if k < steps - 1 else 0.0)
    torch.testing.assert_close(got, x, rtol=0, atol=1e-12)


def test_integration_and_model_dtypes():
    seen = []

    def f(x, t, y, hw):
        seen.append((x.dtype, t.dtype))
        return -x

    hw, y = torch.tensor([[2, 2]]), torch.tensor([0])
    noise = torch.randn(4, 2)
    out64 = sample(f, noise, y, hw, steps=10, dtype=torch.float64)
    assert out64.dtype == torch.float32 and set(seen) == {(torch.float32, torch.float32)}
    seen.clear()
    sample(f, noise.bfloat16(), y, hw, steps=2, dtype=torch.float32)
    assert set(seen) == {(torch.bfloat16, torch.float32)}  # bf16 model, times kept in fp32
    out32 = sample(f, noise, y, hw, steps=10, dtype=torch.float32)
    torch.testing.assert_close(out32, out64, rtol=1e-6, atol=1e-6)  # dx/dt = -x from t=1 to 0: x0 = x1 · (1 + 1/10)^10
    torch.testing.assert_close(out64, noise * 1.1**10, rtol=1e-6, atol=1e-6)


def test_per_sample_noise_depends_only_on_own_seed():
    hw = torch.tensor([[2, 3], [4, 4], [1, 5]])
    full = per_sample_noise([7, 8, 9], hw, 5)
    alone = per_sample_noise([8], hw[1:2], 5)
    torch.testing.assert_close(full[6:22], alone, rtol=0, atol=0)
    assert not torch.equal(per_sample_noise([7], hw[:1], 5, stream=1), full[:6])  # SDE stream differs from start noise
    assert derive_seed(0, 1) != derive_seed(1, 0) and 0 <= derive_seed(2**70, -3) < 2**63


def _tiny_net():
    from nit_lightning.models import build_nit

    torch.manual_seed(0)
    net = build_nit("NiT-debug", in_channels=4, num_classes=10).double().eval()
    for p in net.parameters():  # random non-zero weights (the zero init predicts exactly 0)
        p.data.normal_(0, 0.05)
    return net


@pytest.mark.parametrize("method", ["euler", "sde"])
def test_packing_and_batch_size_do_not_change_samples(method):
    net = _tiny_net()
    grids = [(2, 3), (4, 4), (3, 1), (2, 2), (4, 4), (1, 5)]
    reqs = [SampleRequest(i, g, i % 10, derive_seed(123, i)) for i, g in enumerate(grids)]
    kw = dict(method=method, steps=4, cfg_scale=2.0, cfg_interval=(0.0, 0.7), null_class=net.null_class,
              noise_dtype=torch.float64)

    def run(packs):
        out = {}
        for pack in packs:
            x = sample_pack(net, pack, 4, **kw)
            for r, chunk in zip(pack, x.split([r.tokens for r in pack])):
                out[r.index] = chunk
        return out

    one_pack = run([reqs])  # all resolutions in one packed call set
    per_image = run([[r] for r in reqs])  # batch size 1
    planned = run(plan_sample_packs(reqs, 40, cfg=True))  # token budget 40 with CFG doubling
    by_res: dict = {}
    for r in reqs:
        by_res.setdefault(r.hw, []).append(r)
    per_res = run(list(by_res.values())[::-1])  # one pack per resolution, in another order
    for i in range(len(reqs)):
        for other in (per_image, planned, per_res):
            torch.testing.assert_close(one_pack[i], other[i], rtol=1e-9, atol=1e-9)


def test_plan_sample_packs_budget_and_errors():
    reqs = [SampleRequest(i, (4, 4) if i % 3 else (2, 8 if i % 2 else 4), i, i) for i in range(50)]
    for cfg in (False, True):
        packs = plan_sample_packs(reqs, 64, cfg=cfg)
        assert sorted(r.index for p in packs for r in p) == list(range(50))
        assert all(sum(r.tokens for r in p) * (2 if cfg else 1) <= 64 for p in packs)
    assert len(plan_sample_packs(reqs, 64, cfg=True)) >= 2 * len(plan_sample_packs(reqs, 64)) - 2
    with pytest.raises(ValueError, match="needs 32 tokens .*CFG doubles it.* budget is 20"):
        plan_sample_packs(reqs, 20, cfg=True)


def test_sample_rejects_bad_inputs():
    hw, y = torch.tensor([[2, 2]]), torch.tensor([0])
    with pytest.raises(ValueError, match="method 'ddim'"):
        sample(oracle, torch.zeros(4, 3), y, hw, method="ddim")
    with pytest.raises(ValueError, match="hw describes 4 tokens but noise has 5"):
        sample(oracle, torch.zeros(5, 3), y, hw)
    with pytest.raises(ValueError, match="needs null_class"):
        sample(oracle, torch.zeros(4, 3), y, hw, cfg_scale=2.0)


def test_sizes_parse_validate_round(caplog):
    assert parse_size("320x960") == (320, 960) and parse_size("256") == (256, 256) and parse_size("64×32") == (64, 32)
    assert parse_sizes("256x256, 320x960") == [(256, 256), (320, 960)]
    with pytest.raises(ValueError, match="more than once"):
        parse_sizes("256x256,256")
    with pytest.raises(ValueError, match=r"432x250 is not a multiple of 32 .*448x256 \(--round nearest\) or 416x224"):
        validate_size((432, 250), 32)
    assert validate_size((432, 250), 32, round="floor") == (416, 224)
    assert validate_size((432, 250), 32, round="nearest") == (448, 256)
    assert "rounded (nearest) to 448x256" in caplog.text
    assert validate_size((20, 10), 32, round="floor") == (32, 32)


def test_net_model_fn_builds_meta_once_per_branch():
    from nit_lightning.generation.pipeline import NetModelFn

    net = _tiny_net()
    built = []
    real = net.build_meta
    net.build_meta = lambda hw, n, **kw: (built.append(n), real(hw, n, **kw))[1]
    hw, y = torch.tensor([[2, 3], [3, 3]]), torch.tensor([1, 2])
    noise = per_sample_noise([5, 6], hw, 4, dtype=torch.float64)
    kw = dict(method="heun", steps=5, cfg_scale=3.0, cfg_interval=(0.0, 0.7), null_class=net.null_class)
    fast = sample(NetModelFn(net), noise, y, hw, **kw)
    assert built == [15, 30]  # conditional pack and CFG-doubled pack, each built once for 9 forwards
    del net.build_meta
    torch.testing.assert_close(fast, sample(net, noise, y, hw, **kw), rtol=0, atol=1e-12)


def test_net_model_fn_bf16_autocast_close_to_fp32():
    from nit_lightning.generation.pipeline import NetModelFn

    net = _tiny_net().float()
    hw, y = torch.tensor([[3, 4]]), torch.tensor([3])
    x, t = torch.randn(12, 4), torch.tensor([0.6])
    v32, v16 = NetModelFn(net, "float32")(x, t, y, hw), NetModelFn(net, "bfloat16")(x, t, y, hw)
    assert v16.dtype == torch.float32 and not torch.equal(v16, v32)  # autocast really ran in bf16
    torch.testing.assert_close(v16, v32, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="precision 'fp8'"):
        NetModelFn(net, "fp8")
