"""Robomimic-format pipeline: envs, scripted experts, hdf5 reader/writer, models, policies, task.

Uses the real robosuite simulator at tiny sizes (a handful of Lift demos generated once per
module); nothing is downloaded.
"""

import json
import os

import h5py
import numpy as np
import pytest
import torch

from dopr.data.robomimic_hdf5 import (
    ChunkDataset,
    DemoWriter,
    Episode,
    RobomimicFormatError,
    demo_names,
    load_episodes,
    read_env_args,
)
from dopr.envs.robosuite_envs import RobosuiteEnv, convert_controller_configs, make_env_args
from dopr.envs.scripted import generate_demos, make_expert, run_expert_episode
from dopr.envs.scripted import generated_demos_path
from dopr.tasks.robomimic import RobomimicTask
from dopr.models.unet1d import ConditionalUnet1D
from dopr.models.vision import ResNetEncoder, random_crop
from dopr.policies.flow_matching import FlowMatchingPolicy
from dopr.policies.normalizer import RangeNormalizer
from dopr.policies.obs_encoder import ObsEncoder
from script_loader import load_script

torch.set_num_threads(1)

LEGACY_OSC = {  # a robosuite <= 1.4 part controller config, as stored in robomimic v0.1 datasets
    "type": "OSC_POSE", "input_max": 1, "input_min": -1,
    "output_max": [0.05, 0.05, 0.05, 0.5, 0.5, 0.5], "output_min": [-0.05, -0.05, -0.05, -0.5, -0.5, -0.5],
    "kp": 150, "damping": 1, "impedance_mode": "fixed", "kp_limits": [0, 300], "damping_limits": [0, 10],
    "position_limits": None, "orientation_limits": None, "uncouple_pos_ori": True, "control_delta": True,
    "interpolation": None, "ramp_ratio": 0.2,
}
LOW_DIM = ["object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]


@pytest.fixture(scope="module")
def lift_env():
    env = RobosuiteEnv(make_env_args("Lift"))
    yield env
    env.close()


@pytest.fixture(scope="module")
def lift_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("demos") / "lift.hdf5")
    stats = generate_demos("Lift", 5, path, seed=3, action_noise=0.05, valid_fraction=0.2, log=None)
    assert stats["expert_success_rate"] == 1.0
    return path


def test_a_generated_file_made_with_other_noise_is_not_reused(tmp_path):
    path = generated_demos_path(tmp_path, "Lift", "low_dim", 1, 0)
    generate_demos("Lift", 1, str(path), seed=0, action_noise=0.05, valid_fraction=0.0, log=None)
    assert RobomimicTask._resolve_dataset(None, tmp_path, "Lift", 1, 0, 0.05, "low_dim") == str(path)
    with pytest.raises(ValueError, match=r"action noise 0.05, not task.gen_noise=0.2; delete it"):
        RobomimicTask._resolve_dataset(None, tmp_path, "Lift", 1, 0, 0.2, "low_dim")


# ----- environments -----

def test_legacy_controller_config_is_converted_and_env_runs():
    kwargs = convert_controller_configs({"robots": ["Panda"], "controller_configs": LEGACY_OSC})
    config = kwargs["controller_configs"]
    assert config["type"] == "BASIC" and config["body_parts"]["right"]["type"] == "OSC_POSE"
    env = RobosuiteEnv({"env_name": "Lift", "type": 1, "env_kwargs": {"robots": ["Panda"], "controller_configs": LEGACY_OSC}})
    obs = env.reset(seed=0)
    assert {"object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"} <= set(obs)
    before = obs["robot0_eef_pos"].copy()
    for _ in range(5):
        obs, _, _ = env.step(np.array([1.0, 0, 0, 0, 0, 0, -1]))  # +x delta moves the hand along +x
    assert obs["robot0_eef_pos"][0] > before[0] + 0.02
    env.close()


def test_seeded_resets_repeat_and_differ(lift_env):
    a = lift_env.reset(seed=7)["object"][:3]
    b = lift_env.reset(seed=8)["object"][:3]
    c = lift_env.reset(seed=7)["object"][:3]
    np.testing.assert_allclose(a, c)
    assert np.abs(a - b).max() > 1e-3


