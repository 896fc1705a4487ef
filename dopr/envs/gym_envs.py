"""Gymnasium MuJoCo env construction and seeded, batched policy rollouts for evaluation.

``rollout_policy`` runs ``episodes`` episodes side by side, one env per episode, episode i reset
with seed ``seed + i``, and queries the policy once per step on the stacked observations of the
episodes still running. Unlike gymnasium's vector envs with autoreset, finished episodes (Hopper,
Walker2d, Ant and Humanoid terminate when they fall) cost no further simulation, and the result
is the same for any batching. With ``video=True`` the first episode's env renders one
``rgb_array`` frame per state (headless: MUJOCO_GL is chosen first); rendering does not change the
simulation, so the returns are the same as without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from dopr.envs.video import VIDEO_SIZE, RolloutVideo


def make_env(env_id: str, **kwargs):
    """``gymnasium.make`` with an error that lists the MuJoCo ids when the id is wrong."""
    import gymnasium as gym

    try:
        return gym.make(env_id, **kwargs)
    except (gym.error.Error, ValueError) as error:  # NameNotFound / VersionNotFound / bad kwargs
        mujoco_ids = sorted(k for k, spec in gym.registry.items()
                            if "mujoco" in str(spec.entry_point) and k.endswith("-v5"))
        raise ValueError(f"cannot make Gymnasium env '{env_id}': {error}. MuJoCo v5 ids: {mujoco_ids}") from error


@dataclass
class RolloutResult:
    returns: np.ndarray        # (episodes,) undiscounted returns
    lengths: np.ndarray        # (episodes,) steps per episode
    states: np.ndarray         # (sum(lengths), obs_dim) every observation the policy acted on
    video: RolloutVideo | None = None  # the first episode's frames, when recorded

    @property
    def mean_return(self) -> float:
        return float(self.returns.mean())

    @property
    def std_return(self) -> float:
        return float(self.returns.std())


def rollout_policy(policy: Callable[[np.ndarray], np.ndarray], env_id: str, episodes: int, seed: int = 0,
                   max_steps: int | None = None, video: bool = False) -> RolloutResult:
    """Roll ``policy`` (batch of observations (k, obs_dim) -> actions (k, act_dim)) out for ``episodes`` episodes."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if video:
        from dopr.envs.robosuite_envs import select_gl_backend

        select_gl_backend()  # before MuJoCo's renderer starts
    envs = [make_env(env_id, **(dict(render_mode="rgb_array", width=VIDEO_SIZE, height=VIDEO_SIZE)
                                if video and i == 0 else {})) for i in range(episodes)]
    horizon = max_steps or envs[0].spec.max_episode_steps or 1000
    low, high = envs[0].action_space.low, envs[0].action_space.high
    observations = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
    frames = [envs[0].render()] if video else None
    returns, lengths = np.zeros(episodes), np.zeros(episodes, dtype=np.int64)
    active = list(range(episodes))
    visited = []
    for _ in range(horizon):
        if not active:
            break
        batch = np.stack([observations[i] for i in active])
        visited.append(batch)
        actions = np.clip(np.asarray(policy(batch), dtype=np.float64), low, high)
        still_active = []
        for row, i in enumerate(active):
            observations[i], reward, terminated, truncated, _ = envs[i].step(actions[row])
            returns[i] += reward
            lengths[i] += 1
            if frames is not None and i == 0:
                frames.append(envs[0].render())
            if not (terminated or truncated):
                still_active.append(i)
        active = still_active
    for env in envs:
        env.close()
    recorded = RolloutVideo(np.stack(frames), int(envs[0].metadata.get("render_fps", 30))) if video else None
    return RolloutResult(returns=returns, lengths=lengths, states=np.concatenate(visited), video=recorded)
