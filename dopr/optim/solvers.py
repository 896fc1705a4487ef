"""The linear algebra of AP: G P by a d x d inverse or in batch space, and what each costs.

    P   = (S + damping * tr(S)/d * I)^-1                   d x d, Cholesky in fp32 (or fp64); an inverse used
                                                             once is applied by solving with the factor
    G P = (G - (G z^T) (n mu I + z z^T)^-1 z) / mu           batch space (Woodbury), mu = damping tr(S)/d

The batch-space form subtracts nearly equal terms, so in fp32 its error grows like kappa(S + mu I)^2;
it is evaluated in float64 and rounded once (scripts/ap_accuracy.py measures every candidate form).
Which one a layer takes is a flop count (:func:`batch_space_cheaper`), float64 weighted by the
device's float64 rate (:func:`fp64_cost`). Every product runs under :func:`full_fp32_precision`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

# The batch-space path must beat the d x d one by this factor in flops: its triangular solves and
# skinny matmuls run below GEMM speed.
DUAL_FLOP_MARGIN = 0.75
# Float64 flops cost this many fp32 flops: CPUs and datacenter GPUs (P100, V100, A100, H100, B200)
# run float64 at half the fp32 rate or better; other GPUs at 1/32..1/64.
FP64_COST_CPU = 2.0
FP64_COST_GPU_FULL_RATE = 2.0
FP64_COST_GPU_OTHER = 32.0
_FULL_RATE_FP64_CAPABILITIES = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}


def fp64_cost(device: torch.device) -> float:
    """How many fp32 flops one float64 flop costs on ``device`` (for the batch-space cost model)."""
    if device.type != "cuda":
        return FP64_COST_CPU
    capability = torch.cuda.get_device_capability(device)
    return FP64_COST_GPU_FULL_RATE if capability in _FULL_RATE_FP64_CAPABILITIES else FP64_COST_GPU_OTHER


@contextlib.contextmanager
def full_fp32_precision():
    """Run AP's products at full fp32 precision: TF32 (cuBLAS), bf16 (oneDNN) and autocast off.

    Uses torch's per-backend ``fp32_precision`` switches and restores them, so a user's setting
    (``allow_tf32``, ``set_float32_matmul_precision``, or the new API) is untouched afterwards.
    """
    backends = [b for b in (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None))
                if b is not None and hasattr(b, "fp32_precision")]
    saved = [(b, b.fp32_precision) for b in backends]
    try:
        for backend, value in saved:
            if value != "ieee":
                backend.fp32_precision = "ieee"
        with contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                stack.enter_context(torch.autocast(device_type, enabled=False))
            yield
    finally:
        for backend, value in saved:
            if backend.fp32_precision != value:
                backend.fp32_precision = value


# -- the d x d path ------------------------------------------------------------------------------

def damped_cholesky(S: torch.Tensor, damping: float, overwrite: bool = False) -> torch.Tensor | None:
    """Cholesky factors L of (S + damping*tr(S)/d*I) for a batch (B, d, d) of PSD matrices, in fp32 (or
    fp64); None unless every factorization succeeded on a finite, nonzero S (the caller then takes
    :func:`damped_inverse`, whose fallbacks handle each matrix). With ``overwrite`` the damping goes onto
    S itself (fp32 or wider) instead of a copy: for a caller that built S for this call alone."""
    dtype = torch.promote_types(S.dtype, torch.float32)
    damped = S if overwrite and S.dtype == dtype else S.to(dtype, copy=True)
    diagonal = torch.diagonal(damped, dim1=-2, dim2=-1)
    scale = diagonal.sum(-1) / S.shape[-1]  # mean eigenvalue, (B,)
    # The damping goes onto the diagonal (of a copy unless overwrite): the same sums as S + mu*I without
    # building mu*I and the sum as (B, d, d) temporaries.
    diagonal.add_((damping * scale)[:, None])
    L, info = torch.linalg.cholesky_ex(damped)
    # One batched check on the common path; any nan/inf entry makes the sum non-finite.
    ok = bool(((info == 0) & torch.isfinite(scale) & (scale > 0)).all()) and bool(torch.isfinite(L.sum()))
    return L if ok else None


def damped_inverse(S: torch.Tensor, damping: float) -> torch.Tensor:
    """(S + damping*tr(S)/d*I)^-1 for a batch (B, d, d) of PSD matrices, by Cholesky in fp32 (or fp64).

    Never returns NaN or inf: a failed factorization retries with 10x more damping (three times),
    then falls back to (tr(S)/d)^-1 * I; a zero or non-finite S gives the identity.
    """
    L = damped_cholesky(S, damping)
    if L is not None:
        P = torch.cholesky_inverse(L)
        if bool(torch.isfinite(P.sum())):  # any nan/inf entry makes the sum non-finite; 10x cheaper than isfinite().all()
            return P
    S = S.to(torch.promote_types(S.dtype, torch.float32))
    eye = torch.eye(S.shape[-1], device=S.device, dtype=S.dtype)
    return torch.stack([_robust_inverse(S_i, damping, eye) for S_i in S])


def solve_with_factor(G: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """G (L L^T)^-1 by two triangular solves from the right: X L^T = G, then Y L = X.

    Same math as G @ cholesky_inverse(L), with the backward error of a Cholesky solve (Higham 2002,
    Thm 10.4: |dA| <= gamma_{3d+1} |L||L^T| per row of G), no larger than forming P and multiplying.
    """
    X = torch.linalg.solve_triangular(L.mT, G, upper=True, left=False)
    return torch.linalg.solve_triangular(L, X, upper=False, left=False)


def factor_once_cheaper(device: torch.device) -> bool:
    """Whether an inverse applied once costs less as two triangular solves with its Cholesky factor than as
    P = cholesky_inverse(L) then G P. Measured on CPU (1 thread; residual-MLP layers d = 257..513, d_out =
    256..512): forming P costs about one d x d x d GEMM, which the solves save (docs/cost.md). Not measured
    on CUDA, where triangular solves run far below GEMM speed, so GPUs keep the explicit inverse."""
    return device.type == "cpu"


def _robust_inverse(S: torch.Tensor, damping: float, eye: torch.Tensor) -> torch.Tensor:
    scale = torch.trace(S) / S.shape[0]
    if not (torch.isfinite(S).all() and torch.isfinite(scale) and scale > 0):
        return eye.clone()
    for lam in (damping, max(10 * damping, 1e-6), max(100 * damping, 1e-5), max(1000 * damping, 1e-4)):
        L, info = torch.linalg.cholesky_ex(S + lam * scale * eye)
        if info == 0 and torch.isfinite(L).all():
            P = torch.cholesky_inverse(L)
            if torch.isfinite(P).all():
                return P
    return eye / scale


# -- the batch-space (Woodbury) path -------------------------------------------------------------

def batch_space_cheaper(n: int, d: int, d_out: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the float64 n x n path costs less than fp32 statistics + d x d inverse + G P, for a
    layer with ``d`` (bias-augmented) inputs, ``d_out`` outputs and ``n`` rows of ``dtype``."""
    primal = n * d * d + d**3 + d_out * d * d
    dual = n * n * d + n**3 / 3 + 2 * d_out * d * n + n * n * d_out
    if dtype != torch.float64:
        dual *= fp64_cost(device)
    return dual < DUAL_FLOP_MARGIN * primal


