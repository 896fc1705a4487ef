"""``build_optimizer(model, name, **hparams)``: the one place that turns a name into an optimizer."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence

from torch import nn

from dopr.optim.config import AP_PRESETS, APConfig, check_ap_setting, is_integer, is_number
from dopr.optim.dopr import DoPr
from dopr.optim.gp import AdaMuon, Muon, route_params
from dopr.optim.preconditioner import ActivationPreconditioner

GP_NAMES = ("adamw", "muon", "signum", "adamuon", "sgd", "soap", "kron")
# GPs that are pytorch-optimizer's classes (the optimizers extra): imported only when built.
PYTORCH_OPTIMIZER_GPS = {"signum": "SignSGD", "soap": "SOAP", "kron": "Kron"}
ALIASES = {"adam": "adamw", "dopr_adam": "dopr_adamw"}
KNOWN_OPTIMIZERS = (tuple(GP_NAMES) + tuple(f"dopr_{n}" for n in GP_NAMES) + tuple(ALIASES)
                    + tuple(f"dopr_{n}_{preset}" for preset in AP_PRESETS for n in GP_NAMES))

AP_KEYS = tuple(f.name for f in dataclasses.fields(APConfig))  # the one name of each AP setting


def _adamw(params, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    import torch

    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)


def _pytorch_optimizer(gp: str):
    """pytorch-optimizer's class for ``gp``; the core install (pip install dopr) brings torch alone."""
    try:
        import pytorch_optimizer
    except ImportError:
        raise ImportError(f"{gp} and dopr_{gp} are pytorch-optimizer's {PYTORCH_OPTIMIZER_GPS[gp]}, which the core "
                          f"install leaves out: pip install 'dopr[optimizers]' (or pip install pytorch-optimizer)") from None
    return getattr(pytorch_optimizer, PYTORCH_OPTIMIZER_GPS[gp])


def _signum(params, lr, weight_decay, momentum=0.9):
    return _pytorch_optimizer("signum")(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                        weight_decouple=True)


def _sgd(params, lr, weight_decay, momentum=0.9, nesterov=False):
    """torch's SGD with momentum: with AP, DoPr without a gradient preconditioner (the paper's claim that
    the GP is needed is dopr_sgd against dopr_adamw). Its weight decay is torch's, added to the gradient."""
    import torch

    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


def _soap(params, lr, weight_decay, betas=(0.95, 0.95), precondition_frequency=10, eps=1e-8):
    """SOAP (Vyas et al. 2024): Adam in Shampoo's eigenbasis; pytorch-optimizer's defaults."""
    return _pytorch_optimizer("soap")(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                      precondition_frequency=precondition_frequency, eps=eps)


def _kron(params, lr, weight_decay, momentum=0.9):
    """PSGD-Kron (Li 2015; pytorch-optimizer's port): its own preconditioner-update schedule."""
    import torch

    # Kron applies its factors in one many-operand einsum; torch orders the contraction only with opt_einsum,
    # and without it goes through the factors' d1²·d2² outer product (measured: 32 GB asked for on a
    # 256 x 348 layer, 44 s a step on the lm_arith GPT against 47 ms with it)
    if not torch.backends.opt_einsum.is_available():
        raise ImportError("kron and dopr_kron need the opt_einsum package, which torch uses to order Kron's einsum "
                          "(without it: out of memory or 100-1000x slower): pip install 'dopr[optimizers]' "
                          "(or pip install opt_einsum)")
    return _pytorch_optimizer("kron")(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      weight_decouple=True)


def _muon(params, lr, weight_decay, momentum=0.95, nesterov=True, ns_steps=5, ns_dtype="auto"):
    return Muon(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                ns_dtype=ns_dtype)


def _adamuon(params, lr, weight_decay, betas=(0.9, 0.95), eps=1e-8, ns_steps=5, ns_dtype="auto"):
    return AdaMuon(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, ns_steps=ns_steps, ns_dtype=ns_dtype)


_FACTORIES = {"adamw": _adamw, "signum": _signum, "muon": _muon, "adamuon": _adamuon, "sgd": _sgd, "soap": _soap,
              "kron": _kron}
_MATRIX_GPS = {"muon", "adamuon"}
_SIDE_KEYS = ("adamw_lr", "adamw_weight_decay", "adamw_betas", "io_to_adamw")


def _keys_of(factory) -> set[str]:
    return set(list(inspect.signature(factory).parameters)[1:])


