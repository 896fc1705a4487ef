"""Train a linear expert for a Gymnasium MuJoCo env with Augmented Random Search (ARS V2-t).

    python scripts/train_expert.py env=HalfCheetah-v5 [seed=0] [max_env_steps=3000000]
        [max_minutes=30] [out=experts/HalfCheetah-v5.npz] [directions=..] [top=..] [step_size=..] [noise=..]
    python scripts/train_expert.py env=Hopper-v5 evaluate_only=experts/Hopper-v5.npz   # re-measure a saved expert
    python scripts/train_expert.py env=Humanoid-v5 workers=16 max_minutes=9 resume=true  # many cores, in chunks

``workers=N`` rolls the 2*directions perturbed policies out in N processes (same result as serial:
every episode seed is drawn in the main process). The full training state is written atomically
to ``<out>.state.npz`` after every iteration; ``resume=true`` continues from it, so a long run can
be split across time-limited calls (the wall-time budget ``max_minutes`` counts per call).

Why ARS: it needs only env steps (no backprop, no GPU), a linear policy fits in a few KB, and
Mania et al. (2018) report expert-level Hopper/HalfCheetah/Walker2d returns with it. The
per-env defaults below are that paper's V2-t hyperparameters.

The script keeps the best policy by periodic evaluations of ``selection_episodes`` episodes (reset seeds
20_000 + i; default 10: the max over many 3-episode scores picked Humanoid policies that returned 7136 on
their three episodes and 4356 on ten others), then
measures the final return over `eval_episodes` episodes with other fixed seeds (eval_seed_base + i,
default 10_000 + i), so that the policy picked on some episodes is not measured on the same ones,
and records it in experts/returns.json together with the command, seed, env steps, wall time and machine.
"""

import json
import multiprocessing
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gymnasium as gym  # noqa: E402

from dopr.cli import parse_script_args  # noqa: E402
from dopr.envs.linear_expert import LinearPolicy  # noqa: E402
from dopr.paths import REPO_ROOT  # noqa: E402

# ARS V2-t hyperparameters (Mania et al. 2018, Table 9): directions N, top directions b,
# step size alpha, exploration noise nu, and the per-step alive bonus removed during training
# (it otherwise rewards standing still).
ARS_DEFAULTS = {
    "HalfCheetah-v5": dict(directions=32, top=4, step_size=0.02, noise=0.03, alive_bonus=0.0),
    "Hopper-v5": dict(directions=8, top=4, step_size=0.01, noise=0.025, alive_bonus=1.0),
    "Walker2d-v5": dict(directions=40, top=30, step_size=0.025, noise=0.01, alive_bonus=1.0),
    "Ant-v5": dict(directions=60, top=20, step_size=0.015, noise=0.025, alive_bonus=1.0),
    "Humanoid-v5": dict(directions=230, top=230, step_size=0.02, noise=0.0075, alive_bonus=5.0),
}
EVAL_SEED_BASE = 10_000
# The periodic evaluations that pick the best policy reset with these seeds, disjoint from the final
# measurement's: a policy picked on lucky episodes would otherwise be measured on them again.
SELECTION_SEED_BASE = 20_000
LEGACY_SELECTION_EPISODES = 3  # what states written before selection_episodes existed used
HYPERPARAMETERS = ("directions", "top", "step_size", "noise", "alive_bonus")