def gram(Z: torch.Tensor, augmented: bool) -> torch.Tensor:
    """z z^T of the rows Z; with ``augmented`` the rows carry a constant-1 column, which adds 1 everywhere."""
    K = Z @ Z.T
    return K.add_(1.0) if augmented else K


@dataclass
class BatchSpaceFactor:
    """n mu I + z z^T factored for a group of layers with the same row count n (float64)."""

    mu: torch.Tensor  # (B,) damping * tr(S) / d of each layer
    L: torch.Tensor  # (B, n, n) Cholesky factors
    info: torch.Tensor  # (B,) 0 where the factorization succeeded
    K_inv: torch.Tensor | None  # (B, n, n) explicit inverses, when every factorization succeeded

    @classmethod
    def of(cls, K: torch.Tensor, dims: list[int], damping: float) -> "BatchSpaceFactor":
        """Factor the stacked Gram matrices ``K`` (B, n, n) of layers with ``dims`` (augmented) inputs."""
        n = K.shape[-1]
        mu = damping * torch.diagonal(K, dim1=-2, dim2=-1).sum(-1) / (n * K.new_tensor(dims))
        eye = torch.eye(n, device=K.device, dtype=K.dtype)
        L, info = torch.linalg.cholesky_ex(K + (n * mu)[:, None, None] * eye)
        # An explicit n x n inverse then one GEMM beats triangular solves with d_out right-hand sides on CPU.
        K_inv = torch.cholesky_inverse(L) if bool((info == 0).all()) else None
        return cls(mu, L, info, K_inv)

    def apply(self, i: int, G: torch.Tensor, Z: torch.Tensor) -> torch.Tensor | None:
        """G P for layer ``i`` of the group, in float64, from its rows Z (float64, n x d_in) and gradient
        G (d_out x d_in, or d_out x (d_in + 1) with the bias column); None where it cannot be trusted
        (a failed factorization, zero damping, a non-finite result): the caller takes the d x d path."""
        if not (self.info[i] == 0 and self.mu[i] > 0):
            return None
        in_dim = Z.shape[1]
        augmented = G.shape[1] == in_dim + 1
        G64 = G.to(torch.float64, copy=True)  # M is built in place
        GZt = G64[:, :in_dim] @ Z.T
        if augmented:
            GZt += G64[:, -1:]  # the ones column of the augmented rows
        # (G z^T)(n mu I + z z^T)^-1, d_out x n
        B = GZt @ self.K_inv[i] if self.K_inv is not None else torch.cholesky_solve(GZt.T, self.L[i]).T
        M = G64
        M[:, :in_dim] -= B @ Z
        if augmented:
            M[:, -1] -= B.sum(1)
        M /= self.mu[i]
        return M if torch.isfinite(M.sum()) else None
