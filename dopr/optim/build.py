"""``build_optimizer(model, name, **hparams)``: the one place that turns a name into an optimizer."""

from __future__ import annotations

import dataclasses
import inspect

from torch import nn

from dopr.optim.dopr import DoPr
from dopr.optim.gp import AdaMuon, Muon, route_params
from dopr.optim.preconditioner import ActivationPreconditioner, APConfig

GP_NAMES = ("adamw", "muon", "signum", "adamuon")
ALIASES = {"adam": "adamw", "dopr_adam": "dopr_adamw"}
KNOWN_OPTIMIZERS = tuple(GP_NAMES) + tuple(f"dopr_{n}" for n in GP_NAMES) + tuple(ALIASES)

AP_KEYS = tuple(f.name for f in dataclasses.fields(APConfig))  # the one name of each AP setting


def _adamw(params, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    import torch

    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)


def _signum(params, lr, weight_decay, momentum=0.9):
    from pytorch_optimizer import SignSGD

    if not 0 < momentum < 1:
        raise ValueError(f"signum: momentum must be in (0, 1) (0 would be plain SignSGD), got {momentum}")
    return SignSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, weight_decouple=True)


def _muon(params, lr, weight_decay, momentum=0.95, nesterov=True, ns_steps=5, ns_dtype="auto"):
    return Muon(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                ns_dtype=ns_dtype)


def _adamuon(params, lr, weight_decay, betas=(0.9, 0.95), eps=1e-8, ns_steps=5, ns_dtype="auto"):
    return AdaMuon(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, ns_steps=ns_steps, ns_dtype=ns_dtype)


_FACTORIES = {"adamw": _adamw, "signum": _signum, "muon": _muon, "adamuon": _adamuon}
_MATRIX_GPS = {"muon", "adamuon"}
_SIDE_KEYS = ("adamw_lr", "adamw_weight_decay", "adamw_betas", "io_to_adamw")


def _keys_of(factory) -> set[str]:
    return set(list(inspect.signature(factory).parameters)[1:])


def build_optimizer(model: nn.Module, name: str, lr: float = 1e-3, weight_decay: float = 0.0,
                    ap: dict | APConfig | None = None, **hparams) -> DoPr:
    """Build ``name`` (see ``KNOWN_OPTIMIZERS``) for ``model``.

    ``dopr_<gp>`` is ``<gp>`` with activation preconditioning on every Linear/Conv layer, configured
    by ``ap``: an :class:`APConfig` or a dict of its fields (damping, ema, stat_interval,
    inverse_interval, max_rows, bias, warmup_steps, exclude, solver), the same names as
    ``opt.ap.<field>`` on the command line. Matrix GPs (muon, adamuon) send the parameters that
    ``route_params`` does not call matrices to AdamW (adamw_lr, adamw_weight_decay, adamw_betas
    default to lr, weight_decay, (0.9, 0.999)). Raises ValueError on an unknown name, unknown key
    or bad value.
    """
    key = ALIASES.get(name, name)
    use_ap = key.startswith("dopr_")
    gp = key.removeprefix("dopr_")
    if gp not in _FACTORIES:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(KNOWN_OPTIMIZERS)}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"{name}: lr must be a number > 0, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(f"{name}: weight_decay must be a number >= 0, got {weight_decay!r}")

    misplaced = sorted(set(hparams) & set(AP_KEYS))
    if misplaced:
        raise ValueError(f"{name}: {misplaced} are activation-preconditioning settings; pass them as "
                         f"ap={{{', '.join(repr(k) + ': ...' for k in misplaced)}}} (opt.ap.<key> on the command line)")
    if ap is not None and not use_ap:
        raise ValueError(f"{name}: ap settings only apply with activation preconditioning (use dopr_{gp})")
    if isinstance(ap, APConfig):
        ap_config = ap
    else:
        unknown_ap = sorted(set(ap or {}) - set(AP_KEYS))
        if unknown_ap:
            raise ValueError(f"{name}: unknown ap settings {unknown_ap}; known: {list(AP_KEYS)}")
        ap_config = APConfig(**(ap or {})) if use_ap else None
    side = {k: hparams.pop(k) for k in list(hparams) if k in _SIDE_KEYS}
    if side and gp not in _MATRIX_GPS:
        raise ValueError(f"{name}: {sorted(side)} only apply to the matrix GPs {sorted(_MATRIX_GPS)}")
    allowed = _keys_of(_FACTORIES[gp]) - {"lr", "weight_decay"}
    unknown = set(hparams) - allowed
    if unknown:
        known = sorted(allowed | {"lr", "weight_decay"} | ({"ap"} if use_ap else set())
                       | (set(_SIDE_KEYS) if gp in _MATRIX_GPS else set()))
        raise ValueError(f"{name}: unknown hyperparameters {sorted(unknown)}; known: {known}")

    if gp in _MATRIX_GPS:
        matrix, other = route_params(model, io_to_adamw=side.get("io_to_adamw", True))
        optimizers = []
        if matrix:
            optimizers.append(_FACTORIES[gp](matrix, lr, weight_decay, **hparams))
        if other:
            optimizers.append(_adamw(other, side.get("adamw_lr", lr), side.get("adamw_weight_decay", weight_decay),
                                     betas=side.get("adamw_betas", (0.9, 0.999))))
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizers = [_FACTORIES[gp](params, lr, weight_decay, **hparams)]
    if not optimizers or not any(g["params"] for o in optimizers for g in o.param_groups):
        raise ValueError(f"{name}: the model has no trainable parameters")

    preconditioner = None
    if use_ap:
        params = [p for o in optimizers for g in o.param_groups for p in g["params"]]
        preconditioner = ActivationPreconditioner(model, ap_config, params=params)
    return DoPr(optimizers, preconditioner)
