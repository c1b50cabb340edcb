"""NativeLatentDataModule on small self-made shards: DDP split, reshuffle, resume, corrupt shards, flips, weights."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from helpers.shards import write_latent_shards
from nit_lightning.data.datamodule import NativeLatentDataModule
from nit_lightning.data.loader import TooMuchSkipped
from nit_lightning.data.shard_reader import ShardReadError
from nit_lightning.models.patching import patchify

CHANNELS = 4
SETTINGS = {"latent_channels": CHANNELS, "codec": {"name": "pixel", "factor": 1}}


def write_source(directory: Path, num_shards: int = 3, per_shard: int = 40, seed: int = 0, side: int = 1,
                 settings: dict | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:  # fmt: skip
    """Random half-precision (C, h, w) latents with their mirror, sides 1..6 × `side`: key -> (latent, flip, cls)."""
    stored: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
    write_latent_shards(directory, num_samples=num_shards * per_shard, per_shard=per_shard, channels=CHANNELS,
                        sides=(1, 6), side_multiple=side, seed=seed, dtype=torch.float16,
                        key=directory.name + "_{shard}_{i}", settings=SETTINGS if settings is None else settings,
                        stored=stored)
    return stored


@pytest.fixture()
def data(tmp_path):
    stored = write_source(tmp_path / "native")
    stored.update(write_source(tmp_path / "fixed", num_shards=1, per_shard=30, seed=1))
    return tmp_path, stored


def make(tmp_path: Path, rank: int = 0, world: int = 1, **kwargs) -> NativeLatentDataModule:
    options = dict(tokens_per_pack=64, num_workers=0, seed=0, buffer_size=0)
    options.update(kwargs)
    sources = options.pop("sources", [{"path": str(tmp_path / "native")}, {"path": str(tmp_path / "fixed")}])
    dm = NativeLatentDataModule(sources=sources, **options)
    dm.override_distributed(rank, world)
    return dm


def epoch_keys(dm: NativeLatentDataModule, kind: str = "train") -> list[list[str]]:
    loader = dm.train_dataloader() if kind == "train" else dm.val_dataloader()
    return [batch.keys for batch in loader]


def short(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def test_one_epoch_every_sample_once(data):
    tmp_path, stored = data
    dm = make(tmp_path, max_images_per_pack=5)
    assert dm.latent_channels == CHANNELS and dm.codec_description == SETTINGS["codec"]
    loader = dm.train_dataloader()
    assert len(loader) == dm.plan_report["packs_per_rank"]
    seen = []
    for batch in loader:
        assert batch.x.dtype == torch.float32 and batch.x.shape == (int(batch.seqlens.sum()), CHANNELS)
        assert batch.num_tokens <= 64 and batch.num_images <= 5
        assert torch.equal(batch.seqlens, batch.hw[:, 0] * batch.hw[:, 1])
        for key, cls in zip(batch.keys, batch.y.tolist()):
            assert stored[short(key)][2] == cls
        seen += [short(k) for k in batch.keys]
    assert sorted(seen) == sorted(stored)
    stats = dm.stats["train"]
    assert stats.packs == len(loader) and stats.images == len(stored) and stats.skipped_samples == 0
    # 5 images × ~12 tokens cap the fill of a 64-token pack
    assert stats.tokens_per_s > 0 and dm.packing_efficiency == stats.plan_efficiency > 0.75


def test_two_ranks_two_workers_split(data):
    tmp_path, stored = data
    per_rank = {}
    for rank in (0, 1):
        per_rank[rank] = epoch_keys(make(tmp_path, rank, 2, num_workers=2))
        assert per_rank[rank] == epoch_keys(make(tmp_path, rank, 2, num_workers=0))  # worker count keeps the order
    assert len(per_rank[0]) == len(per_rank[1]) > 0  # equal pack counts: DDP does not hang
    keys = [k for rank in (0, 1) for pack in per_rank[rank] for k in pack]
    assert len(keys) == len(set(keys))  # no sample twice across ranks × workers
    report = make(tmp_path, 0, 2).plan_report
    assert len(keys) + report["leftover_samples"] == len(stored)
    assert report["leftover_packs"] == report["planned_packs"] % 2


def test_reshuffled_every_epoch_deterministic_from_seed(data):
    tmp_path, _ = data
    dm = make(tmp_path)
    first, second = epoch_keys(dm), epoch_keys(dm)
    assert first != second and sorted(sum(first, [])) == sorted(sum(second, []))
    again = make(tmp_path)
    assert epoch_keys(again) == first and epoch_keys(again) == second
    assert epoch_keys(make(tmp_path, seed=1)) != first


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_equals_uninterrupted(data, num_workers):
    tmp_path, _ = data
    reference = make(tmp_path, num_workers=num_workers)
    epoch0, epoch1 = epoch_keys(reference), epoch_keys(reference)
    interrupted = make(tmp_path, num_workers=num_workers)
    taken = []
    for batch in interrupted.train_dataloader():
        taken.append(batch.keys)
        if len(taken) == 3:
            break
    state = interrupted.state_dict()
    assert (state["epoch"], state["packs_consumed"]) == (0, 3)
    resumed = make(tmp_path, num_workers=num_workers)
    resumed.load_state_dict(state)
    assert taken + epoch_keys(resumed) == epoch0
    assert epoch_keys(resumed) == epoch1


def test_an_old_checkpoint_with_another_world_restarts_the_epoch_loudly(data, caplog):
    """A checkpoint written before positions were recorded in the packing cannot continue on another world size."""
    tmp_path, _ = data
    state = {**make(tmp_path).state_dict(), "packs_consumed": 2, "world_size": 4}
    for key in ("packs_done", "epoch_world_size"):
        state.pop(key)
    dm = make(tmp_path)
    with caplog.at_level(logging.WARNING):
        dm.load_state_dict(state)
    assert "restarts from its first pack" in caplog.text
    assert epoch_keys(dm) == epoch_keys(make(tmp_path))


def _take(dms: list[NativeLatentDataModule], steps: int) -> tuple[list[str], list[dict]]:
    """`steps` steps of every rank's loader (one module per rank, in lockstep): the keys seen, each rank's state."""
    iterators = [iter(dm.train_dataloader()) for dm in dms]
    keys = [short(k) for _ in range(steps) for it in iterators for k in next(it).keys]
    return keys, [dm.state_dict() for dm in dms]


def test_resume_on_one_rank_then_two_sees_every_sample_of_the_epoch_once(data, caplog):
    tmp_path, stored = data
    two = [make(tmp_path, rank, 2) for rank in (0, 1)]
    per_epoch = len(two[0].train_dataloader())
    first, states = _take(two, 3)
    assert states[0]["packs_done"] == states[1]["packs_done"] > 0 and states[0]["epoch_world_size"] == 2
    one = make(tmp_path)
    with caplog.at_level(logging.WARNING):
        one.load_state_dict(states[0])
        steps_on_one = len(one.train_dataloader()) - 3
    assert "the rest of the epoch is split over them" in caplog.text and "continues on 1 ranks after 3 steps" in caplog.text
    assert steps_on_one > 2 * (per_epoch - 3)  # one rank takes about twice the steps for the rest
    second, (state,) = _take([one], 4)
    assert state["epoch_world_size"] == 2 and state["packs_consumed"] == 7
    again = [make(tmp_path, rank, 2) for rank in (0, 1)]
    for dm in again:
        dm.load_state_dict(state)
    lengths = {len(dm.train_dataloader()) for dm in again}
    assert len(lengths) == 1  # both ranks get as many packs: DDP does not hang
    third = [short(k) for dm in again for batch in dm.train_dataloader() for k in batch.keys]
    seen = first + second + third
    assert len(seen) == len(set(seen)), "a sample was seen twice in one epoch"
    plans = [two[0]._plans["train"], one._continued, again[0]._continued]
    dropped = sum(plan.report["leftover_samples"] for plan in plans)
    assert len(stored) - dropped <= len(seen) < len(stored)  # only the least-full leftover packs are left out
    # the next epoch is planned afresh on two ranks: the same packs as a run that never changed its world size
    uninterrupted = make(tmp_path, 0, 2)
    epoch_keys(uninterrupted)
    assert epoch_keys(again[0]) == epoch_keys(uninterrupted)


@pytest.mark.parametrize("options", [{}, {"packs_per_epoch": 5}, {"buffer_size": 32}], ids=str)
def test_resuming_on_the_same_world_is_the_rest_of_the_plan(data, options):
    tmp_path, _ = data
    reference = [make(tmp_path, rank, 2, **options).train_dataloader() for rank in (0, 1)]
    reference = [[(b.keys, b.x) for b in loader] for loader in reference]
    two = [make(tmp_path, rank, 2, **options) for rank in (0, 1)]
    _, states = _take(two, 2)
    for rank in (0, 1):
        resumed = make(tmp_path, rank, 2, **options)
        resumed.load_state_dict(states[rank])
        rest = [(b.keys, b.x) for b in resumed.train_dataloader()]
        assert [keys for keys, _ in rest] == [keys for keys, _ in reference[rank][2:]]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rest, reference[rank][2:]))  # flips included


def truncate_shard(tmp_path: Path) -> Path:
    path = tmp_path / "native" / "shard-000001.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_corrupt_shard_raise_names_shard(data):
    tmp_path, _ = data
    truncate_shard(tmp_path)
    with pytest.raises(ShardReadError, match="shard-000001.tar"):
        epoch_keys(make(tmp_path, on_error="raise"))


def test_corrupt_shard_skip_counts_and_logs(data, caplog):
    tmp_path, stored = data
    clean = make(tmp_path)
    packs_before = len(clean.train_dataloader())
    truncate_shard(tmp_path)
    dm = make(tmp_path, on_error="skip", max_skipped_fraction=1.0)
    with caplog.at_level(logging.WARNING):
        keys = epoch_keys(dm)
    assert len(keys) == packs_before  # every rank keeps its pack count
    stats = dm.stats["train"]
    assert 0 < stats.skipped_samples < 40 and stats.images + stats.skipped_samples == len(stored)
    assert stats.skipped_shards == 1 and stats.planned_samples == len(stored)
    assert stats.skipped_fraction == stats.skipped_samples / len(stored)
    assert "shard-000001.tar" in caplog.text and "loses a sample" in caplog.text


def test_corrupt_shard_whole_packs_lost_keep_count(data, caplog):
    tmp_path, stored = data
    packs_before = len(make(tmp_path, max_images_per_pack=1).train_dataloader())
    truncate_shard(tmp_path)
    dm = make(tmp_path, max_images_per_pack=1, max_skipped_fraction=1.0)  # a lost sample loses its whole pack
    with caplog.at_level(logging.WARNING):
        keys = epoch_keys(dm)
    assert len(keys) == packs_before
    repeats = [pack for pack in keys if pack[0].startswith("(repeat) ")]
    stats = dm.stats["train"]
    assert 0 < len(repeats) == stats.skipped_samples < 40 and "stands in" in caplog.text
    assert stats.skipped_shards == 1


def test_skipping_more_than_the_limit_fails_the_epoch(data):
    # Before: any share of the data could be skipped with on_error=skip, silently but for per-sample warnings.
    tmp_path, _ = data
    truncate_shard(tmp_path)  # about 20 of 150 samples: well over the default 1%
    with pytest.raises(TooMuchSkipped, match=r"train epoch 0, rank 0: \d+ of the 150 planned samples .* from 1 shards "
                                             r"\(native/shard-000001.tar\); the limit is max_skipped_fraction=0.01"):
        epoch_keys(make(tmp_path))
    assert len(epoch_keys(make(tmp_path, max_skipped_fraction=0.5))) > 0  # under a looser limit the epoch completes
    with pytest.raises(ValueError, match="max_skipped_fraction=2"):
        make(tmp_path, max_skipped_fraction=2)


def _stale_index(tmp_path: Path) -> int:
    """Rewrite index.json of `native` as if every sample of its first shard were 1×1; returns how many are not."""
    import json

    path = tmp_path / "native" / "index.json"
    index = json.loads(path.read_text())
    from nit_lightning.data.shard_reader import ShardReader

    real = [s.num_tokens for s in ShardReader().samples(tmp_path / "native" / "shard-000000.tar")]
    index["shards"][0]["lengths"] = [1] * len(real)
    path.write_text(json.dumps(index))
    return sum(n != 1 for n in real)


def test_a_stale_index_is_caught_not_trusted(data, caplog):
    # Before: the packer trusted the index's 1-token lengths and packs of hundreds of tokens went to a 64-token budget.
    tmp_path, stored = data
    wrong = _stale_index(tmp_path)
    assert wrong > 20
    with pytest.raises(ShardReadError, match=r"latent \(\d+ tokens at patch size 1\), but index.json plans 1 tokens "
                                             r"of 4 channels: the index does not describe this shard .*--reindex"):
        epoch_keys(make(tmp_path, on_error="raise"))
    dm = make(tmp_path, on_error="skip", max_skipped_fraction=1.0)
    with caplog.at_level(logging.WARNING):
        packs = list(dm.train_dataloader())
    assert all(batch.num_tokens <= 64 for batch in packs)
    assert dm.stats["train"].skipped_samples == wrong and dm.stats["train"].skipped_shards == 1
    with pytest.raises(TooMuchSkipped):  # and under the default limit the run stops
        epoch_keys(make(tmp_path))


@pytest.mark.parametrize("buffer_size", [0, 8192])
def test_a_too_small_token_budget_says_which_sample_and_what_to_do(data, buffer_size):
    # Before: "source …, sample #3: sample 7 has length 110": two numbers for one sample (the second its epoch position).
    tmp_path, stored = data
    longest = max(latent.shape[1] * latent.shape[2] for latent, _, _ in stored.values())
    too_long = sum(latent.shape[1] * latent.shape[2] > 20 for latent, _, _ in stored.values())
    with pytest.raises(ValueError) as error:
        len(make(tmp_path, tokens_per_pack=20, buffer_size=buffer_size).train_dataloader())
    message = str(error.value)
    assert message.startswith(f"tokens_per_pack=20 is smaller than {too_long} samples, the longest {longest} tokens "
                              f"(the first: source {tmp_path / 'native'}, shard shard-000000.tar, sample #")
    assert f"raise tokens_per_pack to at least {longest}" in message and "has length" not in message


@pytest.mark.parametrize("flip_prob", [0.0, 1.0, 0.5])
def test_flip_selection(data, flip_prob):
    tmp_path, stored = data
    dm = make(tmp_path, flip_prob=flip_prob)
    flips = 0
    for batch in dm.train_dataloader():
        for key, tokens in zip(batch.keys, torch.split(batch.x, batch.seqlens.tolist())):
            latent, mirrored, _ = stored[short(key)]
            is_flip = torch.equal(tokens, patchify(mirrored.float(), 1))
            assert is_flip or torch.equal(tokens, patchify(latent.float(), 1))
            flips += is_flip and not torch.equal(latent, mirrored)
    distinct = sum(not torch.equal(a, b) for a, b, _ in stored.values())
    if flip_prob == 0.0:
        assert flips == 0
    elif flip_prob == 1.0:
        assert flips == distinct
    else:
        assert 0.3 * distinct < flips < 0.7 * distinct


def test_source_weights(data):
    tmp_path, _ = data
    sources = [{"path": str(tmp_path / "native"), "weight": 0.5}, {"path": str(tmp_path / "fixed"), "weight": 2.0}]
    keys = [short(k) for pack in epoch_keys(make(tmp_path, sources=sources)) for k in pack]
    native = [k for k in keys if k.startswith("native")]
    fixed = [k for k in keys if k.startswith("fixed")]
    assert len(native) == len(set(native)) == 60  # half of 120, each at most once
    assert len(fixed) == 60 and len(set(fixed)) == 30  # every sample twice


def test_patch_size_two(tmp_path):
    stored = write_source(tmp_path / "p2", num_shards=1, per_shard=20, side=2)
    dm = make(tmp_path, patch_size=2, sources=[{"path": str(tmp_path / "p2")}], flip_prob=0.0)
    for batch in dm.train_dataloader():
        assert batch.x.shape[1] == CHANNELS * 4 and batch.num_tokens <= 64
        for key, tokens in zip(batch.keys, torch.split(batch.x, batch.seqlens.tolist())):
            assert torch.equal(tokens, patchify(stored[short(key)][0].float(), 2))


def test_val_dataloader_fixed_no_flip(data):
    tmp_path, stored = data
    dm = make(tmp_path, val_sources=[{"path": str(tmp_path / "fixed")}], flip_prob=1.0)
    first = epoch_keys(dm, "val")
    assert first == epoch_keys(dm, "val")
    for batch in dm.val_dataloader():
        for key, tokens in zip(batch.keys, torch.split(batch.x, batch.seqlens.tolist())):
            assert torch.equal(tokens, patchify(stored[short(key)][0].float(), 1))
    assert make(tmp_path).val_dataloader() == []


def test_packs_per_epoch(data):
    tmp_path, _ = data
    assert len(epoch_keys(make(tmp_path, packs_per_epoch=3))) == 3
    with pytest.raises(ValueError, match="packs_per_epoch=999"):
        epoch_keys(make(tmp_path, packs_per_epoch=999))


def test_streaming_buffer_plan(data):
    tmp_path, stored = data
    keys = [short(k) for pack in epoch_keys(make(tmp_path, buffer_size=32)) for k in pack]
    assert sorted(keys) == sorted(stored)


def test_rank_from_env(data, monkeypatch):
    tmp_path, _ = data
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dm = NativeLatentDataModule(sources=[{"path": str(tmp_path / "native")}], tokens_per_pack=64, num_workers=0)
    assert dm.rank_world() == (1, 2)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, world size 2\)"):
        dm.rank_world()


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare"):
        NativeLatentDataModule(sources=[{"path": str(tmp_path / "missing")}])
    write_source(tmp_path / "a", num_shards=1, per_shard=3)
    write_source(tmp_path / "b", num_shards=1, per_shard=3, settings={"latent_channels": 8, "codec": None})
    with pytest.raises(ValueError, match="disagree"):
        NativeLatentDataModule(sources=[{"path": str(tmp_path / "a")}, {"path": str(tmp_path / "b")}])
    with pytest.raises(ValueError, match="on_error"):
        NativeLatentDataModule(sources=[{"path": str(tmp_path / "a")}], on_error="ignore")
    with pytest.raises(ValueError, match="patch_size"):
        NativeLatentDataModule(sources=[{"path": str(tmp_path / "a")}], patch_size=3)
    dm = NativeLatentDataModule(sources=[{"path": str(tmp_path / "a")}], tokens_per_pack=4, num_workers=0)
    with pytest.raises(ValueError, match="shard-000000.tar"):
        len(dm.train_dataloader())


class _Recorder:
    """A tiny LightningModule factory that records the keys of every training batch."""

    @staticmethod
    def build(record: list):
        import lightning as L

        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.weight = torch.nn.Parameter(torch.zeros(CHANNELS))

            def training_step(self, batch, batch_idx):
                record.append(batch.keys)
                return (batch.x * self.weight).mean()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Module()


@pytest.mark.slow
def test_lightning_resume_mid_epoch(data, tmp_path):
    import lightning as L

    root, _ = data
    options = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, limit_val_batches=0)  # fmt: skip
    per_epoch = len(make(root).train_dataloader())
    total = per_epoch + 4  # crosses into the second epoch
    full: list = []
    L.Trainer(max_steps=total, **options).fit(_Recorder.build(full), datamodule=make(root))

    class SaveAt(L.Callback):
        def __init__(self, step: int, name: str):
            self.step, self.name = step, name

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == self.step:
                trainer.save_checkpoint(tmp_path / self.name)

    first: list = []
    trainer = L.Trainer(max_steps=7, callbacks=[SaveAt(5, "a.ckpt")], **options)
    trainer.fit(_Recorder.build(first), datamodule=make(root))
    second: list = []  # resumed once, saved again mid-epoch, then stopped
    L.Trainer(max_steps=10, callbacks=[SaveAt(8, "b.ckpt")], **options).fit(
        _Recorder.build(second), datamodule=make(root), ckpt_path=tmp_path / "a.ckpt"
    )
    resumed: list = []
    L.Trainer(max_steps=total, **options).fit(_Recorder.build(resumed), datamodule=make(root),
                                              ckpt_path=tmp_path / "b.ckpt")  # fmt: skip
    assert len(full) == total
    assert first[:5] + second[:3] + resumed == full


@pytest.mark.parametrize("max_steps", [-1, 5])  # a whole epoch, and a run stopped mid-epoch by max_steps
def test_skipped_data_reaches_the_logger_and_a_summary_line(data, caplog, max_steps):
    import lightning as L

    from nit_lightning.training.callbacks import DataHealthMonitor

    root, stored = data
    truncate_shard(root)
    dm = make(root, max_skipped_fraction=1.0)
    trainer = L.Trainer(max_epochs=1, max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, callbacks=[DataHealthMonitor()])
    with caplog.at_level(logging.INFO, logger="nit_lightning.training.callbacks"):
        trainer.fit(_Recorder.build([]), datamodule=dm)
    stats = dm.stats["train"]
    assert stats.skipped_samples > 0 and stats.skipped_shard_names == ["native/shard-000001.tar"]
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train_data/")}
    plan = dm.plan_report
    # The epoch's plan beside what was delivered: an epoch cut short by max_steps reads as a fraction below 1 (it used
    # to read as `data/planned_samples` dropping, like lost data).
    assert metrics == {"train_data/skipped_samples": stats.skipped_samples, "train_data/skipped_shards": 1.0,
                       "train_data/epoch_samples_delivered": stats.planned_samples,
                       "train_data/epoch_samples_planned": plan["kept_samples"],
                       "train_data/epoch_fraction_delivered": pytest.approx(stats.packs / plan["packs_per_rank"]),
                       "train_data/skipped_fraction": pytest.approx(stats.skipped_samples / stats.planned_samples)}
    assert (metrics["train_data/epoch_fraction_delivered"] < 1) == (max_steps == 5)
    line = [r.getMessage() for r in caplog.records if "train epoch 0 data:" in r.getMessage()]
    assert len(line) == 1 and f"{stats.skipped_samples} skipped" in line[0] and "native/shard-000001.tar" in line[0]
    if max_steps == -1:
        assert stats.planned_samples == len(stored)


def test_jsonargparse_config(data):
    from jsonargparse import ArgumentParser

    tmp_path, _ = data
    parser = ArgumentParser()
    parser.add_class_arguments(NativeLatentDataModule, "data")
    config = parser.parse_object({"data": {"sources": [{"path": str(tmp_path / "fixed"), "weight": 2.0}],
                                           "tokens_per_pack": 64, "max_images_per_pack": 4, "num_workers": 0}})  # fmt: skip
    dm = parser.instantiate_classes(config).data
    assert isinstance(dm, NativeLatentDataModule) and dm.max_images_per_pack == 4 and dm.buffer_size == 8192
    assert dm.plan_report["selected_samples"] == 60


def test_order_in_pack_size_groups_equal_grids_and_keeps_each_pack(data):
    """order_in_pack="size": the same images in every pack, their latents and labels kept together, equal token grids
    next to each other; "plan" (the default) is the order of the plan, as before."""
    tmp_path, stored = data
    plan, size = make(tmp_path), make(tmp_path, order_in_pack="size")
    reordered = 0
    for a, b in zip(plan.train_dataloader(), size.train_dataloader()):
        reordered += a.keys != b.keys
        assert sorted(a.keys) == sorted(b.keys)
        grids = [tuple(g) for g in b.hw.tolist()]
        assert grids == sorted(grids)
        rows = dict(zip(a.keys, a.x.split(a.seqlens.tolist())))
        for key, x in zip(b.keys, b.x.split(b.seqlens.tolist())):
            assert torch.equal(rows[key], x)
    assert reordered  # the data's grids differ: some pack was reordered
    with pytest.raises(ValueError, match="order_in_pack"):
        make(tmp_path, order_in_pack="random")
