"""The statistics of one preconditioned block: rows of one step summed into z^T z, S, and its damped
inverse, held as P or as P's Cholesky factor (:meth:`LayerStats.apply_inverse`).

Rows arrive from forwards whose backward reached the layer (``commit``); micro-batches of a step
add up (gradient accumulation). While the batch-space path may still be the cheaper one, rows are
kept as they are (usually the very tensor autograd saved, so no extra memory) instead of reduced.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from dopr.optim.layers import Block, is_dtensor
from dopr.optim.solvers import batch_space_cheaper, gram, solve_with_factor


@dataclass
class ForwardRecord:
    """One training forward's layer input, waiting for its backward to commit it."""

    x: torch.Tensor | None
    step: int


class LayerStats:
    """Statistics, inverse and gradient plumbing of one block (see :mod:`dopr.optim.layers`)."""

    def __init__(self, block: Block, index: int):
        self.block = block
        self.name = block.name
        self.module = block.module
        self.index = index  # staggers inverse refreshes across layers
        self.weight = block.weight
        self.bias = block.bias  # the augmented bias parameter, or None
        self.in_dim = block.in_dim  # d_in, or C*kh*kw for convolutions
        self.dim = self.in_dim + (1 if self.bias is not None else 0)
        # Sums over this step's recorded rows; stale (a buffer to overwrite) while rows == 0.
        self.xtx: torch.Tensor | None = None  # sum of z z^T
        self.xsum: torch.Tensor | None = None  # sum of z (only with bias augmentation)
        self.rows = 0
        # Rows kept (not yet reduced to z^T z) while the batch-space path may still be the cheaper one.
        self.kept: list[torch.Tensor] = []
        self.awaiting: list[ForwardRecord] = []  # this step's forwards whose backward has not run yet
        self.S: torch.Tensor | None = None
        # The damped inverse (S + mu I)^-1, held one of two ways (solvers.py says which is cheaper when):
        # P itself, or its Cholesky factor L, for an inverse applied once and then replaced.
        self.P: torch.Tensor | None = None
        self.factor: torch.Tensor | None = None
        # The weight gradient AP last saw (a weak reference) and its version counter then: a second
        # step() with no backward in between finds both unchanged and leaves the gradient alone.
        self.seen_grad: tuple[weakref.ref, int] | None = None
        self.warned_missing = False  # warned that its statistics never arrived

    # -- recording -------------------------------------------------------------------------------
    def commit(self, x: torch.Tensor, max_rows: int | None, step: int, keep_rows: bool = False) -> None:
        """Add one forward's input rows to this step's statistics (called when its backward runs)."""
        z = self.block.input_rows(x)
        if max_rows is not None and z.shape[0] > max_rows:
            stride = math.ceil(z.shape[0] / max_rows)
            z = z[step % stride :: stride]  # strided view: cheap and deterministic
        z = z.to(torch.promote_types(z.dtype, torch.float32))  # bf16/fp16 inputs accumulate in fp32
        if keep_rows and self.rows + z.shape[0] < self.dim:
            # Usually the very tensor autograd saved for backward: no extra memory.
            self.kept.append(z)
            self.rows += z.shape[0]
            return
        self.reduce_kept()
        self._accumulate(z)

    def reduce_kept(self) -> None:
        """Fold kept rows into z^T z (the d x d path)."""
        kept, self.kept = self.kept, []
        self.rows -= sum(z.shape[0] for z in kept)
        for z in kept:
            self._accumulate(z)

    def _accumulate(self, z: torch.Tensor) -> None:
        if self.xtx is None or (self.rows == 0 and (self.xtx.dtype, self.xtx.device) != (z.dtype, z.device)):
            # First rows, or the model changed dtype or device since the last step: the sums follow it.
            self.xtx = torch.zeros(self.in_dim, self.in_dim, device=z.device, dtype=z.dtype)
            self.xsum = None if self.bias is None else torch.zeros(self.in_dim, device=z.device, dtype=z.dtype)
        elif self.xtx.dtype != z.dtype:  # changed between micro-batches of one step: keep the wider
            dtype = torch.promote_types(self.xtx.dtype, z.dtype)
            self.xtx = self.xtx.to(dtype)
            self.xsum = None if self.xsum is None else self.xsum.to(dtype)
            z = z.to(dtype)
        if self.rows == 0:  # the step's first rows overwrite the sums: reset() need not zero them
            torch.mm(z.T, z, out=self.xtx)
            if self.xsum is not None:
                torch.sum(z, 0, out=self.xsum)
        else:
            self.xtx.addmm_(z.T, z)
            if self.xsum is not None:
                self.xsum.add_(z.sum(0))
        self.rows += z.shape[0]

    def batch_second_moment(self) -> torch.Tensor:
        """S of the recorded rows, augmented with the constant-1 column when biases are included (zero
        without rows: the sums' buffers then hold a past step's)."""
        if self.rows == 0:
            return self.xtx.new_zeros(self.dim, self.dim)
        n = self.rows
        if self.bias is None:
            return self.xtx / n
        S = self.xtx.new_empty(self.dim, self.dim)
        torch.div(self.xtx, n, out=S[:-1, :-1])  # in place: no (d_in, d_in) temporary
        S[:-1, -1] = S[-1, :-1] = self.xsum / n
        S[-1, -1] = 1.0
        return S

    # -- the inverse ------------------------------------------------------------------------------
    def has_inverse(self) -> bool:
        return self.P is not None or self.factor is not None

    def set_inverse(self, P: torch.Tensor | None = None, factor: torch.Tensor | None = None) -> None:
        """Hold the new inverse as P or as its Cholesky factor; the other representation is dropped."""
        self.P, self.factor = P, factor

    def inverse(self) -> torch.Tensor | None:
        """P as a d x d matrix (formed from the factor when that is what the layer holds), or None."""
        return torch.cholesky_inverse(self.factor) if self.P is None and self.factor is not None else self.P

    def apply_inverse(self, G: torch.Tensor) -> torch.Tensor:
        """G P, in at least the inverse's precision (fp32 or more; it may predate a change of the model's dtype)."""
        held = self.P if self.P is not None else self.factor
        dtype = torch.promote_types(G.dtype, held.dtype)
        G, held = G.to(dtype), held.to(device=G.device, dtype=dtype)
        return G @ held if self.P is not None else solve_with_factor(G, held)

    def reset(self) -> None:
        """Drop this step's statistics (committed rows and sums); S and the inverse stay. The sums' buffers
        are kept, not zeroed: they hold the step's sums only while ``rows`` > 0, and the next step's first
        rows overwrite them."""
        self.kept = []
        self.rows = 0

    # -- gradients -------------------------------------------------------------------------------
    def grad_matrix(self) -> torch.Tensor | None:
        return self.block.grad_matrix()

    def set_grad_matrix(self, M: torch.Tensor) -> None:
        self.block.set_grad_matrix(M)

    def has_new_grad(self) -> bool:
        """Whether a backward wrote the weight gradient since AP last saw it.

        Backward either creates the gradient tensor (after ``zero_grad(set_to_none=True)``) or adds
        into it in place, which bumps its version counter; so does ``zero_grad(set_to_none=False)``.
        """
        grad = self.weight.grad
        if grad is None:
            return False
        return self.seen_grad is None or self.seen_grad[0]() is not grad or self.seen_grad[1] != _version(grad)

    def remember_grad(self) -> None:
        grad = self.weight.grad
        self.seen_grad = None if grad is None else (weakref.ref(grad), _version(grad))

    # -- batch-space (Woodbury) path -------------------------------------------------------------
    def batch_space_cheaper(self) -> bool:
        """Whether the float64 n x n path costs less than fp32 statistics + d x d inverse + G P."""
        if not self.kept or self.rows == 0:
            return False
        return batch_space_cheaper(self.rows, self.dim, self.block.out_dim, self.kept[0].dtype, self.kept[0].device)

    def kept_rows(self) -> torch.Tensor:
        return self.kept[0] if len(self.kept) == 1 else torch.cat(self.kept)

    def gram(self, Z: torch.Tensor) -> torch.Tensor:
        """z z^T of the (bias-augmented) rows: the augmenting ones column adds 1 everywhere."""
        return gram(Z, self.bias is not None)


def _version(grad: torch.Tensor) -> int:
    """The gradient's version counter; for an FSDP2 DTensor, its local shard's (writes go there)."""
    return grad.to_local()._version if is_dtensor(grad) else grad._version
