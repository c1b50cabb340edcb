"""NiTModule: training step on the real datamodule, label dropout, per-step generators, NaN handling, checkpoint meta."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers.fit import fit_args
from helpers.shards import write_latent_shards
from nit_lightning.data.batch import PackedBatch
from nit_lightning.data.codecs import PixelCodec
from nit_lightning.training.module import NiTModule
from nit_lightning.training.seeds import step_seed


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_latent_shards(tmp_path_factory.mktemp("shards"))


def tiny(**kwargs) -> NiTModule:
    return NiTModule(net={"name": "NiT-debug", "in_channels": 12, "num_classes": 10}, **kwargs)


def test_step_seed_differs_by_rank_step_and_micro_batch():
    seeds = {step_seed(0, r, s, m) for r in range(2) for s in range(3) for m in range(2)}
    assert len(seeds) == 12
    assert step_seed(0, 1, 2, 0) == step_seed(0, 1, 2, 0)


def test_label_dropout_uses_the_null_class_and_the_generator():
    module = tiny(label_dropout=0.5)
    y = torch.arange(10).repeat(100)  # 1000 labels
    dropped = module._drop_labels(y, torch.Generator().manual_seed(3))
    again = module._drop_labels(y, torch.Generator().manual_seed(3))
    assert torch.equal(dropped, again)
    is_null = dropped == module.net.null_class
    assert module.net.null_class == 10
    assert 400 < int(is_null.sum()) < 600  # p = 0.5 of 1000: 500 ± 5σ (σ ≈ 16)
    assert torch.equal(dropped[~is_null], y[~is_null])
    assert torch.equal(tiny(label_dropout=0.0)._drop_labels(y, torch.Generator()), y)


def nan_batch() -> PackedBatch:
    hw = torch.tensor([[2, 2], [1, 3]])
    x = torch.randn(7, 12)
    x[3, 0] = float("nan")
    return PackedBatch(x=x, hw=hw, y=torch.tensor([1, 2]), seqlens=hw.prod(1), keys=["shardA/k1", "shardA/k2"])


def test_nonfinite_loss_raises_with_step_and_keys():
    with pytest.raises(FloatingPointError, match=r"step 0 .*shardA/k1"):
        tiny().training_step(nan_batch(), 0)


def test_nonfinite_loss_skip_mode_counts():
    module = tiny(on_nonfinite="skip")
    assert module.training_step(nan_batch(), 0) is None
    assert module.skipped_steps == 1


def test_latent_channel_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="in_channels=32 but the data's latents have 12"):
        NiTModule(net={"name": "NiT-debug", "in_channels": 32}, latent_channels=12)
    assert NiTModule(net={"name": "NiT-debug"}, latent_channels=12).net.config.in_channels == 12


def test_warmup_is_linear_then_constant():
    module = tiny(warmup_steps=4, lr=1.0)
    config = module.configure_optimizers()
    scheduler = config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(6):
        lrs.append(scheduler.get_last_lr()[0])
        config["optimizer"].step()
        scheduler.step()
    assert lrs == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert not isinstance(tiny().configure_optimizers(), dict)  # default: constant lr, no scheduler


def test_cosine_schedule_after_warmup_ends_at_the_floor():
    from types import SimpleNamespace

    module = tiny(warmup_steps=2, lr=1.0, lr_schedule="cosine", lr_min_ratio=0.1)
    module._trainer = SimpleNamespace(max_steps=6)  # what configure_optimizers reads
    config = module.configure_optimizers()
    lrs = []
    for _ in range(7):
        lrs.append(config["lr_scheduler"]["scheduler"].get_last_lr()[0])
        config["optimizer"].step()
        config["lr_scheduler"]["scheduler"].step()
    # warm-up 0.5, 1.0; then 0.1 + 0.9·½(1 + cos(π·k/4)) for k = 1..4; held at the floor after max_steps.
    expected = [0.5, 1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 0.55, 0.1 + 0.45 * (1 - math.cos(math.pi / 4)),
                0.1, 0.1]
    assert lrs == pytest.approx(expected)
    module._trainer = SimpleNamespace(max_steps=-1)
    with pytest.raises(ValueError, match="needs trainer.max_steps > warmup_steps=2"):
        module.configure_optimizers()
    with pytest.raises(ValueError, match="lr_schedule must be"):
        tiny(lr_schedule="linear")


@pytest.mark.slow
def test_fit_on_real_datamodule_writes_meta_and_ema(shards, tmp_path, monkeypatch):
    from nit_lightning.cli.lightning import run_cli
    from nit_lightning.training.callbacks import ThroughputMonitor

    monkeypatch.chdir(tmp_path)
    cli = run_cli(fit_args(shards, max_steps=3), trainer_defaults={"callbacks": [ThroughputMonitor(window=1, peak_flops=1e12)]})
    trainer = cli.trainer
    assert trainer.global_step == 3
    metrics = trainer.callback_metrics
    for name in ("loss/train", "loss/train_mse", "loss/train_direction", "optim/grad_norm", "perf/tokens_per_s", "perf/mfu",
                 "perf/packing_efficiency", "perf/tokens_seen"):
        assert name in metrics and torch.isfinite(metrics[name]), name
    assert 0 < float(metrics["perf/packing_efficiency"]) <= 1
    checkpoint = torch.load(tmp_path / "outputs/debug/checkpoints/last.ckpt", weights_only=False)
    meta = checkpoint["nit_meta"]
    assert meta["latent_channels"] == 12 and meta["patch_size"] == 1
    assert meta["codec"] == PixelCodec(2).describe()
    assert meta["net_config"]["in_channels"] == 12 and meta["net_config"]["num_classes"] == 10
    net = cli.model.net
    assert list(checkpoint["ema_state_dict"]) == list(net.state_dict())
    from nit_lightning.models import NiT, NiTConfig

    rebuilt = NiT(NiTConfig(**meta["net_config"]))
    rebuilt.load_state_dict(checkpoint["ema_state_dict"], strict=True)


def test_init_from_official_safetensors_is_strict(tmp_path):
    from safetensors.torch import save_file

    from nit_lightning.models import build_nit, official_state_dict

    source = build_nit("NiT-debug", in_channels=12, num_classes=10, rope_layout="reference")
    torch.nn.init.normal_(source.final_layer.linear.weight)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in official_state_dict(source).items()}, str(path))
    module = NiTModule(net={"name": "NiT-debug", "in_channels": 12, "num_classes": 10, "rope_layout": "reference"},
                       init_from=str(path))
    assert torch.equal(module.net.final_layer.linear.weight, source.final_layer.linear.weight)
    with pytest.raises(Exception, match="depth|missing|unexpected|shape"):
        NiTModule(net={"name": "NiT-debug", "depth": 3, "in_channels": 12, "num_classes": 10}, init_from=str(path))


def test_repa_uses_the_nets_projector_and_batch_features():
    module = NiTModule(
        net={"name": "NiT-debug", "in_channels": 12, "num_classes": 10, "projector_dim": 8, "projector_hidden": 16},
        repa_weight=0.5, repa_layer=1,
    )
    hw = torch.tensor([[2, 2], [1, 3]])
    batch = PackedBatch(x=torch.randn(7, 12), hw=hw, y=torch.tensor([1, 2]), seqlens=hw.prod(1), keys=["a", "b"],
                        repa_z=torch.randn(7, 8))
    out = module._loss(batch, batch.y, torch.Generator().manual_seed(0))
    assert "repa" in out.parts and torch.isfinite(out.parts["repa"])
    out.loss.backward()
    assert module.net.projector[0].weight.grad is not None
    with pytest.raises(ValueError, match="projector_dim"):
        tiny(repa_weight=1.0)
    off = NiTModule(net={"name": "NiT-debug", "in_channels": 12, "projector_dim": 8, "projector_hidden": 16})
    assert not any(p.requires_grad for p in off.net.projector.parameters())  # unused: frozen, DDP-safe


def test_grad_norm_guard_raises_on_nonfinite_gradients():
    from types import SimpleNamespace

    from nit_lightning.training.callbacks import GradNormMonitor

    module = tiny()
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    module.net.final_layer.linear.weight.grad[0, 0] = float("inf")
    trainer = SimpleNamespace(global_step=7, global_rank=0)
    with pytest.raises(FloatingPointError, match="step 7"):  # the blocking check (tests/test_grad_norm_monitor.py: async)
        GradNormMonitor(asynchronous=False).on_before_optimizer_step(trainer, module, None)


@pytest.mark.slow
def test_validation_runs_with_ema_weights_and_restores_live_ones(shards, tmp_path, monkeypatch):
    from lightning.pytorch import Callback

    from nit_lightning.cli.lightning import run_cli

    class SeenInValidation(Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self.weight = pl_module.net.final_layer.linear.weight.detach().clone()

    monkeypatch.chdir(tmp_path)
    seen = SeenInValidation()
    sources = json.dumps([{"path": str(shards), "weight": 1.0}])
    args = fit_args(shards, max_steps=2) + ["--data.val_sources", sources, "--trainer.val_check_interval", "2",
                                            "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0"]
    cli = run_cli(args, trainer_defaults={"callbacks": [seen]})
    ema = [c for c in cli.trainer.callbacks if type(c).__name__ == "EMA"][0]
    assert "loss/val" in cli.trainer.callback_metrics
    assert torch.equal(seen.weight, ema.shadow["final_layer.linear.weight"])  # validation saw the EMA weights
    cli.trainer.save_checkpoint(tmp_path / "done.ckpt")
    shadow = {k: v.clone() for k, v in ema.shadow.items()}
    seen_again = SeenInValidation()
    validate = ["validate", *args[1:], "--ckpt_path", str(tmp_path / "done.ckpt")]
    run_cli(validate, trainer_defaults={"callbacks": [seen_again]})  # `validate` alone also uses the EMA weights
    assert torch.equal(seen_again.weight, shadow["final_layer.linear.weight"])
    live = cli.model.net.state_dict()
    assert not all(torch.equal(live[k], ema.shadow[k].to(live[k].dtype)) for k in live)  # live weights are back


def test_activation_checkpointing_gives_the_same_gradients():
    hw = torch.tensor([[2, 3], [3, 3]])
    batch = PackedBatch(x=torch.randn(15, 12), hw=hw, y=torch.tensor([1, 2]), seqlens=hw.prod(1), keys=["a", "b"])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = tiny(activation_checkpointing=checkpointing)
        torch.nn.init.normal_(module.net.final_layer.linear.weight)  # non-zero output so every block gets gradients
        for block in module.net.blocks:
            torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
        module.configure_model()
        module._loss(batch, batch.y, torch.Generator().manual_seed(1)).loss.backward()
        grads.append({k: p.grad.clone() for k, p in module.net.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_patch_size_mismatch_with_data_is_a_clear_error():
    from types import SimpleNamespace

    module = tiny()
    module._trainer = SimpleNamespace(world_size=1, datamodule=SimpleNamespace(patch_size=2))
    with pytest.raises(ValueError, match="data.patch_size=2 but the network's patch_size=1"):
        module.setup("fit")


def test_local_repa_encoder_aligns_one_patch_per_token(tmp_path):
    from nit_lightning.training.encoders import load_repa_encoder

    torch.save(torch.nn.Conv2d(3, 8, kernel_size=4, stride=4), tmp_path / "enc.pt")  # a "ViT" with 4-px patches
    encoder = load_repa_encoder(f"{tmp_path / 'enc.pt'}:4", codec=PixelCodec(2).describe(), patch_size=1)
    assert encoder.z_dim == 8
    hw = torch.tensor([[2, 3], [4, 1]])
    z = encoder(torch.randn(10, 12), hw)
    assert z.shape == (10, 8) and torch.isfinite(z).all()
    with pytest.raises(FileNotFoundError, match="REPA encoder"):
        load_repa_encoder(str(tmp_path / "missing.pt"), codec=PixelCodec(2).describe(), patch_size=1)


def test_bf16_clipping_works_with_the_fused_optimizer_and_equals_clip_grad_norm():
    """Lightning's AMP plugin refuses to clip for a fused AdamW (found on the H200: `fit` failed at step 1); bf16 has no
    scaler, so the module clips itself, exactly as torch.nn.utils.clip_grad_norm_ does. fp16 keeps Lightning's path."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import MixedPrecision

    module = tiny()
    params = [p for p in module.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 10
    expected = [p.grad.clone() for p in params]
    reference = [g.clone() for g in expected]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in reference]))
    reference = [g * (1.0 / (norm + 1e-6)) for g in reference]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    module._trainer = SimpleNamespace(precision_plugin=MixedPrecision("bf16-mixed", "cpu"))
    module.configure_gradient_clipping(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    for p, r in zip(params, reference):
        torch.testing.assert_close(p.grad, r, rtol=1e-6, atol=1e-7)
    assert module._gradient_scaler() is None

    fp16 = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    module._trainer = SimpleNamespace(precision_plugin=fp16, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    assert module._gradient_scaler() is fp16.scaler
    with pytest.raises(RuntimeError, match="fused"):  # with a scaler, Lightning's own check stands
        module.configure_gradient_clipping(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")


def test_skipped_steps_are_bounded_and_an_all_skipped_run_fails(tmp_path, monkeypatch):
    """Before: on_nonfinite=skip with every step non-finite exited 0 ("max_steps reached") with untrained weights."""
    from nit_lightning.cli.lightning import main
    from nit_lightning.data.shards import ShardWriter, build_index, sample_members
    from nit_lightning.training.nonfinite import NonFinitePolicy, TooManySkippedSteps

    policy = NonFinitePolicy("skip", max_fraction=0.5)
    for _ in range(5):  # 5 of max_steps=10 may be skipped
        policy.handle(float("nan"), "step", [], taken=0, max_steps=10)
    with pytest.raises(TooManySkippedSteps, match="6 steps were skipped .*max_skipped_steps_fraction=0.5 of "
                                                  "trainer.max_steps=10"):
        policy.handle(float("nan"), "step", [], taken=0, max_steps=10)
    unbounded = NonFinitePolicy("skip", max_fraction=0.01)
    unbounded.handle(float("nan"), "step", [], taken=50, max_steps=-1)  # too few steps to judge a fraction

    shards = tmp_path / "nan"
    shards.mkdir()
    writer = ShardWriter(shards / "shard-000000.tar")
    for i in range(8):
        latent = torch.full((12, 4, 4), float("nan"))
        writer.write(f"s{i}", sample_members(f"s{i}", latent, 0, latent_flip=latent), 16)
    writer.close()
    build_index(shards, {"codec": PixelCodec(2).describe(), "latent_channels": 12})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TooManySkippedSteps, match="the run is not training"):  # a failed run: exit 1, traceback
        main(fit_args(shards, max_steps=4) + ["--model.on_nonfinite", "skip"])
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing that looks like a trained model

    # a long run is not left skipping for 1% of its steps (here 1000 batches): a streak stops it
    streak = NonFinitePolicy("skip", max_fraction=1.0, max_consecutive=10)
    for _ in range(3):
        for _ in range(10):
            streak.handle(float("nan"), "step", [], taken=0, max_steps=10**6)
        streak.finite()  # a finite step ends the streak: 30 skipped, never 11 in a row
    assert streak.skipped == 30
    for _ in range(10):
        streak.handle(float("inf"), "step", [], taken=0, max_steps=10**6)
    with pytest.raises(TooManySkippedSteps, match="11 steps in a row .*max_consecutive_skipped_steps=10"):
        streak.handle(float("nan"), "step 41", [], taken=0, max_steps=10**6)
    # (a skipped step still counts as a Lightning step: debug.yaml's checkpoint every 10 steps would come at the 10th)
    with pytest.raises(TooManySkippedSteps, match="6 steps in a row .*max_consecutive_skipped_steps=5"):
        main(fit_args(shards, max_steps=100_000) + ["--model.on_nonfinite", "skip",
                                                      "--model.max_consecutive_skipped_steps", "5"])
    assert not list(tmp_path.rglob("*.ckpt"))
