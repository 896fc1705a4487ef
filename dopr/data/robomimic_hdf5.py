"""Read and write demonstration files in the robomimic hdf5 layout, with h5py only.

Layout (robomimic v0.1, what its released datasets and our scripts/make_demos.py use)::

    data                      attrs: env_args (JSON: env_name, type, env_kwargs), total (int)
    data/demo_N/actions       (T, A) float
    data/demo_N/states        (T, S) flattened MuJoCo states          [optional for training]
    data/demo_N/rewards       (T,)                                      [optional]
    data/demo_N/dones         (T,)                                      [optional]
    data/demo_N/obs/<key>     (T, ...) e.g. object, robot0_eef_pos, agentview_image (T, H, W, 3) uint8
    data/demo_N/next_obs/<key>                                          [optional]
                              attrs: num_samples (T), model_file (MuJoCo XML)
    mask/train, mask/valid    byte strings naming demos                 [optional]

Anything malformed raises RobomimicFormatError naming the file and what is wrong.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import h5py
import numpy as np

REAL_DATASETS_HINT = (
    "The real robomimic datasets (e.g. tool_hang/ph/image.hdf5, transport/ph/image.hdf5, "
    "can/ph/low_dim.hdf5) are listed at https://robomimic.github.io/docs/datasets/robomimic_v0.1.html "
    "and fetched with robomimic's scripts/download_datasets.py; pass the file with task.dataset=<path>. "
    "For Lift/Can/Square you can instead generate demonstrations with "
    "`python scripts/make_demos.py env=lift gen_demos=60` (it writes the file the task reads)."
)


class RobomimicFormatError(ValueError):
    """A demonstration file that is not in the robomimic layout (or lacks what was asked for)."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


@dataclass
class Episode:
    """One demonstration: observations by key, each (T, ...), and actions (T, A)."""

    name: str
    obs: dict[str, np.ndarray]
    actions: np.ndarray

    def __len__(self) -> int:
        return len(self.actions)


def _demo_sort_key(name: str) -> tuple[int, str]:
    match = re.search(r"(\d+)$", name)
    return (int(match.group(1)) if match else -1, name)


def _open(path: str) -> h5py.File:
    if not os.path.exists(path):
        raise FileNotFoundError(f"Demonstration file not found: {path}. {REAL_DATASETS_HINT}")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise RobomimicFormatError(path, f"not a readable hdf5 file ({exc}). {REAL_DATASETS_HINT}") from exc


def _data_group(f: h5py.File, path: str) -> h5py.Group:
    if "data" not in f or not isinstance(f["data"], h5py.Group):
        raise RobomimicFormatError(path, f"no 'data' group (top-level keys: {sorted(f.keys())}); not a robomimic file")
    return f["data"]


def read_env_args(path: str) -> dict:
    """The env_args JSON stored in ``data.attrs['env_args']``."""
    with _open(path) as f:
        data = _data_group(f, path)
        if "env_args" not in data.attrs:
            raise RobomimicFormatError(path, "'data' has no 'env_args' attribute (the environment metadata)")
        raw = data.attrs["env_args"]
        try:
            env_args = json.loads(raw)
        except (TypeError, json.JSONDecodeError) as exc:
            raise RobomimicFormatError(path, f"data.attrs['env_args'] is not valid JSON ({exc})") from exc
        if not isinstance(env_args, dict) or "env_name" not in env_args:
            raise RobomimicFormatError(path, "data.attrs['env_args'] must be a JSON object with an 'env_name'")
        return env_args


def demo_names(path: str, filter_key: str | None = None) -> list[str]:
    """Demo names in numeric order, optionally restricted to ``mask/<filter_key>``."""
    with _open(path) as f:
        data = _data_group(f, path)
        names = sorted((k for k in data.keys() if isinstance(data[k], h5py.Group)), key=_demo_sort_key)
        if not names:
            raise RobomimicFormatError(path, "'data' holds no demonstrations (expected groups data/demo_0, ...)")
        if filter_key is None:
            return names
        if "mask" not in f or filter_key not in f["mask"]:
            available = sorted(f["mask"].keys()) if "mask" in f else []
            raise RobomimicFormatError(
                path, f"no filter key mask/{filter_key} (available: {available or 'none'}); use filter_key=None"
            )
        selected = [n.decode() if isinstance(n, bytes) else str(n) for n in f["mask"][filter_key][()]]
        missing = [n for n in selected if n not in data]
        if missing:
            raise RobomimicFormatError(path, f"mask/{filter_key} names demos that do not exist: {missing[:5]}")
        return sorted(selected, key=_demo_sort_key)


