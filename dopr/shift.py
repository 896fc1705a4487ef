"""Distribution-shift meters: how far the states a learner visits are from the demonstrations.

The paper's thesis is that test-time performance is limited by compounding error, which shows up
as a shift of the visited-state distribution away from the training data. These meters compare
two sets of states through their first two moments, so they are cheap and work in any dimension.
"""

from __future__ import annotations

import numpy as np


def gaussian_state_shift(visited: np.ndarray, reference: np.ndarray, ridge: float = 1e-3) -> dict[str, float]:
    """Moment-based divergence between visited states and reference (demonstration) states.

    Both sets are first standardized by the reference mean and std, so the numbers are
    unit-free and comparable across envs; a ridge of ``ridge`` (in standardized units) is added
    to both covariances so rank-deficient sets (constant coordinates, few samples) stay finite.

    Args:
      visited: (n, d) states the learner visited at test time.
      reference: (m, d) demonstration states.
      ridge: diagonal regularizer added to both standardized covariances.

    Returns:
      gaussian_kl: KL( N(mu_v, S_v) || N(mu_r, S_r) ), the Gaussian fits of the two sets,
                   0 when the moments match.
      mean_distance: || mu_v - mu_r || / sqrt(d) in reference-std units (RMS mean shift).
      cov_distance: || S_v - S_r ||_F / || S_r ||_F (relative covariance change).
    """
    visited = np.asarray(visited, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if visited.ndim != 2 or reference.ndim != 2 or visited.shape[1] != reference.shape[1]:
        raise ValueError(f"need 2-D state arrays with the same width, got {visited.shape} and {reference.shape}")
    if len(visited) < 2 or len(reference) < 2:
        raise ValueError(f"need at least 2 states in each set, got {len(visited)} and {len(reference)}")
    if ridge <= 0:
        raise ValueError(f"ridge must be > 0, got {ridge}")
    dim = reference.shape[1]
    center, scale = reference.mean(0), reference.std(0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    v = (visited - center) / scale
    r = (reference - center) / scale
    mu_v, mu_r = v.mean(0), r.mean(0)
    cov_v = np.cov(v, rowvar=False).reshape(dim, dim) + ridge * np.eye(dim)
    cov_r = np.cov(r, rowvar=False).reshape(dim, dim) + ridge * np.eye(dim)
    chol_r = np.linalg.cholesky(cov_r)
    # KL = 1/2 [ tr(S_r^-1 S_v) + (mu_r-mu_v)^T S_r^-1 (mu_r-mu_v) - d + log det S_r - log det S_v ]
    solved_cov = np.linalg.solve(chol_r, np.linalg.solve(chol_r, cov_v).T)  # L^-1 S_v L^-T (symmetric)
    diff = np.linalg.solve(chol_r, mu_v - mu_r)
    logdet_r = 2.0 * np.log(np.diag(chol_r)).sum()
    sign_v, logdet_v = np.linalg.slogdet(cov_v)
    kl = 0.5 * (np.trace(solved_cov) + diff @ diff - dim + logdet_r - logdet_v)
    return {
        "gaussian_kl": float(max(kl, 0.0)),
        "mean_distance": float(np.linalg.norm(mu_v - mu_r) / np.sqrt(dim)),
        "cov_distance": float(np.linalg.norm(cov_v - cov_r) / np.linalg.norm(cov_r)),
    }
