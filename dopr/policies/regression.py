"""The simple baseline: regress the whole action chunk from the observation window (MSE)."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from dopr.models.residual_mlp import ResidualMLP
from dopr.policies.obs_encoder import ObsEncoder


class RegressionPolicy(nn.Module):
    def __init__(self, obs_encoder: ObsEncoder, action_dim: int, horizon: int, width: int = 256, depth: int = 3):
        super().__init__()
        self.obs_encoder = obs_encoder
        self.action_dim, self.horizon = action_dim, horizon
        self.net = ResidualMLP(obs_encoder.output_dim, horizon * action_dim, width=width, depth=depth)

    def loss(
        self, obs: Mapping[str, torch.Tensor], actions: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return F.mse_loss(self.predict_train(obs), actions)

    def predict_train(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.net(self.obs_encoder(obs)).reshape(-1, self.horizon, self.action_dim)

    @torch.no_grad()
    def predict(self, obs: Mapping[str, torch.Tensor], num_steps: int | None = None, generator=None) -> torch.Tensor:
        """Normalized action chunks (B, horizon, action_dim); ``num_steps`` is ignored (one shot)."""
        return self.predict_train(obs)
