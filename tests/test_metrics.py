"""ADM metrics: Fréchet distance, Inception Score, precision/recall, and the DDP-synced feature statistics."""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from scipy import linalg

from nit_lightning.evaluation.metrics import (
    ADMFeatureStats,
    frechet_distance,
    inception_score,
    knn_radii,
    precision_recall,
)


def _random_stats(rng: np.random.Generator, dim: int, n: int = 64):
    x = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim))
    return x.mean(0), np.cov(x, rowvar=False)


def test_frechet_matches_symmetric_scipy_formula():
    rng = np.random.default_rng(0)
    mu1, s1 = _random_stats(rng, 8)
    mu2, s2 = _random_stats(rng, 8)
    root1 = linalg.sqrtm(s1).real
    # tr sqrtm(Σ1Σ2) = tr sqrtm(Σ1^½ Σ2 Σ1^½): an independent route through a symmetric matrix.
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(root1 @ s2 @ root1).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-8)


def test_frechet_zero_for_identical_and_1d_closed_form():
    rng = np.random.default_rng(1)
    mu, s = _random_stats(rng, 6)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8
    # 1-D: (m1 - m2)² + (σ1 - σ2)².
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_frechet_singular_covariances_are_finite_and_shape_mismatch_raises():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(3, 10)), rng.normal(size=(3, 10))  # 3 samples in 10 dims: rank-2 covariances
    value = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert np.isfinite(value)
    with pytest.raises(ValueError, match="same feature extractor"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_hand_made_logits():
    assert inception_score(torch.zeros(100, 10)) == pytest.approx(1.0)
    k = 7
    onehot = 50.0 * torch.eye(k).repeat(4, 1)  # 28 confident predictions, balanced over 7 classes
    assert inception_score(onehot) == pytest.approx(k, rel=1e-6)
    # Sequential splits: two splits, each balanced over 7 classes -> still 7; one split of a single class -> 1.
    assert inception_score(onehot, split_size=14) == pytest.approx(k, rel=1e-6)
    assert inception_score(50.0 * torch.eye(3)[[0, 0, 1, 1]], split_size=2) == pytest.approx(1.0, rel=1e-6)


def test_inception_score_matches_numpy_adm_formula():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(30, 5)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for i in range(0, 30, 8):
        part = p[i:i + 8]
        kl = (part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1).mean()
        scores.append(np.exp(kl))
    assert inception_score(logits, split_size=8) == pytest.approx(float(np.mean(scores)), rel=1e-10)


def test_precision_recall_toy_sets_known_answer():
    ref = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    # ref radii: 3rd neighbour of 0 is 3 -> r² = 9 etc; only 0.5 lies in a ref ball -> precision 1/5.
    # the sample 0.5's 3rd neighbour among {100..103} is 102 -> its ball covers every ref -> recall 1.
    samples = torch.tensor([[0.5], [100.0], [101.0], [102.0], [103.0]])
    p, r = precision_recall(ref, samples, k=3, dtype=torch.float64)
    assert (p, r) == (pytest.approx(0.2), pytest.approx(1.0))
    assert precision_recall(ref, ref, k=3) == (1.0, 1.0)


def test_knn_radii_excludes_self_and_matches_brute_force():
    x = torch.randn(40, 5, dtype=torch.float64)
    d = torch.cdist(x, x) ** 2
    d.fill_diagonal_(float("inf"))
    expected = d.sort(1).values[:, 2]
    torch.testing.assert_close(knn_radii(x, 3, block=7), expected)
    dup = torch.zeros(4, 2, dtype=torch.float64)  # duplicates count as neighbours (self only by index)
    assert torch.all(knn_radii(dup, 3) == 0)


def test_precision_recall_blocked_equals_unblocked():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(200, 16, generator=g, dtype=torch.float64)
    smp = torch.randn(150, 16, generator=g, dtype=torch.float64) * 1.3 + 0.2
    full = precision_recall(ref, smp, dtype=torch.float64, block=100000)
    blocked = precision_recall(ref, smp, dtype=torch.float64, block=7)
    assert full == blocked
    assert 0.0 < full[0] < 1.0 and 0.0 < full[1] < 1.0


def test_feature_stats_match_numpy_and_count_every_row():
    g = torch.Generator().manual_seed(0)
    pool, spatial, logits = torch.randn(23, 6, generator=g), torch.randn(23, 4, generator=g), torch.randn(23, 3)
    metric = ADMFeatureStats(6, 4)
    for i in range(0, 23, 5):  # uneven last batch: nothing dropped
        metric.update({"pool": pool[i:i + 5], "spatial": spatial[i:i + 5], "logits": logits[i:i + 5]})
    out = metric.compute()
    assert out["n"] == 23 and out["pool"].shape == (23, 6) and out["logits"].shape == (23, 3)
    np.testing.assert_allclose(out["mu"], pool.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(out["sigma"], np.cov(pool.double().numpy(), rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["sigma_s"], np.cov(spatial.double().numpy(), rowvar=False), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="pool"):
        metric.update({"pool": pool[:, :5], "spatial": spatial, "logits": logits})


def _ddp_worker(rank: int, world: int, port: int, out_path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    pool, spatial, logits = torch.randn(10, 6, generator=g), torch.randn(10, 4, generator=g), torch.randn(10, 3, generator=g)
    rows = slice(0, 7) if rank == 0 else slice(7, 10)  # unequal shares: 7 + 3
    metric = ADMFeatureStats(6, 4)
    metric.update({"pool": pool[rows], "spatial": spatial[rows], "logits": logits[rows]})
    out = metric.compute()
    if rank == 0:
        torch.save({k: torch.as_tensor(v) for k, v in out.items()}, out_path)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_sync_two_processes_equals_single(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_path = str(tmp_path / "ddp.pt")
    # spawn, not fork: forking after torch ran intra-op threads deadlocks (measured: a hang); each child re-imports
    # torch, 15-35 s on the shared 2 cores.
    mp.spawn(_ddp_worker, args=(2, port, out_path), nprocs=2, join=True)
    synced = torch.load(out_path)
    g = torch.Generator().manual_seed(0)
    pool, spatial, logits = torch.randn(10, 6, generator=g), torch.randn(10, 4, generator=g), torch.randn(10, 3, generator=g)
    single = ADMFeatureStats(6, 4)
    single.update({"pool": pool, "spatial": spatial, "logits": logits})
    ref = single.compute()
    assert int(synced["n"]) == 10
    torch.testing.assert_close(synced["sigma"], torch.as_tensor(ref["sigma"]))
    torch.testing.assert_close(synced["mu_s"], torch.as_tensor(ref["mu_s"]))
    # gathered rows: rank order (0's 7 rows then 1's 3) = the original order
    torch.testing.assert_close(synced["pool"], pool)
    torch.testing.assert_close(synced["logits"], logits)
