"""Arguments of a `fit` shrunk to NiT-debug on CPU, for tests that run the LightningCLI."""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEBUG_CONFIG = REPO / "experiments" / "debug.yaml"


def fit_args(shards: Path | list[Path], *, config: Path = DEBUG_CONFIG, max_steps: int = 2, tokens: int = 64) -> list[str]:
    """CLI args: a config shrunk to NiT-debug on CPU, data on test shards, logs and checkpoints in the cwd."""
    dirs = shards if isinstance(shards, list) else [shards]
    sources = json.dumps([{"path": str(d), "weight": 1.0} for d in dirs])
    return [
        "fit", "--config", str(config),
        "--model.net", '{"name": "NiT-debug", "num_classes": 10}',
        "--data.sources", sources, "--data.tokens_per_pack", str(tokens), "--data.num_workers", "0",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
        "--trainer.strategy", "auto", "--trainer.precision", "32-true", "--trainer.max_steps", str(max_steps),
        "--trainer.log_every_n_steps", "1",
    ]  # fmt: skip


def run_command(argv: list[str]) -> int:
    """`python -m nit_lightning ARGV` in this process, without the entry point's process-wide signal handlers
    (nit_lightning.stop_signals): a test must not leave them behind for the tests that follow."""
    import importlib

    from nit_lightning.__main__ import COMMANDS, LIGHTNING_COMMANDS

    if argv[0] in LIGHTNING_COMMANDS:
        from nit_lightning.cli.lightning import main

        return main(argv)
    return int(importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:]) or 0)
