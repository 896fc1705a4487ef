"""Activation preconditioning (AP): the part of DoPr that we own.

For every supported layer with weight gradient G (d_out x d_in) and inputs z (n rows of d_in):

    S = z^T z / n                                   (uncentered second moment of the layer input)
    P = (S + damping * tr(S)/d * I)^-1              (Cholesky, fp32, never NaN)
    G <- G P                                        (before any gradient preconditioner sees it)

When S is the current batch's (no EMA, refreshed every step) and the batch has fewer rows than
the layer has inputs, the same G P can be cheaper in batch space (Woodbury, mu = damping tr(S)/d):

    G P = (G - (G z^T) (n mu I + z z^T)^-1 z) / mu   (an n x n Cholesky instead of d x d)

That formula subtracts nearly equal terms, so in fp32 its error grows like kappa(S + mu I)^2; it is
evaluated in float64 and rounded once (scripts/ap_accuracy.py measures every candidate form).
``APConfig.solver`` picks per layer and step by cost ("auto": flops, float64 weighted by the
device's float64 rate), or forces "primal". Every path returns G P within an error bound derived
from what it computes (tests/optim/test_precision.py states and checks it against float64 dense
math), and AP's own products run at full fp32 precision even when the user enabled TF32 or autocast.

Statistics belong to one optimizer step. A forward hook (training mode, grad enabled) marks the
layer input; the rows are committed to the step when that forward's backward reaches the layer
(a hook on the layer output's gradient), so a forward whose loss is never backpropagated (a
skipped non-finite loss, a rollout in train mode) adds nothing. ``discard_statistics()`` (which
``DoPr.zero_grad()`` calls) drops committed rows of a step that was abandoned. Micro-batches of
one step are summed (gradient accumulation), and under torch.distributed the sums are all-reduced
in one bucket before use. Each backward's gradient is rewritten once: a second ``step()`` with no
backward in between leaves it alone and does not advance the schedule.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import numbers
import warnings
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
BIAS_MODES = ("augment", "gp")
SOLVERS = ("auto", "primal")
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


def is_number(value) -> bool:
    """A finite real number (not a bool, not a string)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value) -> bool:
    """A finite real number with an integral value (2 or 2.0)."""
    return is_number(value) and float(value).is_integer()


def _exclude_patterns(value) -> tuple[str, ...] | None:
    """A single string is one pattern (``opt.ap.exclude=net.*`` on the command line); else a list of them."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):
        patterns = tuple(value)
        return patterns if all(isinstance(p, str) for p in patterns) else None
    return None


def _same(value):
    return value


# field -> (is the value valid, its normalized form, the expected form for the error message)
_AP_SETTINGS = {
    "damping": (lambda v: is_number(v) and v >= 0, float, "a finite number >= 0, e.g. 1e-3"),
    "ema": (lambda v: is_number(v) and 0 <= v < 1, float, "a number in [0, 1), e.g. 0.0 or 0.95"),
    "stat_interval": (lambda v: is_integer(v) and v >= 1, int, "an integer >= 1, e.g. 1"),
    "inverse_interval": (lambda v: is_integer(v) and v >= 1, int, "an integer >= 1, e.g. 1"),
    "max_rows": (lambda v: v is None or (is_integer(v) and v >= 1), lambda v: v if v is None else int(v),
                 "null (every row) or an integer >= 1, e.g. 4096"),
    "bias": (lambda v: isinstance(v, str) and v in BIAS_MODES, _same, f"one of {', '.join(BIAS_MODES)}"),
    "warmup_steps": (lambda v: is_integer(v) and v >= 0, int, "an integer >= 0, e.g. 0"),
    "exclude": (lambda v: _exclude_patterns(v) is not None, _exclude_patterns,
                "a module-name pattern (fnmatch) or a list of them, e.g. head or [head, 'encoder.*']"),
    "solver": (lambda v: isinstance(v, str) and v in SOLVERS, _same, f"one of {', '.join(SOLVERS)}"),
}


def check_ap_setting(key: str, value):
    """``value`` of APConfig field ``key``, validated and normalized (ints for counts, a tuple of
    patterns for ``exclude``). Raises ValueError naming the field and the expected form."""
    valid, normalize, form = _AP_SETTINGS[key]
    if not valid(value):
        raise ValueError(f"{key} must be {form}; got {value!r}")
    return normalize(value)


@dataclass
class APConfig:
    """Hyperparameters of activation preconditioning. Paper defaults: per-batch S, every step."""

    damping: float = 1e-3  # relative to the mean eigenvalue tr(S)/d
    ema: float = 0.0  # 0: S of the current batch; b in (0,1): S <- b*S + (1-b)*S_batch
    stat_interval: int = 1  # record statistics every k steps
    inverse_interval: int = 1  # recompute P every k steps (staggered across layers when > 1)
    max_rows: int | None = None  # sub-sample z to about this many rows (strided, no RNG)
    bias: str = "augment"  # "augment": precondition [W b] with z augmented by 1; "gp": biases untouched
    warmup_steps: int = 0  # plain gradients for the first k steps
    exclude: tuple[str, ...] = field(default_factory=tuple)  # fnmatch patterns of module names to skip (a str is one)
    solver: str = "auto"  # "auto": batch-space (Woodbury) G P when it is cheaper; "primal": always d x d

    def batch_space_allowed(self) -> bool:
        """Woodbury needs S to be exactly this step's batch and a nonzero damping."""
        return (self.solver == "auto" and self.ema == 0 and self.stat_interval == 1
                and self.inverse_interval == 1 and self.damping > 0)

    def __post_init__(self):
        for f in fields(self):
            try:
                setattr(self, f.name, check_ap_setting(f.name, getattr(self, f.name)))
            except ValueError as error:
                raise ValueError(f"APConfig: {error}") from None


