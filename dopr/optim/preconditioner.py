"""Activation preconditioning (AP): the part of DoPr that we own.

This module is :class:`ActivationPreconditioner`: hooks, the step, coverage and state. Beside it,
one concern a file: ``config.py`` (APConfig), ``layers.py`` (what AP reads in each layer type),
``statistics.py`` (one layer's statistics), ``solvers.py`` (G P by d x d inverse or in batch space,
and their cost), ``sync.py`` (torch.distributed). Every name once defined here is importable here.

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
layer input (for attention, the inputs of all four projections); the rows are committed to the
step when that forward's backward reaches the layer (a hook on the layer output's gradient), so a
forward whose loss is never backpropagated (a skipped non-finite loss, a rollout in train mode)
adds nothing. ``discard_statistics()`` (which
``DoPr.zero_grad()`` calls) drops committed rows of a step that was abandoned. Micro-batches of
one step are summed (gradient accumulation), and under torch.distributed the sums are all-reduced
in one bucket before use. Each backward's gradient is rewritten once: a second ``step()`` with no
backward in between leaves it alone and does not advance the schedule.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

# Re-exported: these names have always been importable from here.
from dopr.optim.config import BIAS_MODES, SOLVERS, APConfig, check_ap_setting, is_integer, is_number  # noqa: F401
from dopr.optim.layers import SUPPORTED_LAYERS, Block, ModuleHelper, select_layers  # noqa: F401
from dopr.optim.solvers import (  # noqa: F401
    DUAL_FLOP_MARGIN,
    FP64_COST_CPU,
    FP64_COST_GPU_FULL_RATE,
    FP64_COST_GPU_OTHER,
    BatchSpaceFactor,
    damped_cholesky,
    damped_inverse,
    factor_once_cheaper,
    fp64_cost,
    full_fp32_precision,
)
from dopr.optim.statistics import ForwardRecord, LayerStats
from dopr.optim.sync import StatisticsSync, broadcast_inverses, owner, world


class Coverage(dict):
    """``{"preconditioned": [names], "plain": [names]}``: which parameters AP rewrites and which reach
    the gradient preconditioner as they are. A parameter AP covers in part (attention's packed
    ``in_proj_weight`` with one projection excluded) is listed in both, with its rows:
    ``att.in_proj_weight[rows 0:8]``. ``str()`` is a readable report."""

    def __str__(self) -> str:
        done, plain = self["preconditioned"], self["plain"]
        lines = [f"AP preconditions {len(done)} of {len(done) + len(plain)} parameters; the rest get the plain GP"]
        lines += [f"  AP + GP   {name}" for name in done]
        lines += [f"  GP only   {name}" for name in plain]
        return "\n".join(lines)


class ActivationPreconditioner:
    """Hooks a model's supported layers (see :mod:`dopr.optim.layers`) and rewrites their gradients to G P.

    Use standalone between ``loss.backward()`` and ``optimizer.step()`` (call ``step()``), or let
    :class:`dopr.optim.DoPr` call it. Only layers whose weight is in ``params`` (when given) and
    requires grad are preconditioned; ``config.exclude`` removes layers by name (see
    :func:`select_layers`, which refuses a pattern that matches nothing and a model with no layer).
    ``coverage()`` says which parameters that leaves to the plain GP.

    Each backward's gradient is preconditioned once: a ``step()`` with no backward since the last
    one leaves the (already preconditioned) gradients alone and does not count as a step for the
    statistics / inverse schedule or the warmup. A layer whose weight gets a gradient on a
    statistics step without any of its inputs recorded (its weight used without calling the module,
    or a forward in eval mode) is named in a warning, once.
    """

    def __init__(self, model: nn.Module, config: APConfig | None = None, params: Iterable[torch.Tensor] | None = None):
        self.config = config or APConfig()
        self.layers: list[LayerStats] = []
        self._handles = []
        self._blocks_of: dict[ModuleHelper, list[LayerStats | None]] = {}  # each block's stats (None: not selected)
        for helper, blocks in select_layers(model, self.config, params):
            chosen = {id(b) for b in blocks}
            stats = []
            for block in helper.blocks:
                stats.append(LayerStats(block, len(self.layers)) if id(block) in chosen else None)
                if stats[-1] is not None:
                    self.layers.append(stats[-1])
            self._blocks_of[helper] = stats
            self._handles += helper.register(self._should_record, self._on_forward)
        # Every parameter in AP's scope, by name: for coverage() and DoPr's messages.
        wanted = None if params is None else {id(p) for p in params}
        self.param_names = {id(p): name for name, p in model.named_parameters()}
        self._scope = [(name, p) for name, p in model.named_parameters()
                       if p.requires_grad and (wanted is None or id(p) in wanted)]
        self.steps = 0  # completed optimizer steps
        self._keep_rows = self.config.batch_space_allowed()
        self._sync = StatisticsSync()
        self._warned_non_finite = False
        # Form every inverse as P even where it is applied once (scripts/bench_optim.py times both ways).
        self.always_form_inverse = False

    # -- hooks -----------------------------------------------------------------------------------
    def _recording(self) -> bool:
        return self.steps % self.config.stat_interval == 0

    def _should_record(self, module: nn.Module) -> bool:
        # Only the optimized step's own passes count: no eval passes, no no_grad rollouts, and
        # (through the gradient hook) no forward whose loss is never backpropagated.
        return module.training and torch.is_grad_enabled() and self._recording()

    def _on_forward(self, helper: ModuleHelper, inputs: list, outputs: list) -> None:
        """A recorded forward of ``helper``'s module: its blocks' inputs wait for that forward's backward."""
        outputs = [o for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad]
        if not outputs:
            return
        records = []
        for layer, x in zip(self._blocks_of[helper], inputs):
            if layer is None or x is None:
                continue
            record = ForwardRecord(x.detach(), self.steps)
            layer.awaiting.append(record)
            records.append((layer, record))

        def commit(grad):  # the backward reached the module: this forward belongs to the step
            for layer, record in records:
                self._commit(layer, record)

        for output in outputs:  # whichever gradient comes first; a record commits once
            output.register_hook(commit)

    def _commit(self, layer: LayerStats, record: ForwardRecord) -> None:
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
        self._sync.drop()

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
        not count as a step for ``stat_interval``, ``inverse_interval`` or ``start_step``.
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
            single_process = world()[0] == 1
            for layer in self.layers:
                if layer.kept:
                    if (single_process and self.steps >= cfg.start_step and layer.batch_space_cheaper()
                            and id(layer) in new):
                        batch_space.append(layer)
                    else:
                        layer.reduce_kept()
            if world()[0] > 1:
                self._sync.finish(self.layers)
            for layer in self.layers:
                if layer.rows == 0 and id(layer) in new:
                    self._warn_missing(layer)
                if layer.rows == 0 or layer in batch_space:
                    continue
                S_batch = layer.batch_second_moment()
                if not bool(torch.isfinite(S_batch.sum())):
                    self._warn_non_finite(layer)
                    continue  # never enters S or its EMA; the layer keeps its last inverse
                if cfg.stat_decay > 0 and layer.S is not None:
                    # .to: after a model.double() / .bfloat16() the average continues in the new precision
                    layer.S = layer.S.to(S_batch).mul_(cfg.stat_decay).add_(S_batch, alpha=1 - cfg.stat_decay)
                else:
                    layer.S = S_batch
        self._refresh_inverses()
        if batch_space:
            self._batch_space_step(batch_space)
        for layer in self.layers:
            layer.reset()
        if self.steps >= cfg.start_step:
            for layer in self.layers:
                if id(layer) not in new or not layer.has_inverse() or layer in batch_space:
                    continue
                layer.set_grad_matrix(layer.apply_inverse(layer.grad_matrix()))

    def _warn_non_finite(self, layer: LayerStats) -> None:
        if not self._warned_non_finite:
            warnings.warn(f"AP: non-finite layer inputs at step {self.steps} (first: {layer.name!r}); that step's "
                          "statistics are skipped and the layer keeps its last inverse (warned once)")
            self._warned_non_finite = True

    def _warn_missing(self, layer: LayerStats) -> None:
        """A weight got a gradient on a statistics step, but no input of the layer was recorded."""
        if layer.warned_missing:
            return
        layer.warned_missing = True
        now = "keeps its last inverse" if layer.has_inverse() else "gets its plain gradient"
        warnings.warn(
            f"AP: layer {layer.name!r} ({type(layer.module).__name__}) got a gradient at step {self.steps} but none "
            "of its inputs was recorded: no training-mode forward of the module with grad enabled led to that "
            "gradient (its weight used without calling the module, or the module in eval mode). The layer "
            f"{now} until its inputs arrive; exclude it (ap.exclude) to silence this (warned once per layer)")

    def _batch_space_step(self, layers: list[LayerStats]) -> None:
        """G P = (G - (G z^T)(n mu I + z z^T)^-1 z) / mu, one batched n x n Cholesky per row count.

        Evaluated in float64 and rounded once: in fp32 the subtraction of nearly equal terms loses
        accuracy as kappa(S + mu I)^2 (scripts/ap_accuracy.py). A layer whose factorization fails
        falls back to the d x d path (same math, robust inverse).
        """
        by_rows: dict[tuple, list[tuple[LayerStats, torch.Tensor]]] = {}
        for layer in layers:
            Z = layer.kept_rows().double()
            by_rows.setdefault((Z.shape[0], Z.device), []).append((layer, Z))
        for group in by_rows.values():
            K = torch.stack([layer.gram(Z) for layer, Z in group])
            factor = BatchSpaceFactor.of(K, [layer.dim for layer, _ in group], self.config.damping)
            for i, (layer, Z) in enumerate(group):
                G = layer.grad_matrix()
                M = factor.apply(i, G, Z)
                if M is None:
                    layer.reduce_kept()
                    P = damped_inverse(layer.batch_second_moment()[None], self.config.damping)[0]
                    M = G.to(P.dtype) @ P
                layer.set_grad_matrix(M.to(G.dtype))

    def _refresh_inverses(self) -> None:
        k = self.config.inverse_interval
        due = [
            layer
            for layer in self.layers
            if layer.S is not None and (not layer.has_inverse() or (self.steps + layer.index) % k == 0)
        ]
        world_size, rank = world()
        # Under torch.distributed each layer's inverse is computed by one owner rank and broadcast.
        owned = [layer for layer in due if owner(layer, world_size) == rank]
        by_shape: dict[tuple, list[LayerStats]] = {}
        for layer in owned:
            by_shape.setdefault((layer.dim, layer.S.device, layer.S.dtype), []).append(layer)
        for (_, device, _), group in by_shape.items():  # one batched Cholesky per shape
            # torch.stack makes a new tensor, so the damping may go onto it: one pass over S saved
            factors = (damped_cholesky(torch.stack([layer.S for layer in group]), self.config.damping, overwrite=True)
                       if self._applied_once(device, world_size) else None)
            if factors is not None:
                for layer, factor in zip(group, factors):
                    layer.set_inverse(factor=factor)
                continue
            S = torch.stack([layer.S for layer in group])
            for layer, inverse in zip(group, damped_inverse(S, self.config.damping)):
                layer.set_inverse(P=inverse)
        if world_size > 1:
            broadcast_inverses(due, world_size, rank)
        if self.config.stat_decay == 0:
            for layer in due:
                layer.S = None  # not needed again until the next statistics step

    def _applied_once(self, device: torch.device, world_size: int) -> bool:
        """Whether a fresh inverse is used for one step only (statistics and inverse every step), so that
        solving with its factor beats forming it (solvers.factor_once_cheaper). Under torch.distributed
        the owner rank broadcasts P itself."""
        cfg = self.config
        return (cfg.stat_interval == 1 and cfg.inverse_interval == 1 and world_size == 1
                and factor_once_cheaper(device) and not self.always_form_inverse)

    def start_statistics_sync(self) -> None:
        """Launch this step's statistics all-reduce now, so it runs while backward does.

        Call it after the step's last forward pass and before ``backward()``: it commits every
        training forward since the last step as this step's, and ``step()`` waits for it.
        Without the call, ``step()`` all-reduces synchronously. A no-op on one process and on
        steps that record no statistics.
        """
        if world()[0] > 1 and self._recording() and self._sync.pending is None:
            self._commit_awaiting()  # their backward is about to run
            self._sync.launch(self.layers)

    # -- coverage --------------------------------------------------------------------------------
    def coverage(self, params: Iterable[torch.Tensor] | None = None) -> Coverage:
        """Which parameters AP preconditions and which go to the plain GP, by name (see :class:`Coverage`).

        Over ``params`` when given (DoPr passes its inner optimizers'), else over the model's trainable
        parameters in AP's scope. Names are the model's; an unnamed parameter is described by shape.
        """
        if params is None:
            scope = list(self._scope)
        else:
            scope = [(self.param_names.get(id(p), f"<unnamed {tuple(p.shape)}>"), p) for p in params]
        rows: dict[int, list[slice | None]] = {}
        for layer in self.layers:
            for param, part in layer.block.covers():
                rows.setdefault(id(param), []).append(part)
        done, plain = [], []
        for name, p in scope:
            parts = rows.get(id(p))
            if parts is None:
                plain.append(name)
                continue
            covered = {i for r in parts for i in (range(p.shape[0]) if r is None else range(p.shape[0])[r])}
            if len(covered) == p.shape[0]:
                done.append(name)
                continue
            done += [f"{name}[rows {a}:{b}]" for a, b in _spans(sorted(covered))]
            plain += [f"{name}[rows {a}:{b}]" for a, b in _spans(sorted(set(range(p.shape[0])) - covered))]
        return Coverage(preconditioned=done, plain=plain)

    # -- bookkeeping -----------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes held by AP state (statistics accumulators, S, the inverse or its factor) right now."""
        total = 0
        for layer in self.layers:
            for t in (layer.xtx, layer.xsum, layer.S, layer.P, layer.factor):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            # P as a matrix even where the layer holds its factor, so that a state loads into any setting.
            "layers": {layer.name: {"S": layer.S, "P": layer.inverse()} for layer in self.layers},
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
            layer.set_inverse(P=None if entry["P"] is None else entry["P"].to(device))


def _keys(value) -> list:
    return sorted(map(str, value)) if isinstance(value, Mapping) else []


def _spans(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted row indices as [start, stop) runs."""
    spans: list[tuple[int, int]] = []
    for i in indices:
        if spans and spans[-1][1] == i:
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    return spans
