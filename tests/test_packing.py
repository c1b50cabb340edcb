"""LPFHP and the streaming packer: invariants, hand cases, errors, efficiency on the recipe mixture."""
from __future__ import annotations

import time

import numpy as np
import pytest

from helpers.packs import as_lists, lpfhp
from nit_lightning.data.lengths import FIXED_256_TOKENS, FIXED_512_TOKENS, native_tokens, recipe_lengths
from nit_lightning.data.packing import StreamingPacker, lpfhp_flat, pack_histogram, packing_efficiency


def check_packs(packs: list[list[int]], lengths, max_tokens: int, max_per_pack: int | None = None) -> None:
    """Every index exactly once, every pack within the token (and image) budget, no empty pack."""
    lengths = np.asarray(lengths)
    flat = [i for pack in packs for i in pack]
    assert sorted(flat) == list(range(len(lengths)))
    for pack in packs:
        assert pack, "empty pack"
        assert lengths[pack].sum() <= max_tokens
        if max_per_pack is not None:
            assert len(pack) <= max_per_pack


def test_hand_case_best_fit_and_copies():
    # 10 + 6 fill one pack of 16 exactly (best fit), the three 4s go 4+4+4(+4 free) into a new pack of ⌊16/4⌋ = 4 slots.
    lengths = [4, 10, 4, 6, 4]
    packs = lpfhp(lengths, 16, seed=0)
    check_packs(packs, lengths, 16)
    contents = sorted(sorted(lengths[i] for i in pack) for pack in packs)
    assert contents == [[4, 4, 4], [6, 10]]


def test_hand_case_histogram_groups():
    # 5 × 8 at L=16: ⌊16/8⌋ = 2 per pack -> 2 full packs + 1 half pack; the 3s fill the half pack's 8 free (2 copies).
    values, counts = np.array([3, 8]), np.array([2, 5])
    groups = pack_histogram(values, counts, 16)
    assert sorted(groups) == sorted([(2, ((8, 2),)), (1, ((8, 1), (3, 2)))])


def test_best_fit_picks_smallest_space():
    # Packs with free space 7 (9) and 5 (11): a 5 must go to the pack with 5 free, leaving the 7 free for the 7.
    lengths = [9, 11, 5, 7]
    packs = lpfhp(lengths, 16, seed=0)
    contents = sorted(sorted(lengths[i] for i in pack) for pack in packs)
    assert contents == [[5, 11], [7, 9]]


def best_fit_decreasing(lengths, max_tokens: int) -> list[list[int]]:
    """Slow reference: one sample at a time, longest first, into the open pack with the least free space that fits."""
    packs: list[list[int]] = []
    free: list[int] = []
    for length in sorted(lengths, reverse=True):
        fits = [j for j in range(len(packs)) if free[j] >= length]
        if fits:
            j = min(fits, key=free.__getitem__)
        else:
            packs.append([])
            free.append(max_tokens)
            j = len(packs) - 1
        packs[j].append(length)
        free[j] -= length
    return packs


def test_equals_slow_best_fit_decreasing():
    # The histogram version must make the same packs as per-sample best-fit decreasing, up to ties between packs of
    # equal free space (either choice leaves the same multiset of free spaces): compare the sorted pack totals.
    rng = np.random.default_rng(1)
    for trial in range(40):
        max_tokens = int(rng.integers(4, 300))
        lengths = rng.integers(1, max_tokens + 1, size=int(rng.integers(1, 400)))
        if trial % 2:  # few distinct lengths: many copies per length, the case the histogram is for
            lengths = rng.choice(rng.integers(1, max_tokens + 1, size=4), size=lengths.size)
        ours = sorted(int(lengths[pack].sum()) for pack in lpfhp(lengths, max_tokens, seed=trial))
        reference = sorted(sum(pack) for pack in best_fit_decreasing(lengths.tolist(), max_tokens))
        assert ours == reference, (trial, max_tokens)


@pytest.mark.parametrize("max_per_pack", [None, 1, 3])
def test_random_invariants(max_per_pack):
    rng = np.random.default_rng(0)
    for trial in range(30):
        max_tokens = int(rng.integers(8, 200))
        lengths = rng.integers(1, max_tokens + 1, size=int(rng.integers(0, 300)))
        packs = lpfhp(lengths, max_tokens, max_per_pack=max_per_pack, seed=trial)
        check_packs(packs, lengths, max_tokens, max_per_pack)
        if max_per_pack == 1:
            assert len(packs) == len(lengths)


