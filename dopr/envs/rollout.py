"""Seeded policy rollouts over a pool of robosuite envs: gymnasium's vector envs, one step per chunk.

``ChunkEnv`` is one robosuite episode as a ``gymnasium.Env`` whose step executes the executed
part of one predicted action chunk (stopping early at success) and whose observation is the
policy's window of the last ``obs_steps`` observations, so a rollout costs one round trip to a
worker per chunk. ``EnvPool`` runs ``num_workers`` of them in gymnasium's ``AsyncVectorEnv``
(which owns the worker processes and their shutdown), or one in this process
(``SyncVectorEnv``) for ``num_workers=0``; the policy runs in the calling process on the batch of
every running env's window. Episodes are assigned fixed seeds, so two evaluations with the same
seeds face the same initial scenes whatever the number of workers.

Gymnasium's vector envs are used so that the worker processes, their pipes and their shutdown are
gymnasium's tested code rather than this module's; the price is one env that ``AsyncVectorEnv`` builds in
the parent to read the spaces (~2 s for Lift), once per pool.
"""

from __future__ import annotations

import functools
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import gymnasium as gym
import numpy as np

from dopr.envs.robosuite_envs import RobosuiteEnv
from dopr.envs.video import VIDEO_CAMERA, RolloutVideo


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    length: int
    final_obs: dict = field(default_factory=dict, repr=False)  # the last observation (policy keys)
    video: RolloutVideo | None = field(default=None, repr=False)  # its frames, when recorded


class ChunkEnv(gym.Env):
    """One robosuite episode, stepped a chunk at a time.

    Action: ``{"actions": (action_steps, A), "count": n}``; the first ``n`` actions are executed
    (``n=0`` leaves an env with nothing left to do untouched). Observation: ``{key: (obs_steps, ...)}``,
    the last ``obs_steps`` observations (the first one repeated after a reset). ``terminated`` at
    success, ``truncated`` after ``max_steps`` env steps; ``info["length"]`` is the episode's steps.

    With ``video=True`` the env has an offscreen renderer, and an episode reset with
    ``options={"video": True}`` keeps one ``agentview`` frame per state (``take_video()``).
    """

    def __init__(self, env_kwargs: dict, obs_keys: Sequence[str], obs_steps: int, action_steps: int,
                 max_steps: int, video: bool = False):
        self.env = RobosuiteEnv(**env_kwargs, render_camera=VIDEO_CAMERA if video else None)
        self.obs_keys, self.obs_steps, self.max_steps = list(obs_keys), obs_steps, max_steps
        self.can_record = video
        self.fps = int(env_kwargs["env_args"].get("env_kwargs", {}).get("control_freq", 20))
        first = self._select(self.env.reset(seed=0))
        self.observation_space = gym.spaces.Dict({
            k: gym.spaces.Box(*((0, 255) if v.dtype == np.uint8 else (-np.inf, np.inf)), (obs_steps, *v.shape), v.dtype)
            for k, v in first.items()})
        self.action_space = gym.spaces.Dict({
            "actions": gym.spaces.Box(-np.inf, np.inf, (action_steps, self.env.action_dim), np.float64),
            "count": gym.spaces.Discrete(action_steps + 1)})
        self._frames: list[np.ndarray] | None = None
        self._video: RolloutVideo | None = None

    def _select(self, obs: dict) -> dict:
        missing = [k for k in self.obs_keys if k not in obs]
        if missing:
            raise KeyError(f"the environment does not produce observation keys {missing}; it has {sorted(obs)}")
        return {k: np.asarray(obs[k]) for k in self.obs_keys}

    def _window(self) -> dict:
        return {k: np.stack([h[k] for h in self.history]) for k in self.obs_keys}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        first = self._select(self.env.reset(seed=seed))
        self.history = deque([first] * self.obs_steps, maxlen=self.obs_steps)
        self.steps = 0
        self._frames = [self.env.render()] if self.can_record and (options or {}).get("video") else None
        return self._window(), {"length": 0}

    def step(self, action: dict):
        success = False
        for act in action["actions"][: min(int(action["count"]), self.max_steps - self.steps)]:
            obs, _, success = self.env.step(act)
            self.history.append(self._select(obs))
            self.steps += 1
            if self._frames is not None:
                self._frames.append(self.env.render())
            if success:
                break
        done = success or self.steps >= self.max_steps
        if done and self._frames is not None:
            self._video, self._frames = RolloutVideo(np.stack(self._frames), self.fps), None
        return self._window(), 0.0, bool(success), done and not success, {"length": self.steps}

    def take_video(self) -> RolloutVideo | None:
        """The last recorded episode's frames (once), or None."""
        video, self._video = self._video, None
        return video

    def close(self):
        self.env.close()


