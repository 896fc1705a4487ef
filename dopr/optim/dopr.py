"""DoPr = AP o GP: one torch.optim.Optimizer that preconditions gradients by activations, then
hands them to any gradient preconditioner(s). With AP off it is exactly the plain GP."""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Mapping
from typing import Sequence

import torch
from torch.optim import Optimizer

from dopr.optim.gp import AdaMuon, Muon, evaluate_closure
from dopr.optim.preconditioner import ActivationPreconditioner, Coverage


class DoPr(Optimizer):
    """Compose an :class:`ActivationPreconditioner` (or None) with one or more inner optimizers.

    ``param_groups`` are the inner optimizers' own group dicts, so LR schedulers, ``zero_grad`` and
    group edits reach them directly. ``step()`` rewrites gradients with AP, then steps every inner
    optimizer. Several inner optimizers let a matrix GP (Muon) and AdamW share one optimizer; each
    parameter belongs to exactly one of them.

    ``state_dict()`` is ``{"optimizers": [each inner state dict], "preconditioner": AP's}``: load it
    into a DoPr built the same way. A plain torch optimizer cannot read it (torch raises
    ``KeyError: 'param_groups'``); give ``state_dict()["optimizers"][i]`` to the plain optimizer instead.
    """

    def __init__(self, optimizers: Optimizer | Sequence[Optimizer], preconditioner: ActivationPreconditioner | None = None):
        self.optimizers = [optimizers] if isinstance(optimizers, Optimizer) else list(optimizers)
        if not self.optimizers:
            raise ValueError("DoPr needs at least one inner optimizer")
        self.preconditioner = preconditioner
        _check_disjoint(self.optimizers, _param_names(preconditioner))
        self._wired = False
        params = [p for o in self.optimizers for g in o.param_groups for p in g["params"]]
        super().__init__(params, {})  # sets up torch's hook machinery; groups stay in the inner optimizers
        self._wired = True
        self._param_kinds = _param_kinds(self.optimizers)

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
        kinds = _param_kinds(self.optimizers)
        if kinds != self._param_kinds:  # model.double(), .bfloat16() or .to(device) after construction
            for optimizer in self.optimizers:
                _follow_params(optimizer, self._param_kinds)
            self._param_kinds = kinds
        if self.preconditioner is not None:
            self.preconditioner.step()
        for optimizer in self.optimizers:
            optimizer.step()
        if self.preconditioner is not None:
            self.preconditioner.remember_gradients()  # an inner step may have changed a gradient in place
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
        """Load ``state_dict()``'s output. Everything is checked before anything changes: group
        structure, every state tensor's shape against its parameter, AP's on/off and layers."""
        if isinstance(state_dict, Mapping) and "param_groups" in state_dict and "optimizers" not in state_dict:
            raise ValueError(
                "DoPr.load_state_dict got a plain torch optimizer's state dict (keys 'state', 'param_groups'), "
                "not DoPr's (keys 'optimizers', 'preconditioner'). Load the DoPr state saved with the run, or, "
                "to start from a plain optimizer's state, load it into the inner optimizer: "
                "opt.optimizers[0].load_state_dict(state) (AP's statistics then start fresh)")
        if not (isinstance(state_dict, Mapping) and isinstance(state_dict.get("optimizers"), (list, tuple))
                and "preconditioner" in state_dict):
            raise ValueError("DoPr.load_state_dict expects DoPr.state_dict()'s output, a dict with 'optimizers' "
                             f"(a list) and 'preconditioner'; got {type(state_dict).__name__} with keys {_keys(state_dict)}")
        saved = state_dict["optimizers"]
        if len(saved) != len(self.optimizers):
            raise ValueError(f"state has {len(saved)} inner optimizers, this DoPr has {len(self.optimizers)}: "
                             "build the optimizer the state was saved from (same name, same model)")
        if state_dict["preconditioner"] is None and self.preconditioner is not None:
            raise ValueError(
                "the state was saved with activation preconditioning off (e.g. adamw) and this optimizer has it on "
                "(e.g. dopr_adamw): build the optimizer the state was saved from; or, to switch AP on from that "
                "state, load each state['optimizers'][i] into opt.optimizers[i] (AP's statistics start fresh)")
        if state_dict["preconditioner"] is not None and self.preconditioner is None:
            raise ValueError(
                "the state was saved with activation preconditioning on (e.g. dopr_adamw) and this optimizer has it "
                "off (e.g. adamw): build the optimizer the state was saved from; or, to go on without AP, load each "
                "state['optimizers'][i] into opt.optimizers[i]")
        names = _param_names(self.preconditioner)
        for i, (optimizer, state) in enumerate(zip(self.optimizers, saved)):
            _check_inner_state(i, optimizer, state, names)
        if self.preconditioner is not None:
            self.preconditioner.check_state_dict(state_dict["preconditioner"])
        for optimizer, state in zip(self.optimizers, saved):
            optimizer.load_state_dict(state)
        if self.preconditioner is not None:
            self.preconditioner.load_state_dict(state_dict["preconditioner"])
        self._param_kinds = _param_kinds(self.optimizers)  # torch cast the state to the parameters'

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held by optimizer state: the GP's (every tensor of the inner optimizers' state, those in
        lists and dicts included, as SOAP's and Kron's factors are; each storage once) and AP's (the
        overhead DoPr adds)."""
        seen, gp = set(), 0

        def walk(value):
            nonlocal gp
            if torch.is_tensor(value):
                key = (value.device, value.untyped_storage().data_ptr())
                if not value.numel() or key not in seen:
                    seen.add(key)
                    gp += value.numel() * value.element_size()
            elif isinstance(value, dict):
                for v in value.values():
                    walk(v)
            elif isinstance(value, (list, tuple)):
                for v in value:
                    walk(v)

        for o in self.optimizers:
            for s in o.state.values():
                walk(s)
        ap = 0 if self.preconditioner is None else self.preconditioner.memory_bytes()
        return {"gp": gp, "ap": ap}

    def coverage(self) -> Coverage:
        """Which of the inner optimizers' parameters AP preconditions and which get the plain GP:
        ``{"preconditioned": [names], "plain": [names]}``; ``print(opt.coverage())`` is a report."""
        params = [p for o in self.optimizers for g in o.param_groups for p in g["params"]]
        if self.preconditioner is not None:
            return self.preconditioner.coverage(params)
        plain = [f"inner optimizer {i}, group {g}, index {j} (shape {tuple(p.shape)})"
                 for i, o in enumerate(self.optimizers) for g, group in enumerate(o.param_groups)
                 for j, p in enumerate(group["params"])]
        return Coverage(preconditioned=[], plain=plain)

    def __repr__(self) -> str:
        inner = ", ".join(type(o).__name__ for o in self.optimizers)
        ap = "off" if self.preconditioner is None else f"on, {len(self.preconditioner.layers)} layers"
        return f"DoPr(GP=[{inner}], AP={ap})"


def _keys(value) -> list:
    return sorted(map(str, value)) if isinstance(value, Mapping) else []


def _param_names(preconditioner: ActivationPreconditioner | None) -> dict[int, str]:
    """Names for error messages: the model's parameter names, which DoPr knows through AP."""
    return {} if preconditioner is None else dict(preconditioner.param_names)


