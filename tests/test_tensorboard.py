"""What a researcher sees while training (issue 22, item 3): tag groups that open on loss, lr and throughput, units in
the names, the README's tag table true for a real fit, and wandb as a drop-in logger (offline, no network)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers.fit import REPO, fit_args
from helpers.shards import write_latent_shards


def _readme_tags() -> dict[str, str]:
    """{tag: when} from the README's TensorBoard table (rows '| `tag`, `tag` | what | when |')."""
    section = (REPO / "README.md").read_text().split("### TensorBoard", 1)[1].split("\n## ", 1)[0]
    tags = {}
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            for tag in re.findall(r"`([^`]+)`", cells[0]):
                tags[tag] = cells[2]
    return tags


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> set[str]:
    """Scalar tags of a 6-step fit of experiments/debug.yaml (shrunk), as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nit_lightning.cli.lightning import run_cli

    root = tmp_path_factory.mktemp("tb")
    shards = write_latent_shards(root / "shards", num_samples=12)
    monkey = pytest.MonkeyPatch()
    monkey.chdir(root)
    try:
        cli = run_cli(fit_args(shards, max_steps=6))
        log_dir = Path(cli.trainer.logger.log_dir).resolve()  # relative to the run's working directory
    finally:
        monkey.undo()
    return set(EventAccumulator(str(log_dir)).Reload().Tags()["scalars"])


@pytest.mark.slow
def test_the_board_opens_on_loss_lr_and_throughput_with_units_in_the_names(logged):
    groups = sorted({tag.split("/")[0] for tag in logged} - {"epoch"})  # `epoch` is Lightning's own counter
    assert groups[:4] == ["loss", "lr-AdamW", "optim", "perf"], groups  # data health used to open the board
    assert groups.index("train_data") > groups.index("perf")
    assert {"perf/step_time_s", "perf/tokens_per_s", "perf/images_per_s"} <= logged
    assert not logged & {"perf/step_time", "perf/tokens_per_sec", "data/planned_samples", "train/loss"}


@pytest.mark.slow
def test_every_tag_the_readme_names_as_always_is_logged(logged):
    """The README used to name `perf/tokens_per_s` and `perf/images_per_s`, which no callback logged."""
    tags = _readme_tags()
    always = {tag for tag, when in tags.items() if when == "always"}
    assert len(always) >= 12, tags
    assert always <= logged, sorted(always - logged)
    documented = {t for t in tags if "<" not in t and not t.endswith("...")}
    assert logged - {"epoch"} <= documented, sorted(logged - documented)  # nothing logged goes unexplained


@pytest.mark.slow
def test_a_wandb_logger_parses_and_trains_offline(tmp_path, monkeypatch):
    """WandbLogger through the CLI, offline (no network): the config parses, a 2-step fit logs its scalars."""
    pytest.importorskip("wandb", reason="wandb is optional and not installed here (pip install wandb)")
    from nit_lightning.cli.lightning import run_cli

    monkeypatch.chdir(tmp_path)
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
                        "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(name, value)
    shards = write_latent_shards(tmp_path / "shards", num_samples=12)
    argv = fit_args(shards, max_steps=2) + ["--trainer.logger", "lightning.pytorch.loggers.WandbLogger",
                                            "--trainer.logger.offline", "true", "--trainer.logger.project", "nit-test",
                                            "--trainer.logger.save_dir", str(tmp_path / "wandb_runs")]
    cli = run_cli(argv)
    from lightning.pytorch.loggers import WandbLogger

    assert isinstance(cli.trainer.logger, WandbLogger) and cli.trainer.global_step == 2
    cli.trainer.logger.experiment.finish()
    runs = list((tmp_path / "wandb_runs").rglob("*.wandb"))
    assert runs, "an offline run file to `wandb sync` later"
