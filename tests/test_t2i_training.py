"""NiT-T2I training through the same `fit` path as NiT: captioned shards -> NiTModule with a text encoder; the checkpoint
records the conditioning and the encoder; caption dropout gives the null caption; a T2I run resumes bitwise."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.fit import REPO
from nit_lightning.data.prepare import PrepareSettings, run_prepare
from nit_lightning.data.synthetic_captions import CaptionedSynthSettings, write_captioned_synthetic
from nit_lightning.data.tinytext import TinyTextConfig, make_tiny_text_encoder, save_tiny_text_encoder
from test_resume import CALLBACKS_YAML, Recorder

CONFIG = REPO / "experiments" / "debug_t2i.yaml"


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> tuple[Path, Path]:
    """(shards, tinytext encoder) of 24 captioned images, 16..32 px at pixel:4 (4..64 tokens)."""
    root = tmp_path_factory.mktemp("t2i")
    images = root / "images"
    write_captioned_synthetic(CaptionedSynthSettings(out=str(images), num_images=24, min_side=16, max_side=32))
    run_prepare(PrepareSettings(input=str(images), output=str(root / "shards"), codec="pixel:4", captions="beside",
                                samples_per_shard=8))
    texts = [p.read_text().strip() for p in sorted(images.glob("*.txt"))]
    encoder = make_tiny_text_encoder(texts, TinyTextConfig(dim=16))
    save_tiny_text_encoder(encoder, root / "tinytext.pt")
    return root / "shards", root / "tinytext.pt"


def t2i_args(shards: Path, encoder: Path, max_steps: int, extra: list[str] = ()) -> list[str]:
    return ["fit", "--config", str(CONFIG), "--config", "callbacks.yaml",
            "--model.text_encoder", f"tinytext:{encoder}", "--model.label_dropout", "0.3",
            "--data.sources", f'[{{"path": "{shards}", "weight": 1.0}}]', "--data.tokens_per_pack", "96",
            "--trainer.max_steps", str(max_steps), "--trainer.log_every_n_steps", "1", *extra]


def run(workdir: Path, captioned, max_steps: int, monkeypatch, extra: list[str] = ()) -> Recorder:
    from nit_lightning.cli.lightning import run_cli

    workdir.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(workdir)
    (workdir / "callbacks.yaml").write_text(CALLBACKS_YAML)
    recorder = Recorder()
    cli = run_cli(t2i_args(*captioned, max_steps, extra), trainer_defaults={"callbacks": [recorder]})
    assert cli.trainer.global_step == max_steps
    return recorder


def test_a_t2i_checkpoint_records_its_conditioning_and_encoder(captioned, tmp_path, monkeypatch):
    from nit_lightning.generation.pipeline import load_pipeline

    run(tmp_path, captioned, 2, monkeypatch)
    ckpt = torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=True)
    meta = ckpt["nit_meta"]
    assert meta["conditioning"] == "text" and meta["text_encoder"]["type"] == "tinytext"
    assert meta["net_config"]["text_dim"] == 16 and meta["net_config"]["in_channels"] == 48
    assert not any("text" in k and "encoder" in k for k in ckpt["state_dict"])  # the frozen encoder is not trained
    pipe = load_pipeline(tmp_path / "ckpts" / "last.ckpt")
    assert pipe.conditioning == "text" and pipe.text_encoder.dim == 16


def test_caption_dropout_uses_the_label_draws_and_gives_null_captions(captioned):
    from nit_lightning.data.batch import PackedBatch
    from nit_lightning.training.module import NiTModule

    module = NiTModule(net={"name": "NiT-T2I-debug", "in_channels": 4}, text_encoder=f"tinytext:{captioned[1]}",
                       label_dropout=0.5)
    hw = torch.tensor([[1, 2]] * 8)
    batch = PackedBatch(x=torch.zeros(16, 4), hw=hw, y=torch.zeros(8, dtype=torch.long), seqlens=hw.prod(1),
                        captions=["a red disc"] * 8)
    text = module._condition(batch, module._generator(3, 0, "train"), "test")
    drop = torch.rand((8,), generator=module._generator(3, 0, "train")) < 0.5
    assert torch.equal(text.lengths == 0, drop) and 0 < int(drop.sum()) < 8
    whole = module._condition(batch, None, "validation")
    assert bool((whole.lengths > 0).all())


def test_t2i_needs_an_encoder_and_captions_and_c2i_refuses_one(captioned):
    from nit_lightning.data.batch import PackedBatch
    from nit_lightning.training.module import NiTModule

    with pytest.raises(ValueError, match="set model.text_encoder"):
        NiTModule(net={"name": "NiT-T2I-debug", "in_channels": 4})
    with pytest.raises(ValueError, match="class-conditional preset"):
        NiTModule(net={"name": "NiT-debug", "in_channels": 4}, text_encoder=f"tinytext:{captioned[1]}")
    with pytest.raises(ValueError, match="text_dim=8"):
        NiTModule(net={"name": "NiT-T2I-debug", "in_channels": 4, "text_dim": 8}, text_encoder=f"tinytext:{captioned[1]}")
    module = NiTModule(net={"name": "NiT-T2I-debug", "in_channels": 4}, text_encoder=f"tinytext:{captioned[1]}")
    hw = torch.tensor([[1, 1]])
    batch = PackedBatch(x=torch.zeros(1, 4), hw=hw, y=torch.zeros(1, dtype=torch.long), seqlens=hw.prod(1))
    with pytest.raises(ValueError, match="without a caption"):
        module._condition(batch, None, "validation")


@pytest.mark.slow
def test_t2i_resume_is_bitwise_exact(captioned, tmp_path, monkeypatch):
    k = 4
    straight = run(tmp_path / "straight", captioned, 2 * k, monkeypatch)
    first = run(tmp_path / "resumed", captioned, k, monkeypatch)
    second = run(tmp_path / "resumed", captioned, 2 * k, monkeypatch, ["--ckpt_path", "last"])
    for step in range(1, 2 * k + 1):
        assert (first.steps | second.steps)[step] == straight.steps[step], f"step {step} differs"
    a = torch.load(tmp_path / "straight/ckpts/last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "resumed/ckpts/last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 2 * k
    for name in ("state_dict", "ema_state_dict"):
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}[{key}] differs"


def test_resuming_with_another_text_encoder_is_refused(captioned, tmp_path, monkeypatch):
    from nit_lightning.records import SettingsMismatch

    run(tmp_path, captioned, 1, monkeypatch)
    other = make_tiny_text_encoder(["a red disc"], TinyTextConfig(dim=16, seed=1))
    save_tiny_text_encoder(other, tmp_path / "other.pt")
    from nit_lightning.cli.lightning import run_cli

    args = t2i_args(captioned[0], tmp_path / "other.pt", 2, ["--ckpt_path", "last"])
    with pytest.raises(SettingsMismatch, match="model.text_encoder"):
        run_cli(args)


SHARDED_YAML = """
trainer:
  callbacks:
    - class_path: nit_lightning.training.strategies.ShardedEMA
      init_args: {decay: 0.9}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: ckpts, every_n_train_steps: 1, save_last: true, save_top_k: -1}
