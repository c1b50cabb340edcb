"""Official safetensors round trip: names, conv->linear reshape, strictness, projector keys, config inference."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from nit_lightning.models import build_nit, load_official_checkpoint, official_state_dict
from nit_lightning.models.official import config_from_official


def _perturbed(**kw):
    net = build_nit("NiT-debug", rope_layout="reference", **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def _save(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_official_names_and_shapes():
    sd = official_state_dict(build_nit("NiT-debug", patch_size=2, in_channels=4))
    assert sd["x_embedder.proj.weight"].shape == (64, 4, 2, 2)
    expected = {
        "x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight", "blocks.1.attn.qkv.weight", "blocks.1.attn.q_norm.weight",
        "blocks.1.attn.k_norm.bias", "blocks.1.attn.proj.weight", "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.bias",
        "blocks.1.adaLN_modulation.1.weight", "final_layer.linear.weight", "final_layer.adaLN_modulation.1.bias",
    }
    assert expected <= set(sd)
    assert all(k.split(".")[0] in {"x_embedder", "t_embedder", "y_embedder", "blocks", "final_layer"} for k in sd)


def test_round_trip_strict(tmp_path):
    src = _perturbed()
    path = _save(official_state_dict(src), tmp_path / "model.safetensors")
    dst = build_nit("NiT-debug", rope_layout="reference")
    report = load_official_checkpoint(dst, path)
    assert report.reshaped == ["x_embedder.proj.weight"] and report.warnings == [] and not report.skipped_projector
    assert len(report.loaded) == len(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    hw = torch.tensor([[2, 3], [3, 1]])
    x, t, y = torch.randn(9, 32), torch.rand(2), torch.tensor([5, 1000])  # 1000 = null class
    with torch.no_grad():
        assert torch.equal(src(x, t, y, hw), dst(x, t, y, hw))


def test_missing_unexpected_and_mismatched_keys_all_listed(tmp_path):
    sd = official_state_dict(_perturbed())
    sd.pop("blocks.0.attn.q_norm.weight")
    sd.pop("final_layer.linear.bias")
    sd["blocks.0.attn.rope.freqs"] = torch.zeros(4)
    sd["y_embedder.embedding_table.weight"] = torch.zeros(1000, 64)  # no null-class row
    path = _save(sd, tmp_path / "bad.safetensors")
    with pytest.raises(RuntimeError) as err:
        load_official_checkpoint(build_nit("NiT-debug", rope_layout="reference"), path)
    msg = str(err.value)
    assert "missing (2): ['blocks.0.attn.q_norm.weight', 'final_layer.linear.bias']" in msg
    assert "unexpected (1): ['blocks.0.attn.rope.freqs']" in msg
    assert "y_embedder.embedding_table.weight: file (1000, 64) vs model (1001, 64)" in msg


def test_projector_keys_loaded_or_reported(tmp_path, caplog):
    src = _perturbed(projector_dim=8, projector_hidden=32)
    sd = official_state_dict(src)
    assert {"projector.0.weight", "projector.2.weight", "projector.4.bias"} <= set(sd)
    path = _save(sd, tmp_path / "with_proj.safetensors")
    with_proj = build_nit("NiT-debug", rope_layout="reference", projector_dim=8, projector_hidden=32)
    load_official_checkpoint(with_proj, path)
    assert torch.equal(with_proj.projector[4].weight, src.projector[4].weight)
    plain = build_nit("NiT-debug", rope_layout="reference")
    report = load_official_checkpoint(plain, path)
    assert report.skipped_projector == sorted(k for k in sd if k.startswith("projector."))
    assert "skipped 6 REPA projector tensors" in caplog.text and "skipped 6" in report.summary()


def test_rowcol_model_gets_a_warning(tmp_path):
    path = _save(official_state_dict(_perturbed()), tmp_path / "m.safetensors")
    report = load_official_checkpoint(build_nit("NiT-debug"), path)
    assert any("rope_layout='reference'" in w for w in report.warnings)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors.*model.safetensors"):
        load_official_checkpoint(build_nit("NiT-debug"), tmp_path / "nope.safetensors")


@pytest.mark.parametrize("kw", [{}, {"modulation_rank": 16, "projector_dim": 8, "projector_hidden": 32}])
def test_config_from_official(kw):
    src = build_nit("NiT-debug", depth=3, num_heads=4, num_classes=10, patch_size=2, in_channels=4, **kw)
    cfg = config_from_official(official_state_dict(src))
    expected = {**src.config.__dict__, "rope_layout": "reference"}
    assert cfg.__dict__ == expected
