"""Read Minari datasets (written by minari itself or by scripts/make_gym_demos.py) for behavior cloning.

Datasets are looked up under a local root: the ``datasets_path`` argument (runs pass
``${paths.data}/minari``; a relative path is taken against the repo root), else
``<repo>/data/minari``. Nothing is ever downloaded: a missing dataset is an error that says how to get it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dopr.paths import DEFAULT_DATA, resolve

DEFAULT_DATASETS_PATH = DEFAULT_DATA / "minari"


def resolve_datasets_path(datasets_path: str | os.PathLike | None = None) -> Path:
    """The Minari root directory: ``datasets_path`` (relative to the repo root), else <repo>/data/minari."""
    return resolve(datasets_path) if datasets_path else DEFAULT_DATASETS_PATH


@dataclass
class MinariEpisodes:
    """Episodes of one Minari dataset as plain arrays.

    observations[i] has T_i + 1 rows (the final observation included, as Minari stores it);
    actions[i] and rewards[i] have T_i rows.
    """

    dataset_id: str
    env_id: str | None
    observations: list[np.ndarray]
    actions: list[np.ndarray]
    rewards: list[np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def episode_returns(self) -> np.ndarray:
        return np.array([r.sum() for r in self.rewards])

    @property
    def ref_max_score(self) -> float | None:
        value = self.metadata.get("ref_max_score")
        return None if value is None else float(value)

    def state_action_pairs(self, episode_ids) -> tuple[np.ndarray, np.ndarray]:
        """Concatenate (observation_t, action_t) pairs of the given episodes (final obs dropped)."""
        episode_ids = list(episode_ids)
        if not episode_ids:
            raise ValueError("no episodes selected")
        obs = np.concatenate([self.observations[i][:-1] for i in episode_ids]).astype(np.float32)
        act = np.concatenate([self.actions[i] for i in episode_ids]).astype(np.float32)
        return obs, act


def _missing_dataset_message(dataset_id: str, root: Path) -> str:
    available = sorted(str(p.parent.relative_to(root)) for p in root.glob("**/data") if p.is_dir()) if root.is_dir() else []
    return (
        f"Minari dataset '{dataset_id}' not found under {root} (expected {root / dataset_id / 'data'}). "
        f"Available here: {available or 'none'}. To get it: on a machine with network run "
        f"`MINARI_DATASETS_PATH=<dir> minari download {dataset_id}` and copy <dir>/{dataset_id} to "
        f"{root / dataset_id}; or write one locally from a committed expert with `python scripts/make_gym_demos.py "
        f"env=<Gymnasium id> expert=experts/<Gymnasium id>.npz dataset_id={dataset_id} datasets_path={root}`. "
        f"The root is task.datasets_path (default ${{paths.data}}/minari): set paths.data to move every data "
        f"location, or task.datasets_path for this one.")


def load_minari_episodes(dataset_id: str, datasets_path: str | os.PathLike | None = None,
                         max_episodes: int | None = None) -> MinariEpisodes:
    """Load the first ``max_episodes`` episodes (all if None) of a local Minari dataset as arrays."""
    from minari.dataset.minari_dataset import MinariDataset  # heavy import, only when reading data

    root = resolve_datasets_path(datasets_path)
    data_path = root / dataset_id / "data"
    if not data_path.is_dir():
        raise FileNotFoundError(_missing_dataset_message(dataset_id, root))
    dataset = MinariDataset(str(data_path))
    n = dataset.total_episodes if max_episodes is None else min(int(max_episodes), dataset.total_episodes)
    if n < 1:
        raise ValueError(f"Minari dataset '{dataset_id}' at {data_path} holds no episodes")
    observations, actions, rewards = [], [], []
    for episode in dataset.iterate_episodes(range(n)):
        if isinstance(episode.observations, dict):
            raise ValueError(
                f"dataset '{dataset_id}' has dict observations (keys {sorted(episode.observations)}); "
                f"the Gymnasium BC task expects flat Box observations such as the mujoco/* datasets")
        observations.append(np.asarray(episode.observations, dtype=np.float64))
        actions.append(np.asarray(episode.actions, dtype=np.float64))
        rewards.append(np.asarray(episode.rewards, dtype=np.float64))
    spec = dataset.env_spec
    metadata = dict(dataset.storage.metadata)
    return MinariEpisodes(dataset_id=dataset_id, env_id=None if spec is None else spec.id,
                          observations=observations, actions=actions, rewards=rewards, metadata=metadata)
