"""Robot manipulation from robomimic-format demonstrations (the paper's robomimic experiments).

Data: a robomimic-layout hdf5 (``dataset=<path>``): the real low_dim / image datasets, or files
written by scripts/make_demos.py (a relative path is taken against the repo root). With
``dataset: null`` the task uses ``<demos_dir>/<env>_<obs>_<gen_demos>demos_seed<gen_seed>.hdf5``
(``demos_dir`` is ``${paths.data}/robomimic`` in the configs) and generates it with the scripted
expert on first use. Training demos are ``mask/train`` (or all), of which the first
``train_episodes`` are used; the validation loss is measured on ``mask/valid`` demos.

Model: a flow-matching policy (conditional U-Net 1D, action chunking) or an MLP regression
baseline, on normalized observations (range-normalized low-dim keys; images through a
ResNet-18-style encoder per camera).

Metrics:
  val/loss                          one-step training objective on held-out demos (fixed noise)
  test/success_rate                 rollout success at the first of ``integration_steps``
  test/success_rate_k{K}            success with K Euler steps (flow policy), same seeds
  test/episode_length[_k{K}]        mean episode length (an episode ends at success or max_episode_steps)
  test/video                        with ``video=True``: the first seed's episode (agentview camera), written
                                    to <run_dir>/videos/step<step>.mp4 (.gif without imageio-ffmpeg) and W&B
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from dopr.data.robomimic_hdf5 import ChunkDataset, demo_names, load_episodes, obs_keys_in, read_env_args
from dopr.policies.chunk_policy import ChunkPolicyRunner, PolicySpec, build_policy
from dopr.policies.flow_matching import FlowMatchingPolicy
from dopr.policies.normalizer import RangeNormalizer
from dopr.paths import DEFAULT_DATA, resolve
from dopr.tasks.base import Task, require_at_least

DEFAULT_DEMOS_DIR = DEFAULT_DATA / "robomimic"
DEFAULT_LOW_DIM_KEYS = ("object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
DEFAULT_IMAGE_KEYS = ("agentview_image", "robot0_eye_in_hand_image")


class RobomimicTask(Task):
    headline_metric = "test/success_rate"
    higher_is_better = True

    def __init__(
        self,
        env_name: str = "Lift",
        dataset: str | None = None,
        gen_demos: int = 100,
        gen_seed: int = 0,
        gen_noise: float = 0.05,
        demos_dir: str | None = None,
        train_episodes: int | None = None,
        obs: str = "low_dim",
        low_dim_keys: Sequence[str] = DEFAULT_LOW_DIM_KEYS,
        image_keys: Sequence[str] = DEFAULT_IMAGE_KEYS,
        image_size: int | None = None,
        policy: str = "flow",
        obs_steps: int = 2,
        horizon: int = 16,
        action_steps: int = 8,
        unet_channels: Sequence[int] = (32, 64),
        kernel_size: int = 5,
        time_embed_dim: int = 32,
        mlp_width: int = 256,
        mlp_depth: int = 3,
        image_feature_dim: int = 64,
        crop_size: int | None = 76,
        image_base_width: int = 16,
        integration_steps: Sequence[int] = (9, 3, 1),
        init: str = "zeros",
        batch_size: int = 64,
        val_samples: int = 512,
        eval_episodes: int = 20,
        eval_seed: int = 100_000,
        max_episode_steps: int = 200,
        num_workers: int = 0,
        video: bool = False,
        seed: int = 0,
        device: str = "cpu",
        **kwargs: Any,
    ):
        super().__init__(seed=seed, device=device)
        unknown = sorted(k for k in kwargs if k != "name")
        if unknown:
            raise TypeError(f"RobomimicTask got unknown config keys {unknown}")
        if obs not in ("low_dim", "image"):
            raise ValueError(f"task.obs must be 'low_dim' or 'image', got {obs!r}")
        if not 1 <= action_steps <= horizon - obs_steps + 1:
            raise ValueError(
                f"task.action_steps={action_steps} must be in [1, horizon - obs_steps + 1 = {horizon - obs_steps + 1}]"
            )
        if not integration_steps or min(integration_steps) < 1:
            raise ValueError(f"task.integration_steps must be a non-empty list of positive ints, got {integration_steps}")
        require_at_least(1, train_episodes=train_episodes, batch_size=batch_size, val_samples=val_samples,
                         eval_episodes=eval_episodes, max_episode_steps=max_episode_steps, obs_steps=obs_steps)
        require_at_least(2, gen_demos=gen_demos)  # one of them is held out for the validation loss
        require_at_least(0, num_workers=num_workers)
        self.path = self._resolve_dataset(dataset, demos_dir or DEFAULT_DEMOS_DIR, env_name, gen_demos, gen_seed,
                                          gen_noise, obs)
        self.env_args = read_env_args(self.path)
        image_keys = tuple(image_keys) if obs == "image" else ()
        self.obs_keys = list(low_dim_keys) + list(image_keys)
        self._check_keys_recorded(low_dim_keys, image_keys)

        train_names = self._names("train")
        if train_episodes is not None:
            if train_episodes > len(train_names):
                raise ValueError(f"task.train_episodes={train_episodes} but {self.path} has {len(train_names)} "
                                 f"training demos; set task.train_episodes <= {len(train_names)}, or null for all")
            train_names = train_names[:train_episodes]
        valid_names = self._names("valid")
        if not valid_names:
            raise ValueError(f"{self.path}: mask/valid is empty; the validation loss needs held-out demos")
        train_eps = load_episodes(self.path, self.obs_keys, names=train_names)
        valid_eps = load_episodes(self.path, self.obs_keys, names=valid_names)

        # normalization statistics from training demos only
        self.normalizers = {
            k: RangeNormalizer.fit(np.concatenate([e.obs[k] for e in train_eps])) for k in low_dim_keys
        }
        self.action_normalizer = RangeNormalizer.fit(np.concatenate([e.actions for e in train_eps]))
        self.train_data = ChunkDataset(train_eps, obs_steps, horizon)
        self.valid_data = ChunkDataset(valid_eps, obs_steps, horizon)
        self.image_size = image_size or (train_eps[0].obs[image_keys[0]].shape[1] if image_keys else None)
        self.policy_spec = PolicySpec(
            policy=policy,
            low_dim_sizes={k: int(train_eps[0].obs[k].shape[1]) for k in low_dim_keys},
            image_keys=list(image_keys),
            action_dim=int(train_eps[0].actions.shape[1]),
            obs_steps=obs_steps,
            horizon=horizon,
            action_steps=action_steps,
            unet_channels=list(unet_channels),
            kernel_size=kernel_size,
            time_embed_dim=time_embed_dim,
            mlp_width=mlp_width,
            mlp_depth=mlp_depth,
            image_feature_dim=image_feature_dim,
            crop_size=crop_size,
            image_base_width=image_base_width,
            integration_steps=[int(k) for k in integration_steps],
            init=init,
        )
        self.batch_size, self.val_samples = batch_size, val_samples
        self.eval_episodes, self.eval_seed = eval_episodes, eval_seed
        self.max_episode_steps, self.num_workers, self.video = max_episode_steps, num_workers, bool(video)
        self.num_train_demos, self.num_train_samples = len(train_eps), len(self.train_data)
        self._pool = None
        self._check_env_matches_data()

    # ----- data -----
    @staticmethod
    def _resolve_dataset(dataset, demos_dir, env_name, gen_demos, gen_seed, gen_noise, obs) -> str:
        if dataset is not None:
            path = resolve(dataset)
            if not path.exists() and os.path.exists(str(dataset)):  # a relative path given from the cwd
                path = Path(dataset)
            return str(path)  # a missing file is reported by read_env_args, with where to get the real ones
        from dopr.envs.scripted import scripted_demos  # robosuite loads only when demos are generated

        cameras = [k[: -len("_image")] for k in DEFAULT_IMAGE_KEYS] if obs == "image" else []
        return str(scripted_demos(demos_dir, env_name, obs, gen_demos, gen_seed, gen_noise, cameras))

    def _check_keys_recorded(self, low_dim_keys: Sequence[str], image_keys: Sequence[str]) -> None:
        recorded = obs_keys_in(self.path)
        for name, keys in (("low_dim_keys", low_dim_keys), ("image_keys", image_keys)):
            missing = [k for k in keys if k not in recorded]
            if missing:
                hint = " (image keys need an image dataset: task.obs=image with one that records them)" \
                    if name == "image_keys" else ""
                raise ValueError(f"task.{name} has {missing}, which {self.path} does not record; its observation "
                                 f"keys are {recorded}{hint}")

    def _check_env_matches_data(self) -> None:
        """Before any training: the env the dataset names must take its actions and produce its
        observations, at the same sizes (else rollouts fail only after training)."""
        from dopr.envs.robosuite_envs import RobosuiteEnv

        env = RobosuiteEnv(self.env_args)  # no cameras: building it is cheap, and names the cameras it has
        try:
            obs, action_dim, cameras = env.reset(seed=self.eval_seed), env.action_dim, env.cameras
        finally:
            env.close()
        where = f"{self.path} (env {self.env_args['env_name']!r} from its data.attrs['env_args'])"
        problems = []
        if self.policy_spec.action_dim != action_dim:
            problems.append(f"its actions have {self.policy_spec.action_dim} dims, the env takes {action_dim}")
        for key, size in self.policy_spec.low_dim_sizes.items():
            if key not in obs:
                problems.append(f"the env has no observation {key!r} (it has {sorted(obs)}; set task.low_dim_keys "
                                f"from those)")
            elif np.asarray(obs[key]).size != size:
                problems.append(f"observation {key!r} has {size} values per step in the data, "
                                f"{np.asarray(obs[key]).size} in the env")
        for key in self.policy_spec.image_keys:
            if key[: -len("_image")] not in cameras:
                problems.append(f"the env has no camera for {key!r} (cameras: {list(cameras)})")
        if problems:
            raise ValueError(f"{where} does not match its env: " + "; ".join(problems) + ". The dataset was not "
                             f"recorded in this env: regenerate it, or pass the matching task.dataset")

    def _names(self, split: str) -> list[str]:
        try:
            return demo_names(self.path, split)
        except ValueError:
            # no masks: hold out the last 10% of demos
            names = demo_names(self.path)
            n_valid = max(1, len(names) // 10)
            return names[:-n_valid] if split == "train" else names[-n_valid:]

    def _to_tensors(self, data: ChunkDataset, indices: np.ndarray) -> tuple[dict, torch.Tensor]:
        obs, actions = data.get(indices)
        tensors = {}
        for key, value in obs.items():
            if key in self.normalizers:
                tensors[key] = torch.as_tensor(self.normalizers[key].normalize(value), device=self.device)
            else:
                tensors[key] = torch.as_tensor(value, device=self.device)  # uint8 images
        return tensors, torch.as_tensor(self.action_normalizer.normalize(actions), device=self.device)

    # ----- the Task contract -----
    def build_model(self) -> nn.Module:
        return build_policy(self.policy_spec).to(self.device)

    def train_batches(self) -> Iterator[tuple[dict, torch.Tensor]]:
        rng = np.random.default_rng(self.seed)
        while True:
            indices = rng.integers(0, len(self.train_data), size=self.batch_size)
            yield self._to_tensors(self.train_data, indices)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        # flow noise and times come from torch's global RNG, which the trainer seeds and checkpoints
        obs, actions = batch
        return model.loss(obs, actions)

    def validate(self, model: nn.Module) -> dict[str, float]:
        # the same windows and the same noise every time, so curves compare across steps and optimizers
        rng = np.random.default_rng(12345)
        n = min(self.val_samples, len(self.valid_data))
        indices = rng.choice(len(self.valid_data), size=n, replace=False)
        generator = torch.Generator(device=self.device).manual_seed(12345)
        total, count = 0.0, 0
        for start in range(0, n, 256):
            obs, actions = self._to_tensors(self.valid_data, indices[start : start + 256])
            total += float(model.loss(obs, actions, generator=generator)) * len(actions)
            count += len(actions)
        metrics = {"val/loss": total / count}
        if isinstance(model, FlowMatchingPolicy):
            # the deterministic sampler's action error: what the rollout executes, unlike the flow loss
            obs, actions = self._to_tensors(self.valid_data, indices[:256])
            predicted = model.predict(obs, num_steps=self.policy_spec.integration_steps[0])
            metrics["val/action_mse"] = float(((predicted - actions) ** 2).mean())
        return metrics

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        from dopr.envs.rollout import EnvPool, summarize

        if self._pool is None:
            cameras = [k[: -len("_image")] for k in self.policy_spec.image_keys]
            self._pool = EnvPool(self.env_args, self.num_workers, camera_names=cameras, image_size=self.image_size,
                                 video=self.video)
        spec = self.policy_spec
        steps_list = spec.integration_steps if spec.policy == "flow" else [1]
        seeds = [self.eval_seed + i for i in range(self.eval_episodes)]
        metrics = {}
        for k in steps_list:
            runner = ChunkPolicyRunner(model, self.normalizers, self.action_normalizer, self.device, k)
            record = self.video and k == steps_list[0]  # one video per evaluation
            results = self._pool.rollout(
                runner, seeds, self.max_episode_steps, spec.obs_steps, spec.action_steps, self.obs_keys,
                video=record,
            )
            if record:
                metrics["test/video"] = results[0].video
            summary = summarize(results)
            if spec.policy == "flow":
                metrics[f"test/success_rate_k{k}"] = summary["success_rate"]
                metrics[f"test/episode_length_k{k}"] = summary["mean_episode_length"]
            if k == steps_list[0]:
                metrics["test/success_rate"] = summary["success_rate"]
                metrics["test/episode_length"] = summary["mean_episode_length"]
        return metrics

    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild the policy and its env from a checkpoint alone."""
        return {
            "env_args": self.env_args,
            "dataset": self.path,
            "obs_keys": self.obs_keys,
            "image_size": self.image_size,
            "policy_spec": self.policy_spec.state(),
            "normalizers": {k: v.state() for k, v in self.normalizers.items()},
            "action_normalizer": self.action_normalizer.state(),
        }
