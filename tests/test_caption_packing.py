"""Caption tokens in packing (NiT-T2I): prepare --text-encoder counts each caption's tokens into index.json;
data.caption_token_cost charges ceil(c × caption tokens) on top of the image tokens; c = 0 is exactly the old plans."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from nit_lightning.cli.prepare import main as prepare_main
from nit_lightning.data.caption_packing import caption_cost
from nit_lightning.data.datamodule import NativeLatentDataModule
from nit_lightning.data.prepare import PrepareSettings, run_prepare
from nit_lightning.data.shard_reader import ShardReader
from nit_lightning.data.shards import load_index
from nit_lightning.data.synthetic_captions import CaptionedSynthSettings, possible_captions, write_captioned_synthetic
from nit_lightning.data.tinytext import TinyTextConfig, make_tiny_text_encoder, save_tiny_text_encoder
from nit_lightning.records import SettingsMismatch

TOKENS_PER_PACK = 48  # images of 16..48 px at pixel:8: 4..36 tokens; captions of 2..3 counted words (max_length 3)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A captioned set ("a small ..." captions exceed the encoder's 3 words), its encoder, shards with and without
    caption token counts."""
    root = tmp_path_factory.mktemp("caption_packing")
    write_captioned_synthetic(CaptionedSynthSettings(out=str(root / "images"), num_images=24, min_side=16,
                                                     max_side=48, small_fraction=0.5))
    encoder = make_tiny_text_encoder(possible_captions(), TinyTextConfig(dim=8, max_length=3, heads=2))
    save_tiny_text_encoder(encoder, root / "tinytext.pt")
    paths = {"root": root, "images": root / "images", "encoder": root / "tinytext.pt"}
    for name, extra in (("counted", ["--text-encoder", f"tinytext:{root / 'tinytext.pt'}"]), ("plain", [])):
        assert _prepare(root / "images", root / name, *extra) == 0
        paths[name] = root / name
    return paths


def _prepare(images: Path, out: Path, *args: str) -> int:
    return prepare_main(["--input", str(images), "--output", str(out), "--codec", "pixel:8", "--captions", "beside",
                         "--samples-per-shard", "10", *args])


def _module(source: Path, rank: int = 0, world: int = 1, **options) -> NativeLatentDataModule:
    options = {"tokens_per_pack": TOKENS_PER_PACK, "num_workers": 0, "seed": 0, "buffer_size": 0, **options}
    dm = NativeLatentDataModule(sources=[{"path": str(source)}], **options)
    dm.override_distributed(rank, world)
    return dm


def test_prepare_counts_each_caption_with_the_encoders_tokenizer(data, caplog):
    from nit_lightning.data.tinytext import load_tiny_text_encoder

    index = load_index(data["counted"])
    encoder = load_tiny_text_encoder(data["encoder"])
    assert index["caption_tokenizer"] == encoder.describe()
    reader = ShardReader()
    for shard in index["shards"]:
        samples = list(reader.samples(data["counted"] / shard["name"]))
        assert len(shard["caption_tokens"]) == len(shard["lengths"]) == len(samples)
        # the count is the length the encoder itself gives the caption (capped at its 3 words)
        direct = [int(encoder.encode([s.caption]).lengths[0]) for s in samples]
        assert shard["caption_tokens"] == direct
    counts = [n for shard in index["shards"] for n in shard["caption_tokens"]]
    assert set(counts) <= {2, 3} and 3 in counts
    plain = load_index(data["plain"])  # without --text-encoder: no counts, as before
    assert plain["caption_tokenizer"] is None and all("caption_tokens" not in s for s in plain["shards"])
    assert plain["content_sha256"] == index["content_sha256"]  # the same shards' data


def test_capped_captions_are_logged_and_the_encoder_decides_a_resume(data, tmp_path, caplog):
    settings = PrepareSettings(input=str(data["images"]), output=str(tmp_path / "out"), codec="pixel:8",
                               samples_per_shard=10, captions="beside", text_encoder=f"tinytext:{data['encoder']}")
    with caplog.at_level(logging.WARNING):
        assert run_prepare(settings)["encoded"] == 3
    assert "captions are longer than tinytext's 3 tokens: counted as 3" in caplog.text
    assert run_prepare(settings)["already_complete"] == 3
    other = make_tiny_text_encoder(possible_captions(), TinyTextConfig(dim=8, max_length=4, heads=2))
    save_tiny_text_encoder(other, tmp_path / "other.pt")
    for spec in (f"tinytext:{tmp_path / 'other.pt'}", None):  # another tokenizer, or none, counts otherwise
        settings.text_encoder = spec
        with pytest.raises(SettingsMismatch, match="caption_tokenizer"):
            run_prepare(settings)


