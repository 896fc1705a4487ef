"""Flow-matching policy with action chunking (the paper's robomimic policy).

Training (linear interpolant, ``dopr.models.flow_ode``): a_1 = the expert's action chunk,
a_0 ~ N(0, I), t ~ U[0, 1], a_t = (1 - t) a_0 + t a_1; the U-Net regresses the velocity a_1 - a_0
given (a_t, t, obs). Sampling: Euler integration of the learned velocity from t = 0 to 1 in
``num_steps`` steps, starting from zeros (the mean of a_0; deterministic) or from Gaussian noise.
Everything is in normalized action/observation space; the task owns the normalizers.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from dopr.models.flow_ode import flow_matching_loss, integrate
from dopr.models.unet1d import ConditionalUnet1D
from dopr.policies.obs_encoder import ObsEncoder


class FlowMatchingPolicy(nn.Module):
    """Args:
        obs_encoder: maps an observation window to the global conditioning vector.
        action_dim, horizon: the predicted chunk is (horizon, action_dim).
        channels, kernel_size, time_embed_dim: U-Net size.
        num_steps: default Euler steps at inference; init: "zeros" or "noise".
    """

    def __init__(
        self,
        obs_encoder: ObsEncoder,
        action_dim: int,
        horizon: int,
        channels: Sequence[int] = (64, 128),
        kernel_size: int = 5,
        time_embed_dim: int = 64,
        num_steps: int = 9,
        init: str = "zeros",
    ):
        super().__init__()
        if init not in ("zeros", "noise"):
            raise ValueError(f"init must be 'zeros' or 'noise', got {init!r}")
        self.obs_encoder = obs_encoder
        self.action_dim, self.horizon = action_dim, horizon
        self.num_steps, self.init = num_steps, init
        self.net = ConditionalUnet1D(
            action_dim, obs_encoder.output_dim, channels=channels, kernel_size=kernel_size, time_embed_dim=time_embed_dim
        )

    def loss(
        self, obs: Mapping[str, torch.Tensor], actions: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        cond = self.obs_encoder(obs)
        noise = torch.randn(actions.shape, generator=generator, device=actions.device)
        t = torch.rand((actions.shape[0],), generator=generator, device=actions.device)
        return flow_matching_loss(self.net, actions, noise, t, cond)

    @torch.no_grad()
    def predict(
        self,
        obs: Mapping[str, torch.Tensor],
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Normalized action chunks (B, horizon, action_dim)."""
        num_steps = num_steps or self.num_steps
        cond = self.obs_encoder(obs)
        shape = (cond.shape[0], self.horizon, self.action_dim)
        if self.init == "zeros":
            x = torch.zeros(shape, device=cond.device)
        else:
            x = torch.randn(shape, generator=generator, device=cond.device)
        return integrate(self.net, x, num_steps, "euler", cond)