@dataclass
class TrainExpertArgs:
    env: str
    seed: int = 0
    max_env_steps: float = 3e6  # a float, so that 3e6 is accepted
    max_minutes: float = 30.0  # wall-time budget of this call
    eval_every: int = 10  # iterations between evaluations (selection_episodes episodes each)
    selection_episodes: int = 10  # episodes of each evaluation that picks the best policy
    eval_episodes: int = 10  # episodes of the final measurement
    out: str | None = None  # default: experts/<env>.npz
    returns_json: str | None = None  # default: returns.json next to out
    workers: int = 1
    resume: bool = False
    evaluate_only: str | None = None  # a checkpoint to re-measure instead of training
    eval_seed_base: int = EVAL_SEED_BASE  # the final measurement resets with seeds eval_seed_base + i
    machine: str | None = None  # how the run's machine is described in its record
    # ARS hyperparameters; None: the env's row of ARS_DEFAULTS
    directions: int | None = None
    top: int | None = None
    step_size: float | None = None
    noise: float | None = None
    alive_bonus: float | None = None

    def __post_init__(self):
        for key in ("eval_every", "selection_episodes", "eval_episodes", "workers"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")


class RunningObsStats:
    """Running mean/variance of observations (ARS 'V2' normalization), merged once per iteration."""

    def __init__(self, dim: int):
        self.count = 0
        self.sum = np.zeros(dim)
        self.sumsq = np.zeros(dim)

    def add(self, observations: np.ndarray) -> None:
        self.count += len(observations)
        self.sum += observations.sum(0)
        self.sumsq += (observations ** 2).sum(0)

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            return np.zeros_like(self.sum), np.ones_like(self.sum)
        mean = self.sum / self.count
        var = np.maximum(self.sumsq / self.count - mean ** 2, 0.0)
        std = np.sqrt(var)
        # Constant coordinates (std ~ 0) would blow up the normalized input; leave them unscaled.
        std[std < 1e-8] = 1.0
        return mean, std


def rollout(env, weight, mean, std, low, high, seed, max_steps, alive_bonus=0.0, record=None):
    """One episode with action clip(weight @ (obs-mean)/std). Returns (shaped return, true return, steps)."""
    obs, _ = env.reset(seed=int(seed))
    shaped, true_return, steps = 0.0, 0.0, 0
    visited = [] if record is not None else None
    for steps in range(1, max_steps + 1):
        if visited is not None:
            visited.append(obs)
        action = np.clip(weight @ ((obs - mean) / std), low, high)
        obs, reward, terminated, truncated, _ = env.step(action)
        true_return += reward
        shaped += reward - alive_bonus
        if terminated or truncated:
            break
    if record is not None:
        record.add(np.asarray(visited))
    return shaped, true_return, steps


_WORKER_ENV = None  # one env per worker process
_JSON_STATE_KEYS = ("rng", "history", "hp")  # state entries that are not arrays


def _init_worker(env_id: str, env=None) -> None:
    global _WORKER_ENV
    _WORKER_ENV = env if env is not None else gym.make(env_id, disable_env_checker=True).unwrapped


def _rollout_in_worker(job):
    """(weight, mean, std, low, high, seed, max_steps, alive_bonus) -> (shaped return, steps, obs sum, sum sq, count)."""
    weight, mean, std, low, high, seed, max_steps, alive_bonus = job
    stats = RunningObsStats(len(mean))
    shaped, _, steps = rollout(_WORKER_ENV, weight, mean, std, low, high, seed, max_steps, alive_bonus, record=stats)
    return shaped, steps, stats.sum, stats.sumsq, stats.count


def save_state(path: Path, **state) -> None:
    """Atomic: a run killed mid-write keeps its previous state file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **{k: (json.dumps(v) if k in _JSON_STATE_KEYS else v) for k, v in state.items()})
    os.replace(tmp, path)


def load_state(path: Path) -> dict:
    with np.load(path) as data:
        state = {k: data[k] for k in data.files}
    for key in _JSON_STATE_KEYS:
        state[key] = json.loads(str(state[key]))
    return state


def evaluate(env, weight, mean, std, low, high, episodes, max_steps, per_episode=False, seed_base=EVAL_SEED_BASE):
    """Mean and std of the true return over episodes reset with seeds seed_base + i."""
    returns = [rollout(env, weight, mean, std, low, high, seed_base + i, max_steps)[1]
               for i in range(episodes)]
    summary = (float(np.mean(returns)), float(np.std(returns)))
    return summary + ([float(r) for r in returns],) if per_episode else summary


def remeasure(env_id: str, checkpoint: Path, episodes: int, argv: list[str], seed_base: int = EVAL_SEED_BASE) -> None:
    """Re-measure a saved expert's return (seeds seed_base + i) and record it in the checkpoint and returns.json."""
    from dopr.envs.linear_expert import load_expert

    policy = load_expert(checkpoint)
    if policy.meta.get("env_id") not in (None, env_id):
        raise SystemExit(f"{checkpoint} is an expert for {policy.meta['env_id']}, not {env_id}")
    env = gym.make(env_id, disable_env_checker=True)
    max_steps = int(env.spec.max_episode_steps or 1000)
    env = env.unwrapped
    mean, std, episode_returns = evaluate(env, policy.weight, policy.obs_mean, policy.obs_std,
                                          policy.action_low, policy.action_high, episodes, max_steps,
                                          per_episode=True, seed_base=seed_base)
    print(f"{env_id}: {checkpoint} return {mean:.1f} +- {std:.1f} over {episodes} episodes "
          f"(seeds {seed_base}..{seed_base + episodes - 1})")
    policy.meta.update(return_mean=mean, return_std=std, episode_returns=episode_returns, eval_episodes=episodes,
                       eval_seeds=[seed_base, seed_base + episodes - 1],
                       measure_command="python scripts/train_expert.py " + " ".join(argv))
    policy.save(checkpoint)
    returns_path = checkpoint.parent / "returns.json"
    table = json.loads(returns_path.read_text()) if returns_path.is_file() else {}
    table[env_id] = {k: v for k, v in policy.meta.items() if k != "history"} | {"checkpoint": checkpoint.name}
    returns_path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")


def main(argv: list[str]) -> None:
    args = parse_script_args(argv, TrainExpertArgs, __doc__)
    env_id = args.env
    if args.evaluate_only is not None:
        remeasure(env_id, Path(args.evaluate_only), args.eval_episodes, argv, args.eval_seed_base)
        return
    hp = dict(ARS_DEFAULTS.get(env_id, dict(directions=16, top=8, step_size=0.02, noise=0.03, alive_bonus=0.0)))
    hp.update({key: getattr(args, key) for key in HYPERPARAMETERS if getattr(args, key) is not None})
    if not 1 <= hp["top"] <= hp["directions"]:
        raise SystemExit(f"need 1 <= top <= directions, got top={hp['top']} directions={hp['directions']}")
    seed = args.seed
    max_env_steps = int(args.max_env_steps)
    max_minutes, eval_every, eval_episodes = args.max_minutes, args.eval_every, args.eval_episodes
    selection_episodes = args.selection_episodes
    out_path = Path(args.out) if args.out is not None else REPO_ROOT / "experts" / f"{env_id}.npz"
    returns_path = Path(args.returns_json) if args.returns_json is not None else out_path.parent / "returns.json"

    env = gym.make(env_id, disable_env_checker=True)
    max_steps = int(env.spec.max_episode_steps or 1000)
    env = env.unwrapped  # the loop enforces the time limit itself; wrappers only cost time here
    low, high = env.action_space.low.astype(np.float64), env.action_space.high.astype(np.float64)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    rng = np.random.default_rng(seed)
    weight = np.zeros((act_dim, obs_dim))
    stats = RunningObsStats(obs_dim)
    mean, std = stats.mean_std()
    env_steps, iteration, minutes_before = 0, 0, 0.0
    best = (-np.inf, weight.copy(), mean.copy(), std.copy())
    history = []
    state_path = out_path.with_name(out_path.name + ".state.npz")

    def save() -> None:
        save_state(state_path, rng=rng.bit_generator.state, hp=hp, seed=seed, weight=weight, obs_sum=stats.sum,
                   obs_sumsq=stats.sumsq, obs_count=stats.count, env_steps=env_steps, iteration=iteration,
                   minutes=minutes, best_return=best[0], best_weight=best[1], best_mean=best[2],
                   best_std=best[3], history=history, selection_seed_base=SELECTION_SEED_BASE,
                   selection_episodes=selection_episodes)

    if args.resume and state_path.is_file():
        state = load_state(state_path)
        if state["hp"] != hp or int(state["seed"]) != seed:
            raise SystemExit(f"{state_path} was written with hp={state['hp']} seed={int(state['seed'])}; "
                             f"this call has hp={hp} seed={seed}. Use the same settings, or delete the state file.")
        rng.bit_generator.state = state["rng"]
        weight, stats.sum, stats.sumsq, stats.count = state["weight"], state["obs_sum"], state["obs_sumsq"], int(state["obs_count"])
        mean, std = stats.mean_std()
        env_steps, iteration, minutes_before = int(state["env_steps"]), int(state["iteration"]), float(state["minutes"])
        best = (float(state["best_return"]), state["best_weight"], state["best_mean"], state["best_std"])
        history = state["history"]
        print(f"resumed {state_path}: iteration {iteration}, {env_steps} env steps, best {best[0]:.1f}", flush=True)
        picked_on = (int(state.get("selection_seed_base", EVAL_SEED_BASE)),
                     int(state.get("selection_episodes", LEGACY_SELECTION_EPISODES)))
        if picked_on != (SELECTION_SEED_BASE, selection_episodes) and np.isfinite(best[0]):
            # Picked on other episodes (the final measurement's first seeds, or fewer of them): score it again
            # on this call's selection episodes, so that later candidates are compared on the same ones.
            rescored = evaluate(env, best[1], best[2], best[3], low, high, selection_episodes,
                                max_steps, seed_base=SELECTION_SEED_BASE)[0]
            print(f"best policy re-scored on the selection seeds {SELECTION_SEED_BASE}.."
                  f"{SELECTION_SEED_BASE + selection_episodes - 1}: {best[0]:.1f} -> {rescored:.1f}", flush=True)
            best = (rescored,) + best[1:]
            minutes = minutes_before
            save()  # the new score stands even if this call runs no iteration
    workers = args.workers
    if workers > 1:
        pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (env_id,))
    else:
        pool = None
        _init_worker(env_id, env)  # the main process rolls out in the env it evaluates in

    start = time.time()
    while env_steps < max_env_steps and (time.time() - start) < max_minutes * 60:
        iteration += 1
        deltas = rng.standard_normal((hp["directions"], act_dim, obs_dim))
        plus, minus = np.zeros(hp["directions"]), np.zeros(hp["directions"])
        iteration_stats = RunningObsStats(obs_dim)
        jobs = []
        for k in range(hp["directions"]):
            episode_seed = int(rng.integers(2**31 - 1))
            for sign in (1.0, -1.0):
                jobs.append((weight + sign * hp["noise"] * deltas[k], mean, std, low, high, episode_seed,
                             max_steps, hp["alive_bonus"]))
        results = pool.map(_rollout_in_worker, jobs) if pool is not None else [_rollout_in_worker(job) for job in jobs]
        for j, (shaped, steps, obs_sum, obs_sumsq, count) in enumerate(results):
            (plus if j % 2 == 0 else minus)[j // 2] = shaped
            env_steps += steps
            iteration_stats.sum += obs_sum
            iteration_stats.sumsq += obs_sumsq
            iteration_stats.count += count
        # Keep the b best directions (by max of the pair) and step along their reward differences,
        # scaled by the std of the rewards used (the V1 -> V2 'reward scaling' of ARS).
        order = np.argsort(-np.maximum(plus, minus))[: hp["top"]]
        reward_std = np.concatenate([plus[order], minus[order]]).std() + 1e-8
        step = np.tensordot(plus[order] - minus[order], deltas[order], axes=1)
        weight = weight + hp["step_size"] / (hp["top"] * reward_std) * step
        stats.sum += iteration_stats.sum
        stats.sumsq += iteration_stats.sumsq
        stats.count += iteration_stats.count
        mean, std = stats.mean_std()
        minutes = minutes_before + (time.time() - start) / 60
        if iteration % eval_every == 0:
            avg, sd = evaluate(env, weight, mean, std, low, high, selection_episodes, max_steps,
                               seed_base=SELECTION_SEED_BASE)
            history.append(dict(iteration=iteration, env_steps=env_steps, eval_return=avg, minutes=minutes,
                                episodes=selection_episodes))
            print(f"iter {iteration} env_steps {env_steps} eval_return {avg:.1f} +- {sd:.1f} "
                  f"({minutes:.1f} min)", flush=True)
            if avg > best[0]:
                best = (avg, weight.copy(), mean.copy(), std.copy())
        save()
    if pool is not None:
        pool.close()
    minutes = minutes_before + (time.time() - start) / 60
    if best[0] == -np.inf:  # never evaluated: keep the final policy
        best = (np.nan, weight, mean, std)
    _, weight, mean, std = best
    # Checkpoints store float32; measure the return of exactly what is saved.
    weight, mean, std = (np.asarray(a, np.float32).astype(np.float64) for a in (weight, mean, std))
    seed_base = args.eval_seed_base
    final_mean, final_std, episode_returns = evaluate(env, weight, mean, std, low, high, eval_episodes,
                                                      max_steps, per_episode=True, seed_base=seed_base)
    print(f"final: {env_id} return {final_mean:.1f} +- {final_std:.1f} over {eval_episodes} episodes "
          f"(seeds {seed_base}..{seed_base + eval_episodes - 1}), {env_steps} env steps, "
          f"{minutes:.1f} min", flush=True)

    command = "python scripts/train_expert.py " + " ".join(argv)
    meta = dict(env_id=env_id, algorithm="ARS V2-t (linear policy)", hyperparameters=hp, seed=seed,
                env_steps=env_steps, iterations=iteration, train_minutes=round(minutes, 2),
                return_mean=final_mean, return_std=final_std, episode_returns=episode_returns,
                eval_episodes=eval_episodes,
                eval_seeds=[seed_base, seed_base + eval_episodes - 1], selection_seeds=[
                    SELECTION_SEED_BASE, SELECTION_SEED_BASE + selection_episodes - 1], command=command,
                machine=f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU" if args.machine is None
                else args.machine,
                gymnasium=gym.__version__, history=history)
    LinearPolicy(weight, mean, std, low, high, meta=meta).save(out_path)
    table = json.loads(returns_path.read_text()) if returns_path.is_file() else {}
    table[env_id] = {k: v for k, v in meta.items() if k != "history"} | {"checkpoint": out_path.name}
    returns_path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out_path} and {returns_path}")


if __name__ == "__main__":
    main(sys.argv[1:])
