"""The one writer of small random latent shards that the tests train, load and resume on."""
from __future__ import annotations

from pathlib import Path

import torch

from nit_lightning.data.codecs import PixelCodec
from nit_lightning.data.shards import ShardWriter, build_index, sample_members

Stored = dict[str, tuple[torch.Tensor, torch.Tensor, int]]  # key -> (latent, its mirror, class)


def write_latent_shards(
    directory: Path,
    *,
    num_samples: int = 24,
    per_shard: int = 8,
    channels: int = 12,
    sides: tuple[int, int] = (2, 6),
    side_multiple: int = 1,
    seed: int = 0,
    num_classes: int = 10,
    dtype: torch.dtype = torch.float32,
    key: str = "s{index:05d}",
    settings: dict | None = None,
    stored: Stored | None = None,
) -> Path:
    """`num_samples` random (C, h, w) latents and their mirrors in shards of `per_shard`, sides in [lo, hi] × side_multiple.

    The default settings describe a pixel codec whose channel count matches (12 channels = pixel:2). Returns the
    directory; `key` names sample i of a shard ({shard}, {i}, {index} = position overall); `stored`, when given, receives key -> (latent, mirror, class) of every sample written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for shard in range((num_samples + per_shard - 1) // per_shard):
        writer = ShardWriter(directory / f"shard-{shard:06d}.tar")
        for i in range(min(per_shard, num_samples - shard * per_shard)):
            h, w = (int(v) * side_multiple for v in torch.randint(sides[0], sides[1] + 1, (2,), generator=generator))
            latent = torch.randn(channels, h, w, generator=generator).to(dtype)
            cls = int(torch.randint(0, num_classes, (1,), generator=generator))
            name = key.format(shard=shard, i=i, index=shard * per_shard + i)
            writer.write(name, sample_members(name, latent, cls, latent_flip=latent.flip(-1)), h * w)
            if stored is not None:
                stored[name] = (latent, latent.flip(-1), cls)
        writer.close()
    build_index(directory, settings if settings is not None else default_settings(channels))
    return directory


def default_settings(channels: int) -> dict:
    """index.json settings of a pixel codec with `channels` = 3·f² latent channels (f = 1 when it is not such a count)."""
    factor = round((channels / 3) ** 0.5)
    factor = factor if 3 * factor * factor == channels else 1
    return {"codec": PixelCodec(factor).describe(), "latent_channels": channels}
