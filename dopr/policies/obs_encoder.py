"""Turn a window of observations into one conditioning vector.

Low-dimensional keys are (already normalized and) concatenated; each camera key gets its own
image encoder. Features of all ``obs_steps`` steps are concatenated, as in diffusion policy's
global conditioning.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from dopr.models.vision import ResNetEncoder


class ObsEncoder(nn.Module):
    """Args:
        low_dim_sizes: {key: size} of low-dimensional observations (order is kept).
        image_keys: camera keys (``*_image``), each (H, W, 3) uint8.
        obs_steps: number of observation steps in the window.
        image_feature_dim, crop_size, image_base_width: passed to each ResNetEncoder.
    """

    def __init__(
        self,
        low_dim_sizes: Mapping[str, int],
        image_keys: tuple[str, ...] = (),
        obs_steps: int = 2,
        image_feature_dim: int = 64,
        crop_size: int | None = 76,
        image_base_width: int = 16,
    ):
        super().__init__()
        self.low_dim_keys = list(low_dim_sizes)
        self.image_keys = list(image_keys)
        self.obs_steps = obs_steps
        self.image_encoders = nn.ModuleDict(
            {
                key: ResNetEncoder(feature_dim=image_feature_dim, crop_size=crop_size, base_width=image_base_width)
                for key in self.image_keys
            }
        )
        per_step = sum(low_dim_sizes.values()) + image_feature_dim * len(self.image_keys)
        self.output_dim = per_step * obs_steps

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        batch = None
        for key in self.low_dim_keys:
            value = obs[key]
            batch = value.shape[0]
            parts.append(value.reshape(batch, self.obs_steps, -1).float())
        for key in self.image_keys:
            images = obs[key]  # (B, To, H, W, 3)
            batch = images.shape[0]
            features = self.image_encoders[key](images.reshape(-1, *images.shape[2:]))
            parts.append(features.reshape(batch, self.obs_steps, -1))
        return torch.cat(parts, dim=-1).reshape(batch, -1)