def obs_keys_in(path: str) -> list[str]:
    """Observation keys of the first demonstration."""
    with _open(path) as f:
        data = _data_group(f, path)
        first = demo_names(path)[0]
        if "obs" not in data[first]:
            raise RobomimicFormatError(path, f"data/{first} has no 'obs' group")
        return sorted(data[first]["obs"].keys())


def load_episodes(
    path: str,
    obs_keys: Sequence[str],
    names: Iterable[str] | None = None,
    filter_key: str | None = None,
) -> list[Episode]:
    """Load the given demos (default: all, or those of ``mask/<filter_key>``), checking their shapes."""
    names = list(names) if names is not None else demo_names(path, filter_key)
    episodes = []
    action_dim = None
    key_shapes: dict[str, tuple] = {}
    with _open(path) as f:
        data = _data_group(f, path)
        for name in names:
            if name not in data:
                raise RobomimicFormatError(path, f"no demonstration data/{name}")
            demo = data[name]
            if "actions" not in demo:
                raise RobomimicFormatError(path, f"data/{name} has no 'actions' dataset")
            actions = np.asarray(demo["actions"][()], dtype=np.float32)
            if actions.ndim != 2 or len(actions) == 0:
                raise RobomimicFormatError(
                    path, f"data/{name}/actions must be a non-empty (T, action_dim) array, got shape {actions.shape}"
                )
            _require_finite(path, f"data/{name}/actions", actions)
            if action_dim is None:
                action_dim = actions.shape[1]
            elif actions.shape[1] != action_dim:
                raise RobomimicFormatError(
                    path, f"data/{name}/actions has action_dim {actions.shape[1]}, earlier demos have {action_dim}"
                )
            if "obs" not in demo:
                raise RobomimicFormatError(path, f"data/{name} has no 'obs' group")
            obs = {}
            for key in obs_keys:
                if key not in demo["obs"]:
                    raise RobomimicFormatError(
                        path,
                        f"data/{name}/obs has no key {key!r}; its observation keys are {sorted(demo['obs'].keys())}"
                        + (" (images need an image dataset)" if key.endswith("_image") else ""),
                    )
                value = demo["obs"][key][()]
                if len(value) != len(actions):
                    raise RobomimicFormatError(
                        path, f"data/{name}/obs/{key} has {len(value)} steps but actions has {len(actions)}"
                    )
                if key.endswith("_image"):
                    if value.ndim != 4 or value.shape[-1] != 3 or value.dtype != np.uint8:
                        raise RobomimicFormatError(
                            path,
                            f"data/{name}/obs/{key} must be uint8 (T, H, W, 3), got {value.dtype} {value.shape}",
                        )
                else:
                    value = np.asarray(value, dtype=np.float32).reshape(len(value), -1)
                    _require_finite(path, f"data/{name}/obs/{key}", value)
                if key in key_shapes and value.shape[1:] != key_shapes[key]:
                    raise RobomimicFormatError(
                        path, f"data/{name}/obs/{key} has shape {value.shape[1:]} per step, earlier demos {key_shapes[key]}"
                    )
                key_shapes[key] = value.shape[1:]
                obs[key] = value
            episodes.append(Episode(name=name, obs=obs, actions=actions))
    return episodes


def _require_finite(path: str, name: str, values: np.ndarray) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        step = int(np.argwhere(bad)[0][0])
        raise RobomimicFormatError(
            path, f"{name} holds {int(bad.sum())} NaN or inf values (the first at step {step}): the data is broken, "
                  f"not the training; repair or regenerate the file")


