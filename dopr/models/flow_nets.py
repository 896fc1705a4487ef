"""Velocity-field networks for flow matching: an MLP with a time embedding and a small conv U-Net.

Both map (x_t, t[, class label]) to a velocity with the shape of x_t. Every weight matrix is an
``nn.Linear`` or ``nn.Conv2d`` (upsampling is nearest-neighbour + Conv2d, no ConvTranspose), so
activation preconditioning sees every layer; class labels go through an ``nn.Embedding`` and
normalization gains are 1-D parameters, both of which optimizers treat as plain parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SinusoidalTimeEmbedding(nn.Module):
    """Features [sin(2 pi f t), cos(2 pi f t)] for ``dim // 2`` frequencies f log-spaced in [1, max_freq].

    t lives in [0, 1]; frequencies from 1 (one period over the whole path) up to ``max_freq`` let the
    network resolve fine changes of the velocity near the data end of the path.
    """

    def __init__(self, dim: int, max_freq: float = 64.0):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"time embedding dim must be an even number >= 2, got {dim}")
        freqs = torch.logspace(0.0, math.log10(max_freq), dim // 2)
        self.register_buffer("freqs", freqs, persistent=False)
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * t.reshape(-1, 1).to(self.freqs.dtype) * self.freqs
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class FlowMLP(nn.Module):
    """MLP velocity field on flat vectors: [x, time features, class embedding] -> hidden^depth -> v.

    ``num_classes`` > 0 makes it class-conditional (``forward(x, t, y)``).
    """

    def __init__(self, data_dim: int, hidden: int = 256, depth: int = 3, time_dim: int = 32,
                 num_classes: int = 0, class_dim: int = 32):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.data_dim = data_dim
        self.num_classes = num_classes
        self.time_embedding = SinusoidalTimeEmbedding(time_dim)
        self.class_embedding = nn.Embedding(num_classes, class_dim) if num_classes else None
        in_dim = data_dim + time_dim + (class_dim if num_classes else 0)
        layers: list[nn.Module] = []
        for layer_index in range(depth):
            layers += [nn.Linear(in_dim if layer_index == 0 else hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, data_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        parts = [x.reshape(len(x), -1), self.time_embedding(t)]
        if self.class_embedding is not None:
            if y is None:
                raise ValueError("this FlowMLP is class-conditional: pass class labels y")
            parts.append(self.class_embedding(y))
        return self.net(torch.cat(parts, dim=1)).reshape(shape)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, with the conditioning embedding added as a per-channel shift."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(min(groups, out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.emb_proj(emb)[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h)))
        return h + self.skip(x)


class SmallUNet(nn.Module):
    """A two-level conv U-Net for small square images (8x8 digits: 8 -> 4 -> 2 -> 4 -> 8).

    ``image_size`` must be divisible by 4. Conditioning (time features through an MLP, plus an
    optional class embedding) enters every residual block.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 8, channels: int = 32,
                 time_dim: int = 64, num_classes: int = 0, groups: int = 8):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"SmallUNet downsamples twice: image_size must be divisible by 4, got {image_size}")
        emb_dim = 4 * channels
        self.num_classes = num_classes
        self.time_embedding = SinusoidalTimeEmbedding(time_dim)
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embedding = nn.Embedding(num_classes, emb_dim) if num_classes else None
        wide = 2 * channels
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.enc_full = _ResBlock(channels, channels, emb_dim, groups)
        self.down1 = nn.Conv2d(channels, wide, 3, stride=2, padding=1)
        self.enc_half = _ResBlock(wide, wide, emb_dim, groups)
        self.down2 = nn.Conv2d(wide, wide, 3, stride=2, padding=1)
        self.middle = _ResBlock(wide, wide, emb_dim, groups)
        self.up_half = nn.Conv2d(wide, wide, 3, padding=1)
        self.dec_half = _ResBlock(2 * wide, wide, emb_dim, groups)
        self.up_full = nn.Conv2d(wide, channels, 3, padding=1)
        self.dec_full = _ResBlock(2 * channels, channels, emb_dim, groups)
        self.out_norm = nn.GroupNorm(min(groups, channels), channels)
        self.out_conv = nn.Conv2d(channels, in_channels, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"SmallUNet expects images (batch, channels, H, W), got shape {tuple(x.shape)}")
        emb = self.time_mlp(self.time_embedding(t))
        if self.class_embedding is not None:
            if y is None:
                raise ValueError("this SmallUNet is class-conditional: pass class labels y")
            emb = emb + self.class_embedding(y)
        h_full = self.enc_full(self.stem(x), emb)
        h_half = self.enc_half(self.down1(h_full), emb)
        h = self.middle(self.down2(h_half), emb)
        h = self.up_half(nn.functional.interpolate(h, scale_factor=2, mode="nearest"))
        h = self.dec_half(torch.cat([h, h_half], dim=1), emb)
        h = self.up_full(nn.functional.interpolate(h, scale_factor=2, mode="nearest"))
        h = self.dec_full(torch.cat([h, h_full], dim=1), emb)
        return self.out_conv(self.act(self.out_norm(h)))
