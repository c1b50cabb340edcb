"""FID Inception-v3: exact state-dict layout, strict loading, TF1 resize, feature taps."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from helpers.inception import random_inception
from nit_lightning.evaluation import inception as inc

SHARED_LAYOUT = Path("/work/shared/inception_layout.json")
# sha256 of json.dumps([[name, shape], ...]) of pt_inception-2015-12-05-6726825d.pth (566 tensors, no AuxLogits).
LAYOUT_SHA256 = "a7a15da1ed154b7574faa006bd5c8ac6ff96d0d5f879ca050475348d2a4368d9"


@pytest.fixture(scope="module")
def net() -> inc.FIDInceptionV3:
    return random_inception(0)


def _layout(model: torch.nn.Module) -> list:
    return [[k, list(v.shape)] for k, v in model.state_dict().items()]


def test_state_dict_layout_is_exactly_the_public_one(net):
    layout = _layout(net)
    assert len(layout) == 566
    assert hashlib.sha256(json.dumps(layout).encode()).hexdigest() == LAYOUT_SHA256
    if SHARED_LAYOUT.is_file():
        assert layout == json.loads(SHARED_LAYOUT.read_text())


def test_strict_load_of_a_state_dict_in_the_layout(tmp_path, net, monkeypatch):
    g = torch.Generator().manual_seed(1)
    state = {k: (torch.rand(v.shape, generator=g) + 0.5 if v.is_floating_point() else v.clone())
             for k, v in net.state_dict().items()}
    path = tmp_path / inc.WEIGHTS_FILE
    torch.save(state, path)
    monkeypatch.setenv(inc.WEIGHTS_ENV, str(path))
    loaded = inc.load_inception()  # path from $NIT_INCEPTION_WEIGHTS
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key

    missing = dict(state)
    del missing["Mixed_6d.branch1x1.bn.running_mean"]
    with pytest.raises(KeyError, match="Mixed_6d.branch1x1.bn.running_mean"):
        inc.load_state_dict_strict(loaded, missing)
    extra = dict(state, **{"AuxLogits.fc.weight": torch.zeros(1008, 768)})
    with pytest.raises(KeyError, match="AuxLogits.fc.weight"):
        inc.load_state_dict_strict(loaded, extra)
    wrong = dict(state, **{"fc.weight": torch.zeros(1000, 2048)})
    with pytest.raises(KeyError, match="fc.weight"):
        inc.load_state_dict_strict(loaded, wrong)


def test_missing_weights_name_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv(inc.WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=inc.WEIGHTS_FILE):
        inc.load_inception()
    with pytest.raises(FileNotFoundError, match="NIT_INCEPTION_WEIGHTS"):
        inc.load_inception(tmp_path / "nope.pth")


def _tf1_resize_loop(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Slow reference: TF1 resize_bilinear(align_corners=False) per output pixel."""
    in_h, in_w = x.shape[-2:]
    out = torch.empty(*x.shape[:-2], out_h, out_w, dtype=x.dtype)
    for i in range(out_h):
        sy = i * in_h / out_h
        y0 = math.floor(sy)
        y1, dy = min(y0 + 1, in_h - 1), sy - y0
        for j in range(out_w):
            sx = j * in_w / out_w
            x0 = math.floor(sx)
            x1, dx = min(x0 + 1, in_w - 1), sx - x0
            top = x[..., y0, x0] * (1 - dx) + x[..., y0, x1] * dx
            bottom = x[..., y1, x0] * (1 - dx) + x[..., y1, x1] * dx
            out[..., i, j] = top * (1 - dy) + bottom * dy
    return out


@pytest.mark.parametrize("shape,out", [((3, 5), (7, 4)), ((6, 6), (4, 9)), ((2, 11), (5, 3))])
def test_tf1_resize_matches_its_formula(shape, out):
    x = torch.rand(2, 3, *shape, dtype=torch.float64)
    torch.testing.assert_close(inc.tf1_resize(x, *out), _tf1_resize_loop(x, *out))


def test_tf1_resize_hand_values_no_half_pixel_offset():
    x = torch.tensor([[[[0.0, 10.0]]]], dtype=torch.float64)
    # source = dest·in/out = 0, 0.5, 1, 1.5 -> 0, 5, 10, 10 (clamped); a half-pixel rule would give 0, 2.5, 7.5, 10.
    assert inc.tf1_resize(x, 1, 4).flatten().tolist() == [0.0, 5.0, 10.0, 10.0]
    y = torch.arange(4.0, dtype=torch.float64).view(1, 1, 1, 4)
    assert inc.tf1_resize(y, 1, 2).flatten().tolist() == [0.0, 2.0]  # sources 0 and 2


def test_forward_shapes_and_taps(net):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 45, 70), generator=g, dtype=torch.uint8)  # any size: resized to 299
    seen = {}
    hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.setdefault("b1", o))
    try:
        with torch.no_grad():
            net.fc.bias.fill_(3.0)  # must not enter the logits
            out = net(images)
    finally:
        hook.remove()
    assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 2023) and out["logits"].shape == (2, 1008)
    torch.testing.assert_close(out["spatial"], seen["b1"][:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    assert seen["b1"].shape[-2:] == (17, 17) and bool((seen["b1"] >= 0).all())  # after ReLU
    torch.testing.assert_close(out["logits"], out["pool"] @ net.fc.weight.T)
    with pytest.raises(ValueError, match="uint8"):
        net(images.float())


def test_preprocess_scale_and_fid_pooling_variants(net):
    x = net.preprocess(torch.full((1, 3, 10, 10), 192, dtype=torch.uint8))
    assert x.shape == (1, 3, 299, 299) and torch.allclose(x, torch.full_like(x, 0.5))  # (192 - 128) / 128
    ones = torch.ones(1, 1, 4, 4)
    assert torch.equal(inc._avg3(ones), ones)  # count_include_pad=False: edges average real pixels only
    assert net.Mixed_7b.pool == "avg" and net.Mixed_7c.pool == "max"


def test_float64_option_agrees_with_float32(net):
    net64 = random_inception(0, compute_dtype=torch.float64)
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    a, b = net(images), net64(images)
    assert b["pool"].dtype == torch.float64
    torch.testing.assert_close(a["pool"].double(), b["pool"], rtol=1e-3, atol=1e-4)