def _betas(value) -> bool:
    return (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
            and all(is_number(b) and 0 <= b < 1 for b in value))


def _tuple_of_floats(value) -> tuple:
    return tuple(float(b) for b in value)


def _same(value):
    return value


# hyperparameter -> (is the value valid, its normalized form, the expected form for the error message)
_LR = (lambda v: is_number(v) and v > 0, float, "a number > 0, e.g. 1e-3")
_WEIGHT_DECAY = (lambda v: is_number(v) and v >= 0, float, "a number >= 0, e.g. 0.01")
_BETAS = (_betas, _tuple_of_floats, "a list of two numbers in [0, 1), e.g. [0.9, 0.999]")
_FLAG = (lambda v: isinstance(v, bool), _same, "true or false")
_HPARAMS = {
    "lr": _LR,
    "weight_decay": _WEIGHT_DECAY,
    "betas": _BETAS,
    "eps": (lambda v: is_number(v) and v >= 0, float, "a number >= 0, e.g. 1e-8"),
    "momentum": (lambda v: is_number(v) and 0 <= v < 1, float, "a number in [0, 1), e.g. 0.95"),
    "nesterov": _FLAG,
    "ns_steps": (lambda v: is_integer(v) and v >= 1, int, "an integer >= 1, e.g. 5"),
    "precondition_frequency": (lambda v: is_integer(v) and v >= 1, int, "an integer >= 1, e.g. 10"),
    "ns_dtype": (lambda v: v in ("auto", "bfloat16", "float32", "float64"), _same,
                 "one of auto, bfloat16, float32, float64"),
    "adamw_lr": _LR,
    "adamw_weight_decay": _WEIGHT_DECAY,
    "adamw_betas": _BETAS,
    "io_to_adamw": _FLAG,
}
# Where one GP reads a name differently.
_GP_HPARAMS = {
    ("signum", "momentum"): (lambda v: is_number(v) and 0 < v < 1, float,
                             "a number in (0, 1), e.g. 0.9 (0 would be plain SignSGD)"),
}


@dataclasses.dataclass
class _Plan:
    """A validated optimizer request: what ``build_optimizer`` builds."""

    gp: str
    lr: float
    weight_decay: float
    ap: APConfig | None  # None: AP off
    hparams: dict  # the GP factory's own keyword arguments
    side: dict  # the AdamW side of a matrix GP


def _checked(name: str, gp: str, key: str, value):
    valid, normalize, form = _GP_HPARAMS.get((gp, key), _HPARAMS[key])
    if not valid(value):  # each check tests the type before comparing, so a str never reaches `>`
        raise ValueError(f"{name}: opt.{key} must be {form}; got {value!r}")
    return normalize(value)


