"""ADM-suite metrics: Fréchet distance (FID/sFID), Inception Score, Kynkäänniemi precision/recall, DDP-safe states."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from scipy import linalg
from torchmetrics import Metric

log = logging.getLogger(__name__)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """‖μ1−μ2‖² + tr(Σ1 + Σ2 − 2·sqrtm(Σ1Σ2)) in float64, as the ADM evaluator computes it."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}; were they made by the same feature extractor?")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        # A singular product (e.g. fewer samples than dimensions): ADM retries with eps·I added to both.
        log.warning("sqrtm(Σ1Σ2) is not finite; retrying with %g·I added to both covariances", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(Σ1Σ2) has a large imaginary component {np.max(np.abs(covmean.imag)):.3g}; "
                             "the statistics are degenerate (too few samples?)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits: torch.Tensor | np.ndarray, split_size: int = 5000) -> float:
    """Mean over sequential splits of exp(E_x[KL(p(y|x) ‖ p(y))]), softmax in float64 (ADM: splits of 5000)."""
    logits = torch.as_tensor(np.asarray(logits) if isinstance(logits, np.ndarray) else logits).double().cpu()
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must be (N, K) with N > 0, got shape {tuple(logits.shape)}")
    probs = torch.softmax(logits, dim=1)
    scores = []
    for start in range(0, probs.shape[0], split_size):  # sequential, no shuffle; the last split may be shorter
        part = probs[start:start + split_size]
        marginal = part.mean(dim=0, keepdim=True)
        kl = torch.special.xlogy(part, part) - torch.special.xlogy(part, marginal)  # 0·log 0 = 0
        scores.append(torch.exp(kl.sum(dim=1).mean()))
    return float(torch.stack(scores).mean())


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (Na, Nb) via ‖a‖² − 2ab + ‖b‖², clamped at 0."""
    d = (a * a).sum(1, keepdim=True) - 2.0 * (a @ b.transpose(0, 1)) + (b * b).sum(1)[None, :]
    return d.clamp_(min=0.0)


def knn_radii(feats: torch.Tensor, k: int = 3, block: int = 10000) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in its own set, itself excluded; blocked."""
    n = feats.shape[0]
    if n <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, got {n}")
    radii = torch.empty(n, dtype=feats.dtype, device=feats.device)
    for r0 in range(0, n, block):
        rows = feats[r0:r0 + block]
        best = torch.full((rows.shape[0], k), float("inf"), dtype=feats.dtype, device=feats.device)
        for c0 in range(0, n, block):
            d = _sq_dists(rows, feats[c0:c0 + block])
            # Exclude self by index, not by value, so that duplicates still count as neighbours (as ADM does).
            idx = torch.arange(r0, r0 + rows.shape[0], device=feats.device)
            inside = (idx >= c0) & (idx < c0 + d.shape[1])
            d[inside.nonzero().squeeze(1), idx[inside] - c0] = float("inf")
            kk = min(k, d.shape[1])
            best = torch.cat([best, torch.topk(d, kk, dim=1, largest=False).values], 1)
            best = torch.topk(best, k, dim=1, largest=False).values
        radii[r0:r0 + rows.shape[0]] = best[:, k - 1]
    return radii


def coverage_share(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int = 10000) -> float:
    """Share of `points` within radius (≤, squared) of at least one centre."""
    inside = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    for r0 in range(0, points.shape[0], block):
        rows = points[r0:r0 + block]
        hit = torch.zeros(rows.shape[0], dtype=torch.bool, device=points.device)
        for c0 in range(0, centres.shape[0], block):
            d = _sq_dists(rows, centres[c0:c0 + block])  # (rows, cols): memory block² entries
            hit |= (d <= radii[c0:c0 + block][None, :]).any(1)
        inside[r0:r0 + rows.shape[0]] = hit
    return float(inside.double().mean())


def precision_recall(ref: torch.Tensor | np.ndarray, samples: torch.Tensor | np.ndarray, k: int = 3,
                     block: int = 10000, dtype: torch.dtype = torch.float32,
                     device: str | torch.device | None = None) -> tuple[float, float]:
    """Kynkäänniemi et al. (2019) improved precision and recall; memory O(block²) (10k² fp32 = 400 MB)."""
    ref_t = torch.as_tensor(np.asarray(ref) if isinstance(ref, np.ndarray) else ref)
    smp_t = torch.as_tensor(np.asarray(samples) if isinstance(samples, np.ndarray) else samples)
    device = device if device is not None else ref_t.device
    ref_t, smp_t = ref_t.to(device, dtype), smp_t.to(device, dtype)
    if ref_t.dim() != 2 or smp_t.dim() != 2 or ref_t.shape[1] != smp_t.shape[1]:
        raise ValueError(f"features must be (N, F) with equal F, got {tuple(ref_t.shape)} and {tuple(smp_t.shape)}")
    ref_radii = knn_radii(ref_t, k, block)
    smp_radii = knn_radii(smp_t, k, block)
    precision = coverage_share(smp_t, ref_t, ref_radii, block)
    recall = coverage_share(ref_t, smp_t, smp_radii, block)
    return precision, recall


def stats_from_sums(total: torch.Tensor, outer: torch.Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(μ, unbiased Σ) from float64 sums Σx and ΣxxT over n samples (np.cov's (n − 1) normalisation)."""
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {n}")
    total, outer = total.double().cpu(), outer.double().cpu()
    mu = total / n
    sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)
    return mu.numpy(), sigma.numpy()


class ADMFeatureStats(Metric):
    """All sample-side ADM statistics in one Metric: pool (FID, gathered for P/R), spatial (sFID), logits (IS)."""

    full_state_update = False

    def __init__(self, pool_dim: int = 2048, spatial_dim: int = 2023, keep_rows: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pool_dim, self.spatial_dim, self.keep_rows = pool_dim, spatial_dim, keep_rows
        # float64 sums all-reduced as sums: 2048² doubles = 32 MiB, 2023² = 31 MiB.
        self.add_state("pool_total", torch.zeros(pool_dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pool_outer", torch.zeros(pool_dim, pool_dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("spatial_total", torch.zeros(spatial_dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("spatial_outer", torch.zeros(spatial_dim, spatial_dim, dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        if keep_rows:  # P/R needs every sample's pool row, IS every logit row: gathered, never dropped
            self.add_state("pool_rows", [], dist_reduce_fx="cat")
            self.add_state("logit_rows", [], dist_reduce_fx="cat")

    def update(self, features: dict[str, torch.Tensor]) -> None:
        pool, spatial = features["pool"], features["spatial"]
        if pool.dim() != 2 or pool.shape[1] != self.pool_dim or spatial.shape != (pool.shape[0], self.spatial_dim):
            raise ValueError(f"features must be pool (N, {self.pool_dim}) and spatial (N, {self.spatial_dim}), got "
                             f"{tuple(pool.shape)} and {tuple(spatial.shape)}")
        p = pool.detach().to(self.pool_total.device, torch.float64)
        s = spatial.detach().to(self.pool_total.device, torch.float64)
        self.pool_total += p.sum(0)
        self.pool_outer += p.transpose(0, 1) @ p
        self.spatial_total += s.sum(0)
        self.spatial_outer += s.transpose(0, 1) @ s
        self.count += p.shape[0]
        if self.keep_rows:
            self.pool_rows.append(pool.detach().float())
            self.logit_rows.append(features["logits"].detach().float())

    def compute(self) -> dict[str, Any]:
        n = int(self.count.item())
        mu, sigma = stats_from_sums(self.pool_total, self.pool_outer, n)
        mu_s, sigma_s = stats_from_sums(self.spatial_total, self.spatial_outer, n)
        out: dict[str, Any] = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s, "n": n}
        if self.keep_rows:
            out["pool"] = _cat(self.pool_rows)
            out["logits"] = _cat(self.logit_rows)
            if out["pool"].shape[0] != n:
                raise RuntimeError(f"gathered {out['pool'].shape[0]} feature rows but counted {n} samples")
        return out


def _cat(rows: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """A "cat" state is a list before sync and a tensor after it."""
    return (torch.cat(rows) if isinstance(rows, list) else rows).cpu()


def compare(sample_stats: dict[str, Any], ref_stats: dict[str, Any], ref_pool: torch.Tensor | None,
            *, k: int = 3, pr_block: int = 10000, pr_dtype: torch.dtype = torch.float32,
            is_split: int = 5000) -> dict[str, Any]:
    """FID, sFID, IS, precision, recall of sample statistics against a reference (PR needs the ref's pool rows)."""
    out: dict[str, Any] = {
        "fid": frechet_distance(sample_stats["mu"], sample_stats["sigma"], ref_stats["mu"], ref_stats["sigma"]),
        "sfid": frechet_distance(sample_stats["mu_s"], sample_stats["sigma_s"], ref_stats["mu_s"],
                                 ref_stats["sigma_s"]),
        "num_samples": int(sample_stats["n"]),
    }
    if "logits" in sample_stats:
        out["is"] = inception_score(sample_stats["logits"], split_size=is_split)
    if ref_pool is not None and "pool" in sample_stats:
        out["precision"], out["recall"] = precision_recall(ref_pool, sample_stats["pool"], k=k, block=pr_block,
                                                           dtype=pr_dtype)
        out["num_reference_images"] = int(ref_pool.shape[0])
    return out