@dataclass
class _ForwardRecord:
    """One training forward's layer input, waiting for its backward to commit it."""

    x: torch.Tensor | None
    step: int


class _LayerStats:
    """Statistics, inverse and gradient plumbing of one supported layer."""

    def __init__(self, name: str, module: nn.Module, augment_bias: bool, index: int):
        self.name = name
        self.module = module
        self.index = index  # staggers inverse refreshes across layers
        self.weight = module.weight
        self.bias = module.bias if (augment_bias and module.bias is not None) else None
        self.in_dim = self.weight[0].numel()  # d_in, or C*kh*kw for convolutions
        self.dim = self.in_dim + (1 if self.bias is not None else 0)
        self.xtx: torch.Tensor | None = None  # sum over recorded rows of z z^T
        self.xsum: torch.Tensor | None = None  # sum of z (only with bias augmentation)
        self.rows = 0
        # Rows kept (not yet reduced to z^T z) while the batch-space path may still be the cheaper one.
        self.kept: list[torch.Tensor] = []
        self.awaiting: list[_ForwardRecord] = []  # this step's forwards whose backward has not run yet
        self.S: torch.Tensor | None = None
        self.P: torch.Tensor | None = None
        # The weight gradient AP last saw (a weak reference) and its version counter then: a second
        # step() with no backward in between finds both unchanged and leaves the gradient alone.
        self.seen_grad: tuple[weakref.ref, int] | None = None

    # -- recording -------------------------------------------------------------------------------
    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The (n, d_in) matrix whose rows the weight multiplies (patches for convolutions)."""
        m = self.module
        if isinstance(m, nn.Linear):
            return x.reshape(-1, self.in_dim)
        if isinstance(m, nn.Conv1d):
            x = x.unsqueeze(2)
            kernel, stride, dilation = (1, m.kernel_size[0]), (1, m.stride[0]), (1, m.dilation[0])
            pads = _explicit_padding(m.padding, m.kernel_size, m.dilation)  # (left, right)
        else:
            kernel, stride, dilation = m.kernel_size, m.stride, m.dilation
            pads = _explicit_padding(m.padding, m.kernel_size, m.dilation)  # (l, r, t, b)
        if any(pads):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, pads, mode=mode)
        patches = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (N, d_in, L)
        return patches.transpose(1, 2).reshape(-1, self.in_dim)

    def commit(self, x: torch.Tensor, max_rows: int | None, step: int, keep_rows: bool = False) -> None:
        """Add one forward's input rows to this step's statistics (called when its backward runs)."""
        z = self.input_rows(x)
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
        self.xtx.addmm_(z.T, z)
        if self.xsum is not None:
            self.xsum.add_(z.sum(0))
        self.rows += z.shape[0]

    def batch_second_moment(self) -> torch.Tensor:
        """S of the recorded rows, augmented with the constant-1 column when biases are included."""
        n = max(self.rows, 1)
        if self.bias is None:
            return self.xtx / n
        S = self.xtx.new_empty(self.dim, self.dim)
        S[:-1, :-1] = self.xtx / n
        S[:-1, -1] = S[-1, :-1] = self.xsum / n
        S[-1, -1] = 1.0 if self.rows else 0.0
        return S

    def reset(self) -> None:
        """Drop this step's statistics (committed rows and sums); S and P stay."""
        self.kept = []
        if self.xtx is not None:
            self.xtx.zero_()
        if self.xsum is not None:
            self.xsum.zero_()
        self.rows = 0

    # -- gradients -------------------------------------------------------------------------------
    def grad_matrix(self) -> torch.Tensor | None:
        if self.weight.grad is None:
            return None
        G = self.weight.grad.reshape(self.weight.shape[0], -1)
        if self.bias is None:
            return G
        b = self.bias.grad if self.bias.grad is not None else torch.zeros_like(self.bias)
        return torch.cat([G, b.reshape(-1, 1)], dim=1)

    def set_grad_matrix(self, M: torch.Tensor) -> None:
        """Write M back into the gradients, in the gradients' own dtype."""
        self.weight.grad.copy_(M[:, : self.in_dim].reshape(self.weight.shape))
        if self.bias is not None and self.bias.grad is not None:
            self.bias.grad.copy_(M[:, -1])

    def has_new_grad(self) -> bool:
        """Whether a backward wrote the weight gradient since AP last saw it.

        Backward either creates the gradient tensor (after ``zero_grad(set_to_none=True)``) or adds
        into it in place, which bumps its version counter; so does ``zero_grad(set_to_none=False)``.
        """
        grad = self.weight.grad
        if grad is None:
            return False
        return self.seen_grad is None or self.seen_grad[0]() is not grad or self.seen_grad[1] != grad._version

    def remember_grad(self) -> None:
        grad = self.weight.grad
        self.seen_grad = None if grad is None else (weakref.ref(grad), grad._version)

    # -- batch-space (Woodbury) path -------------------------------------------------------------
    def batch_space_cheaper(self) -> bool:
        """Whether the float64 n x n path costs less than fp32 statistics + d x d inverse + G P."""
        n, d, d_out = self.rows, self.dim, self.weight.shape[0]
        if not self.kept or n == 0:
            return False
        primal = n * d * d + d**3 + d_out * d * d
        dual = n * n * d + n**3 / 3 + 2 * d_out * d * n + n * n * d_out
        if self.kept[0].dtype != torch.float64:
            dual *= fp64_cost(self.kept[0].device)
        return dual < DUAL_FLOP_MARGIN * primal

    def kept_rows(self) -> torch.Tensor:
        return self.kept[0] if len(self.kept) == 1 else torch.cat(self.kept)

    def gram(self, Z: torch.Tensor) -> torch.Tensor:
        """z z^T of the (bias-augmented) rows: the augmenting ones column adds 1 everywhere."""
        K = Z @ Z.T
        return K.add_(1.0) if self.bias is not None else K


