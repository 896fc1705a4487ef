"""Seeded policy rollouts over a pool of robosuite envs in worker processes.

The policy runs in the calling process on a batch made of every active env's observation
window; each worker steps its own env through the executed part of the predicted action chunk
and returns the observations it saw. Episodes are assigned fixed seeds, so two evaluations
with the same seeds face the same initial scenes whatever the number of workers.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from dopr.envs.robosuite_envs import RobosuiteEnv


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    length: int
    final_obs: dict = field(default_factory=dict, repr=False)  # the last observation (policy keys)


def _execute_chunk(env: RobosuiteEnv, actions: np.ndarray, keep_last: int):
    """Step through ``actions`` until success; return (last ``keep_last`` obs, steps, success)."""
    seen = []
    success = False
    for action in actions:
        obs, _, success = env.step(action)
        seen.append(obs)
        if success:
            break
    return seen[-keep_last:], len(seen), success


class _LocalWorker:
    """The same protocol as a process worker, run in this process (no parallelism, no start cost)."""

    def __init__(self, env_kwargs: dict):
        self.env = RobosuiteEnv(**env_kwargs)
        self._result = None

    def send(self, command: str, *args) -> None:
        if command == "reset":
            self._result = self.env.reset(seed=args[0])
        elif command == "chunk":
            self._result = _execute_chunk(self.env, *args)
        elif command == "close":
            self.env.close()
            self._result = None

    def recv(self):
        return self._result


def _worker_main(connection, env_kwargs: dict) -> None:
    import os

    import torch

    from dopr.run_log import follow_parent_log

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    follow_parent_log()
    worker = _LocalWorker(env_kwargs)
    connection.send("ready")
    while True:
        try:
            command, args = connection.recv()
        except EOFError:  # the parent exited without closing the pool: nothing left to do
            return
        try:
            worker.send(command, *args)
            connection.send(("ok", worker.recv()))
        except Exception as exc:  # report, don't hang the parent
            connection.send(("error", repr(exc)))
        if command == "close":
            connection.close()
            return


class _ProcessWorker:
    def __init__(self, env_kwargs: dict, context):
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, env_kwargs), daemon=True)
        self.process.start()
        child.close()
        self._ready = False

    def send(self, command: str, *args) -> None:
        if not self._ready:
            self.connection.recv()  # "ready": the env is built
            self._ready = True
        self.connection.send((command, args))

    def recv(self):
        status, value = self.connection.recv()
        if status == "error":
            raise RuntimeError(f"rollout worker failed: {value}")
        return value


class EnvPool:
    """``num_workers`` robosuite envs; ``num_workers=0`` runs one env in this process.

    Args:
        env_args: robomimic-style env_args.
        camera_names, image_size: rendering for image observations (none: no rendering).
    """

    def __init__(
        self, env_args: dict, num_workers: int = 0, camera_names: Sequence[str] = (), image_size: int | None = None
    ):
        env_kwargs = dict(env_args=env_args, camera_names=list(camera_names), image_size=image_size)
        if camera_names:
            from dopr.envs.robosuite_envs import select_gl_backend

            select_gl_backend()  # before spawning, so workers inherit MUJOCO_GL
        if num_workers <= 0:
            self.workers = [_LocalWorker(env_kwargs)]
        else:
            context = mp.get_context("spawn")  # fork after torch/OpenGL initialisation is unsafe
            self.workers = [_ProcessWorker(env_kwargs, context) for _ in range(num_workers)]

    def close(self) -> None:
        for worker in self.workers:
            try:
                worker.send("close")
                worker.recv()
            except Exception:
                pass
            if isinstance(worker, _ProcessWorker):
                worker.process.join(timeout=5)
        self.workers = []

    def rollout(
        self,
        policy: Callable[[dict[str, np.ndarray]], np.ndarray],
        seeds: Sequence[int],
        max_steps: int,
        obs_steps: int,
        action_steps: int,
        obs_keys: Sequence[str],
    ) -> list[EpisodeResult]:
        """Run one episode per seed. ``policy(obs_window)`` gets {key: (n, obs_steps, ...)} and
        returns env-space action chunks (n, horizon, A); actions ``obs_steps-1 ...
        obs_steps-1+action_steps`` of each chunk are executed. An episode ends at success or
        after ``max_steps`` env steps."""
        pending = deque(seeds)
        active: dict[int, dict] = {}  # worker index -> episode state
        results = []

        def start(index: int) -> None:
            seed = pending.popleft()
            self.workers[index].send("reset", seed)
            obs = self.workers[index].recv()
            history = deque([_select(obs, obs_keys)] * obs_steps, maxlen=obs_steps)
            active[index] = {"seed": seed, "history": history, "steps": 0}

        for index in range(len(self.workers)):
            if pending:
                start(index)
        while active:
            order = sorted(active)
            window = {k: np.stack([np.stack([h[k] for h in active[i]["history"]]) for i in order]) for k in obs_keys}
            chunks = np.asarray(policy(window))
            executed = chunks[:, obs_steps - 1 : obs_steps - 1 + action_steps]
            for row, index in enumerate(order):
                budget = max_steps - active[index]["steps"]
                self.workers[index].send("chunk", executed[row, :budget], obs_steps)
            for index in order:
                seen, steps, success = self.workers[index].recv()
                state = active[index]
                state["steps"] += steps
                state["history"].extend(_select(o, obs_keys) for o in seen)
                if success or state["steps"] >= max_steps:
                    results.append(EpisodeResult(state["seed"], bool(success), state["steps"], state["history"][-1]))
                    del active[index]
                    if pending:
                        start(index)
        return sorted(results, key=lambda r: list(seeds).index(r.seed))


def _select(obs: dict, keys: Sequence[str]) -> dict:
    missing = [k for k in keys if k not in obs]
    if missing:
        raise KeyError(f"the environment does not produce observation keys {missing}; it has {sorted(obs)}")
    return {k: np.asarray(obs[k]) for k in keys}


def summarize(results: Sequence[EpisodeResult]) -> dict[str, float]:
    """Success rate and mean episode length over episodes (each episode counted once)."""
    if not results:
        raise ValueError("no episodes to summarize")
    return {
        "success_rate": float(np.mean([r.success for r in results])),
        "mean_episode_length": float(np.mean([r.length for r in results])),
        "episodes": float(len(results)),
    }
