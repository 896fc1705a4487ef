"""Conditional 1-D U-Net over action sequences (the diffusion-policy architecture).

Input: a noisy action chunk x of shape (B, T, A), a flow time t in [0, 1] of shape (B,), and a
global conditioning vector (observation features) of shape (B, C). Output: a velocity of the
same shape as x. Every residual block is FiLM-conditioned on [time embedding, observation
features]: the conditioning predicts a per-channel scale and bias for the block's first conv.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


class SinusoidalTimeEmbedding(nn.Module):
    def __init__(self, dim: int, max_period: float = 10_000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"time embedding dim must be even, got {dim}")
        self.dim = dim
        self.max_period = max_period

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        # flow time lives in [0, 1]; scale it like a diffusion step index so frequencies spread out
        angles = (t.float() * 1000.0)[:, None] * freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Conv1dBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, groups: int):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.norm = nn.GroupNorm(groups, out_channels)
        self.act = nn.Mish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class ConditionalResidualBlock1D(nn.Module):
    """Two conv blocks; FiLM (scale, bias) from the conditioning after the first."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, kernel_size: int, groups: int):
        super().__init__()
        self.block1 = Conv1dBlock(in_channels, out_channels, kernel_size, groups)
        self.block2 = Conv1dBlock(out_channels, out_channels, kernel_size, groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * out_channels))
        self.skip = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.block1(x)
        scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)
        h = self.block2(h * (1 + scale) + bias)
        return h + self.skip(x)


class ConditionalUnet1D(nn.Module):
    """U-Net over the time axis of an action chunk.

    Args:
        action_dim: A, channels of the input/output sequence.
        cond_dim: size of the global conditioning (observation features); 0 for none.
        channels: channel width per resolution level; the sequence is halved between levels,
            so the horizon must be divisible by 2 ** (len(channels) - 1).
        time_embed_dim: size of the sinusoidal flow-time embedding.
    """

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        channels: Sequence[int] = (64, 128, 256),
        time_embed_dim: int = 64,
        kernel_size: int = 5,
        groups: int = 8,
    ):
        super().__init__()
        channels = list(channels)
        for c in channels:
            if c % groups:
                raise ValueError(f"every U-Net width must be divisible by groups={groups}; got {channels}")
        self.downsample_factor = 2 ** (len(channels) - 1)
        self.time_embed = nn.Sequential(
            SinusoidalTimeEmbedding(time_embed_dim),
            nn.Linear(time_embed_dim, 4 * time_embed_dim),
            nn.Mish(),
            nn.Linear(4 * time_embed_dim, time_embed_dim),
        )
        full_cond = time_embed_dim + cond_dim

        def block(cin, cout):
            return ConditionalResidualBlock1D(cin, cout, full_cond, kernel_size, groups)

        widths = [action_dim] + channels
        self.down = nn.ModuleList()
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            last = i == len(channels) - 1
            self.down.append(
                nn.ModuleList(
                    [block(cin, cout), block(cout, cout), nn.Conv1d(cout, cout, 3, 2, 1) if not last else nn.Identity()]
                )
            )
        self.mid = nn.ModuleList([block(channels[-1], channels[-1]), block(channels[-1], channels[-1])])
        self.up = nn.ModuleList()
        for cin, cout in reversed(list(zip(channels[:-1], channels[1:]))):
            # concatenates the skip of the level at this resolution, then upsamples to the next
            # nearest upsampling + Conv1d rather than ConvTranspose1d: activation preconditioning
            # (dopr.optim) handles Conv1d/Linear layers
            upsample = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv1d(cin, cin, 3, padding=1))
            self.up.append(nn.ModuleList([block(2 * cout, cin), block(cin, cin), upsample]))
        self.final = nn.Sequential(
            Conv1dBlock(channels[0], channels[0], kernel_size, groups), nn.Conv1d(channels[0], action_dim, 1)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[1] % self.downsample_factor:
            raise ValueError(
                f"sequence length {x.shape[1]} must be divisible by {self.downsample_factor} "
                f"(2 ** (number of U-Net levels - 1))"
            )
        feature = self.time_embed(t.expand(x.shape[0]) if t.dim() == 0 else t)
        if cond is not None:
            feature = torch.cat([feature, cond], dim=-1)
        h = x.transpose(1, 2)  # (B, A, T)
        skips = []
        for res1, res2, downsample in self.down:
            h = res2(res1(h, feature), feature)
            skips.append(h)
            h = downsample(h)
        for res in self.mid:
            h = res(h, feature)
        for res1, res2, upsample in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = res2(res1(h, feature), feature)
            h = upsample(h)
        return self.final(h).transpose(1, 2)