def _describe(param: torch.Tensor, names: dict[int, str], where: str) -> str:
    name = names.get(id(param))
    return f"{name!r} ({where}, shape {tuple(param.shape)})" if name else f"{where} (shape {tuple(param.shape)})"


def _check_disjoint(optimizers: list[Optimizer], names: dict[int, str]) -> None:
    """Each parameter in one inner optimizer only: in two, every step() would update it twice."""
    owner: dict[int, int] = {}
    shared = []
    for i, optimizer in enumerate(optimizers):
        for g, group in enumerate(optimizer.param_groups):
            for j, p in enumerate(group["params"]):
                if owner.get(id(p), i) != i:
                    shared.append(_describe(p, names, f"inner optimizers {owner[id(p)]} and {i}; group {g}, index {j}"))
                owner.setdefault(id(p), i)
    if shared:
        raise ValueError(f"DoPr: {len(shared)} parameter(s) are in more than one inner optimizer, so step() would "
                         f"update them twice: {'; '.join(shared[:10])}. Give each parameter to one inner optimizer "
                         "(dopr.optim.route_params splits a model between a matrix GP and AdamW)")


# Optimizers whose every non-scalar state tensor has its parameter's shape (Muon's: the 2-D view).
# Others (a user's Shampoo, Adafactor) keep state of other shapes, so it is not checked for them.
_ELEMENTWISE_STATE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, Muon, AdaMuon)


