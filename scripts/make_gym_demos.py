"""Roll a policy out in a Gymnasium MuJoCo env and write the episodes as a Minari dataset (offline).

    python scripts/make_gym_demos.py env=HalfCheetah-v5 expert=experts/HalfCheetah-v5.npz \
        episodes=20 [action_noise=0.0] [seed=0] [dataset_id=dopr/halfcheetah/ars-expert-v0] \
        [datasets_path=data/minari] [overwrite=false]

``datasets_path`` is the Minari root the gym tasks read (``${paths.data}/minari``; a relative path is
taken against the repo root); it defaults to <repo>/data/minari, the default ``paths.data``.

``expert=random`` writes uniformly random actions (an expert-free dataset, used by the tests).
``action_noise`` adds N(0, action_noise^2) to the executed (and recorded) actions, then clips to
the action bounds, for noisier demonstrations. Episode i is reset with seed ``seed + i``.
The dataset records ref_max_score = the expert's measured return (from its checkpoint) so the
BC task can report returns normalized by it.
"""

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dopr.cli import parse_script_args  # noqa: E402
from dopr.data.minari_data import DEFAULT_DATASETS_PATH, resolve_datasets_path  # noqa: E402


@dataclass
class GymDemosArgs:
    env: str
    expert: str  # a checkpoint .npz or "random"
    episodes: int = 20
    action_noise: float = 0.0
    seed: int = 0
    dataset_id: str | None = None  # default: dopr/<env>/ars-expert-v0 (or random-v0)
    datasets_path: str = str(DEFAULT_DATASETS_PATH)
    overwrite: bool = False


def default_dataset_id(env_id: str, expert: str) -> str:
    name = env_id.split("-v")[0].lower()
    return f"dopr/{name}/{'random' if expert == 'random' else 'ars-expert'}-v0"


def write_demos(env_id: str, expert: str, episodes: int, dataset_id: str,
                datasets_path: str | Path = DEFAULT_DATASETS_PATH,
                seed: int = 0, action_noise: float = 0.0, overwrite: bool = False) -> dict:
    """Write ``episodes`` rollouts of ``expert`` (a checkpoint path or 'random') as a Minari dataset."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if action_noise < 0:
        raise ValueError(f"action_noise must be >= 0, got {action_noise}")
    from minari.dataset.minari_dataset import parse_dataset_id

    try:
        parse_dataset_id(dataset_id)
    except ValueError as error:
        raise ValueError(f"bad dataset_id {dataset_id!r}: use '<namespace>/<env>/<name>-v<N>' such as "
                         f"'dopr/hopper/ars-expert-v0' (namespaces need >= 2 characters). {error}") from None
    datasets_path = resolve_datasets_path(datasets_path)
    import gymnasium as gym
    from minari import create_dataset_from_buffers
    from minari.data_collector.episode_buffer import EpisodeBuffer

    from dopr.envs.linear_expert import load_expert

    target = datasets_path / dataset_id
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=true to replace it")
        shutil.rmtree(target)

    env = gym.make(env_id)
    low, high = env.action_space.low, env.action_space.high
    rng = np.random.default_rng(seed)
    ref_max_score, algorithm = None, "uniform random actions"
    if expert == "random":
        env.action_space.seed(seed)
        policy = lambda obs: env.action_space.sample()  # noqa: E731
    else:
        expert_policy = load_expert(expert)
        if expert_policy.meta.get("env_id") not in (None, env_id):
            raise ValueError(f"expert {expert} was trained on {expert_policy.meta['env_id']}, not {env_id}")
        if expert_policy.obs_dim != env.observation_space.shape[0]:
            raise ValueError(f"expert {expert} expects {expert_policy.obs_dim}-dim observations, "
                             f"{env_id} gives {env.observation_space.shape[0]}")
        policy = expert_policy
        ref_max_score = expert_policy.meta.get("return_mean")
        algorithm = f"{expert_policy.meta.get('algorithm', 'expert')} from {Path(expert).name}"
    if action_noise > 0:
        algorithm += f" + N(0, {action_noise}^2) action noise"

    # Episodes go to minari's own writer (create_dataset_from_buffers). We fill the buffers
    # ourselves rather than through minari.DataCollector, which needs jax just to append steps.
    buffers, returns = [], []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        done = False
        while not done:
            action = np.asarray(policy(obs), dtype=np.float32)
            if action_noise > 0:
                action = np.clip(action + action_noise * rng.standard_normal(action.shape), low, high).astype(np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(float(reward))
            terminations.append(bool(terminated))
            truncations.append(bool(truncated))
            done = terminated or truncated
        buffers.append(EpisodeBuffer(id=i, seed=seed + i, observations=np.asarray(observations),
                                     actions=np.asarray(actions), rewards=rewards,
                                     terminations=terminations, truncations=truncations))
        returns.append(sum(rewards))
    # Give ref_min_score explicitly so minari does not roll out 100 random episodes itself.
    # minari's writer takes its root only from $MINARI_DATASETS_PATH: ours, for this call only.
    with mock.patch.dict(os.environ, {"MINARI_DATASETS_PATH": str(datasets_path)}):
        create_dataset_from_buffers(
            dataset_id=dataset_id, buffer=buffers, env=env_id, eval_env=env_id, algorithm_name=algorithm,
            code_permalink="scripts/make_gym_demos.py", author="DoPr reproduction",
            author_email="see the repository README",
            ref_max_score=None if ref_max_score is None else float(ref_max_score),
            ref_min_score=0.0 if ref_max_score is not None else None,
            description=f"{episodes} episodes of {algorithm} on {env_id}, reset seeds {seed}..{seed + episodes - 1}")
    env.close()
    return dict(dataset_id=dataset_id, path=str(target), episodes=episodes,
                return_mean=float(np.mean(returns)), return_std=float(np.std(returns)))


def main(argv: list[str]) -> None:
    args = parse_script_args(argv, GymDemosArgs, __doc__)
    dataset_id = default_dataset_id(args.env, args.expert) if args.dataset_id is None else args.dataset_id
    info = write_demos(env_id=args.env, expert=args.expert, episodes=args.episodes, dataset_id=dataset_id,
                       datasets_path=args.datasets_path, seed=args.seed, action_noise=args.action_noise,
                       overwrite=args.overwrite)
    print(f"wrote {info['episodes']} episodes to {info['path']}: return {info['return_mean']:.1f} "
          f"+- {info['return_std']:.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
