"""The shard format: latent encodings, sample members, atomic writer, sidecars and index."""
from __future__ import annotations

import errno
import json

import pytest
import torch

from nit_lightning.data import shards
from nit_lightning.data.shard_reader import ShardReader
from nit_lightning.data.shards import ShardWriter, sample_members


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_latent_round_trip_is_exact_in_storage_dtype(dtype):
    latent = torch.randn(12, 5, 7)
    decoded = shards.decode_latent(shards.encode_latent(latent, dtype), dtype)
    assert decoded.dtype == getattr(torch, dtype)
    assert torch.equal(decoded, latent.to(getattr(torch, dtype)))


def test_truncated_or_foreign_payload_is_a_format_error():
    data = shards.encode_latent(torch.randn(4, 3, 3), "float16")
    with pytest.raises(shards.ShardFormatError, match="truncated"):
        shards.decode_latent(data[:-4], "float16")
    with pytest.raises(shards.ShardFormatError, match="npy"):
        shards.decode_latent(b"not an array at all", "float16")
    with pytest.raises(shards.ShardFormatError, match="uint16"):
        shards.decode_latent(data, "bfloat16")


def test_sample_members_round_trip_and_key_rules():
    latent, flip = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    members = shards.sample_members("img_001", latent, 7, latent_flip=flip, meta={"orig_size": [32, 48]})
    sample = shards.decode_sample("img_001", members)
    assert sample.cls == 7 and sample.num_tokens == 24 and sample.meta["orig_size"] == [32, 48]
    assert torch.equal(sample.latent, latent.half()) and torch.equal(sample.latent_flip, flip.half())
    with pytest.raises(ValueError, match="must not contain"):
        shards.sample_members("a.b", latent, 0)
    del members["json"]
    with pytest.raises(shards.ShardFormatError, match="img_001"):
        shards.decode_sample("img_001", members)


def test_writer_is_atomic_and_index_merges_sidecars_in_name_order(tmp_path):
    lengths = {}
    for shard_index in (1, 0):  # written out of order: the index must still be sorted by name
        writer = shards.ShardWriter(tmp_path / f"train-{shard_index:06d}.tar")
        for j in range(3):
            latent = torch.randn(2, 1 + j, 2)
            writer.write(f"s{shard_index}_{j}", shards.sample_members(f"s{shard_index}_{j}", latent, j), 2 * (1 + j))
        assert not (tmp_path / f"train-{shard_index:06d}.tar").exists()  # only the .tmp until close
        writer.close()
        lengths[shard_index] = [2, 4, 6]
    assert shards.shard_is_complete(tmp_path / "train-000000.tar")
    index = shards.build_index(tmp_path, {"latent_channels": 2})
    assert [s["name"] for s in index["shards"]] == ["train-000000.tar", "train-000001.tar"]
    assert index["num_samples"] == 6 and index["length_histogram"] == {"2": 2, "4": 2, "6": 2}
    assert json.loads((tmp_path / "index.json").read_text()) == shards.load_index(tmp_path)
    read = [sample.key for sample in ShardReader().samples(tmp_path / "train-000001.tar")]
    assert read == ["s1_0", "s1_1", "s1_2"]


def test_unfinished_shard_and_missing_index_are_reported(tmp_path):
    (tmp_path / "train-000000.tar").write_bytes(b"")
    with pytest.raises(shards.ShardFormatError, match="unfinished"):
        shards.build_index(tmp_path)
    with pytest.raises(FileNotFoundError, match="prepare"):
        shards.load_index(tmp_path / "nowhere")


class _FullDisk:
    """A file object whose writes fail as on a full disk; closing still closes the real file."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        self.handle.close()


@pytest.mark.parametrize("finish", ["abort", "close"])
def test_full_disk_never_leaks_the_tmp_tar(tmp_path, finish):
    # Before: abort() re-raised from the tar's close (its end blocks cannot be written) before removing the .tar.tmp.
    writer = ShardWriter(tmp_path / "shard-000000.tar")
    writer.write("a", sample_members("a", torch.zeros(3, 2, 2), 0), 4)
    writer._tar.fileobj = _FullDisk(writer._tar.fileobj)
    if finish == "abort":
        writer.abort()  # silent: the error that made us abort is the one to report
    else:
        with pytest.raises(OSError, match="No space left"):
            writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
