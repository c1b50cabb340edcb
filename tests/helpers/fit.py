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