"""


@pytest.mark.slow
def test_t2i_under_fsdp2_per_block_equals_plain_training(captioned, tmp_path, monkeypatch):
    """NiTFSDP2Strategy's default block class is the net's own: NiT-T2I's blocks shard, and fp32 FSDP2 on one
    process trains bitwise like no strategy (the frozen text encoder is not part of the module's parameters)."""
    from nit_lightning.cli.lightning import run_cli

    run(tmp_path / "plain", captioned, 2, monkeypatch)
    workdir = tmp_path / "fsdp2"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    (workdir / "callbacks.yaml").write_text(SHARDED_YAML)
    strategy = '{"class_path": "nit_lightning.training.strategies.NiTFSDP2Strategy", "init_args": {"param_dtype": "float32"}}'
    cli = run_cli(t2i_args(*captioned, 2, ["--trainer.strategy", strategy]))
    assert cli.trainer.strategy.num_groups == 2 + 1  # NiT-T2I-debug's two blocks and the net's root
    a = torch.load(tmp_path / "plain/ckpts/last.ckpt", weights_only=False)
    b = torch.load(workdir / "ckpts/last.ckpt", weights_only=False)
    for key, value in a["state_dict"].items():
        assert torch.equal(b["state_dict"][key], value), key


@pytest.mark.slow
def test_t2i_ddp_two_cpu_processes(captioned, tmp_path):
    import os
    import subprocess
    import sys

    from test_ddp import REPO

    (tmp_path / "callbacks.yaml").write_text(CALLBACKS_YAML)
    args = t2i_args(*captioned, 2, ["--trainer.devices", "2", "--trainer.strategy", "ddp"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]), OMP_NUM_THREADS="1")
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)  # left by an in-process run (FSDP2 above) whose port this process still holds
    result = subprocess.run([sys.executable, "-m", "nit_lightning", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ckpt = torch.load(tmp_path / "ckpts/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["nit_meta"]["conditioning"] == "text"