def _explicit_padding(padding, kernel_size, dilation) -> tuple[int, ...]:
    """Conv padding as an F.pad tuple (last spatial dim first), resolving 'same' / 'valid'."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * (2 * len(kernel_size))
        pads: list[int] = []
        for k, d in zip(reversed(kernel_size), reversed(dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]  # torch puts the odd extra on the right
        return tuple(pads)
    pads = []
    for p in reversed(padding):
        pads += [p, p]
    return tuple(pads)


def damped_inverse(S: torch.Tensor, damping: float) -> torch.Tensor:
    """(S + damping*tr(S)/d*I)^-1 for a batch (B, d, d) of PSD matrices, by Cholesky in fp32 (or fp64).

    Never returns NaN or inf: a failed factorization retries with 10x more damping (three times),
    then falls back to (tr(S)/d)^-1 * I; a zero or non-finite S gives the identity.
    """
    S = S.to(torch.promote_types(S.dtype, torch.float32))
    d = S.shape[-1]
    eye = torch.eye(d, device=S.device, dtype=S.dtype)
    scale = torch.diagonal(S, dim1=-2, dim2=-1).sum(-1) / d  # mean eigenvalue, (B,)
    L, info = torch.linalg.cholesky_ex(S + (damping * scale)[:, None, None] * eye)
    # One batched check on the common path; the per-matrix fallbacks below are rare.
    if bool(((info == 0) & torch.isfinite(scale) & (scale > 0)).all()):
        P = torch.cholesky_inverse(L)
        if bool(torch.isfinite(P.sum())):  # any nan/inf entry makes the sum non-finite; 10x cheaper than isfinite().all()
            return P
    return torch.stack([_robust_inverse(S_i, damping, eye) for S_i in S])


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


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _names(names: list[str], limit: int = 30) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def select_layers(model: nn.Module, config: APConfig, params: Iterable[torch.Tensor] | None = None
                  ) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs AP preconditions: Linear / Conv1d / Conv2d layers whose weight is
    trainable and in ``params`` (when given), minus ``config.exclude`` and grouped convolutions.

    Raises ValueError when an exclude pattern matches none of those layers (a typo would otherwise
    leave AP on where the user meant it off), or when no layer is left: AP with no layer is the
    plain gradient preconditioner under DoPr's name.
    """
    wanted = None if params is None else {id(p) for p in params}
    eligible = [(name, module) for name, module in model.named_modules()
                if isinstance(module, SUPPORTED_LAYERS) and module.weight.requires_grad
                and (wanted is None or id(module.weight) in wanted)]
    names = [name for name, _ in eligible]
    for pattern in config.exclude:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ValueError(f"AP: exclude pattern {pattern!r} matches none of the layers AP preconditions; "
                             f"it can match (fnmatch over module names): {_names(names) or 'none'}")
    selected = []
    for name, module in eligible:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in config.exclude):
            continue
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups != 1:
            warnings.warn(f"AP skips grouped convolution {name!r} (groups={module.groups}); it gets the plain GP")
            continue
        selected.append((name, module))
    if not selected:
        if eligible:
            why = (f"exclude patterns {list(config.exclude)} and grouped convolutions leave none of "
                   f"{_names(names)}; remove the exclude patterns, or")
        else:
            why = ("the model has no nn.Linear, nn.Conv1d or nn.Conv2d layer with a trainable weight among "
                   "the optimizer's parameters (AP does not handle Conv3d, transposed convolutions or "
                   "embeddings);")
        raise ValueError(f"AP has no layer to precondition: {why} use the gradient preconditioner alone "
                         "(adamw rather than dopr_adamw, opt=adamw on the command line; or DoPr(optimizer, None))")
    return selected


