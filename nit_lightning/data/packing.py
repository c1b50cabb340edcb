"""LPFHP histogram packing (SPEC §5, Krell et al. 2021) and a streaming packer over a bounded buffer."""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

# A strategy is the content of one pack as ((length, copies), ...), longest first; a group is `count` identical packs.
Strategy = tuple[tuple[int, int], ...]

SeedLike = int | Sequence[int] | None


def check_lengths(lengths: Any, max_tokens: int, max_per_pack: int | None = None) -> np.ndarray:
    """Validate lengths -> int64 array; the first length ≤ 0 or > max_tokens is a ValueError naming its index."""
    if int(max_tokens) < 1:
        raise ValueError(f"max_tokens={max_tokens} must be ≥ 1")
    if max_per_pack is not None and int(max_per_pack) < 1:
        raise ValueError(f"max_per_pack={max_per_pack} must be ≥ 1 or None (no limit)")
    array = np.asarray(lengths)
    if array.ndim != 1:
        raise ValueError(f"lengths must be a 1-D sequence, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.mod(array, 1) == 0):
            raise ValueError(f"lengths must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    bad = np.flatnonzero((array <= 0) | (array > max_tokens))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"sample {i} has length {int(array[i])}, outside 1..max_tokens={max_tokens} "
            f"({bad.size} such samples); raise the token budget or drop/resize that sample"
        )
    return array


def pack_histogram(
    values: np.ndarray, counts: np.ndarray, max_tokens: int, max_per_pack: int | None = None
) -> list[tuple[int, Strategy]]:
    """LPFHP on a histogram: (count, strategy) groups; cost grows with distinct lengths and groups, not samples."""
    limit = max_per_pack or max_tokens  # a pack never holds more than max_tokens images of length ≥ 1
    smallest = int(values.min()) if len(values) else 1
    open_groups: dict[int, list[list[Any]]] = {}  # free space -> groups [count, strategy, images]
    spaces: list[int] = []  # sorted keys of open_groups, for the best-fit search
    closed: list[tuple[int, Strategy]] = []

    def add(count: int, strategy: Strategy, images: int, space: int) -> None:
        # A pack whose free space is below the shortest length, or which is full in images, can take nothing more.
        if space < smallest or images >= limit:
            closed.append((count, strategy))
            return
        if space not in open_groups:
            open_groups[space] = []
            bisect.insort(spaces, space)
        open_groups[space].append([count, strategy, images])

    def extend(strategy: Strategy, length: int, copies: int) -> Strategy:
        if strategy and strategy[-1][0] == length:  # the same length placed again into this pack: merge
            return strategy[:-1] + ((length, strategy[-1][1] + copies),)
        return strategy + ((length, copies),)

    for length, n in zip(values[::-1].tolist(), counts[::-1].tolist()):  # longest first
        while n > 0:
            i = bisect.bisect_left(spaces, length)  # best fit: the smallest free space that still fits
            if i == len(spaces):
                per_pack = min(max_tokens // length, limit)  # no open pack fits: new packs of ⌊L/ℓ⌋ copies
                full, rest = divmod(n, per_pack)
                if full:
                    add(full, ((length, per_pack),), per_pack, max_tokens - per_pack * length)
                if rest:
                    add(1, ((length, rest),), rest, max_tokens - rest * length)
                break
            space = spaces[i]
            bucket = open_groups[space]
            count, strategy, images = bucket.pop()
            if not bucket:
                del open_groups[space]
                spaces.pop(i)
            copies = min(space // length, limit - images)  # several copies at once where they fit
            filled = min(count, n // copies)
            if filled:
                add(filled, extend(strategy, length, copies), images + copies, space - copies * length)
                n -= filled * copies
            untouched = count - filled
            if untouched and n:  # here n < copies: one more pack takes the rest
                add(1, extend(strategy, length, n), images + n, space - n * length)
                untouched, n = untouched - 1, 0
            if untouched:
                add(untouched, strategy, images, space)
    closed.extend((count, strategy) for bucket in open_groups.values() for count, strategy, _ in bucket)
    return closed


def lpfhp_flat(
    lengths: Any, max_tokens: int, max_per_pack: int | None = None, seed: SeedLike = None
) -> tuple[np.ndarray, np.ndarray]:
    """LPFHP -> (indices (N,), offsets (P+1,)): pack j is indices[offsets[j]:offsets[j+1]]; packs in shuffled order."""
    lengths = check_lengths(lengths, max_tokens, max_per_pack)
    rng = np.random.default_rng(seed)
    if lengths.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
    values, counts = np.unique(lengths, return_counts=True)
    groups = pack_histogram(values, counts, int(max_tokens), max_per_pack)
    # One length pattern per group, then one entry per pack, in a seeded random pack order.
    patterns = [np.repeat([l for l, _ in s], [c for _, c in s]) for _, s in groups]
    pattern_sizes = np.array([len(p) for p in patterns], dtype=np.int64)
    pattern_starts = np.concatenate([[0], np.cumsum(pattern_sizes)[:-1]])
    pack_group = rng.permutation(np.repeat(np.arange(len(groups)), [count for count, _ in groups]))
    sizes = pattern_sizes[pack_group]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    position = np.arange(offsets[-1], dtype=np.int64)
    flat_lengths = np.concatenate(patterns)[np.repeat(pattern_starts[pack_group] - offsets[:-1], sizes) + position]
    # Per-length queues of shuffled indices: sort a random permutation of the samples by length (stable), sort the
    # slots by length too; equal counts per length make the two orders line up one to one.
    key_dtype = np.uint16 if max_tokens < 2**16 else np.int64  # ≤ 16-bit keys get numpy's radix sort
    perm = rng.permutation(lengths.size)
    samples_by_length = perm[np.argsort(lengths[perm].astype(key_dtype), kind="stable")]
    slots_by_length = np.argsort(flat_lengths.astype(key_dtype), kind="stable")
    indices = np.empty(lengths.size, dtype=np.int64)
    indices[slots_by_length] = samples_by_length
    return indices, offsets


def packing_efficiency(lengths: Any, packs: Sequence[Sequence[int]] | int, max_tokens: int) -> float:
    """Real tokens / (packs × max_tokens); `packs` is the pack list or the pack count."""
    num_packs = packs if isinstance(packs, int) else len(packs)
    total = int(np.asarray(lengths, dtype=np.int64).sum())
    return total / (num_packs * max_tokens) if num_packs else 0.0


@dataclass
class PackerStats:
    """Running totals of a packer: efficiency = tokens / (packs × max_tokens)."""

    packs: int = 0
    samples: int = 0
    tokens: int = 0
    capacity: int = 0  # packs × max_tokens
    rounds: int = 0  # lpfhp calls

    @property
    def efficiency(self) -> float:
        return self.tokens / self.capacity if self.capacity else 0.0


class StreamingPacker:
    """Packs a stream of lengths: LPFHP over a buffer, emit the fullest packs, carry the rest over to the next buffer."""

    def __init__(
        self,
        max_tokens: int,
        buffer_size: int = 8192,
        max_per_pack: int | None = None,
        seed: int = 0,
        carry_below: float = 0.99,
        max_carry_fraction: float = 0.5,
    ):
        if buffer_size < 1:
            raise ValueError(f"buffer_size={buffer_size} must be ≥ 1")
        if not 0.0 <= max_carry_fraction < 1.0:
            raise ValueError(f"max_carry_fraction={max_carry_fraction} must be in [0, 1): some packs must leave")
        check_lengths([], max_tokens, max_per_pack)
        self.max_tokens, self.buffer_size, self.max_per_pack = int(max_tokens), buffer_size, max_per_pack
        self.seed = seed
        self.carry_below, self.max_carry_fraction = carry_below, max_carry_fraction
        self.stats = PackerStats()

    def pack_indices(self, lengths: Any) -> tuple[np.ndarray, np.ndarray]:
        """Stream positions 0..N-1 of `lengths` through the buffer: (indices, offsets) of the packs in emission order."""
        lengths_N = check_lengths(lengths, self.max_tokens, self.max_per_pack)
        chunks, sizes = [], []
        carried, position = np.zeros(0, dtype=np.int64), 0
        while True:
            take = min(self.buffer_size - carried.size, lengths_N.size - position)
            buffer = np.concatenate([carried, np.arange(position, position + take, dtype=np.int64)])
            position += take
            if buffer.size == 0:
                break
            final = buffer.size < self.buffer_size  # full buffers, then one flush
            indices, offsets, carry = self._round(lengths_N[buffer], final)
            chunks.append(buffer[indices])
            sizes.append(np.diff(offsets))
            carried = buffer[carry]
            if final:
                break
        if not chunks:
            return np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
        return np.concatenate(chunks), np.concatenate([[0], np.cumsum(np.concatenate(sizes))]).astype(np.int64)

    def _round(self, lengths_N: np.ndarray, final: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pack one buffer: (emitted indices, their offsets, carried positions), all positions into the buffer."""
        lengths_N = check_lengths(lengths_N, self.max_tokens, self.max_per_pack)
        seed = [self.seed, self.stats.rounds]
        indices, offsets = lpfhp_flat(lengths_N, self.max_tokens, self.max_per_pack, seed=seed)
        self.stats.rounds += 1
        sizes_P = np.diff(offsets)
        fill_P = np.add.reduceat(lengths_N[indices], offsets[:-1]) / self.max_tokens
        carry_P = np.zeros(len(sizes_P), dtype=bool)
        if not final:
            # Least-full packs go back to the buffer while under `carry_below` full, at most a fraction of the buffer.
            order = np.argsort(fill_P, kind="stable")
            budget = self.max_carry_fraction * lengths_N.size
            fits = (fill_P[order] < self.carry_below) & (np.cumsum(sizes_P[order]) <= budget)
            carry_P[order[: int(np.argmin(fits)) if not fits.all() else len(fits)]] = True
        keep_P = ~carry_P
        entry_pack = np.repeat(np.arange(len(sizes_P)), sizes_P)  # pack of each entry of `indices`
        emitted = indices[keep_P[entry_pack]]
        self.stats.packs += int(keep_P.sum())
        self.stats.samples += int(emitted.size)
        self.stats.tokens += int(lengths_N[emitted].sum())
        self.stats.capacity += int(keep_P.sum()) * self.max_tokens
        emitted_offsets = np.concatenate([[0], np.cumsum(sizes_P[keep_P])]).astype(np.int64)
        return emitted, emitted_offsets, indices[carry_P[entry_pack]]
