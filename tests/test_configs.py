"""Every experiment config parses, rejects bad keys/types with jsonargparse's message, and fits 2 CPU steps shrunk."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers.fit import fit_args
from helpers.shards import write_latent_shards

# The LightningCLI configs; demo*.yaml are demo configs whose `fit` section is one (tests/test_demo.py fits it).
CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml")
                 if not p.stem.startswith("demo"))
PAPER = ["nit_b_ablation_native", "nit_b_ablation_mix", "nit_b_ablation_fixed", "nit_s", "nit_xl", "nit_xxl"]


def cli(args: list[str]):
    from nit_lightning.cli.lightning import run_cli

    return run_cli(args)


def test_all_expected_configs_exist():
    assert {p.stem for p in CONFIGS} >= set(PAPER) | {"debug"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_with_print_config(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["net"]["name"].startswith("NiT-")
    assert printed["trainer"]["gradient_clip_val"] == 1.0
    # Skipped data (on_error=skip) reaches TensorBoard and a summary line in every experiment.
    assert any(c["class_path"].endswith(".DataHealthMonitor") for c in printed["trainer"]["callbacks"])
    if config.stem in PAPER:  # SPEC §6 recipe
        model, trainer = printed["model"], printed["trainer"]
        assert (model["lr"], model["betas"], model["weight_decay"], model["eps"]) == (1e-4, [0.9, 0.95], 0.01, 1e-6)
        assert model["label_dropout"] == 0.1 and model["warmup_steps"] == 0
        assert trainer["precision"] == "bf16-mixed" and trainer["max_steps"] >= 400_000
        callbacks = {c["class_path"].rsplit(".", 1)[-1]: c.get("init_args", {}) for c in trainer["callbacks"]}
        ema = callbacks.get("EMA", callbacks.get("ShardedEMA"))  # XXL shards its EMA under FSDP2
        assert ema is not None and ema["decay"] == 0.9999
        checkpoint = callbacks["ModelCheckpoint"]
        assert (checkpoint["every_n_train_steps"], checkpoint["save_last"], checkpoint["save_top_k"]) == (2000, True, -1)
    if config.stem in PAPER or config.stem == "debug":  # a stop by SIGTERM/SIGUSR1 saves last.ckpt first (exit 75)
        paths = [c["class_path"] for c in printed["trainer"]["callbacks"]]
        assert paths.count("nit_lightning.training.fault_tolerance.RequeueOnSignal") == 1
        assert not any(str(s["path"]).startswith("/") for s in printed["data"]["sources"])  # relative defaults


def test_token_budgets_follow_spec():
    budgets = {p.stem: yaml.safe_load(p.read_text()) for p in CONFIGS if p.stem in PAPER}
    per_step = {k: v["data"]["tokens_per_pack"] * v["trainer"]["devices"] for k, v in budgets.items()}
    assert per_step["nit_xl"] == per_step["nit_s"] == per_step["nit_b_ablation_mix"] == 131072  # SPEC §5
    assert budgets["nit_xl"]["data"]["tokens_per_pack"] == 16384 and budgets["nit_xxl"]["data"]["tokens_per_pack"] == 8192


@pytest.mark.parametrize(
    "extra, message",
    [(["--model.bogus_key", "1"], "bogus_key"), (["--model.lr", "fast"], "lr"), (["--trainer.max_steps", "1.5"], "max_steps")],
)
def test_bad_keys_and_types_fail_with_jsonargparse_message(extra, message, capsys):
    config = [p for p in CONFIGS if p.stem == "debug"][0]
    with pytest.raises(SystemExit) as exit_info:
        cli(["fit", "--config", str(config), *extra])
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("config_shards")
    return [write_latent_shards(root / f"source{i}", num_samples=12, seed=i) for i in range(3)]


TRAINING = [p for p in CONFIGS if p.stem in PAPER or p.stem == "debug"]


@pytest.mark.slow
@pytest.mark.parametrize("config", TRAINING, ids=lambda p: p.stem)
def test_config_fits_two_steps_shrunk(config, shard_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative outputs/ land here
    num_sources = len(yaml.safe_load(config.read_text())["data"]["sources"])
    run = cli(fit_args(shard_dirs[:num_sources], config=config, max_steps=2))
    assert run.trainer.global_step == 2
    assert run.model.net.config.depth == 2 and run.model.net.config.in_channels == 12
