"""Sample-quality metrics for generative models: distances between two sample sets.

All functions take two sample sets (or their moments) and return a Python float; they are pure,
seeded where random, and know nothing of tasks or models.

- ``sliced_wasserstein``: SW-2 between empirical distributions (sorting 1-D projections).
- ``energy_distance``: the (unbiased, U-statistic) squared energy distance; zero in expectation
  for identical distributions.
- ``frechet_distance``: squared Fréchet (2-Wasserstein) distance between Gaussians fitted to
  features, the quantity behind FID.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _as_2d_float64(samples: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(samples).detach().to(dtype=torch.float64, device="cpu")
    if tensor.ndim != 2:
        raise ValueError(f"{name} must have shape (n_samples, dim), got {tuple(tensor.shape)}; "
                         "flatten images with x.reshape(len(x), -1) first")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or inf; the sampler diverged (check the model output)")
    return tensor


def projection_directions(dim: int, num_projections: int, seed: int = 0) -> torch.Tensor:
    """Unit directions for slicing, shape (num_projections, dim).

    In 2-D the directions are evenly spaced angles on [0, pi): deterministic and lower-variance than
    random ones, and their mean of cos^2 is exactly 1/2, so a translation by ``delta`` has
    SW-2 exactly ``|delta| / sqrt(2)``. In higher dimensions they are seeded Gaussian directions.
    """
    if num_projections < 1:
        raise ValueError(f"num_projections must be >= 1, got {num_projections}")
    if dim == 2:
        angles = torch.arange(num_projections, dtype=torch.float64) * math.pi / num_projections
        return torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(num_projections, dim, generator=generator, dtype=torch.float64)
    return directions / directions.norm(dim=1, keepdim=True)


def sliced_wasserstein(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray,
                       num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance sqrt(E_theta W_2^2(theta.x, theta.y)) between two sample sets.

    Both sets must have the same number of samples (so the 1-D optimal coupling is sort-and-match).
    """
    x = _as_2d_float64(x, "x")
    y = _as_2d_float64(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs equal-size sample sets of the same dim, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}; subsample the larger one")
    directions = projection_directions(x.shape[1], num_projections, seed)
    projected_x = torch.sort(x @ directions.T, dim=0).values
    projected_y = torch.sort(y @ directions.T, dim=0).values
    return float(((projected_x - projected_y) ** 2).mean().sqrt())


def _mean_pairwise_distance(a: torch.Tensor, b: torch.Tensor, exclude_diagonal: bool,
                            chunk: int = 2048) -> float:
    total = 0.0
    for start in range(0, len(a), chunk):
        total += float(torch.cdist(a[start:start + chunk], b).sum())
    count = len(a) * len(b)
    if exclude_diagonal:
        count -= len(a)  # the diagonal is exactly zero, so only the count changes
    return total / count


def energy_distance(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Squared energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| (U-statistic: unbiased, may dip below 0).

    For 1-D N(0, s^2) against N(delta, s^2) it equals
    2 * (E|N(delta, 2 s^2)| - E|N(0, 2 s^2)|), which the tests check.
    """
    x = _as_2d_float64(x, "x")
    y = _as_2d_float64(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dim, got {x.shape[1]} and {y.shape[1]}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError("energy_distance needs at least 2 samples in each set")
    cross = _mean_pairwise_distance(x, y, exclude_diagonal=False)
    within_x = _mean_pairwise_distance(x, x, exclude_diagonal=True)
    within_y = _mean_pairwise_distance(y, y, exclude_diagonal=True)
    return 2.0 * cross - within_x - within_y


def gaussian_moments(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of feature rows, float64 numpy."""
    feats = _as_2d_float64(features, "features").numpy()
    if len(feats) < 2:
        raise ValueError("need at least 2 feature rows to estimate a covariance")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance_from_moments(mean_a: np.ndarray, cov_a: np.ndarray,
                                  mean_b: np.ndarray, cov_b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(A + B - 2 (A^1/2 B A^1/2)^1/2): squared W2 between two Gaussians.

    The matrix square root goes through symmetric eigendecompositions (A^1/2 B A^1/2 is symmetric
    PSD), which is stable for the rank-deficient covariances that small sample sets give.
    """
    mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
    cov_a, cov_b = np.atleast_2d(cov_a).astype(np.float64), np.atleast_2d(cov_b).astype(np.float64)
    if mean_a.shape != mean_b.shape or cov_a.shape != cov_b.shape:
        raise ValueError(f"moment shapes differ: means {mean_a.shape} vs {mean_b.shape}, "
                         f"covariances {cov_a.shape} vs {cov_b.shape}")
    eigvals_a, eigvecs_a = np.linalg.eigh((cov_a + cov_a.T) / 2)
    sqrt_a = (eigvecs_a * np.sqrt(np.clip(eigvals_a, 0.0, None))) @ eigvecs_a.T
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt_middle = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    mean_term = float(((mean_a - mean_b) ** 2).sum())
    return mean_term + float(np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt_middle)


def frechet_distance(features_a: torch.Tensor | np.ndarray,
                     features_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID when features are a
    classifier's penultimate activations)."""
    return frechet_distance_from_moments(*gaussian_moments(features_a), *gaussian_moments(features_b))