@pytest.mark.parametrize("args, message", [
    (["--text-encoder", "tinytext:{encoder}"], "--text-encoder tinytext:"),  # no --captions
    (["--captions", "beside", "--text-encoder", "gemma"], "--text-encoder 'gemma' is not hf:PATH"),
    (["--captions", "beside", "--text-encoder", "tinytext:{root}/missing.pt"], "missing.pt"),
])
def test_bad_text_encoder_flags_are_one_line(data, tmp_path, capsys, args, message):
    args = [a.format(encoder=data["encoder"], root=data["root"]) for a in args]
    code = prepare_main(["--input", str(data["images"]), "--output", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.tar"))


@pytest.mark.parametrize("options", [{}, {"buffer_size": 8}, {"max_images_per_pack": 3}], ids=str)
def test_cost_zero_plans_are_identical_to_image_token_plans(data, options):
    for epoch in (0, 1):
        plans = [_module(data[name], 0, 2, **options)._build("train", epoch, 2) for name in ("counted", "plain")]
        counted, plain = plans
        for field in ("ids", "offsets", "flips", "tokens"):
            assert np.array_equal(getattr(counted, field), getattr(plain, field)), field
        assert counted.efficiency == plain.efficiency and counted.report == plain.report
        assert counted.report["kept_cost"] == counted.report["kept_tokens"]


@pytest.mark.parametrize("cost", [1 / 7, 2.0])
def test_a_caption_cost_bounds_image_plus_caption_tokens(data, cost):
    source = _module(data["counted"], caption_token_cost=cost)._sources["train"][0]
    charge = caption_cost(source.caption_tokens, cost)
    assert np.array_equal(source.packing_cost, source.tokens + charge) and charge.min() >= 1
    dm, before = _module(data["counted"], caption_token_cost=cost), _module(data["counted"])
    plan, old = dm._build("train", 0, 1), before._build("train", 0, 1)
    for j in range(len(plan.offsets) - 1):  # one source: a global id is its position in the source
        ids = plan.ids[plan.offsets[j]:plan.offsets[j + 1]]
        assert int(source.tokens[ids].sum()) + int(charge[ids].sum()) <= TOKENS_PER_PACK
        assert np.array_equal(plan.tokens[plan.offsets[j]:plan.offsets[j + 1]], source.tokens[ids])  # image tokens
    # every sample still trained once, in as many packs or more, holding fewer images each
    assert sorted(plan.ids.tolist()) == sorted(old.ids.tolist())
    assert len(plan.offsets) >= len(old.offsets) if cost < 1 else len(plan.offsets) > len(old.offsets)
    assert plan.report["kept_cost"] == plan.report["kept_tokens"] + int(charge.sum())
    assert plan.efficiency == plan.report["kept_cost"] / ((len(plan.offsets) - 1) * TOKENS_PER_PACK)
    # the loader still checks each latent against its image tokens: an epoch loads, packs within the budget
    batches = list(dm.train_dataloader())
    assert sum(b.num_images for b in batches) == source.num_samples
    assert all(b.num_tokens <= TOKENS_PER_PACK for b in batches)


def test_a_cost_without_counts_is_one_line_naming_the_source_and_the_flag(data):
    with pytest.raises(ValueError) as error:
        _module(data["plain"], caption_token_cost=0.143)
    message = str(error.value)
    assert "\n" not in message and str(data["plain"]) in message and "--text-encoder" in message
    with pytest.raises(ValueError, match="must be ≥ 0"):
        _module(data["counted"], caption_token_cost=-0.5)


def test_resume_with_a_caption_cost_is_exact_and_a_changed_cost_restarts_the_epoch(data, caplog):
    reference = [b.keys for b in _module(data["counted"], caption_token_cost=0.5).train_dataloader()]
    interrupted = _module(data["counted"], caption_token_cost=0.5)
    taken = []
    for batch in interrupted.train_dataloader():
        taken.append(batch.keys)
        if len(taken) == 2:
            break
    state = interrupted.state_dict()
    assert state["caption_token_cost"] == 0.5
    resumed = _module(data["counted"], caption_token_cost=0.5)
    resumed.load_state_dict(state)
    assert taken + [b.keys for b in resumed.train_dataloader()] == reference
    changed = _module(data["counted"])
    with caplog.at_level(logging.WARNING):
        changed.load_state_dict(state)
    assert "caption_token_cost" in caplog.text and "restarts from its first pack" in caplog.text
    # a state saved before the option (no key) resumes a cost-0 run where it was
    old = {k: v for k, v in _module(data["plain"]).state_dict().items() if k != "caption_token_cost"}
    plain = _module(data["plain"])
    plain.load_state_dict({**old, "packs_consumed": 1, "packs_done": 1, "epoch_world_size": 1})
    assert plain._continue is not None


def test_hf_counts_equal_the_encoders_lengths_without_running_it(tmp_path, caplog):
    from test_text_encoders import _hf_folder  # a tiny random model + word-level tokenizer that adds [BOS]

    from nit_lightning.data.caption_tokens import caption_counter_from_spec
    from nit_lightning.data.text_encoders import text_encoder_from_spec

    folder = _hf_folder(tmp_path, "gemma3")
    counter = caption_counter_from_spec(f"hf:{folder}")
    encoder = text_encoder_from_spec(f"hf:{folder}")
    assert counter.describe() == {k: v for k, v in encoder.describe().items() if k != "dtype"}
    prompts = ["a red triangle", "", "a small orange ring " * 20]  # [BOS] + words; 81 capped at the 64 positions
    with caplog.at_level(logging.WARNING):
        assert counter.count(prompts) == encoder.encode(prompts).lengths.tolist() == [4, 1, 64]
    assert "1 of 3 captions are longer than hf's 64 tokens: counted as 64" in caplog.text
