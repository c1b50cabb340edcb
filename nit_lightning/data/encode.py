"""Images of planned shards -> latents: decode + resize in DataLoader workers, equal sizes of a shard share codec calls.

One codec per process (one process per GPU under torchrun/srun); K worker processes decode and resize (the CPU work
that limits a GPU run: ~30 images/s with 8 processes each holding a DC-AE). Images travel as uint8 (a quarter of
float32), pinned and copied with non_blocking on CUDA, and become codec input on the device through a 256-entry table
(`imageops.pixels_to_unit`), so the floats are bit-identical to the old CPU conversion on every device.

Grouping: every image of a shard waits in a bucket of its final (H, W); a bucket goes to the codec when it holds
`batch_size` codec inputs (an image and its mirror count two), and the rest when the shard's last image has arrived.
ImageNet at native resolution has few sizes after flooring to multiples of 32 (500×375 -> 480×352 alone is ~1/3), so
most calls are full. Samples are written in index order as soon as every earlier one is done, so a shard's bytes do not
depend on batch size or worker count; when more than `max_pending_bytes` wait (pixels in buckets, encoded samples held
behind an older image), the bucket of the oldest waiting image goes to the codec early: memory stays bounded.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from nit_lightning.data.codecs import Codec
from nit_lightning.data.imageops import BadImage, apply_mode, load_rgb, pixels_to_unit

log = logging.getLogger(__name__)

Item = tuple[int, int, str, int]  # (shard, global index, relative path, class)
DECODE_CHUNK = 4  # images per worker request: fewer round trips than one, little head-of-line wait
MAX_PENDING_BYTES = 1 << 30  # per shard: pixels in buckets + encoded samples waiting for an older one


@dataclass
class Decoded:
    """One image after decode + resize: uint8 pixels and what was done, or why it was skipped."""

    shard: int
    index: int
    rel: str
    cls: int
    pixels: np.ndarray | None = None  # (3, H, W) uint8, H and W multiples of the codec factor (numpy: it travels
    # from the worker by value; a shared-memory tensor would hold a file descriptor open per image waiting in a bucket)
    meta: dict[str, Any] | None = None
    resized: list[str] = field(default_factory=list)  # operation names, ["unchanged"] when none
    skipped: dict[str, str] | None = None  # {"source", "reason", "detail"} of a BadImage
    error: str | None = None  # anything else: the shard fails as a whole (and a rerun retries it)


class DecodeDataset(Dataset):
    """Item k of the plan -> `Decoded` (runs in the DataLoader workers)."""

    def __init__(self, items: list[Item], root: str, mode: str, factor: int, max_area: int | None):
        self.items, self.root, self.mode, self.factor, self.max_area = items, Path(root), mode, factor, max_area

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> Decoded:
        shard, index, rel, cls = self.items[k]
        out = Decoded(shard, index, rel, cls)
        try:
            image, conversions = load_rgb(self.root / rel)
            image, change = apply_mode(image, self.mode, self.factor, self.max_area)
            array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
        except BadImage as error:
            out.skipped = {"source": rel, "reason": error.reason, "detail": error.detail}
            return out
        except Exception as error:  # noqa: BLE001 - reported with the shard, as the old per-shard loop did
            out.error = f"{rel}: {type(error).__name__}: {error}"
            return out
        out.pixels = np.ascontiguousarray(array.transpose(2, 0, 1))
        out.meta = {"source": rel, "orig_size": list(change.orig_hw), "mode": self.mode, "resize": change.describe(),
                    "converted": conversions}
        out.resized = [op.split(" ")[0] for op in change.ops] or ["unchanged"]
        return out


def _as_list(chunk: list[Decoded]) -> list[Decoded]:
    return chunk


@dataclass
class ShardState:
    """One shard on its way: buckets by size, encoded samples waiting for their turn, and its sidecar's records."""

    shard: int
    expected: int
    first_index: int
    writer: Any  # a ShardWriter, or whatever `open_writer` gives (tests)
    received: int = 0
    started: float = field(default_factory=time.perf_counter)
    order: list[int] = field(default_factory=list)  # indices in arrival (= plan) order
    written: int = 0  # position in `order` of the next sample to write
    buckets: dict[tuple[int, int], list[Decoded]] = field(default_factory=dict)
    ready: dict[int, tuple[str, dict[str, bytes], int] | None] = field(default_factory=dict)  # None: skipped
    pending_bytes: int = 0  # pixels in buckets + member bytes in `ready`
    skipped: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    converted: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    resized: Counter = field(default_factory=Counter)
    error: str | None = None

    def sidecar_records(self) -> dict[str, Any]:
        """skipped / converted in index order, resized counts: what the sidecar says about this shard's images."""
        return {"skipped": [entry for _, entry in sorted(self.skipped, key=lambda e: e[0])],
                "converted": [entry for _, entry in sorted(self.converted, key=lambda e: e[0])],
                "resized": dict(sorted(self.resized.items())), "first_index": self.first_index}