def test_scene_is_the_same_in_every_env(lift_env):
    """Lift's cube side is drawn when the scene is built; it must not depend on the process or instance
    (unseeded, demo generation and each clone's evaluation each got their own cube)."""
    other = RobosuiteEnv(make_env_args("Lift"))
    try:
        np.testing.assert_array_equal(other.env.cube.size, lift_env.env.cube.size)
        np.testing.assert_array_equal(other.reset(seed=4)["object"], lift_env.reset(seed=4)["object"])
    finally:
        other.close()


def test_missing_env_name_is_a_clear_error():
    with pytest.raises(ValueError, match="env_name"):
        RobosuiteEnv({"env_kwargs": {}})


# ----- scripted expert and the generator -----

def test_lift_expert_succeeds(lift_env):
    expert = make_expert("Lift", action_noise=0.05, seed=1)
    outcomes = [run_expert_episode(lift_env, expert, seed=s, max_steps=150) for s in (11, 12, 13)]
    assert all(ok for ok, _ in outcomes), outcomes
    assert all(length < 120 for _, length in outcomes)


def test_unknown_expert_is_a_clear_error():
    with pytest.raises(ValueError, match="Lift"):
        make_expert("Stack")


def test_generated_file_has_the_robomimic_layout(lift_file):
    with h5py.File(lift_file, "r") as f:
        env_args = json.loads(f["data"].attrs["env_args"])
        assert env_args["env_name"] == "Lift" and env_args["env_kwargs"]["controller_configs"]["type"] == "BASIC"
        names = sorted(f["data"].keys())
        assert len(names) == 5 and f["data"].attrs["total"] == sum(f["data"][n].attrs["num_samples"] for n in names)
        demo = f["data/demo_0"]
        steps = demo.attrs["num_samples"]
        assert demo["actions"].shape == (steps, 7) and np.abs(demo["actions"][()]).max() <= 1.0
        assert demo["states"].shape[0] == steps and demo["rewards"].shape == (steps,) and demo["dones"][-1] == 1
        for key in LOW_DIM:
            assert demo["obs"][key].shape[0] == steps and demo["next_obs"][key].shape[0] == steps
        np.testing.assert_allclose(demo["obs/robot0_eef_pos"][1:], demo["next_obs/robot0_eef_pos"][:-1])
        assert "<mujoco" in demo.attrs["model_file"]
        assert [n.decode() for n in f["mask/valid"][()]] == ["demo_4"]
        assert len(f["mask/train"][()]) == 4


def test_replaying_recorded_actions_reproduces_the_demo(lift_file, lift_env):
    # the recorded actions, replayed from the recorded initial state, succeed again: the data is
    # consistent with the simulator (as robomimic's playback check does)
    with h5py.File(lift_file, "r") as f:
        actions = f["data/demo_1/actions"][()]
        initial_state = f["data/demo_1/states"][0]
    lift_env.reset(seed=0)
    lift_env.env.sim.set_state_from_flattened(initial_state)
    lift_env.env.sim.forward()
    success = False
    for action in actions:
        _, _, success = lift_env.step(action)
    assert success


@pytest.mark.slow  # >10 s on 2 cores
@pytest.mark.skipif(os.environ.get("DOPR_SKIP_RENDER") == "1", reason="rendering disabled")
def test_image_demos_render_uint8_cameras(tmp_path):
    from dopr.envs.robosuite_envs import select_gl_backend

    try:
        select_gl_backend()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    path = str(tmp_path / "img.hdf5")
    generate_demos("Lift", 2, path, seed=0, camera_names=["agentview"], image_size=32, valid_fraction=0.5, log=None)
    (episode,) = load_episodes(path, ["agentview_image", "object"], filter_key="train")
    assert episode.obs["agentview_image"].shape == (len(episode), 32, 32, 3)
    assert episode.obs["agentview_image"].dtype == np.uint8 and episode.obs["agentview_image"].std() > 5

    # the image policy trains on it: one camera through the ResNet encoder, plus low-dim keys
    task = RobomimicTask(env_name="Lift", dataset=path, obs="image", image_keys=["agentview_image"],
                         crop_size=28, image_base_width=8, unet_channels=[16, 32], time_embed_dim=16, batch_size=8)
    model = task.build_model()
    loss = task.loss(model, next(task.train_batches()))
    loss.backward()
    encoder_grad = next(model.obs_encoder.image_encoders["agentview_image"].parameters()).grad
    assert torch.isfinite(loss) and encoder_grad is not None and encoder_grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert np.isfinite(task.validate(model)["val/loss"])


