"""Image encoder for visuomotor policies: a ResNet-18-style CNN with GroupNorm and random crop.

Written here rather than taken from torchvision (not a dependency). As in diffusion policy,
BatchNorm is replaced by GroupNorm (batch statistics interact badly with EMA weights and small
batches), and training images get a random crop while evaluation uses the centre crop.
Input: uint8 or float images (B, H, W, 3) in robomimic's HWC layout; output (B, feature_dim).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(max(1, channels // 16), channels)


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = _group_norm(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), _group_norm(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


def random_crop(images: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent random ``size`` x ``size`` crops of (B, C, H, W) images."""
    b, _, h, w = images.shape
    if size > min(h, w):
        raise ValueError(f"crop size {size} is larger than the image ({h}x{w})")
    top = torch.randint(0, h - size + 1, (b,), generator=generator, device=images.device)
    left = torch.randint(0, w - size + 1, (b,), generator=generator, device=images.device)
    rows = (top[:, None] + torch.arange(size, device=images.device)[None, :])[:, None, :, None]
    cols = (left[:, None] + torch.arange(size, device=images.device)[None, :])[:, None, None, :]
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return images[batch, channels, rows, cols]


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size]


class ResNetEncoder(nn.Module):
    """ResNet-18 layout (4 stages x 2 basic blocks) with GroupNorm; width scaled by ``base_width``.

    Args:
        feature_dim: output feature size.
        crop_size: random-crop size in training (centre crop in eval); None disables cropping.
        base_width: channels of the first stage (64 in ResNet-18; smaller is much cheaper on CPU).
        blocks_per_stage: 2 per stage is ResNet-18.
    """

    def __init__(
        self,
        feature_dim: int = 64,
        crop_size: int | None = 76,
        base_width: int = 16,
        blocks_per_stage: Sequence[int] = (2, 2, 2, 2),
    ):
        super().__init__()
        self.crop_size = crop_size
        widths = [base_width * 2**i for i in range(len(blocks_per_stage))]
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), _group_norm(widths[0]), nn.ReLU())
        layers = []
        in_channels = widths[0]
        for i, (width, blocks) in enumerate(zip(widths, blocks_per_stage)):
            for j in range(blocks):
                layers.append(BasicBlock(in_channels, width, stride=2 if (j == 0 and i > 0) else 1))
                in_channels = width
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(in_channels, feature_dim)
        self.feature_dim = feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected (B, H, W, 3) images, got {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        if self.crop_size is not None:
            x = random_crop(x, self.crop_size) if self.training else center_crop(x, self.crop_size)
        x = self.stages(self.stem(x * 2.0 - 1.0))
        return self.head(x.mean(dim=(-2, -1)))
