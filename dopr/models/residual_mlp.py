"""Residual MLP: the policy network of the paper's Gymnasium behavior-cloning experiment.

    h = Linear(in, width)(x)
    h = h + Linear(width, width)(act(Linear(width, hidden)(LayerNorm(h))))   x depth
    y = Linear(width, out)(act(LayerNorm(h)))

Pre-norm residual blocks keep deep stacks trainable at a fixed learning rate across optimizers,
and every weight matrix is an ``nn.Linear``, so activation preconditioning (AP) sees each layer's
input directly. LayerNorm gains/biases are 1-D and go to the plain gradient preconditioner.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.act(self.up(self.norm(x))))


class ResidualMLP(nn.Module):
    """Map (..., in_dim) -> (..., out_dim) through ``depth`` pre-norm residual blocks."""

    def __init__(self, in_dim: int, out_dim: int, width: int = 256, depth: int = 3, expansion: int = 2):
        super().__init__()
        if min(in_dim, out_dim, width, expansion) < 1 or depth < 0:
            raise ValueError(f"ResidualMLP needs positive dims and depth >= 0, got in_dim={in_dim}, "
                             f"out_dim={out_dim}, width={width}, depth={depth}, expansion={expansion}")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.inp = nn.Linear(in_dim, width)
        self.blocks = nn.Sequential(*[ResidualBlock(width, expansion * width) for _ in range(depth)])
        self.out_norm = nn.LayerNorm(width)
        self.act = nn.GELU()
        self.out = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"ResidualMLP expected inputs with last dim {self.in_dim}, got shape {tuple(x.shape)}")
        return self.out(self.act(self.out_norm(self.blocks(self.inp(x)))))
