"""DoPr optimizer library: activation preconditioning (AP) composed with any gradient
preconditioner (GP). Depends on torch (and pytorch-optimizer for Signum), nothing else.

    from dopr.optim import build_optimizer
    opt = build_optimizer(model, "dopr_adamw", lr=1e-3)      # or adamw, muon, dopr_muon, ...
    print(opt.coverage())                                     # which parameters AP preconditions

or wrap your own optimizer:

    opt = DoPr(torch.optim.SGD(model.parameters(), lr=0.1), ActivationPreconditioner(model))
"""

from dopr.optim.build import KNOWN_OPTIMIZERS, build_optimizer, check_optimizer_args
from dopr.optim.dopr import DoPr
from dopr.optim.gp import AdaMuon, Muon, newton_schulz5, route_params
from dopr.optim.preconditioner import ActivationPreconditioner, APConfig, damped_inverse

__all__ = [
    "APConfig",
    "ActivationPreconditioner",
    "AdaMuon",
    "DoPr",
    "KNOWN_OPTIMIZERS",
    "Muon",
    "build_optimizer",
    "check_optimizer_args",
    "damped_inverse",
    "newton_schulz5",
    "route_params",
]
