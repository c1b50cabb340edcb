"""EMA callback: update maths vs hand computation, key robustness under compile, swap, checkpoint round trip."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from nit_lightning.data.batch import PackedBatch
from nit_lightning.models import build_nit
from nit_lightning.training.ema import EMA, unwrap_net
from nit_lightning.training.module import NiTModule


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("count", torch.zeros(()))


class RandomPacks(IterableDataset):
    """A few fixed random packs of 12-channel tokens (two images each)."""

    def __init__(self, n: int = 6):
        self.n = n

    def __iter__(self):
        g = torch.Generator().manual_seed(1)
        for i in range(self.n):
            hw = torch.tensor([[4, 4], [2, 6]])
            yield PackedBatch(x=torch.randn(28, 12, generator=g), hw=hw, y=torch.tensor([i % 10, 3]),
                              seqlens=hw.prod(1), keys=[f"a{i}", f"b{i}"])


def tiny_module(**kwargs) -> NiTModule:
    return NiTModule(net={"name": "NiT-debug", "in_channels": 12, "num_classes": 10}, **kwargs)


def test_update_matches_hand_computation():
    net = TinyNet()
    ema = EMA(decay=0.9)
    ema.init_from(net)
    start = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        net.lin.weight.add_(1.0)
        net.count.fill_(7)
    ema.update(net)
    expected = 0.9 * start["lin.weight"] + 0.1 * net.lin.weight.detach()
    torch.testing.assert_close(ema.shadow["lin.weight"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ema.shadow["lin.bias"], start["lin.bias"], rtol=0, atol=1e-7)  # bias did not move
    assert ema.shadow["count"].item() == 7  # buffers are copied, not averaged
    assert ema.num_updates == 1


def test_warmup_decay_and_fp32_shadow():
    net = TinyNet().to(torch.bfloat16)
    ema = EMA(decay=0.999, warmup=True)
    ema.init_from(net)
    assert ema.shadow["lin.weight"].dtype == torch.float32
    assert ema.current_decay() == pytest.approx(1 / 10)  # n = 0: (1 + 0) / (10 + 0)
    with torch.no_grad():
        net.lin.weight.fill_(1.0)
    before = ema.shadow["lin.weight"].clone()
    ema.update(net)
    torch.testing.assert_close(ema.shadow["lin.weight"], 0.1 * before + 0.9 * torch.ones_like(before), rtol=0, atol=1e-6)
    assert ema.current_decay() == pytest.approx(2 / 11)
    ema.num_updates = 10**6
    assert ema.current_decay() == 0.999  # capped by the configured decay


def test_keys_robust_to_compile_wrapping():
    net = build_nit("NiT-debug", in_channels=12, num_classes=10)
    names = list(net.state_dict())
    compiled = torch.compile(net, backend="eager")
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())  # the wrapper renames...
    assert unwrap_net(compiled) is net
    ema = EMA(decay=0.5)
    ema.init_from(compiled)
    assert list(ema.shadow) == names  # ...the EMA does not
    with torch.no_grad():
        net.final_layer.linear.weight.fill_(1.0)
    ema.update(compiled)  # reads the live params through the wrapper
    assert ema.shadow["final_layer.linear.weight"].eq(0.5).all()
    assert list(ema.shadow) == names


def test_per_block_compile_keeps_state_dict_keys():
    module = tiny_module(compile_blocks=True, activation_checkpointing=True)
    names = list(module.net.state_dict())
    module.configure_model()
    assert list(module.net.state_dict()) == names
    ema = EMA()
    ema.init_from(module.net)
    assert list(ema.shadow) == names


def test_swapped_in_restores_live_weights():
    net = TinyNet()
    ema = EMA(decay=0.5)
    ema.init_from(net)
    with torch.no_grad():
        net.lin.weight.add_(2.0)
    ema.update(net)  # shadow = live - 1
    live = net.lin.weight.detach().clone()
    with ema.swapped_in(net):
        torch.testing.assert_close(net.lin.weight.detach(), live - 1.0)
    torch.testing.assert_close(net.lin.weight.detach(), live, rtol=0, atol=0)


@pytest.mark.slow
def test_checkpoint_round_trip_and_one_update_per_optimizer_step(tmp_path):
    module = tiny_module()
    ema = EMA(decay=0.9)
    trainer = L.Trainer(max_steps=2, accumulate_grad_batches=2, accelerator="cpu", logger=False, callbacks=[ema],
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(RandomPacks(6), batch_size=None))
    assert trainer.global_step == 2 and ema.num_updates == 2  # 4 batches, 2 optimiser steps
    path = tmp_path / "ema.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert list(checkpoint["ema_state_dict"]) == list(module.net.state_dict())
    restored = EMA(decay=0.9)
    restored.load_state_dict(checkpoint["callbacks"]["EMA"])
    assert restored.num_updates == 2
    for name, value in ema.shadow.items():
        assert torch.equal(restored.shadow[name], value)
        assert torch.equal(checkpoint["ema_state_dict"][name], value)
    # EMA ≠ live weights after training (decay 0.9 lags), and export keeps the net's names.
    assert not torch.equal(ema.shadow["final_layer.linear.weight"], module.net.final_layer.linear.weight.detach())
    from safetensors.torch import load_file

    exported = load_file(str(ema.export_safetensors(tmp_path / "ema.safetensors")))
    assert set(exported) == set(module.net.state_dict())