def test_max_per_pack_limits_small_lengths():
    packs = lpfhp([1] * 100, 1000, max_per_pack=7, seed=0)
    check_packs(packs, [1] * 100, 1000, 7)
    assert len(packs) == 15  # ⌈100/7⌉


def test_deterministic_and_reshuffled_by_seed():
    lengths = recipe_lengths(5000, seed=3)
    assert lpfhp(lengths, 4096, seed=1) == lpfhp(lengths, 4096, seed=1)
    assert lpfhp(lengths, 4096, seed=1) != lpfhp(lengths, 4096, seed=2)


def test_same_length_packs_are_not_consecutive_indices():
    # The reference fills homogeneous packs with consecutive files (likely one class); ours draw from shuffled queues.
    packs = lpfhp([64] * 4096, 64 * 256, seed=0)
    assert len(packs) == 16
    assert all(sorted(pack) != list(range(min(pack), min(pack) + 256)) for pack in packs)


@pytest.mark.parametrize(
    "lengths, max_tokens, match",
    [([3, 0, 2], 8, "sample 1 has length 0"), ([3, 9, 2], 8, "sample 1 has length 9"), ([-1], 8, "sample 0")],
)
def test_bad_lengths_name_index_and_length(lengths, max_tokens, match):
    with pytest.raises(ValueError, match=match):
        lpfhp(lengths, max_tokens)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_tokens"):
        lpfhp([1], 0)
    with pytest.raises(ValueError, match="max_per_pack"):
        lpfhp([1], 8, max_per_pack=0)
    with pytest.raises(ValueError, match="integers"):
        lpfhp([1.5], 8)
    assert lpfhp([], 8) == []


def test_recipe_lengths_shape():
    lengths = recipe_lengths(30_000, seed=0)
    assert lengths.size == 30_000 and lengths.min() >= 1 and lengths.max() <= 4096
    assert abs(np.mean(lengths == FIXED_256_TOKENS) - 1 / 3) < 0.02  # native images rarely hit exactly 64 tokens
    assert native_tokens(np.array([[375, 500], [4000, 4000], [20, 20]])).tolist() == [11 * 15, 64 * 64, 1]
    assert np.mean(lengths == FIXED_512_TOKENS) > 0.3


@pytest.mark.parametrize("max_tokens", [16384, 65536])
def test_efficiency_on_recipe_mixture(max_tokens):
    lengths = recipe_lengths(120_000, seed=0)
    indices, offsets = lpfhp_flat(lengths, max_tokens, seed=0)
    assert np.array_equal(np.sort(indices), np.arange(lengths.size))
    assert np.add.reduceat(lengths[indices], offsets[:-1]).max() <= max_tokens
    efficiency = packing_efficiency(lengths, len(offsets) - 1, max_tokens)
    assert efficiency >= 0.995, efficiency


@pytest.mark.parametrize("max_tokens", [16384, 65536])
def test_streaming_within_one_point_of_offline(max_tokens):
    lengths = recipe_lengths(100_000, seed=1)
    offline = packing_efficiency(lengths, len(lpfhp_flat(lengths, max_tokens, seed=0)[1]) - 1, max_tokens)
    packer = StreamingPacker(max_tokens, buffer_size=8192, seed=0)
    packs = as_lists(*packer.pack_indices(lengths))
    check_packs(packs, lengths, max_tokens)
    assert packer.stats.samples == lengths.size and packer.stats.packs == len(packs)
    assert packer.stats.efficiency == pytest.approx(packing_efficiency(lengths, packs, max_tokens))
    assert packer.stats.efficiency >= offline - 0.01, (packer.stats.efficiency, offline)


def test_streaming_flushes_everything_small_buffer():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=1000)
    packer = StreamingPacker(128, buffer_size=37, max_per_pack=5, seed=0)
    packs = as_lists(*packer.pack_indices(lengths))
    assert sorted(i for pack in packs for i in pack) == list(range(lengths.size))
    assert all(sum(lengths[i] for i in pack) <= 128 and len(pack) <= 5 for pack in packs)


def test_streaming_rejects_bad_length():
    with pytest.raises(ValueError, match="sample 1 has length 300"):
        StreamingPacker(256, buffer_size=2).pack_indices([3, 300])


@pytest.mark.slow
def test_speed_million_lengths():
    lengths = recipe_lengths(1_000_000, seed=0)
    began = time.perf_counter()
    indices, offsets = lpfhp_flat(lengths, 65536, seed=0)
    assert time.perf_counter() - began < 2.0  # 3.8M in ~0.8 s on the 2-core CPU (bench/packing.py)
    assert indices.size == lengths.size
