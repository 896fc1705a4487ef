"""DoPr = AP o GP: one torch.optim.Optimizer that preconditions gradients by activations, then
hands them to any gradient preconditioner(s). With AP off it is exactly the plain GP."""

from __future__ import annotations

from collections import ChainMap
from typing import Sequence

import torch
from torch.optim import Optimizer

from dopr.optim.gp import evaluate_closure
from dopr.optim.preconditioner import ActivationPreconditioner


class DoPr(Optimizer):
    """Compose an :class:`ActivationPreconditioner` (or None) with one or more inner optimizers.

    ``param_groups`` are the inner optimizers' own group dicts, so LR schedulers, ``zero_grad`` and
    group edits reach them directly. ``step()`` rewrites gradients with AP, then steps every inner
    optimizer. Several inner optimizers let a matrix GP (Muon) and AdamW share one optimizer.
    """

    def __init__(self, optimizers: Optimizer | Sequence[Optimizer], preconditioner: ActivationPreconditioner | None = None):
        self.optimizers = [optimizers] if isinstance(optimizers, Optimizer) else list(optimizers)
        if not self.optimizers:
            raise ValueError("DoPr needs at least one inner optimizer")
        self.preconditioner = preconditioner
        self._wired = False
        params = [p for o in self.optimizers for g in o.param_groups for p in g["params"]]
        super().__init__(params, {})  # sets up torch's hook machinery; groups stay in the inner optimizers
        self._wired = True

    # The groups and state live in the inner optimizers; these views keep torch's API working.
    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    @param_groups.setter
    def param_groups(self, value):
        pass  # Optimizer.__init__ assigns an empty list here; the inner optimizers own the groups

    @property
    def state(self):
        return ChainMap(*[o.state for o in self.optimizers])

    @state.setter
    def state(self, value):
        pass

    def add_param_group(self, param_group: dict) -> None:
        if self._wired:
            raise NotImplementedError("add parameter groups to the inner optimizer, then rebuild DoPr")

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        if self.preconditioner is not None:
            self.preconditioner.step()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the inner optimizers' gradients and drop AP statistics of a step not taken.

        After ``step()`` there are none to drop; after a skipped step (non-finite loss after
        backward, abandoned accumulation) the rows would otherwise leak into the next step.
        """
        if self.preconditioner is not None:
            self.preconditioner.discard_statistics()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {
            "optimizers": [o.state_dict() for o in self.optimizers],
            "preconditioner": None if self.preconditioner is None else self.preconditioner.state_dict(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["optimizers"]
        if len(saved) != len(self.optimizers):
            raise ValueError(f"state has {len(saved)} inner optimizers, this DoPr has {len(self.optimizers)}")
        for optimizer, state in zip(self.optimizers, saved):
            optimizer.load_state_dict(state)
        if (state_dict["preconditioner"] is None) != (self.preconditioner is None):
            raise ValueError("state and optimizer disagree on whether activation preconditioning is on")
        if self.preconditioner is not None:
            self.preconditioner.load_state_dict(state_dict["preconditioner"])

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held by optimizer state: the GP's and AP's (the overhead DoPr adds)."""
        gp = sum(
            t.numel() * t.element_size()
            for o in self.optimizers
            for s in o.state.values()
            for t in s.values()
            if torch.is_tensor(t)
        )
        ap = 0 if self.preconditioner is None else self.preconditioner.memory_bytes()
        return {"gp": gp, "ap": ap}

    def __repr__(self) -> str:
        inner = ", ".join(type(o).__name__ for o in self.optimizers)
        ap = "off" if self.preconditioner is None else f"on, {len(self.preconditioner.layers)} layers"
        return f"DoPr(GP=[{inner}], AP={ap})"