def _elementwise_state(optimizer: Optimizer) -> bool:
    kind = type(optimizer)
    return isinstance(optimizer, _ELEMENTWISE_STATE) or (kind.__module__.startswith("pytorch_optimizer")
                                                          and kind.__name__ == "SignSGD")


def _check_inner_state(i: int, optimizer: Optimizer, state, names: dict[int, str]) -> None:
    """What torch's ``load_state_dict`` would find wrong (group sizes), and what it would not find
    until the first step (a state tensor of another shape than its parameter), without changing anything."""
    what = f"inner optimizer {i} ({type(optimizer).__name__})"
    if not (isinstance(state, Mapping) and isinstance(state.get("state"), Mapping)
            and isinstance(state.get("param_groups"), (list, tuple))):
        raise ValueError(f"{what}: its saved state is not a torch optimizer state dict (keys 'state', 'param_groups'); "
                         f"got keys {_keys(state)}")
    saved_sizes = [len(g["params"]) for g in state["param_groups"]]
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if saved_sizes != sizes:
        raise ValueError(f"{what}: the state has parameter groups of sizes {saved_sizes}, this optimizer {sizes}: "
                         "it was saved from another model or optimizer; build the one it was saved from")
    if not _elementwise_state(optimizer):
        return
    for g, (saved_group, group) in enumerate(zip(state["param_groups"], optimizer.param_groups)):
        for j, (key, p) in enumerate(zip(saved_group["params"], group["params"])):
            entry = state["state"].get(key)
            allowed = {tuple(p.shape)} | ({(p.shape[0], p.numel() // p.shape[0])} if p.ndim and p.shape[0] else set())
            for name, value in (entry.items() if isinstance(entry, Mapping) else ()):
                if name == "step" or not torch.is_tensor(value) or value.ndim == 0 or tuple(value.shape) in allowed:
                    continue
                raise ValueError(
                    f"{what}: the saved {name!r} of parameter {_describe(p, names, f'group {g}, index {j}')} has "
                    f"shape {tuple(value.shape)}; the state was saved from a model of another shape. Load it into "
                    "the model it was saved from, or start this optimizer fresh")


def _param_kinds(optimizers: list[Optimizer]) -> dict[int, tuple]:
    return {id(p): (p.dtype, p.device) for o in optimizers for g in o.param_groups for p in g["params"]}


def _follow_params(optimizer: Optimizer, old_kinds: dict[int, tuple]) -> None:
    """Move a parameter's elementwise state to its new dtype / device after the model was converted.

    This is what torch's own ``load_state_dict`` does with saved state (casts it to the parameter's
    dtype and device), so stepping on equals saving the optimizer state and loading it into a
    rebuilt optimizer. Only state that followed the parameter is moved: tensors of its size in its
    old dtype / on its old device; Adam's ``step`` stays as torch keeps it.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            old_dtype, old_device = old_kinds.get(id(p), (p.dtype, p.device))
            if not state or (p.dtype, p.device) == (old_dtype, old_device):
                continue
            for key, value in state.items():
                if key == "step" or not torch.is_tensor(value) or value.numel() != p.numel():
                    continue
                dtype = p.dtype if value.dtype == old_dtype and value.is_floating_point() else value.dtype
                device = p.device if value.device == old_device else value.device
                state[key] = value.to(device=device, dtype=dtype)
