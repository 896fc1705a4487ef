"""Gradient preconditioners (GPs) and the rule that routes parameters to them.

AdamW is torch.optim.AdamW; Signum is pytorch-optimizer's SignSGD with momentum. Muon and AdaMuon
are written here: torch's and pytorch-optimizer's Muon iterate Newton-Schulz in bf16 only, which
CPUs without bf16 matrix units run ~100x slower than fp32 (6 s vs 0.07 s a step for a small MLP
here), and pytorch-optimizer's AdaMuon orthogonalizes the momentum itself, while Si et al. (2025,
arXiv 2507.11005) orthogonalize its sign. Both default to bf16 on CUDA and fp32 elsewhere.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim import Optimizer

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic Newton-Schulz coefficients


def ns_dtype_for(param: torch.Tensor, ns_dtype: str = "auto") -> torch.dtype:
    """Newton-Schulz precision: "auto" is bf16 on CUDA and the parameter's own precision (at
    least fp32) elsewhere, so a float64 model orthogonalizes in float64."""
    if ns_dtype == "auto":
        if param.device.type == "cuda":
            return torch.bfloat16
        return torch.promote_types(param.dtype, torch.float32)
    return {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}[ns_dtype]


def newton_schulz5(G: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype=torch.bfloat16) -> torch.Tensor:
    """Approximate the orthogonal polar factor U V^T of a 2-D matrix (quintic Newton-Schulz)."""
    a, b, c = NS_COEFFS
    transpose = G.shape[0] > G.shape[1]
    X = (G.T if transpose else G).to(dtype)
    X = X / (X.norm() + eps)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if transpose else X).to(G.dtype)


def route_params(model: nn.Module, io_to_adamw: bool = True) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split trainable parameters into (matrix, other) for the matrix GPs (Muon, AdaMuon).

    Matrix: weights (ndim >= 2) of Linear / Conv layers. Other (handled by AdamW): embeddings,
    biases, norms, gains, every 1-D parameter, and, with ``io_to_adamw``, the input layer (the first
    Linear/Conv when no Embedding precedes it, i.e. it plays the embedding's role) and the output
    layer (the last Linear/Conv), following Muon's usage. Registration order stands in for depth.
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding))]
    io_layers: set[int] = set()
    if io_to_adamw and layers:
        if not isinstance(layers[0], nn.Embedding):
            io_layers.add(id(layers[0]))
        linear_like = [m for m in layers if not isinstance(m, nn.Embedding)]
        if linear_like:
            io_layers.add(id(linear_like[-1]))
    matrix, other, seen = [], [], set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            is_matrix = (
                isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))
                and param is module.weight
                and param.ndim >= 2
                and id(module) not in io_layers
            )
            (matrix if is_matrix else other).append(param)
    return matrix, other


def evaluate_closure(closure):
    """The loss of an optimizer's optional closure, with grad enabled inside a no_grad step."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _check(name: str, lr: float, weight_decay: float, ns_steps: int, ns_dtype: str) -> None:
    if not lr > 0:
        raise ValueError(f"{name}: lr must be > 0, got {lr}")
    if weight_decay < 0 or ns_steps < 1:
        raise ValueError(f"{name}: weight_decay must be >= 0 and ns_steps >= 1")
    if ns_dtype not in ("auto", "bfloat16", "float32", "float64"):
        raise ValueError(f"{name}: ns_dtype must be auto, bfloat16, float32 or float64, got {ns_dtype!r}")


def _check_matrices(name: str, groups) -> None:
    for group in groups:
        for p in group["params"]:
            if p.ndim < 2:
                raise ValueError(f"{name} takes matrix parameters only; got shape {tuple(p.shape)} (route it to AdamW)")


class Muon(Optimizer):
    """Muon (Jordan et al. 2024) for matrix parameters (conv weights are flattened to 2-D).

        B <- b B + (1 - b) G;   U = lerp(G, B, b) if nesterov else B
        W <- W (1 - lr wd) - lr * 0.2 sqrt(max(m, n)) NS5(U)

    The 0.2 sqrt(max(m, n)) factor (Moonlight) matches AdamW's update RMS, so AdamW learning rates carry over.
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, ns_dtype: str = "auto"):
        _check("Muon", lr, weight_decay, ns_steps, ns_dtype)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon: momentum must be in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      ns_steps=ns_steps, ns_dtype=ns_dtype))
        _check_matrices("Muon", self.param_groups)

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            beta = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                G = p.grad.reshape(p.shape[0], -1)
                state = self.state[p]
                if not state:
                    state["momentum"] = torch.zeros_like(G)
                buf = state["momentum"]
                buf.lerp_(G, 1 - beta)
                U = G.lerp(buf, beta) if group["nesterov"] else buf
                O = newton_schulz5(U, steps=group["ns_steps"], dtype=ns_dtype_for(p, group["ns_dtype"]))
                scale = 0.2 * math.sqrt(max(O.shape))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(O.reshape(p.shape), alpha=-group["lr"] * scale)
        return loss


class AdaMuon(Optimizer):
    """AdaMuon (Si et al. 2025) for matrix parameters (conv weights are flattened to 2-D).

        M <- b1 M + (1 - b1) G;   O = NS(sign(M));   V <- b2 V + (1 - b2) O*O
        O_hat = O / (sqrt(V) + eps);   W <- W (1 - lr wd) - lr * 0.2 sqrt(mn) O_hat / ||O_hat||_F

    The 0.2 sqrt(mn) / ||.||_F scaling gives the update AdamW's RMS (0.2), so AdamW learning rates carry over.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 ns_steps: int = 5, ns_dtype: str = "auto"):
        _check("AdaMuon", lr, weight_decay, ns_steps, ns_dtype)
        if not all(0.0 <= b < 1.0 for b in betas) or eps < 0:
            raise ValueError(f"AdaMuon: betas must be in [0, 1) and eps >= 0, got {betas}, {eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      ns_steps=ns_steps, ns_dtype=ns_dtype))
        _check_matrices("AdaMuon", self.param_groups)

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                G = p.grad.reshape(p.shape[0], -1)
                if not state:
                    state["momentum"] = torch.zeros_like(G)
                    state["variance"] = torch.zeros_like(G)
                M, V = state["momentum"], state["variance"]
                M.lerp_(G, 1 - b1)
                O = newton_schulz5(torch.sign(M), steps=group["ns_steps"], dtype=ns_dtype_for(p, group["ns_dtype"]))
                V.mul_(b2).addcmul_(O, O, value=1 - b2)
                O_hat = O / (V.sqrt() + group["eps"])
                update = O_hat * (0.2 * math.sqrt(O.numel()) / (O_hat.norm() + group["eps"]))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.reshape(p.shape), alpha=-group["lr"])
        return loss
