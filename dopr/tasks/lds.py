"""Behavior cloning of an LQR expert on a linear dynamical system (the paper's Sec. 3 setting).

    x_{t+1} = A x_t + B u_t + w_t,   w_t ~ N(0, W),   expert u = -K x (discrete LQR)

A has unstable open-loop modes that the expert holds tightly, so the demonstrations carry little
variance exactly where a policy's error compounds in closed loop; the process noise is shaped so
the state covariance is ill-conditioned in a rotated (not axis-aligned) basis. The policy is an MLP,
trained on one-step L2 (val/loss), judged by closed-loop rollouts (test/*).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import scipy.linalg
import torch
from torch import nn

from dopr.shift import gaussian_state_shift
from dopr.tasks.base import Task, require_at_least

DIVERGED = 1e6  # state norm at which a rollout counts as diverged and stops


def random_system(state_dim: int, action_dim: int, unstable: float, noise_cond: float, rng: np.random.Generator):
    """(A, B, W, K): dynamics, input, process-noise covariance and LQR gain."""
    U, _ = np.linalg.qr(rng.standard_normal((state_dim, state_dim)))
    eigs = np.linspace(1.0 + unstable, 0.6, state_dim)
    A = U @ np.diag(eigs) @ U.T
    B = rng.standard_normal((state_dim, action_dim)) / np.sqrt(state_dim)
    V, _ = np.linalg.qr(rng.standard_normal((state_dim, state_dim)))
    W = V @ np.diag(np.logspace(0, -np.log10(noise_cond), state_dim)) @ V.T
    Q, R = np.eye(state_dim), 0.1 * np.eye(action_dim)
    P = scipy.linalg.solve_discrete_are(A, B, Q, R)
    K = np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)
    return A, B, W, K, Q, R


class LDSTask(Task):
    headline_metric = "test/cost_ratio"
    higher_is_better = False

    def __init__(self, seed: int = 0, device: str = "cpu", name: str = "lds", system_seed: int = 0,
                 state_dim: int = 8, action_dim: int = 3, unstable: float = 0.2, noise_cond: float = 1e4,
                 train_episodes: int = 5, val_episodes: int = 10, horizon: int = 50,
                 eval_episodes: int = 64, max_episode_steps: int = 100, hidden: int = 64, depth: int = 2,
                 batch_size: int = 64):
        super().__init__(seed=seed, device=device)
        require_at_least(1, state_dim=state_dim, action_dim=action_dim, train_episodes=train_episodes,
                         val_episodes=val_episodes, horizon=horizon, eval_episodes=eval_episodes,
                         max_episode_steps=max_episode_steps, hidden=hidden, batch_size=batch_size)
        if depth < 2:
            raise ValueError(f"task.depth={depth}: set task.depth >= 2 hidden layers, so the policy learns features")
        self.name = name
        rng = np.random.default_rng(system_seed)  # the system is fixed across seeds; data varies with seed
        self.A, self.B, self.W, self.K, self.Q, self.R = random_system(state_dim, action_dim, unstable, noise_cond, rng)
        self.noise_chol = np.linalg.cholesky(self.W)
        self.hidden, self.depth, self.batch_size = hidden, depth, batch_size
        self.eval_episodes, self.max_episode_steps = eval_episodes, max_episode_steps

        data_rng = np.random.default_rng([system_seed, seed])
        self.train_x, self.train_u = self._demonstrations(train_episodes, horizon, data_rng)
        self.val_x, self.val_u = self._demonstrations(val_episodes, horizon,
                                                      np.random.default_rng([system_seed, 10**6]))
        # Test rollouts: fixed initial states and noise, shared by every seed and optimizer.
        test_rng = np.random.default_rng([system_seed, 2 * 10**6])
        self.test_x0 = self._initial_states(eval_episodes, test_rng)
        self.test_noise = test_rng.standard_normal((max_episode_steps, eval_episodes, state_dim)) @ self.noise_chol.T
        self.expert_states, self.expert_cost = self._rollout(lambda x: -x @ self.K.T)
        cov = np.cov(self.train_x.T)
        self.state_cov_condition = float(np.linalg.cond(cov))

    # -- data ------------------------------------------------------------------------------------
    def _initial_states(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal((n, self.A.shape[0])) @ self.noise_chol.T * 3.0

    def _demonstrations(self, n: int, horizon: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        x = self._initial_states(n, rng)
        xs, us = [], []
        for _ in range(horizon):
            u = -x @ self.K.T
            xs.append(x)
            us.append(u)
            x = x @ self.A.T + u @ self.B.T + rng.standard_normal(x.shape) @ self.noise_chol.T
        return np.concatenate(xs), np.concatenate(us)

    def _rollout(self, policy) -> tuple[np.ndarray, np.ndarray]:
        """States (T+1, N, n) and per-rollout quadratic cost of a closed-loop policy under the test noise."""
        x = self.test_x0.copy()
        alive = np.ones(len(x), dtype=bool)
        states, cost = [x.copy()], np.zeros(len(x))
        for t in range(self.max_episode_steps):
            u = policy(x)
            cost += np.where(alive, np.einsum("ni,ij,nj->n", x, self.Q, x) + np.einsum("ni,ij,nj->n", u, self.R, u), 0.0)
            x = x @ self.A.T + u @ self.B.T + self.test_noise[t]
            alive &= np.linalg.norm(x, axis=1) < DIVERGED
            x = np.where(alive[:, None], x, 0.0)  # a diverged rollout stops; its cost so far stands
            states.append(x.copy())
        cost = np.where(alive, cost, np.inf)
        return np.stack(states), cost

    def train_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x = torch.as_tensor(self.train_x, dtype=torch.float32, device=self.device)
        u = torch.as_tensor(self.train_u, dtype=torch.float32, device=self.device)
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            idx = torch.randint(len(x), (self.batch_size,), generator=gen)
            yield x[idx], u[idx]

    # -- model and metrics -----------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        dims = [self.A.shape[0]] + [self.hidden] * self.depth
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.GELU()]
        layers.append(nn.Linear(dims[-1], self.B.shape[1]))
        return nn.Sequential(*layers).to(self.device)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, u = batch
        return (model(x) - u).pow(2).sum(-1).mean()

    def validate(self, model: nn.Module) -> dict[str, float]:
        x = torch.as_tensor(self.val_x, dtype=torch.float32, device=self.device)
        u = torch.as_tensor(self.val_u, dtype=torch.float32, device=self.device)
        return {"val/loss": float((model(x) - u).pow(2).sum(-1).mean())}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        def policy(x: np.ndarray) -> np.ndarray:
            return model(torch.as_tensor(x, dtype=torch.float32, device=self.device)).double().cpu().numpy()

        states, cost = self._rollout(policy)
        diverged = ~np.isfinite(cost)
        ratio = cost / self.expert_cost
        final_err = np.linalg.norm(states[-1] - self.expert_states[-1], axis=1)
        expert_scale = np.sqrt((self.expert_states[-1] ** 2).sum(1).mean())
        kept = states[:, ~diverged].reshape(-1, states.shape[-1])
        shift = gaussian_state_shift(kept, self.expert_states.reshape(-1, states.shape[-1])) if len(kept) > 2 else None
        return {
            "test/cost_ratio": float(ratio.mean()),  # inf when any rollout diverged
            "test/median_cost_ratio": float(np.median(ratio)),
            "test/final_state_error": float(np.median(final_err[~diverged]) / expert_scale) if (~diverged).any() else float("inf"),
            "test/ttf_shift": shift["gaussian_kl"] if shift else float("inf"),
            "test/diverged_frac": float(diverged.mean()),
        }

    def state(self) -> dict:
        return {"K": torch.as_tensor(self.K), "state_cov_condition": self.state_cov_condition}
