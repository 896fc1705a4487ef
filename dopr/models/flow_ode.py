"""Flow matching with the linear interpolant: its training loss and the fixed-step ODE sampler.

One implementation for every flow-matching model in the repo (the generative ``flow_*`` tasks and
the robot policy's action chunks). A velocity model is called as ``model(x, t)``, or
``model(x, t, cond)`` when it is conditioned (class labels, observation features), with ``t`` a
batch of times in [0, 1].

Training: with noise x0, data x1 and times t, the point x_t = (1 - t) x0 + t x1 on the straight
path has velocity x1 - x0, and the model regresses it:  loss = mean |v(x_t, t) - (x1 - x0)|^2
(mean over the batch and every data dimension).

Sampling: integrate dx/dt = v(x, t) from t = 0 to 1 with a fixed number of uniform steps of Euler
(one velocity evaluation per step), midpoint or Heun (two each).
"""

from __future__ import annotations

import torch
from torch import nn

SOLVERS = ("euler", "midpoint", "heun")


def _velocity(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    return model(x, t) if cond is None else model(x, t, cond)


def flow_matching_loss(model: nn.Module, x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
                       cond: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between v(x_t, t) and x1 - x0 on the straight path x_t = (1-t) x0 + t x1."""
    t_b = t.reshape(-1, *([1] * (x1.ndim - 1)))
    x_t = (1 - t_b) * x0 + t_b * x1
    return ((_velocity(model, x_t, t, cond) - (x1 - x0)) ** 2).mean()


@torch.no_grad()
def integrate(model: nn.Module, x0: torch.Tensor, steps: int, solver: str = "euler",
              cond: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t=0 to 1 with ``steps`` uniform steps of ``solver``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {SOLVERS}")

    def velocity(x: torch.Tensor, time: float) -> torch.Tensor:
        return _velocity(model, x, torch.full((len(x),), time, dtype=x.dtype, device=x.device), cond)

    x, dt = x0, 1.0 / steps
    for i in range(steps):
        t = i * dt
        if solver == "euler":
            x = x + dt * velocity(x, t)
        elif solver == "midpoint":
            x = x + dt * velocity(x + 0.5 * dt * velocity(x, t), t + 0.5 * dt)
        else:  # heun
            v_start = velocity(x, t)
            v_end = velocity(x + dt * v_start, t + dt)
            x = x + 0.5 * dt * (v_start + v_end)
    return x