# ----- reader: other people's files and broken files -----

def _write_foreign_file(path, **breakage):
    """A file shaped like the real robomimic v0.1 low_dim datasets (legacy controller config,
    no next_obs, no masks unless asked), optionally broken."""
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        env_kwargs = {"robots": ["Panda"], "controller_configs": LEGACY_OSC, "has_renderer": False,
                      "use_object_obs": True, "control_freq": 20}
        if not breakage.get("no_env_args"):
            data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": env_kwargs})
        rng = np.random.default_rng(0)
        for i in range(4):
            steps = 20 + i
            demo = data.create_group(f"demo_{i}")
            demo.create_dataset("actions", data=rng.uniform(-1, 1, (steps, 3 if breakage.get("bad_actions") and i == 2 else 7)))
            obs = demo.create_group("obs")
            obs.create_dataset("object", data=rng.normal(size=(steps - (1 if breakage.get("short_obs") else 0), 10)))
            for key, dim in (("robot0_eef_pos", 3), ("robot0_eef_quat", 4), ("robot0_gripper_qpos", 2)):
                if key == "robot0_eef_quat" and breakage.get("missing_key"):
                    continue
                obs.create_dataset(key, data=rng.normal(size=(steps, dim)))
            demo.attrs["num_samples"] = steps
        if breakage.get("masks"):
            mask = f.create_group("mask")
            mask.create_dataset("train", data=np.array([b"demo_0", b"demo_1", b"demo_2"]))
            mask.create_dataset("valid", data=np.array([b"demo_3"]))


def test_reader_takes_a_foreign_robomimic_file(tmp_path):
    path = str(tmp_path / "low_dim.hdf5")
    _write_foreign_file(path, masks=True)
    assert read_env_args(path)["env_name"] == "Lift"
    assert demo_names(path, "valid") == ["demo_3"]
    episodes = load_episodes(path, LOW_DIM, filter_key="train")
    assert [len(e) for e in episodes] == [20, 21, 22] and episodes[0].obs["object"].shape == (20, 10)


@pytest.mark.parametrize(
    "breakage, match",
    [
        ({"no_env_args": True}, "env_args"),
        ({"bad_actions": True}, "action_dim 3"),
        ({"short_obs": True}, "obs/object has 19 steps but actions has 20"),
        ({"missing_key": True}, "no key 'robot0_eef_quat'"),
    ],
)
def test_malformed_files_are_clear_errors(tmp_path, breakage, match):
    path = str(tmp_path / "broken.hdf5")
    _write_foreign_file(path, **breakage)
    with pytest.raises(RobomimicFormatError, match=match) as info:
        read_env_args(path)
        load_episodes(path, LOW_DIM)
    assert path in str(info.value)


def test_missing_and_non_hdf5_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="robomimic_v0.1.*task.dataset"):
        read_env_args(str(tmp_path / "tool_hang_image.hdf5"))
    junk = tmp_path / "junk.hdf5"
    junk.write_text("not hdf5")
    with pytest.raises(RobomimicFormatError, match="not a readable hdf5"):
        read_env_args(str(junk))
    empty = str(tmp_path / "empty.hdf5")
    with h5py.File(empty, "w") as f:
        f.create_group("something")
    with pytest.raises(RobomimicFormatError, match="no 'data' group"):
        read_env_args(empty)
    path = str(tmp_path / "nomask.hdf5")
    _write_foreign_file(path)
    with pytest.raises(RobomimicFormatError, match="mask/valid"):
        demo_names(path, "valid")


