"""GradNormMonitor: a non-finite gradient norm stops training without a host sync per step; the optimiser path
(Lightning's grad clip + fused AdamW + the monitor) makes no host sync at all on ordinary steps."""
from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from test_ema import RandomPacks
from torch.utils.data import DataLoader

from helpers.nets import CountHostSyncs
from nit_lightning.training.callbacks import GradNormMonitor
from nit_lightning.training.module import NiTModule


def _module() -> NiTModule:
    return NiTModule(net={"name": "NiT-debug", "in_channels": 12, "num_classes": 10})


def _set_grads(module: NiTModule, bad: bool = False) -> None:
    for p in module.parameters():
        p.grad = torch.full_like(p, 0.01)
    if bad:
        module.net.final_layer.linear.weight.grad[0, 0] = float("nan")


def _step(monitor: GradNormMonitor, module: NiTModule, step: int, bad: bool = False) -> None:
    _set_grads(module, bad)
    monitor.on_before_optimizer_step(SimpleNamespace(global_step=step, global_rank=0), module, None)


def test_a_nonfinite_norm_raises_at_the_next_step_naming_its_step():
    module, monitor = _module(), GradNormMonitor()
    _step(monitor, module, 6)
    _step(monitor, module, 7, bad=True)  # read asynchronously: no exception yet, no host sync
    with pytest.raises(FloatingPointError, match=r"norm nan at step 7 .*detected at step 8"):
        _step(monitor, module, 8)


def test_check_every_k_raises_within_two_checks():
    module, monitor = _module(), GradNormMonitor(check_every=4)
    for step in range(4, 12):
        _step(monitor, module, step, bad=step == 5)  # 5 is no check step; the check at 8 sends it, the one at 12 reads
    with pytest.raises(FloatingPointError, match="at step 5 .*detected at step 12"):
        _step(monitor, module, 12)


def test_no_checkpoint_is_written_after_a_nonfinite_norm():
    module, monitor = _module(), GradNormMonitor(check_every=100)
    _step(monitor, module, 1)
    monitor.on_save_checkpoint(SimpleNamespace(global_step=2, global_rank=0), module, {})  # clean: no error
    _step(monitor, module, 2, bad=True)
    with pytest.raises(FloatingPointError, match="at step 2"):
        monitor.on_save_checkpoint(SimpleNamespace(global_step=3, global_rank=0), module, {})
    with pytest.raises(FloatingPointError, match="at step 2"):
        monitor.on_train_end(SimpleNamespace(global_step=3, global_rank=0), module)


@pytest.mark.parametrize("asynchronous, syncs_per_step", [(True, 0), (False, 1)])
def test_clip_fused_adamw_and_monitor_make_no_host_sync(asynchronous, syncs_per_step, monkeypatch):
    """The optimiser-step path of Lightning's automatic optimisation, device-generic code paths counted on the CPU.

    A host sync is a dispatched aten::_local_scalar_dense (.item(), bool(), float()) or a host read method called on a
    tensor other than the monitor's pinned host copy (tolist/cpu/numpy of a device tensor copy it to the host).
    """
    from lightning.pytorch.plugins.precision import Precision

    module, monitor = _module(), GradNormMonitor(asynchronous=asynchronous)
    device_reads = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, _original=original, _name=name, **kwargs):
            if self is not monitor._host:
                device_reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    # What NiTModule.configure_optimizers builds on a GPU (fused=True there; CPU has a fused AdamW too since torch 2.4).
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, eps=1e-6,
                                  fused=True)
    precision = Precision()
    for step in range(3):
        _set_grads(module)
        device_reads.clear()
        with CountHostSyncs() as syncs:
            monitor.on_before_optimizer_step(SimpleNamespace(global_step=step, global_rank=0), module, optimizer)
            precision.clip_grad_by_norm(optimizer, 1.0)  # what trainer.gradient_clip_val=1.0 runs
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert syncs.count + len(device_reads) == syncs_per_step, (step, syncs.count, device_reads)


def test_fit_stops_and_writes_no_checkpoint_after_a_nonfinite_norm(tmp_path):
    class PoisonStep2(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == 2:
                pl_module.net.final_layer.linear.weight.grad[0, 0] = float("inf")

    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1,
                                                     filename="{step}")
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, gradient_clip_val=1.0,
                        callbacks=[PoisonStep2(), GradNormMonitor(), checkpoints], default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(FloatingPointError, match="norm inf at step 2"):
        trainer.fit(_module(), DataLoader(RandomPacks(6), batch_size=None))
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["step=1.ckpt", "step=2.ckpt"]  # weights before step 2