def _plan(name, lr, weight_decay, ap, hparams: dict) -> _Plan:
    """Every check that needs no model, in the order a user would fix them; raises ValueError."""
    key = ALIASES.get(name, name) if isinstance(name, str) else None
    preset = {}
    if isinstance(key, str) and key.startswith("dopr_") and key.rpartition("_")[2] in AP_PRESETS:
        key, _, preset_name = key.rpartition("_")
        preset = AP_PRESETS[preset_name]
        if isinstance(ap, APConfig):
            raise ValueError(f"{name}: the {preset_name!r} preset sets {sorted(preset)}; with an APConfig, build "
                             f"{key} instead (or pass ap as a dict of the settings to change)")
        ap = {**preset, **(ap or {})}
    use_ap = isinstance(key, str) and key.startswith("dopr_")
    gp = key.removeprefix("dopr_") if isinstance(key, str) else None
    if gp not in _FACTORIES:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(KNOWN_OPTIMIZERS)}")
    lr = _checked(name, gp, "lr", lr)
    weight_decay = _checked(name, gp, "weight_decay", weight_decay)

    misplaced = sorted(set(hparams) & set(AP_KEYS))
    if misplaced:
        raise ValueError(f"{name}: {misplaced} are activation-preconditioning settings; pass them as "
                         f"ap={{{', '.join(repr(k) + ': ...' for k in misplaced)}}} (opt.ap.<key> on the command line)")
    if ap is not None and not use_ap:
        raise ValueError(f"{name}: ap settings only apply with activation preconditioning (use dopr_{gp})")
    if isinstance(ap, APConfig):
        ap_config = ap
    elif ap is None or isinstance(ap, Mapping):
        unknown_ap = sorted(map(str, set(ap or {}) - set(AP_KEYS)))
        if unknown_ap:
            raise ValueError(f"{name}: unknown ap settings {unknown_ap}; known: {list(AP_KEYS)}")
        settings = {}
        for k, v in (ap or {}).items():
            try:
                settings[k] = check_ap_setting(k, v)
            except ValueError as error:
                raise ValueError(f"{name}: opt.ap.{error}") from None
        ap_config = APConfig(**settings) if use_ap else None
    else:
        raise ValueError(f"{name}: opt.ap must be a dict of activation-preconditioning settings "
                         f"({', '.join(AP_KEYS)}) or an APConfig; got {ap!r}")

    hparams = dict(hparams)
    side = {k: hparams.pop(k) for k in list(hparams) if k in _SIDE_KEYS}
    if side and gp not in _MATRIX_GPS:
        raise ValueError(f"{name}: {sorted(side)} only apply to the matrix GPs {sorted(_MATRIX_GPS)}")
    allowed = _keys_of(_FACTORIES[gp]) - {"lr", "weight_decay"}
    unknown = set(hparams) - allowed
    if unknown:
        known = sorted(allowed | {"lr", "weight_decay"} | ({"ap"} if use_ap else set())
                       | (set(_SIDE_KEYS) if gp in _MATRIX_GPS else set()))
        raise ValueError(f"{name}: unknown hyperparameters {sorted(map(str, unknown))}; known: {known}")
    hparams = {k: _checked(name, gp, k, v) for k, v in hparams.items()}
    side = {k: _checked(name, gp, k, v) for k, v in side.items()}
    return _Plan(gp, lr, weight_decay, ap_config, hparams, side)


def check_optimizer_args(name: str, lr: float = 1e-3, weight_decay: float = 0.0,
                         ap: dict | APConfig | None = None, **hparams) -> None:
    """Raise ValueError for every problem with ``build_optimizer``'s arguments that shows without
    the model: an unknown name, a bad lr / weight_decay, unknown or misplaced keys, a bad ap setting
    (damping=-1, exclude=3), a hyperparameter of the wrong type or length (betas=[0.9], eps="abc").
    Accepts exactly what ``build_optimizer`` accepts after the model (e.g. Hydra's ``opt`` dict), so
    a launcher can call it before any data is built. Messages name the key as ``opt.<key>``.
    """
    _plan(name, lr, weight_decay, ap, hparams)


def build_optimizer(model: nn.Module, name: str, lr: float = 1e-3, weight_decay: float = 0.0,
                    ap: dict | APConfig | None = None, **hparams) -> DoPr:
    """Build ``name`` (see ``KNOWN_OPTIMIZERS``) for ``model``.

    ``dopr_<gp>_cheap`` is ``dopr_<gp>`` with ``AP_PRESETS["cheap"]`` under ``ap`` (statistics and P every 10
    steps, rows sub-sampled to about 1024).
    ``dopr_<gp>`` is ``<gp>`` with activation preconditioning on every supported layer (Linear, Conv1d/2d,
    MultiheadAttention, Hugging Face Conv1D; ``opt.coverage()`` lists what it covers), configured
    by ``ap``: an :class:`APConfig` or a dict of its fields (damping, stat_decay, stat_interval,
    inverse_interval, max_rows, bias, start_step, exclude, solver), the same names as
    ``opt.ap.<field>`` on the command line. Matrix GPs (muon, adamuon) send the parameters that
    ``route_params`` does not call matrices to AdamW (adamw_lr, adamw_weight_decay, adamw_betas
    default to lr, weight_decay, (0.9, 0.999)). Raises ValueError on anything
    :func:`check_optimizer_args` refuses, on a model with no trainable parameter, and, for
    ``dopr_*``, on an exclude pattern that matches no layer or a model with no layer for AP.
    """
    plan = _plan(name, lr, weight_decay, ap, hparams)
    gp, lr, weight_decay, side, hparams = plan.gp, plan.lr, plan.weight_decay, plan.side, plan.hparams
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
    if plan.ap is not None:
        params = [p for o in optimizers for g in o.param_groups for p in g["params"]]
        try:
            preconditioner = ActivationPreconditioner(model, plan.ap, params=params)
        except ValueError as error:  # no layer for AP, or an exclude pattern that matches none
            raise ValueError(f"{name}: {error}") from None
    return DoPr(optimizers, preconditioner)