def test_chunk_windows_use_edge_padding():
    episode = Episode("demo_0", {"x": np.arange(5, dtype=np.float32)[:, None]}, np.arange(5, dtype=np.float32)[:, None])
    data = ChunkDataset([episode, episode], obs_steps=2, horizon=4)
    assert len(data) == 10
    obs, actions = data.get(np.array([0, 4, 5]))
    assert obs["x"][:, :, 0].tolist() == [[0, 0], [3, 4], [0, 0]]  # first step padded with itself
    assert actions[:, :, 0].tolist() == [[0, 0, 1, 2], [3, 4, 4, 4], [0, 0, 1, 2]]  # end padded with the last action


def test_writer_leaves_no_file_when_interrupted(tmp_path):
    path = str(tmp_path / "x.hdf5")
    with pytest.raises(KeyboardInterrupt):
        with DemoWriter(path, {"env_name": "Lift"}):
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


# ----- models and policies -----

def test_unet_shapes_conditioning_and_divisibility():
    torch.manual_seed(0)
    net = ConditionalUnet1D(action_dim=7, cond_dim=5, channels=(16, 32), time_embed_dim=16)
    x, t = torch.randn(3, 16, 7), torch.rand(3)
    out_a, out_b = net(x, t, torch.zeros(3, 5)), net(x, t, torch.ones(3, 5))
    assert out_a.shape == x.shape and (out_a - out_b).abs().max() > 1e-4  # FiLM conditioning is used
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 15, 7), torch.rand(1), torch.zeros(1, 5))


def test_vision_encoder_crops_randomly_in_training_only():
    torch.manual_seed(0)
    encoder = ResNetEncoder(feature_dim=8, crop_size=28, base_width=8)
    images = torch.randint(0, 255, (2, 32, 32, 3), dtype=torch.uint8)
    encoder.eval()
    assert encoder(images).shape == (2, 8)
    torch.testing.assert_close(encoder(images), encoder(images))
    encoder.train()
    assert (encoder(images) - encoder(images)).abs().max() > 0
    crops = random_crop(torch.arange(16.0).reshape(1, 1, 4, 4).repeat(50, 1, 1, 1), 2)
    assert crops.shape == (50, 1, 2, 2) and len({tuple(c.flatten().tolist()) for c in crops}) > 3
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())


def test_normalizer_round_trip_and_constant_dims():
    data = np.stack([np.linspace(-3, 5, 10), np.full(10, 2.0)], axis=1)
    norm = RangeNormalizer.fit(data)
    y = norm.normalize(data)
    assert y[:, 0].min() == pytest.approx(-1) and y[:, 0].max() == pytest.approx(1) and np.all(y[:, 1] == 0)
    np.testing.assert_allclose(RangeNormalizer.from_state(norm.state()).unnormalize(y), data, atol=1e-5)


