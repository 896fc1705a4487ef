"""Gymnasium behavior cloning: Minari writer/reader, residual MLP, shift meter, rollouts, task, experts.

Everything runs real MuJoCo envs and real Minari files at tiny size (random-policy Hopper episodes,
which end in ~20-100 steps); nothing is downloaded.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dopr.data.minari_data import load_minari_episodes
from dopr.envs.gym_envs import make_env, rollout_policy
from dopr.envs.linear_expert import LinearPolicy, load_expert
from dopr.models.residual_mlp import ResidualMLP
from dopr.shift import gaussian_state_shift
from dopr.tasks.gym_bc import GymBCTask
from script_loader import load_script

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


make_gym_demos = load_script("make_gym_demos")


@pytest.fixture(scope="module")
def random_hopper(tmp_path_factory):
    """8 random-action Hopper-v5 episodes written by minari's own writer into a temp Minari root
    (``<data>/minari``, laid out as under a ``paths.data`` root)."""
    root = tmp_path_factory.mktemp("data") / "minari"
    info = make_gym_demos.write_demos("Hopper-v5", "random", episodes=8, dataset_id="test/hopper/random-v0",
                                      datasets_path=root, seed=3)
    return root, info


# ---- data ------------------------------------------------------------------------------------

def test_written_dataset_reads_back_through_minari_and_ours(random_hopper, monkeypatch):
    root, info = random_hopper
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    import minari

    reference = minari.load_dataset("test/hopper/random-v0")  # minari's own reader
    ours = load_minari_episodes("test/hopper/random-v0", datasets_path=root)
    assert len(ours) == reference.total_episodes == 8
    assert ours.env_id == "Hopper-v5"
    for mine, theirs in zip(range(len(ours)), reference.iterate_episodes()):
        np.testing.assert_allclose(ours.observations[mine], theirs.observations)
        np.testing.assert_allclose(ours.actions[mine], theirs.actions)
        assert len(ours.observations[mine]) == len(ours.actions[mine]) + 1
    assert ours.episode_returns.mean() == pytest.approx(info["return_mean"], rel=1e-5)
    # Episode i was reset with seed 3 + i: replaying its actions in a fresh env reproduces its states.
    env = make_env("Hopper-v5")
    obs, _ = env.reset(seed=3 + 2)
    np.testing.assert_allclose(obs, ours.observations[2][0], rtol=1e-6)
    for action in ours.actions[2][:5]:
        obs, *_ = env.step(action)
    np.testing.assert_allclose(obs, ours.observations[2][5], rtol=1e-5, atol=1e-8)


def test_missing_dataset_error_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="minari download mujoco/hopper/expert-v0"):
        load_minari_episodes("mujoco/hopper/expert-v0", datasets_path=tmp_path)
    with pytest.raises(FileNotFoundError, match="make_gym_demos.py"):
        GymBCTask(dataset="mujoco/hopper/expert-v0", datasets_path=str(tmp_path))


def test_expert_demos_record_ref_score_and_action_noise(tmp_path):
    env = make_env("Hopper-v5")
    rng = np.random.default_rng(0)
    expert = LinearPolicy(0.1 * rng.standard_normal((3, 11)), np.zeros(11), np.ones(11),
                          env.action_space.low, env.action_space.high,
                          meta={"env_id": "Hopper-v5", "return_mean": 123.0})
    expert.save(tmp_path / "expert.npz")
    clean = make_gym_demos.write_demos("Hopper-v5", str(tmp_path / "expert.npz"), 2, "tt/clean-v0", tmp_path / "m")
    noisy = make_gym_demos.write_demos("Hopper-v5", str(tmp_path / "expert.npz"), 2, "tt/noisy-v0", tmp_path / "m",
                                       action_noise=0.3)
    clean_eps = load_minari_episodes("tt/clean-v0", tmp_path / "m")
    noisy_eps = load_minari_episodes("tt/noisy-v0", tmp_path / "m")
    assert clean_eps.ref_max_score == 123.0
    # Clean demos are exactly the expert's actions; noisy ones are not, but stay in bounds.
    np.testing.assert_allclose(clean_eps.actions[0], expert(clean_eps.observations[0][:-1]), atol=1e-6)
    assert np.abs(noisy_eps.actions[0] - expert(noisy_eps.observations[0][:-1])).mean() > 0.05
    assert np.all(np.abs(noisy_eps.actions[0]) <= 1.0)
    with pytest.raises(FileExistsError, match="overwrite"):
        make_gym_demos.write_demos("Hopper-v5", str(tmp_path / "expert.npz"), 1, "tt/clean-v0", tmp_path / "m")
    with pytest.raises(ValueError, match="bad dataset_id"):
        make_gym_demos.write_demos("Hopper-v5", "random", 1, "t/x-v0", tmp_path / "m")
    with pytest.raises(ValueError, match="trained on Hopper-v5"):
        make_gym_demos.write_demos("Walker2d-v5", str(tmp_path / "expert.npz"), 1, "tt/w-v0", tmp_path / "m")


# ---- model, shift meter, rollouts ----------------------------------------------------------------

def test_residual_mlp_shapes_and_errors():
    net = ResidualMLP(11, 3, width=32, depth=2)
    assert net(torch.zeros(4, 11)).shape == (4, 3)
    assert net(torch.zeros(2, 5, 11)).shape == (2, 5, 3)
    assert sum(isinstance(m, torch.nn.Linear) for m in net.modules()) == 2 + 2 * 2
    with pytest.raises(ValueError, match="last dim 11"):
        net(torch.zeros(4, 10))
    with pytest.raises(ValueError, match="depth"):
        ResidualMLP(11, 3, depth=-1)


def test_gaussian_state_shift_matches_closed_form():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((20000, 4))
    assert gaussian_state_shift(reference, reference)["gaussian_kl"] == pytest.approx(0.0, abs=1e-9)
    visited = 2.0 * rng.standard_normal((20000, 4)) + 1.0
    # KL(N(1, 4I) || N(0, I)) in 4 dims = 1/2 (4*4 + 4*1 - 4 - 4 log 4)
    expected = 0.5 * (16 + 4 - 4 - 4 * np.log(4))
    shift = gaussian_state_shift(visited, reference)
    assert shift["gaussian_kl"] == pytest.approx(expected, rel=0.05)
    assert shift["mean_distance"] == pytest.approx(1.0, rel=0.05)
    # A constant coordinate (e.g. a pinned joint) stays finite thanks to the ridge.
    reference[:, 0] = 0.0
    assert np.isfinite(gaussian_state_shift(visited, reference)["gaussian_kl"])
    with pytest.raises(ValueError, match="same width"):
        gaussian_state_shift(visited[:, :3], reference)


def test_rollouts_are_seeded_and_batching_invariant():
    weight = np.random.default_rng(1).standard_normal((3, 11)) * 0.2
    policy = lambda obs: obs @ weight.T  # noqa: E731
    together = rollout_policy(policy, "Hopper-v5", episodes=3, seed=7)
    alone = [rollout_policy(policy, "Hopper-v5", episodes=1, seed=7 + i) for i in range(3)]
    np.testing.assert_allclose(together.returns, [r.returns[0] for r in alone])
    np.testing.assert_array_equal(together.lengths, [r.lengths[0] for r in alone])
    assert together.states.shape == (together.lengths.sum(), 11)
    assert rollout_policy(policy, "Hopper-v5", episodes=2, seed=8).returns[0] == pytest.approx(together.returns[1])
    with pytest.raises(ValueError, match="MuJoCo v5 ids"):
        make_env("Hoper-v5")


# ---- the task end to end ---------------------------------------------------------------------

def test_task_trains_validates_and_evaluates(random_hopper):
    root, _ = random_hopper
    task = GymBCTask(dataset="test/hopper/random-v0", datasets_path=str(root), val_episodes=2,
                     batch_size=64, width=32, depth=2, eval_episodes=2, seed=0)
    assert task.n_train_episodes == 6 and task.env_id == "Hopper-v5"
    model = task.build_model()
    batches = task.train_batches()
    fixed = next(batches)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    first = task.loss(model, fixed).item()
    for _ in range(60):
        loss = task.loss(model, next(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert task.loss(model, fixed).item() < 0.7 * first  # it fits its training data
    model.eval()
    val = task.validate(model)
    metrics = task.evaluate(model)
    assert set(metrics) == {"test/return", "test/return_std", "test/normalized_return",
                            "test/episode_length", "test/state_shift", "test/state_mean_shift"}
    assert np.isfinite(val["val/loss"]) and all(np.isfinite(v) for v in metrics.values())
    # The train-set loss of the evaluated model is the fixed-batch loss averaged over all train pairs.
    model.eval()
    whole = task.loss(model, (torch.as_tensor(task.train_obs), torch.as_tensor(task.train_act))).item()
    assert val["val/train_set_loss"] == pytest.approx(whole, rel=1e-4)
    assert metrics["test/normalized_return"] == pytest.approx(metrics["test/return"] / task.demo_return)
    assert metrics["test/episode_length"] >= 1
    json.dumps(task.state())
    # Same seed -> same model and same batches.
    again = GymBCTask(dataset="test/hopper/random-v0", datasets_path=str(root), batch_size=64, width=32, depth=2)
    torch.testing.assert_close(next(again.train_batches()), fixed)


def test_task_rejects_bad_config(random_hopper):
    root, _ = random_hopper
    with pytest.raises(ValueError, match="set task.env_id"):
        GymBCTask(dataset="test/hopper/random-v0", datasets_path=str(root), env_id="HalfCheetah-v5")
    with pytest.raises(ValueError, match="train_episodes=20"):
        GymBCTask(dataset="test/hopper/random-v0", datasets_path=str(root), train_episodes=20)
    with pytest.raises(TypeError, match="unknown config keys"):
        GymBCTask(dataset="test/hopper/random-v0", datasets_path=str(root), widht=3)


@pytest.mark.parametrize("config", sorted((REPO / "configs" / "task").glob("gym_*.yaml")), ids=lambda p: p.stem)
def test_task_configs_match_the_task_signature(config):
    task_cfg = yaml.safe_load(config.read_text())["task"]
    assert task_cfg["_target_"] == "dopr.tasks.gym_bc.GymBCTask"
    accepted = set(inspect.signature(GymBCTask.__init__).parameters) | {"name"}
    assert set(task_cfg) - {"_target_"} <= accepted


def _compose_gym_task(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("config", overrides=["task=gym_hopper", "task.dataset=test/hopper/random-v0",
                                            "task.width=16", "task.depth=1", *overrides]).task


def test_paths_data_moves_where_gym_tasks_read_their_dataset(random_hopper):
    from hydra.utils import instantiate

    root, _ = random_hopper
    assert _compose_gym_task().datasets_path == "data/minari"  # the default root, relative to the repo
    task = instantiate(_compose_gym_task(f"paths.data={root.parent}"))
    assert task.n_train_episodes == 6 and task.env_id == "Hopper-v5"


def test_relative_data_root_is_taken_against_the_repo_root_not_the_cwd(random_hopper, tmp_path, monkeypatch):
    from hydra.utils import instantiate

    root, _ = random_hopper
    monkeypatch.chdir(tmp_path)  # a launcher (or the user) may start the run from anywhere
    relative = os.path.relpath(root.parent, REPO)
    assert instantiate(_compose_gym_task(f"paths.data={relative}")).n_train_episodes == 6


def test_minari_environment_variable_is_not_a_setting(random_hopper, monkeypatch):
    # one data root: minari's own variable must not redirect our reader (paths.data does)
    root, _ = random_hopper
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    with pytest.raises(FileNotFoundError, match=str(REPO / "data" / "minari")):
        load_minari_episodes("test/hopper/random-v0")


# ---- committed experts -----------------------------------------------------------------------

def _committed_experts():
    table_path = REPO / "experts" / "returns.json"
    return sorted(json.loads(table_path.read_text()).items()) if table_path.is_file() else []


@pytest.mark.parametrize("env_id,record", _committed_experts(), ids=lambda x: x if isinstance(x, str) else "")
def test_committed_expert_reproduces_its_recorded_return(env_id, record):
    checkpoint = REPO / "experts" / record["checkpoint"]
    assert checkpoint.stat().st_size < 1_000_000
    expert = load_expert(checkpoint)
    # The first evaluation episode (reset seed 10_000) replays to the recorded return.
    result = rollout_policy(expert, env_id, episodes=1, seed=record["eval_seeds"][0])
    assert result.returns[0] == pytest.approx(record["episode_returns"][0], rel=1e-3)


def _train_expert(out, *extra):
    subprocess.run([sys.executable, str(REPO / "scripts" / "train_expert.py"), "env=Hopper-v5", "directions=2", "top=1",
                    "eval_every=2", "eval_episodes=1", f"out={out}", f"returns_json={out.parent / 'returns.json'}", *extra],
                   check=True, cwd=REPO, capture_output=True, text=True)
    with np.load(out.with_name(out.name + ".state.npz")) as state:
        return state["weight"].copy(), int(state["iteration"])


def test_expert_training_in_workers_and_resumed_matches_one_serial_run(tmp_path):
    serial, iterations = _train_expert(tmp_path / "a" / "e.npz", "max_env_steps=2500")
    parallel, _ = _train_expert(tmp_path / "b" / "e.npz", "max_env_steps=2500", "workers=2")
    _train_expert(tmp_path / "c" / "e.npz", "max_env_steps=1200")
    resumed, resumed_iterations = _train_expert(tmp_path / "c" / "e.npz", "max_env_steps=2500", "resume=true")
    assert iterations > 2 and np.abs(serial).sum() > 0
    assert np.array_equal(serial, parallel)  # episode seeds come from the main process
    assert resumed_iterations == iterations and np.array_equal(serial, resumed)


def test_expert_selection_and_final_measurement_use_disjoint_episode_seeds(tmp_path):
    """The best policy is picked on selection_episodes episodes reset with seeds 20_000 + i and measured on
    eval_seed_base + i. A state whose best was picked on other episodes (the measurement's seeds, before the
    two were disjoint, or fewer of them) has it re-scored on this call's selection episodes when resumed."""
    out = tmp_path / "e.npz"
    _train_expert(out, "max_env_steps=1200", "eval_seed_base=30000", "selection_episodes=2")
    record = json.loads((out.parent / "returns.json").read_text())["Hopper-v5"]
    assert record["selection_seeds"] == [20000, 20001] and record["eval_seeds"] == [30000, 30000]
    state_path = out.with_name(out.name + ".state.npz")

    def resume(*extra):
        return subprocess.run([sys.executable, str(REPO / "scripts" / "train_expert.py"), "env=Hopper-v5",
                               "directions=2", "top=1", "eval_every=2", "eval_episodes=1", f"out={out}",
                               "max_env_steps=1500", f"returns_json={out.parent / 'returns.json'}", "resume=true",
                               *extra], check=True, cwd=REPO, capture_output=True, text=True).stdout

    assert "re-scored" not in resume("selection_episodes=2")  # same episodes: the best's score stands
    with np.load(state_path) as data:
        state = {k: data[k] for k in data.files if k not in ("selection_seed_base", "selection_episodes")}
    state["best_return"] = np.array(1e9)  # as if picked on the measurement's seeds: re-scored, not kept
    np.savez(state_path, **state)
    assert "re-scored on the selection seeds 20000..20002: 1000000000.0 ->" in resume("selection_episodes=3")
    with np.load(state_path) as data:
        assert int(data["selection_episodes"]) == 3 and float(data["best_return"]) < 1e9
    assert "re-scored on the selection seeds 20000..20003:" in resume("selection_episodes=4")
