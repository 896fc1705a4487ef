"""The action-chunking policy of the robomimic tasks, apart from any task: its spec, how to build it,
how to run it on raw observations, and how to rebuild it from a trainer checkpoint alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from dopr.policies.flow_matching import FlowMatchingPolicy
from dopr.policies.normalizer import RangeNormalizer
from dopr.policies.obs_encoder import ObsEncoder
from dopr.policies.regression import RegressionPolicy

POLICIES = ("flow", "regression")


@dataclass
class PolicySpec:
    """Everything that fixes the policy's architecture. Checkpoints keep it as a plain dict
    (``state()``), which ``torch.load(weights_only=True)`` reads back."""

    policy: str  # flow | regression
    low_dim_sizes: dict[str, int]  # low-dim observation key -> values per step
    image_keys: list[str]
    action_dim: int
    obs_steps: int
    horizon: int  # actions per predicted chunk
    action_steps: int  # actions of a chunk executed before the next prediction
    unet_channels: list[int] = field(default_factory=lambda: [32, 64])
    kernel_size: int = 5
    time_embed_dim: int = 32
    mlp_width: int = 256
    mlp_depth: int = 3
    image_feature_dim: int = 64
    crop_size: int | None = 76
    image_base_width: int = 16
    integration_steps: list[int] = field(default_factory=lambda: [9, 3, 1])  # Euler steps; the first is the headline
    init: str = "zeros"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"task.policy must be one of {POLICIES}, got {self.policy!r}")

    def state(self) -> dict:
        return asdict(self)


def build_policy(spec: PolicySpec) -> nn.Module:
    """A fresh, randomly initialized policy (torch's global RNG) for ``spec``."""
    encoder = ObsEncoder(
        {k: int(v) for k, v in spec.low_dim_sizes.items()},
        tuple(spec.image_keys),
        obs_steps=spec.obs_steps,
        image_feature_dim=spec.image_feature_dim,
        crop_size=spec.crop_size,
        image_base_width=spec.image_base_width,
    )
    if spec.policy == "flow":
        return FlowMatchingPolicy(encoder, spec.action_dim, spec.horizon, channels=spec.unet_channels,
                                  kernel_size=spec.kernel_size, time_embed_dim=spec.time_embed_dim,
                                  num_steps=spec.integration_steps[0], init=spec.init)
    return RegressionPolicy(encoder, spec.action_dim, spec.horizon, spec.mlp_width, spec.mlp_depth)


class ChunkPolicyRunner:
    """Normalizes raw observation windows, predicts a chunk, returns env-space actions."""

    def __init__(self, model: nn.Module, normalizers: dict[str, RangeNormalizer], action_normalizer, device, steps):
        self.model, self.normalizers, self.action_normalizer = model, normalizers, action_normalizer
        self.device, self.steps = device, steps

    def __call__(self, window: dict[str, np.ndarray]) -> np.ndarray:
        obs = {}
        for key, value in window.items():
            if key in self.normalizers:
                value = self.normalizers[key].normalize(value.reshape(*value.shape[:2], -1))
                obs[key] = torch.as_tensor(value, device=self.device)
            else:
                obs[key] = torch.as_tensor(np.ascontiguousarray(value), device=self.device)
        with torch.no_grad():
            chunk = self.model.predict(obs, num_steps=self.steps)
        return self.action_normalizer.unnormalize(chunk.cpu().numpy())


def policy_from_checkpoint(path: str, use_ema: bool = True, device: str = "cpu"):
    """(runner, task_state) from a trainer checkpoint: ``runner(obs_window) -> action chunk``.

    The env comes from ``task_state['env_args']`` (``dopr.envs.rollout.EnvPool(task_state['env_args'])``).
    """
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    state = checkpoint["task_state"]
    spec = PolicySpec(**state["policy_spec"])
    model = build_policy(spec).to(device)
    weights = checkpoint["ema"] if use_ema and checkpoint.get("ema") is not None else checkpoint["model"]
    model.load_state_dict(weights)
    model.eval()
    normalizers = {k: RangeNormalizer.from_state(v) for k, v in state["normalizers"].items()}
    runner = ChunkPolicyRunner(model, normalizers, RangeNormalizer.from_state(state["action_normalizer"]),
                               torch.device(device), spec.integration_steps[0])
    return runner, state
