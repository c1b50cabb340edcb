"""Compile modes of NiTModule (none | blocks | model, and the older compile_blocks): equal to eager, keys unchanged.

CPU tests compile with backend="aot_eager" (Dynamo + AOTAutograd, no Inductor codegen), which exercises the graphs,
the compiled body of qk-norm + RoPE, activation checkpointing inside compiled regions and recompiles on new packs.
"""
from __future__ import annotations

import pytest
import torch

from nit_lightning.data.batch import PackedBatch
from nit_lightning.training.compile import compile_net, resolve_compile_mode
from nit_lightning.training.ema import EMA
from nit_lightning.training.module import NiTModule


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Dynamo caches per code object across tests; without a reset, later tests could hit the recompile limit and
    silently run eager."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _module(**kwargs) -> NiTModule:
    torch.manual_seed(0)
    kwargs.setdefault("compile_backend", "aot_eager")
    module = NiTModule(net={"name": "NiT-debug", "in_channels": 12, "num_classes": 10, "projector_dim": 8,
                            "projector_hidden": 16}, repa_weight=0.5, repa_layer=1, **kwargs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero everywhere: every block gets gradients
        for p in module.net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def _batch(hw, seed: int = 0) -> PackedBatch:
    g = torch.Generator().manual_seed(seed)
    hw = torch.tensor(hw)
    n = int(hw.prod(1).sum())
    return PackedBatch(x=torch.randn(n, 12, generator=g), hw=hw, y=torch.arange(len(hw)) % 10, seqlens=hw.prod(1),
                       keys=[str(i) for i in range(len(hw))], repa_z=torch.randn(n, 8, generator=g))


def _loss_and_grads(module: NiTModule, batch: PackedBatch):
    module.net.zero_grad(set_to_none=True)
    out = module._loss(batch, batch.y, torch.Generator().manual_seed(1))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in module.net.named_parameters() if p.grad is not None}


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def test_resolve_compile_mode():
    assert resolve_compile_mode(None, False) == "none"
    assert resolve_compile_mode(None, True) == "blocks"  # the older config key keeps working
    assert resolve_compile_mode("model") == "model" and resolve_compile_mode("blocks", True) == "blocks"
    with pytest.raises(ValueError, match="disagree"):
        resolve_compile_mode("model", True)
    with pytest.raises(ValueError, match="one of"):
        resolve_compile_mode("graph")
    with pytest.raises(ValueError, match="one of"):
        NiTModule(net={"name": "NiT-debug"}, compile="everything")


def _assert_equal_to_eager(compiled: NiTModule, packs) -> None:
    """Loss and every gradient of `compiled` equal eager within 1e-6, pack after pack (shapes change: recompiles)."""
    eager, exact = _module(), _module()
    exact.net.double()
    for i, hw in enumerate(packs):
        batch = _batch(hw, seed=i)
        loss_e, grads_e = _loss_and_grads(eager, batch)
        loss_c, grads_c = _loss_and_grads(compiled, batch)
        assert _rel(loss_c, loss_e) < 1e-6
        assert sorted(grads_c) == sorted(grads_e)
        # As in test_model_equivalence: a few gradients (qk-norm biases) are sums with heavy cancellation whose fp32
        # value is itself ~1e-6 from float64; for those the bound is twice the eager fp32 error.
        batch64 = PackedBatch(x=batch.x.double(), hw=batch.hw, y=batch.y, seqlens=batch.seqlens, keys=batch.keys,
                              repa_z=batch.repa_z.double())
        grads_x = _loss_and_grads(exact, batch64)[1]
        floor = {n: _rel(grads_e[n], grads_x[n]) for n in grads_e}
        bad = {n: (_rel(grads_c[n], grads_e[n]), floor[n]) for n in grads_e
               if _rel(grads_c[n], grads_e[n]) >= max(1e-6, 2 * floor[n])}
        assert not bad, bad


PACKS = [[[3, 4], [2, 2], [2, 2], [1, 5]], [[4, 4], [3, 1]]]  # the second pack has new shapes: a recompile


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "act_ckpt"])
@pytest.mark.parametrize("mode", ["blocks", "model"])
def test_compiled_loss_and_gradients_equal_eager(mode, checkpointing):
    from torch._dynamo.testing import CompileCounterWithBackend

    compiled = _module(compile=mode, activation_checkpointing=checkpointing)
    counter = CompileCounterWithBackend("aot_eager")
    compiled.hparams.compile_backend = counter
    compiled.configure_model()
    _assert_equal_to_eager(compiled, PACKS)
    assert counter.frame_count >= (2 if mode == "blocks" else 1)  # it did compile (no silent eager fallback)


@pytest.mark.slow
def test_inductor_model_mode_equals_eager():
    """The real code generator once (about a minute on one CPU core): fused kernels, same numbers."""
    compiled = _module(compile="model", compile_backend="inductor")
    compiled.configure_model()
    _assert_equal_to_eager(compiled, PACKS[:1])


@pytest.mark.parametrize("kwargs", [{"compile": "model"}, {"compile": "blocks"}, {"compile_blocks": True}])
def test_compile_keeps_state_dict_and_ema_keys(kwargs):
    module = _module(activation_checkpointing=True, **kwargs)
    names = list(module.net.state_dict())
    module.configure_model()
    assert list(module.net.state_dict()) == names and not any("_orig_mod" in k for k in module.state_dict())
    ema = EMA()
    ema.init_from(module.net)
    assert list(ema.shadow) == names


def test_model_mode_compiles_one_graph_for_all_blocks():
    from torch._dynamo.testing import CompileCounter

    module = _module()
    counter = CompileCounter()
    compile_net(module.net, "model", backend=counter)
    module._loss(_batch([[3, 4], [1, 5]]), torch.tensor([1, 2]), torch.Generator().manual_seed(1)).loss.backward()
    assert counter.frame_count == 1  # embeddings, both blocks and the final layer: one graph, no graph break


def test_model_mode_is_refused_with_fsdp():
    from types import SimpleNamespace

    from nit_lightning.training.strategies import NiTFSDP2Strategy

    module = _module(compile="model")
    module._trainer = SimpleNamespace(world_size=1, strategy=NiTFSDP2Strategy(), datamodule=None)
    with pytest.raises(ValueError, match="use model.compile=blocks"):
        module.setup("fit")