@pytest.mark.slow  # >10 s on 2 cores
def test_flow_policy_learns_an_observation_dependent_chunk():
    # two observations, two different target chunks: after training, Euler sampling from zeros
    # lands near the right chunk for each observation, with 1 and with 5 steps
    torch.manual_seed(0)
    policy = FlowMatchingPolicy(ObsEncoder({"x": 1}, obs_steps=1), action_dim=2, horizon=4,
                                channels=(16, 32), time_embed_dim=16, init="zeros")
    obs = {"x": torch.tensor([[[-1.0]], [[1.0]]])}
    targets = torch.stack([torch.full((4, 2), -0.5), torch.full((4, 2), 0.7)])
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    for _ in range(600):
        batch = torch.randint(0, 2, (32,))
        loss = policy.loss({"x": obs["x"][batch]}, targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.eval()
    for steps, tolerance in ((1, 0.4), (9, 0.15)):  # before training the error is ~1
        error = (policy.predict(obs, num_steps=steps) - targets).abs().max()
        assert error < tolerance, (steps, float(error))


# ----- the task, end to end -----

def test_tiny_train_and_rollout_end_to_end(lift_file, tmp_path):
    from dopr.envs.rollout import EnvPool
    from dopr.policies.chunk_policy import policy_from_checkpoint
    from dopr.train import CHECKPOINT, TrainerConfig, train

    task = RobomimicTask(env_name="Lift", dataset=lift_file, unet_channels=[16, 32], time_embed_dim=16,
                         integration_steps=[2, 1], batch_size=16, eval_episodes=2, max_episode_steps=24,
                         val_samples=64)
    assert task.num_train_demos == 4
    trainer = TrainerConfig(steps=20, eval_every=20, ema_decay=0.9, progress=False)
    summary = train(task, {"name": "dopr_adamw", "lr": 1e-3}, trainer, tmp_path, {"task": {"name": "robomimic_lift"}})
    last = summary["last"]
    assert np.isfinite(last["val/loss"]) and 0 <= last["test/success_rate"] <= 1
    assert last["test/success_rate"] == last["test/success_rate_k2"] and "test/success_rate_k1" in last
    assert 1 <= last["test/episode_length"] <= 24
    json.dumps(task.state())  # checkpoint-safe

    # a checkpoint alone rebuilds the policy and its env
    runner, state = policy_from_checkpoint(str(tmp_path / CHECKPOINT))
    pool = EnvPool(state["env_args"])
    (result,) = pool.rollout(runner, [5], max_steps=16, obs_steps=2, action_steps=8, obs_keys=state["obs_keys"])
    assert result.seed == 5 and result.length == 16 and not result.success


@pytest.mark.slow  # >10 s on 2 cores
def test_worker_processes_match_in_process_rollouts(lift_file):
    from dopr.envs.rollout import EnvPool

    env_args = read_env_args(lift_file)

    def policy(window):  # move toward the cube: observation-dependent, deterministic
        delta = window["object"][:, -1, :3] - window["robot0_eef_pos"][:, -1]
        action = np.concatenate([np.clip(10 * delta, -1, 1), np.zeros((len(delta), 3)), -np.ones((len(delta), 1))], 1)
        return np.repeat(action[:, None], 4, axis=1)

    keys = ["object", "robot0_eef_pos"]
    local = EnvPool(env_args, num_workers=0).rollout(policy, [1, 2, 3], 10, 2, 3, keys)
    pool = EnvPool(env_args, num_workers=2)
    try:
        parallel = pool.rollout(policy, [1, 2, 3], 10, 2, 3, keys)
    finally:
        pool.close()
    assert [r.seed for r in parallel] == [1, 2, 3]
    assert [(r.success, r.length) for r in parallel] == [(r.success, r.length) for r in local]
    for a, b in zip(local, parallel):  # same seeds, same actions: the same trajectories (up to the
        # solver's warm start, which carries ~1e-5 m over from a worker's previous episode)
        np.testing.assert_allclose(a.final_obs["robot0_eef_pos"], b.final_obs["robot0_eef_pos"], atol=1e-3)
    assert np.abs(local[0].final_obs["robot0_eef_pos"] - local[1].final_obs["robot0_eef_pos"]).max() > 1e-3


def test_paths_data_moves_where_generated_demos_are_written(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with initialize_config_dir(config_dir=os.path.join(repo, "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["task=robomimic_lift", f"paths.data={tmp_path}", "task.gen_demos=2",
                                           "task.unet_channels=[8,16]", "task.val_samples=8"])
    task = instantiate(cfg.task)  # dataset: null: generates the demos under <paths.data>/robomimic
    expected = tmp_path / "robomimic" / "Lift_low_dim_2demos_seed0.hdf5"
    assert task.path == str(expected) and expected.is_file()
    assert task.num_train_demos == 1 and demo_names(str(expected), "valid")


def test_make_demos_writes_by_default_the_file_the_task_reads(tmp_path, capsys):
    make_demos = load_script("make_demos")
    make_demos.main(["env=lift", "gen_demos=2", "seed=1", f"demos_dir={tmp_path}"])
    expected = generated_demos_path(tmp_path, "Lift", "low_dim", 2, 1)
    assert expected == tmp_path / "Lift_low_dim_2demos_seed1.hdf5" and expected.is_file()