class DemoWriter:
    """Write demonstrations in the robomimic layout. Use as a context manager::

        with DemoWriter(path, env_args) as writer:
            writer.add_demo(obs, next_obs, actions, rewards, dones, states, model_file)
        # on exit: data.attrs['total'], mask/train and mask/valid (last ``valid_fraction`` of demos)
    """

    def __init__(self, path: str, env_args: dict, valid_fraction: float = 0.1):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._tmp_path = f"{path}.{os.getpid()}.partial"  # unique: parallel runs may generate the same file
        self.file = h5py.File(self._tmp_path, "w")
        self.data = self.file.create_group("data")
        self.data.attrs["env_args"] = json.dumps(env_args)
        self.valid_fraction = valid_fraction
        self.names: list[str] = []
        self.total = 0

    def add_demo(
        self,
        obs: dict[str, np.ndarray],
        next_obs: dict[str, np.ndarray],
        actions: np.ndarray,
        rewards: np.ndarray,
        dones: np.ndarray,
        states: np.ndarray,
        model_file: str = "",
    ) -> str:
        name = f"demo_{len(self.names)}"
        group = self.data.create_group(name)
        group.create_dataset("actions", data=np.asarray(actions, dtype=np.float64))
        group.create_dataset("states", data=np.asarray(states, dtype=np.float64))
        group.create_dataset("rewards", data=np.asarray(rewards, dtype=np.float64))
        group.create_dataset("dones", data=np.asarray(dones, dtype=np.int64))
        for sub, values in (("obs", obs), ("next_obs", next_obs)):
            sub_group = group.create_group(sub)
            for key, value in values.items():
                value = np.asarray(value)
                if key.endswith("_image"):
                    sub_group.create_dataset(key, data=value.astype(np.uint8), compression="gzip", compression_opts=4)
                else:
                    sub_group.create_dataset(key, data=value.astype(np.float64))
        group.attrs["num_samples"] = len(actions)
        group.attrs["model_file"] = model_file
        self.names.append(name)
        self.total += len(actions)
        return name

    def close(self) -> None:
        if self.file is None:
            return
        self.data.attrs["total"] = self.total
        n_valid = int(round(self.valid_fraction * len(self.names)))
        n_valid = min(max(n_valid, 1 if len(self.names) > 1 else 0), len(self.names) - 1) if self.names else 0
        train, valid = self.names[: len(self.names) - n_valid], self.names[len(self.names) - n_valid :]
        mask = self.file.create_group("mask")
        mask.create_dataset("train", data=np.array(train, dtype="S"))
        mask.create_dataset("valid", data=np.array(valid, dtype="S"))
        self.file.close()
        self.file = None
        os.replace(self._tmp_path, self.path)  # a crash never leaves a half-written file under the real name

    def __enter__(self) -> "DemoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.file.close()
            self.file = None
            os.remove(self._tmp_path)


class ChunkDataset:
    """Training windows over episodes for action chunking, with edge padding.

    For each step t of each episode, a window covers steps ``t - obs_steps + 1 ... t - obs_steps + horizon``;
    indices outside the episode are clamped to its first/last step (edge padding). A sample is
    (obs: {key: (obs_steps, ...)}, actions: (horizon, A)): the policy sees the last ``obs_steps``
    observations up to t and predicts ``horizon`` actions starting at the first of them.
    """

    def __init__(self, episodes: Sequence[Episode], obs_steps: int, horizon: int):
        if not episodes:
            raise ValueError("ChunkDataset needs at least one episode")
        if horizon < obs_steps:
            raise ValueError(f"horizon ({horizon}) must be >= obs_steps ({obs_steps})")
        self.obs_steps, self.horizon = obs_steps, horizon
        self.keys = list(episodes[0].obs)
        self.obs = {k: np.concatenate([e.obs[k] for e in episodes]) for k in self.keys}
        self.actions = np.concatenate([e.actions for e in episodes])
        windows = []
        start = 0
        offsets = np.arange(horizon) - (obs_steps - 1)
        for episode in episodes:
            length = len(episode)
            t = np.arange(length)[:, None]
            windows.append(start + np.clip(t + offsets[None, :], 0, length - 1))
            start += length
        self.windows = np.concatenate(windows)  # (num_samples, horizon) indices into the flat arrays

    def __len__(self) -> int:
        return len(self.windows)

    def get(self, indices: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        rows = self.windows[indices]
        obs = {k: v[rows[:, : self.obs_steps]] for k, v in self.obs.items()}
        return obs, self.actions[rows]