class BucketEncoder:
    """Runs codec calls on buckets of equal-size uint8 images (and their mirrors), on the codec's device."""

    def __init__(self, codec: Codec, batch_size: int, flip: bool, device: str | torch.device = "cpu"):
        self.codec, self.batch_size, self.flip, self.device = codec, batch_size, flip, torch.device(device)
        self.pin = self.device.type == "cuda"
        self.calls = 0
        self.images = 0

    @property
    def images_per_call(self) -> int:
        """Images a full bucket holds: batch_size codec inputs, two per image with --flip."""
        return max(1, self.batch_size // (2 if self.flip else 1))

    def encode(self, bucket: list[Decoded]) -> list[tuple[torch.Tensor, torch.Tensor | None] | None]:
        """(latent, mirrored latent or None) per image on the CPU, or None where the codec gave NaN/Inf; the codec
        inputs (images, then their mirrors) go in chunks of batch_size."""
        arrays = [d.pixels for d in bucket]
        if self.flip:  # the mirror of the resized image, so that both latents share one geometry
            arrays += [a[:, :, ::-1] for a in arrays]
        shape = (len(arrays), *arrays[0].shape)
        staged = torch.empty(shape, dtype=torch.uint8, pin_memory=self.pin)  # (B, 3, H, W); pinned on CUDA
        np.stack(arrays, out=staged.numpy())  # the one copy of the pixels on the host
        x = pixels_to_unit(staged.to(self.device, non_blocking=self.pin))  # float32 in [-1, 1], on the device
        parts = []
        for part in x.split(self.batch_size):
            parts.append(self.codec.encode(part))
            self.calls += 1
        z = torch.cat(parts) if len(parts) > 1 else parts[0]
        # One reduction per input instead of an elementwise isfinite: a NaN or Inf anywhere makes the sum non-finite.
        finite = torch.isfinite(z.flatten(1).sum(dim=1)).cpu()
        z = z.cpu()
        n = len(bucket)
        self.images += n
        out: list[tuple[torch.Tensor, torch.Tensor | None] | None] = []
        for i in range(n):
            ok = bool(finite[i]) and (not self.flip or bool(finite[n + i]))
            out.append((z[i], z[n + i] if self.flip else None) if ok else None)
        return out


Members = Callable[[Decoded, torch.Tensor, "torch.Tensor | None"], tuple[str, dict[str, bytes], int]]


def encode_shards(
    dataset: DecodeDataset,
    expected: dict[int, int],
    encoder: BucketEncoder,
    num_workers: int,
    open_writer: Callable[[int], Any],
    to_members: Members,
    finish: Callable[[ShardState], None],
    max_pending_bytes: int | None = None,
) -> dict[int, str]:
    """Decode every item (in plan order), encode by buckets, write each sample as soon as all earlier ones are done.

    `open_writer(shard)` gives a writer with write(key, members, tokens) and abort(); `to_members(decoded, latent,
    mirror)` gives (key, members, tokens); `finish(state)` closes the writer with the sidecar. Returns {shard: error} of
    the shards that failed (a codec error, an unexpected decode error, a failed write): they stay unfinished (their
    writer aborted) and the others go on."""
    failed: dict[int, str] = {}
    if not len(dataset):
        return failed
    max_pending_bytes = MAX_PENDING_BYTES if max_pending_bytes is None else max_pending_bytes
    loader = DataLoader(dataset, batch_size=DECODE_CHUNK, shuffle=False, num_workers=num_workers,
                        collate_fn=_as_list, prefetch_factor=4 if num_workers else None)
    open_shards: dict[int, ShardState] = {}

    def fail(state: ShardState, error: str) -> None:
        if state.error is None:
            state.error = error
            state.buckets.clear()
            state.ready.clear()
            state.writer.abort()
            log.error("shard %d failed: %s (rerun prepare to retry it)", state.shard, error)

    def advance(state: ShardState) -> None:
        """Write the samples whose every predecessor is written or skipped."""
        while state.written < len(state.order) and state.order[state.written] in state.ready:
            entry = state.ready.pop(state.order[state.written])
            state.written += 1
            if entry is not None:
                key, members, tokens = entry
                state.pending_bytes -= sum(len(m) for m in members.values())
                state.writer.write(key, members, tokens)

    def run_bucket(state: ShardState, size: tuple[int, int]) -> None:
        bucket = state.buckets.pop(size)
        state.pending_bytes -= sum(d.pixels.nbytes for d in bucket)
        pairs = encoder.encode(bucket)
        for decoded, pair in zip(bucket, pairs):
            decoded.pixels = None
            if pair is None:
                state.skipped.append((decoded.index, {"source": decoded.rel, "reason": "non-finite-latent",
                                                      "detail": "codec output has NaN/Inf"}))
                log.warning("skipped %s (non-finite latent)", decoded.rel)
                state.ready[decoded.index] = None
                continue
            entry = to_members(decoded, *pair)
            state.pending_bytes += sum(len(m) for m in entry[1].values())
            state.ready[decoded.index] = entry
        advance(state)

    def receive(state: ShardState, decoded: Decoded) -> None:
        state.order.append(decoded.index)
        if decoded.error is not None:
            raise RuntimeError(decoded.error)
        if decoded.skipped is not None:
            state.skipped.append((decoded.index, decoded.skipped))
            log.warning("skipped %s (%s: %s)", decoded.rel, decoded.skipped["reason"], decoded.skipped["detail"])
            state.ready[decoded.index] = None
            advance(state)
            return
        if decoded.meta["converted"]:
            state.converted.append((decoded.index, {"source": decoded.rel, "reasons": decoded.meta["converted"]}))
        state.resized.update(decoded.resized)
        size = (int(decoded.pixels.shape[1]), int(decoded.pixels.shape[2]))
        state.buckets.setdefault(size, []).append(decoded)
        state.pending_bytes += decoded.pixels.nbytes
        if len(state.buckets[size]) >= encoder.images_per_call:
            run_bucket(state, size)
        while state.pending_bytes > max_pending_bytes and state.buckets:  # flush the oldest waiting image's bucket
            oldest = state.order[state.written]
            run_bucket(state, next(k for k, b in state.buckets.items() if any(d.index == oldest for d in b)))

    for chunk in loader:
        for decoded in chunk:
            state = open_shards.get(decoded.shard)
            if state is None:
                state = ShardState(decoded.shard, expected[decoded.shard], decoded.index, None)
                open_shards[decoded.shard] = state
                try:
                    state.writer = open_writer(decoded.shard)
                except Exception as error:  # noqa: BLE001
                    state.error = f"{type(error).__name__}: {error}"
            state.received += 1
            if state.error is None:
                try:
                    receive(state, decoded)
                    if state.received == state.expected:
                        for size in sorted(state.buckets):  # the shard is complete: its partial buckets go now
                            run_bucket(state, size)
                        finish(state)
                except Exception as error:  # noqa: BLE001 - e.g. out of memory, a full disk: this shard fails
                    fail(state, f"{type(error).__name__}: {error}")
            if state.received == state.expected:
                del open_shards[decoded.shard]
                if state.error is not None:
                    failed[decoded.shard] = state.error
    return failed