def _make_chunk_env(*args, pool_pid: int, **kwargs) -> ChunkEnv:
    # AsyncVectorEnv also calls this in the pool's own process (to read the spaces): leave that one alone
    if os.getpid() != pool_pid:  # a spawned worker: one thread, the run's log file
        import torch

        from dopr.run_log import follow_parent_log

        torch.set_num_threads(1)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        follow_parent_log()
    return ChunkEnv(*args, **kwargs)


class EnvPool:
    """``num_workers`` robosuite envs in worker processes; ``num_workers=0`` runs one env in this process.

    Args:
        env_args: robomimic-style env_args.
        camera_names, image_size: rendering for image observations (none: no rendering).
        video: give the first env an offscreen renderer, so ``rollout(..., video=True)`` can record.
    """

    def __init__(self, env_args: dict, num_workers: int = 0, camera_names: Sequence[str] = (),
                 image_size: int | None = None, video: bool = False):
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers}: use 0 (one env in this process) or more workers")
        self.env_kwargs = dict(env_args=env_args, camera_names=list(camera_names), image_size=image_size)
        self.num_workers, self.video = num_workers, video
        if camera_names or video:
            from dopr.envs.robosuite_envs import select_gl_backend

            select_gl_backend()  # before spawning, so workers inherit MUJOCO_GL
        self.envs = None  # the vector env, built by the first rollout (its spaces depend on the rollout's shape)
        self._shape = None

    def _vector_env(self, obs_keys: Sequence[str], obs_steps: int, action_steps: int, max_steps: int):
        shape = (tuple(obs_keys), obs_steps, action_steps, max_steps)
        if self.envs is not None and shape == self._shape:
            return self.envs
        self.close()
        from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv

        fns = [functools.partial(_make_chunk_env, self.env_kwargs, *shape, pool_pid=os.getpid(),
                                 video=self.video and index == 0)
               for index in range(max(1, self.num_workers))]
        if self.num_workers == 0:
            self.envs = SyncVectorEnv(fns, autoreset_mode=AutoresetMode.DISABLED)
        else:  # spawn: fork after torch/OpenGL initialisation is unsafe
            self.envs = AsyncVectorEnv(fns, context="spawn", autoreset_mode=AutoresetMode.DISABLED)
        self._shape = shape
        return self.envs

    def close(self) -> None:
        if self.envs is not None:
            self.envs.close()
        self.envs = None

    def rollout(
        self,
        policy: Callable[[dict[str, np.ndarray]], np.ndarray],
        seeds: Sequence[int],
        max_steps: int,
        obs_steps: int,
        action_steps: int,
        obs_keys: Sequence[str],
        video: bool = False,
    ) -> list[EpisodeResult]:
        """Run one episode per seed. ``policy(obs_window)`` gets {key: (n, obs_steps, ...)} and
        returns env-space action chunks (n, horizon, A); actions ``obs_steps-1 ...
        obs_steps-1+action_steps`` of each chunk are executed. An episode ends at success or
        after ``max_steps`` env steps. With ``video``, the first seed's result carries its frames."""
        if video and not self.video:
            raise ValueError("rollout(video=True) needs a pool built with EnvPool(..., video=True)")
        envs = self._vector_env(obs_keys, obs_steps, action_steps, max_steps)
        pending = deque(seeds)
        running = [pending.popleft() if pending else None for _ in range(envs.num_envs)]  # seed per env
        # the first seed always starts in env 0, the one that can record
        window, _ = envs.reset(seed=running, options={"video": video})
        results = []
        while any(seed is not None for seed in running):
            active = [i for i, seed in enumerate(running) if seed is not None]
            chunks = np.asarray(policy({k: v[active] for k, v in window.items()}))
            executed = np.zeros((envs.num_envs, *envs.single_action_space["actions"].shape))
            executed[active] = chunks[:, obs_steps - 1 : obs_steps - 1 + action_steps]
            count = np.array([action_steps if seed is not None else 0 for seed in running])  # idle envs: 0
            window, _, success, truncated, info = envs.step({"actions": executed, "count": count})
            restart = [None] * envs.num_envs
            for i, seed in enumerate(running):
                if seed is not None and (success[i] or truncated[i]):
                    final = {k: v[i, -1].copy() for k, v in window.items()}
                    results.append(EpisodeResult(seed, bool(success[i]), int(info["length"][i]), final))
                    running[i] = restart[i] = pending.popleft() if pending else None
            mask = np.array([seed is not None for seed in restart])
            if mask.any():
                window, _ = envs.reset(seed=restart, options={"reset_mask": mask})
        order = {seed: position for position, seed in enumerate(seeds)}
        results.sort(key=lambda r: order[r.seed])
        if video and results:
            results[0].video = envs.call("take_video")[0]
        return results


def summarize(results: Sequence[EpisodeResult]) -> dict[str, float]:
    """Success rate and mean episode length over episodes (each episode counted once)."""
    if not results:
        raise ValueError("no episodes to summarize")
    return {
        "success_rate": float(np.mean([r.success for r in results])),
        "mean_episode_length": float(np.mean([r.length for r in results])),
        "episodes": float(len(results)),
    }
