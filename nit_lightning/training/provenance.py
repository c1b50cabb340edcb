"""Does a checkpoint belong to this run? What a checkpoint records of its inputs, and the checks before `fit` resumes.

A resumed `fit` continues the run that wrote the checkpoint. So, before training:
- the network (`nit_meta["net_config"]`, resolved, so `{"name": "NiT-S"}` equals NiT-S spelled out) and every model
  hyper-parameter must match the config, else `fit` refuses naming the keys: Lightning would otherwise silently train
  the checkpoint's model (its hparams override `--model.*` for an explicit --ckpt_path) or keep its optimiser's lr;
- run settings (compile, activation checkpointing, on_nonfinite, local paths) may change: the config's value is used;
- NiT-T2I: the text encoder may be found at another path, but must be the same one (sha256 of its files);
- other data than the checkpoint was trained on (`nit_meta["data"]`, the datamodule's `provenance()`) is a loud warning,
  and so is a checkpoint already at `trainer.max_steps` (the run is finished: fit trains 0 steps).
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from nit_lightning import records
from nit_lightning.records.checkpoint import META_KEY, CheckpointMeta

log = logging.getLogger(__name__)

# NiTModule init args that change how a run executes, not what it learns: the config's value wins on resume.
# `sampler` is advice recorded for sampling (CheckpointMeta.sampling): it may change without changing what is learnt.
RUN_SETTINGS = frozenset({"compile_blocks", "activation_checkpointing", "on_nonfinite", "init_from", "repa_encoder",
                          "sampler", "text_encoder"})  # text_encoder: a path; its content is compared by sha256
# Compared through nit_meta's resolved net_config (net) or filled in from the data (latent_channels); Lightning's own.
NOT_HPARAMS = frozenset({"net", "latent_channels", "_instantiator", "_class_path"})
NET_RUNTIME = frozenset({"attn_backend"})  # the same maths by another kernel
SIDES = ("checkpoint", "config")


def differences(saved: Any, now: Any, skip: frozenset[str] = frozenset()) -> dict:
    """{key: (saved, now)} for the keys present in both that differ (keys only one side knows are versions apart)."""
    return records.differences(saved, now, only_shared=True, ignore=skip)


def describe(diffs: Mapping[str, tuple[Any, Any]], prefix: str) -> str:
    return records.describe_differences(diffs, prefix=prefix, sides=SIDES)


def saved_hparams(path: str | Path) -> dict[str, Any]:
    """A checkpoint's `hyper_parameters` (memory-mapped: the weights are not read); {} when it has none or fails to load
    (loading it for real then reports the damage)."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any failure here is reported by the load that follows
        return {}
    return dict(checkpoint.get("hyper_parameters") or {}) if isinstance(checkpoint, dict) else {}


def _encoder_difference(meta: CheckpointMeta | None, model: LightningModule) -> str:
    """'' when the checkpoint's text encoder is the config's (or neither has one), else what differs."""
    text = getattr(model, "text", None)
    saved = (meta.text_encoder or {}) if meta is not None else {}
    now = text.describe() if text is not None else {}
    if saved.get("sha256") == now.get("sha256"):
        return ""
    return (f"model.text_encoder: checkpoint {saved.get('type')}:{saved.get('path')} (sha256 "
            f"{str(saved.get('sha256'))[:12]}…), config {now.get('type')}:{now.get('path')} (sha256 "
            f"{str(now.get('sha256'))[:12]}…)")


def check_resume(ckpt_path: str | Path, model: LightningModule, data: Mapping[str, Any] | None,
                 max_steps: int = -1) -> None:
    """Refuse (SettingsMismatch naming the keys) a checkpoint of another network or model settings; warn on other data
    or a finished run. `model` is the NiTModule built from the config; `data` the datamodule's `provenance()`."""
    from nit_lightning.training.checkpoints import read_checkpoint_header

    header = read_checkpoint_header(ckpt_path)
    step = int(header["global_step"])
    saved_hparams = dict(header.get("hyper_parameters") or {})
    meta = CheckpointMeta.from_checkpoint(header, ckpt_path) if META_KEY in header else None
    net_now = getattr(getattr(model, "net", None), "config", None)
    if meta is not None and net_now is not None:
        net = meta.net_differences(asdict(net_now), ignore=NET_RUNTIME)
    else:  # not a NiT checkpoint of ours: the raw `net` dicts are all there is
        net = differences(saved_hparams, dict(model.hparams), skip=frozenset(saved_hparams) - {"net"})
    hparams = differences(saved_hparams, dict(model.hparams), skip=NOT_HPARAMS | RUN_SETTINGS)
    encoder = _encoder_difference(meta, model)
    if net or hparams or encoder:
        what = "; ".join(filter(None, [describe(net, "model.net."), describe(hparams, "model."), encoder]))
        raise records.SettingsMismatch(
            f"checkpoint {ckpt_path} (step {step}) was trained with other settings than this config: {what}. A resume "
            "continues that run as it was: drop or fix those overrides, or start a new run in another checkpoint "
            "directory (NIT_CKPT_DIR or the ModelCheckpoint dirpath)"
        )
    changed_run = differences(saved_hparams, dict(model.hparams), skip=frozenset(saved_hparams) - RUN_SETTINGS)
    if changed_run and rank_zero_only.rank == 0:
        log.warning("resuming %s with other run settings (the config's are used): %s", ckpt_path,
                    describe(changed_run, "model."))
    if rank_zero_only.rank != 0:
        return
    saved_data = meta.data if meta is not None else None
    changed = differences(saved_data, data) if saved_data is not None and data is not None else {}
    if changed:
        log.warning(
            "CHANGED INPUTS: resuming %s (step %d), trained on other data than this config's: %s. The run goes on from "
            "step %d with the new data; to train a new model on it, use another checkpoint directory (NIT_CKPT_DIR or "
            "the ModelCheckpoint dirpath)", ckpt_path, step, describe(changed, "data."), step,
        )  # fmt: skip
    if max_steps is not None and 0 <= max_steps <= step:
        log.warning(
            "FINISHED RUN: %s is at step %d and trainer.max_steps=%d: fit trains 0 steps. Raise --trainer.max_steps to "
            "train on, or use another checkpoint directory for a new run", ckpt_path, step, max_steps,
        )  # fmt: skip