class ActivationPreconditioner:
    """Hooks a model's Linear / Conv1d / Conv2d layers and rewrites their gradients to G P.

    Use standalone between ``loss.backward()`` and ``optimizer.step()`` (call ``step()``), or let
    :class:`dopr.optim.DoPr` call it. Only layers whose weight is in ``params`` (when given) and
    requires grad are preconditioned; ``config.exclude`` removes layers by name (see
    :func:`select_layers`, which refuses a pattern that matches nothing and a model with no layer).

    Each backward's gradient is preconditioned once: a ``step()`` with no backward since the last
    one leaves the (already preconditioned) gradients alone and does not count as a step for the
    statistics / inverse schedule or the warmup.
    """

    def __init__(self, model: nn.Module, config: APConfig | None = None, params: Iterable[torch.Tensor] | None = None):
        self.config = config or APConfig()
        self.layers: list[_LayerStats] = []
        self._handles = []
        for name, module in select_layers(model, self.config, params):
            layer = _LayerStats(name, module, self.config.bias == "augment", len(self.layers))
            self.layers.append(layer)
            self._handles.append(module.register_forward_hook(self._make_hook(layer)))
        self.steps = 0  # completed optimizer steps
        self._keep_rows = self.config.batch_space_allowed()
        self._pending_sync = None  # (bucket, work handle) of an all-reduce launched before backward
        self._warned_non_finite = False

    # -- hooks -----------------------------------------------------------------------------------
    def _recording(self) -> bool:
        return self.steps % self.config.stat_interval == 0

    def _make_hook(self, layer: _LayerStats):
        def hook(module, args, output):
            # Only the optimized step's own passes count: no eval passes, no no_grad rollouts, and
            # (through the gradient hook) no forward whose loss is never backpropagated.
            if not (module.training and torch.is_grad_enabled() and args and self._recording()):
                return
            if not (isinstance(output, torch.Tensor) and output.requires_grad):
                return
            record = _ForwardRecord(args[0].detach(), self.steps)
            layer.awaiting.append(record)
            output.register_hook(lambda grad: self._commit(layer, record))

        return hook

    def _commit(self, layer: _LayerStats, record: "_ForwardRecord") -> None:
        if record.x is None:  # already committed (start_statistics_sync) or dropped by step()
            return
        x, record.x = record.x, None  # release the input once it is folded in
        with torch.no_grad(), full_fp32_precision():
            layer.commit(x, self.config.max_rows, record.step, keep_rows=self._keep_rows)

    def _commit_awaiting(self) -> None:
        """Treat every forward still awaiting its backward as part of this step (DDP overlap)."""
        for layer in self.layers:
            for record in layer.awaiting:
                self._commit(layer, record)

    def discard_statistics(self) -> None:
        """Drop the statistics committed since the last ``step()`` (an abandoned or skipped step).

        ``DoPr.zero_grad()`` calls it, so a loop that skips ``step()`` (a non-finite loss after
        backward, a GradScaler overflow, an abandoned accumulation) and zeroes the gradients
        starts the next step clean. Forwards still awaiting their backward are kept, so the
        ``forward; zero_grad(); backward(); step()`` order works too. S and P are untouched.
        """
        for layer in self.layers:
            layer.awaiting = [r for r in layer.awaiting if r.x is not None]
            layer.reset()
        if self._pending_sync is not None:  # a launched collective must complete on every rank
            self._pending_sync[1].wait()
            self._pending_sync = None

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """Turn this step's statistics into inverses (when due) and rewrite the gradients.

        Only gradients a backward wrote since the last call are rewritten (each backward's once).
        A call that finds none (``step(); step()`` after one backward) changes no gradient and does
        not count as a step for ``stat_interval``, ``inverse_interval`` or ``warmup_steps``.
        """
        new = {id(layer) for layer in self.layers if layer.has_new_grad()}
        if new:
            with full_fp32_precision():
                self._step(new)
            self.steps += 1
        self.remember_gradients()
        for layer in self.layers:
            # Forwards whose backward never ran (a skipped loss) end with their step.
            for record in layer.awaiting:
                record.x = None
            layer.awaiting = []

    def remember_gradients(self) -> None:
        """Mark the current gradients as seen, so the next ``step()`` leaves them alone unless a
        backward writes them. ``DoPr.step()`` calls it again after its inner optimizers stepped, in
        case one of them changed a gradient in place."""
        for layer in self.layers:
            layer.remember_grad()

    def _step(self, new: set[int]) -> None:
        """One counted step; ``new`` holds the ids of the layers whose gradient is new."""
        cfg = self.config
        batch_space = []
        if self._recording():
            # Batch-space G P needs every row of the step on this process; under torch.distributed
            # the d x d statistics are what gets all-reduced (checked here, not at construction,
            # since the process group may start after the optimizer is built).
            single_process = _world()[0] == 1
            for layer in self.layers:
                if layer.kept:
                    if (single_process and self.steps >= cfg.warmup_steps and layer.batch_space_cheaper()
                            and id(layer) in new):
                        batch_space.append(layer)
                    else:
                        layer.reduce_kept()
            self._all_reduce()
            for layer in self.layers:
                if layer.rows == 0 or layer in batch_space:
                    continue
                S_batch = layer.batch_second_moment()
                if not bool(torch.isfinite(S_batch.sum())):
                    self._warn_non_finite(layer)
                    continue  # never enters S or its EMA; the layer keeps its last inverse
                if cfg.ema > 0 and layer.S is not None:
                    # .to: after a model.double() / .bfloat16() the average continues in the new precision
                    layer.S = layer.S.to(S_batch).mul_(cfg.ema).add_(S_batch, alpha=1 - cfg.ema)
                else:
                    layer.S = S_batch
        self._refresh_inverses()
        if batch_space:
            self._batch_space_step(batch_space)
        for layer in self.layers:
            layer.reset()
        if self.steps >= cfg.warmup_steps:
            for layer in self.layers:
                if id(layer) not in new or layer.P is None or layer in batch_space:
                    continue
                G = layer.grad_matrix()
                # At least P's precision (fp32 or more); P may predate a change of the model's dtype.
                dtype = torch.promote_types(G.dtype, layer.P.dtype)
                layer.set_grad_matrix(G.to(dtype) @ layer.P.to(device=G.device, dtype=dtype))

    def _warn_non_finite(self, layer: _LayerStats) -> None:
        if not self._warned_non_finite:
            warnings.warn(f"AP: non-finite layer inputs at step {self.steps} (first: {layer.name!r}); that step's "
                          "statistics are skipped and the layer keeps its last inverse (warned once)")
            self._warned_non_finite = True

    def _batch_space_step(self, layers: list[_LayerStats]) -> None:
        """G P = (G - (G z^T)(n mu I + z z^T)^-1 z) / mu, one batched n x n Cholesky per row count.

        Evaluated in float64 and rounded once: in fp32 the subtraction of nearly equal terms loses
        accuracy as kappa(S + mu I)^2 (scripts/ap_accuracy.py). A layer whose factorization fails
        falls back to the d x d path (same math, robust inverse).
        """
        by_rows: dict[tuple, list[tuple[_LayerStats, torch.Tensor]]] = {}
        for layer in layers:
            Z = layer.kept_rows().double()
            by_rows.setdefault((Z.shape[0], Z.device), []).append((layer, Z))
        for (n, _), group in by_rows.items():
            K = torch.stack([layer.gram(Z) for layer, Z in group])
            mu = self.config.damping * torch.diagonal(K, dim1=-2, dim2=-1).sum(-1) / (n * K.new_tensor([l.dim for l, _ in group]))
            eye = torch.eye(n, device=K.device, dtype=K.dtype)
            L, info = torch.linalg.cholesky_ex(K + (n * mu)[:, None, None] * eye)
            # An explicit n x n inverse then one GEMM beats triangular solves with d_out right-hand sides on CPU.
            K_inv = torch.cholesky_inverse(L) if bool((info == 0).all()) else None
            for i, (layer, Z) in enumerate(group):
                G = layer.grad_matrix()
                G64 = G.to(torch.float64, copy=True)  # M is built in place
                GZt = G64[:, : layer.in_dim] @ Z.T
                if layer.bias is not None:
                    GZt += G64[:, -1:]  # the ones column of the augmented rows
                M = None
                if info[i] == 0 and mu[i] > 0:
                    # (G z^T)(n mu I + z z^T)^-1, d_out x n
                    B = GZt @ K_inv[i] if K_inv is not None else torch.cholesky_solve(GZt.T, L[i]).T
                    M = G64
                    M[:, : layer.in_dim] -= B @ Z
                    if layer.bias is not None:
                        M[:, -1] -= B.sum(1)
                    M /= mu[i]
                if M is None or not torch.isfinite(M.sum()):
                    layer.reduce_kept()
                    P = damped_inverse(layer.batch_second_moment()[None], self.config.damping)[0]
                    M = G.to(P.dtype) @ P
                layer.set_grad_matrix(M.to(G.dtype))

    def _refresh_inverses(self) -> None:
        k = self.config.inverse_interval
        due = [
            layer
            for layer in self.layers
            if layer.S is not None and (layer.P is None or (self.steps + layer.index) % k == 0)
        ]
        world, rank = _world()
        # Under torch.distributed each layer's inverse is computed by one owner rank and broadcast.
        owned = [layer for layer in due if layer.index % world == rank]
        by_shape: dict[tuple, list[_LayerStats]] = {}
        for layer in owned:
            by_shape.setdefault((layer.dim, layer.S.device, layer.S.dtype), []).append(layer)
        for group in by_shape.values():  # one batched Cholesky per shape
            P = damped_inverse(torch.stack([layer.S for layer in group]), self.config.damping)
            for layer, inverse in zip(group, P):
                layer.P = inverse
        if world > 1:
            pending = []
            for layer in due:
                if layer.index % world != rank:
                    dtype = torch.promote_types(layer.S.dtype, torch.float32)
                    layer.P = torch.empty(layer.dim, layer.dim, device=layer.S.device, dtype=dtype)
                pending.append(dist.broadcast(layer.P, src=layer.index % world, async_op=True))
            for handle in pending:
                handle.wait()
        if self.config.ema == 0:
            for layer in due:
                layer.S = None  # not needed again until the next statistics step

    def start_statistics_sync(self) -> None:
        """Launch this step's statistics all-reduce now, so it runs while backward does.

        Call it after the step's last forward pass and before ``backward()``: it commits every
        training forward since the last step as this step's, and ``step()`` waits for it.
        Without the call, ``step()`` all-reduces synchronously. A no-op on one process and on
        steps that record no statistics.
        """
        if _world()[0] > 1 and self._recording() and self._pending_sync is None:
            self._commit_awaiting()  # their backward is about to run
            self._launch_sync()

    def _launch_sync(self) -> None:
        bucket = self._pack_statistics()
        self._pending_sync = (bucket, dist.all_reduce(bucket, async_op=True))

    def _all_reduce(self) -> None:
        if _world()[0] == 1:
            return
        if self._pending_sync is None:
            self._launch_sync()
        bucket, handle = self._pending_sync
        self._pending_sync = None
        handle.wait()
        self._unpack_statistics(bucket)

    def _pack_statistics(self) -> torch.Tensor:
        """One bucket for every statistic and row count of the step (one collective for all layers)."""
        parts = []
        for layer in self.layers:
            layer.reduce_kept()  # rows kept for the batch-space path are reduced like any others
            if layer.xtx is None:
                layer.xtx = torch.zeros(layer.in_dim, layer.in_dim, device=layer.weight.device)
                if layer.bias is not None:
                    layer.xsum = torch.zeros(layer.in_dim, device=layer.weight.device)
            parts += [layer.xtx.flatten()] + ([layer.xsum] if layer.xsum is not None else [])
            parts.append(torch.tensor([float(layer.rows)], device=layer.xtx.device))
        return torch.cat(parts)

    def _unpack_statistics(self, bucket: torch.Tensor) -> None:
        offset = 0
        for layer in self.layers:
            for tensor in [layer.xtx] + ([layer.xsum] if layer.xsum is not None else []):
                tensor.copy_(bucket[offset : offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()
            layer.rows = int(bucket[offset].item())
            offset += 1

    # -- bookkeeping -----------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes held by AP state (statistics accumulators, S, P) right now."""
        total = 0
        for layer in self.layers:
            for t in (layer.xtx, layer.xsum, layer.S, layer.P):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "layers": {layer.name: {"S": layer.S, "P": layer.P} for layer in self.layers},
        }

    def check_state_dict(self, state) -> None:
        """Raise ValueError, naming the layer, unless ``state`` fits this model's AP layers."""
        if not (isinstance(state, Mapping) and "steps" in state and isinstance(state.get("layers"), Mapping)):
            raise ValueError("AP state must be a dict with 'steps' and 'layers', as "
                             f"ActivationPreconditioner.state_dict() returns; got {type(state).__name__} with keys {_keys(state)}")
        saved = state["layers"]
        missing = [layer.name for layer in self.layers if layer.name not in saved]
        if missing:
            raise ValueError(f"AP state has no entry for layers {missing}; was it saved from another model?")
        for layer in self.layers:
            entry = saved[layer.name]
            for key in ("S", "P"):
                value = entry.get(key, "missing") if isinstance(entry, Mapping) else "missing"
                if value is not None and not (torch.is_tensor(value) and value.shape == (layer.dim, layer.dim)):
                    shape = f"has shape {tuple(value.shape)}" if torch.is_tensor(value) else f"is {value!r}"
                    raise ValueError(
                        f"AP state for layer {layer.name!r}: {key} {shape}, but the layer has {layer.dim} "
                        f"inputs ({layer.in_dim}{' + bias' if layer.bias is not None else ''}), so {key} must be "
                        f"{layer.dim} x {layer.dim}; the state was saved from a model of another shape (or another "
                        "ap.bias setting)")

    def load_state_dict(self, state: dict) -> None:
        """Load ``state_dict()``'s output; checked whole before anything changes."""
        self.check_state_dict(state)
        self.steps = int(state["steps"])
        for layer in self.layers:
            entry = state["layers"][layer.name]
            device = layer.weight.device
            layer.S = None if entry["S"] is None else entry["S"].to(device)
            layer.P = None if entry["P"] is None else entry["P"].to(device)


def _keys(value) -> list:
    return sorted(map(str, value)) if isinstance(value, Mapping) else []
