"""Behavior cloning on Gymnasium MuJoCo (the paper's first experiment, Sec. 5 / Figure 7).

Data: a local Minari dataset (``dataset=<minari id>`` under ``datasets_path``, which the configs set to
``${paths.data}/minari``), split by episode into train and held-out validation episodes. Model: a
residual MLP from normalized observations to actions, trained with the L2 (mean squared error)
behavior-cloning loss. Evaluation: seeded rollouts of the policy (the trainer passes its EMA copy
when ``trainer.ema_decay`` is set), reporting

  test/return, test/return_std        mean / std of episode returns over ``eval_episodes``
  test/normalized_return              test/return / expert return (the dataset's ref_max_score,
                                      else ``expert_return``, else the demos' mean return)
  test/episode_length                 mean episode length (falls terminate Hopper/Walker/Ant/Humanoid)
  test/state_shift                    Gaussian KL between visited and demonstration states (dopr.shift)
  test/state_mean_shift               RMS mean shift of visited states, in demo-std units
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from dopr.data.minari_data import load_minari_episodes
from dopr.envs.gym_envs import make_env, rollout_policy
from dopr.models.residual_mlp import ResidualMLP
from dopr.shift import gaussian_state_shift
from dopr.tasks.base import Task, require_at_least


class NormalizedPolicy(nn.Module):
    """Wraps the network with fixed observation normalization so checkpoints act on raw observations."""

    def __init__(self, net: nn.Module, obs_mean: np.ndarray, obs_std: np.ndarray):
        super().__init__()
        self.net = net
        self.register_buffer("obs_mean", torch.as_tensor(obs_mean, dtype=torch.float32))
        self.register_buffer("obs_std", torch.as_tensor(obs_std, dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net((obs - self.obs_mean) / self.obs_std)


class GymBCTask(Task):
    headline_metric = "test/return"
    higher_is_better = True

    def __init__(self, dataset: str, seed: int = 0, device: str = "cpu", datasets_path: str | None = None,
                 env_id: str | None = None, train_episodes: int | None = None, val_episodes: int = 2,
                 batch_size: int = 256, width: int = 256, depth: int = 3, expansion: int = 2,
                 eval_episodes: int = 5, eval_seed: int = 100_000, max_episode_steps: int | None = None,
                 expert_return: float | None = None, val_batch_size: int = 8192, video: bool = False,
                 **kwargs: Any):
        super().__init__(seed=seed, device=device)
        unknown = sorted(k for k in kwargs if k != "name")
        if unknown:
            raise TypeError(f"GymBCTask got unknown config keys {unknown}")
        # val_episodes >= 1: the validation loss needs held-out episodes
        require_at_least(1, val_episodes=val_episodes, train_episodes=train_episodes, batch_size=batch_size,
                         eval_episodes=eval_episodes, max_episode_steps=max_episode_steps,
                         val_batch_size=val_batch_size,
                         width=width, depth=depth, expansion=expansion)
        wanted = None if train_episodes is None else int(train_episodes) + int(val_episodes)
        episodes = load_minari_episodes(dataset, datasets_path, max_episodes=wanted)
        if len(episodes) < val_episodes + 1:
            raise ValueError(f"dataset '{dataset}' has {len(episodes)} episodes; need at least "
                             f"val_episodes + 1 = {val_episodes + 1}")
        if train_episodes is not None and len(episodes) < wanted:
            raise ValueError(f"dataset '{dataset}' has {len(episodes)} episodes; train_episodes={train_episodes} "
                             f"+ val_episodes={val_episodes} = {wanted} requested")
        self.env_id = env_id or episodes.env_id
        if self.env_id is None:
            raise ValueError(f"dataset '{dataset}' records no env spec; set task.env_id=<Gymnasium id>")
        probe = make_env(self.env_id)
        obs_dim, act_dim = probe.observation_space.shape[0], probe.action_space.shape[0]
        probe.close()
        data_obs_dim, data_act_dim = episodes.observations[0].shape[1], episodes.actions[0].shape[1]
        if (data_obs_dim, data_act_dim) != (obs_dim, act_dim):
            raise ValueError(f"dataset '{dataset}' has obs/action dims ({data_obs_dim}, {data_act_dim}) but "
                             f"{self.env_id} has ({obs_dim}, {act_dim}); set task.env_id to the env it was recorded in")

        # Held-out validation = the last val_episodes episodes; the rest is training data.
        n_train = len(episodes) - val_episodes
        self.train_obs, self.train_act = episodes.state_action_pairs(range(n_train))
        self.val_obs, self.val_act = episodes.state_action_pairs(range(n_train, len(episodes)))
        self.obs_mean = self.train_obs.mean(0)
        self.obs_std = np.maximum(self.train_obs.std(0), 1e-3)  # constant coordinates stay unscaled-ish
        demo_return = float(episodes.episode_returns[:n_train].mean())
        self.expert_return = float(expert_return if expert_return is not None
                                   else episodes.ref_max_score if episodes.ref_max_score is not None
                                   else demo_return)
        self.demo_return = demo_return
        self.dataset, self.n_train_episodes = dataset, n_train
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.batch_size, self.val_batch_size = int(batch_size), int(val_batch_size)
        self.width, self.depth, self.expansion = int(width), int(depth), int(expansion)
        self.eval_episodes, self.eval_seed = int(eval_episodes), int(eval_seed)
        self.max_episode_steps = max_episode_steps
        self.video = bool(video)  # test/video: the first evaluation episode's frames
        self._train_obs_t = torch.as_tensor(self.train_obs, device=self.device)
        self._train_act_t = torch.as_tensor(self.train_act, device=self.device)

    # ---- Task contract -------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        net = ResidualMLP(self.obs_dim, self.act_dim, width=self.width, depth=self.depth, expansion=self.expansion)
        return NormalizedPolicy(net, self.obs_mean, self.obs_std).to(self.device)

    def train_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless, seeded stream of minibatches: reshuffle every epoch, drop the ragged tail."""
        generator = torch.Generator().manual_seed(self.seed)
        n = len(self._train_obs_t)
        batch = min(self.batch_size, n)
        while True:
            order = torch.randperm(n, generator=generator).to(self.device)
            for start in range(0, n - batch + 1, batch):
                idx = order[start:start + batch]
                yield self._train_obs_t[idx], self._train_act_t[idx]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        obs, act = batch
        return ((model(obs) - act) ** 2).sum(-1).mean()

    @torch.no_grad()
    def _mean_loss(self, model: nn.Module, obs_all: np.ndarray, act_all: np.ndarray) -> float:
        total = 0.0
        for start in range(0, len(obs_all), self.val_batch_size):
            obs = torch.as_tensor(obs_all[start:start + self.val_batch_size], device=self.device)
            act = torch.as_tensor(act_all[start:start + self.val_batch_size], device=self.device)
            total += float(((model(obs) - act) ** 2).sum())
        return total / len(obs_all)

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        """val/loss on held-out episodes, and val/train_set_loss: the same loss of the evaluated
        (e.g. EMA) model on the whole training set, i.e. the terminal train loss of the policy
        that is rolled out (train/loss in the records averages the raw model's minibatch losses)."""
        return {"val/loss": self._mean_loss(model, self.val_obs, self.val_act),
                "val/train_set_loss": self._mean_loss(model, self.train_obs, self.train_act)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        def act(obs_batch: np.ndarray) -> np.ndarray:
            obs = torch.as_tensor(obs_batch, dtype=torch.float32, device=self.device)
            return model(obs).cpu().numpy()

        result = rollout_policy(act, self.env_id, self.eval_episodes, seed=self.eval_seed,
                                max_steps=self.max_episode_steps, video=self.video)
        shift = gaussian_state_shift(result.states, self.train_obs)
        metrics = {
            "test/return": result.mean_return,
            "test/return_std": result.std_return,
            "test/normalized_return": result.mean_return / self.expert_return if self.expert_return else float("nan"),
            "test/episode_length": float(result.lengths.mean()),
            "test/state_shift": shift["gaussian_kl"],
            "test/state_mean_shift": shift["mean_distance"],
        }
        if self.video:
            metrics["test/video"] = result.video  # to <run_dir>/videos and W&B, not to metrics.jsonl
        return metrics

    def state(self) -> dict[str, Any]:
        return {"env_id": self.env_id, "dataset": self.dataset, "expert_return": self.expert_return,
                "demo_return": self.demo_return, "n_train_episodes": self.n_train_episodes,
                "obs_mean": self.obs_mean.tolist(), "obs_std": self.obs_std.tolist()}
