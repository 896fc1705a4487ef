"""Bad input is an error before any work is spent, naming the key and the fix."""

import numpy as np
import pytest
import torch

from dopr.data.robomimic_hdf5 import DemoWriter, RobomimicFormatError
from dopr.tasks.lds import LDSTask
from dopr.train import TrainerConfig, train

torch.set_num_threads(1)


# --- trainer and top-level keys -----------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"min_lr_ratio": 1.5}, r"trainer.min_lr_ratio=1.5: must be in \[0, 1\]"),
    ({"min_lr_ratio": -0.1}, r"trainer.min_lr_ratio=-0.1: must be in \[0, 1\]"),
    ({"steps": 100, "warmup_steps": 200}, "trainer.warmup_steps=200 is more than trainer.steps=100: lower"),
    ({"steps": 0}, "trainer.steps=0: set trainer.steps to an integer >= 1"),
    ({"eval_every": 0}, "trainer.eval_every=0: set trainer.eval_every"),
    ({"threads": 0}, "trainer.threads=0"),
])
def test_trainer_keys(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainerConfig(**kwargs)


def test_negative_seed():
    with pytest.raises(ValueError, match=r"seed=-1: use a non-negative integer"):
        LDSTask(seed=-1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda():
    with pytest.raises(ValueError, match="device=cuda: CUDA is not available here.*use device=cpu"):
        LDSTask(device="cuda")


@pytest.mark.parametrize("key", ["batch_size", "train_episodes", "eval_episodes", "horizon"])
def test_lds_sizes(key):
    with pytest.raises(ValueError, match=f"task.{key}=0: set task.{key} to an integer >= 1"):
        LDSTask(**{key: 0})


def test_nan_in_the_data_is_a_data_error_not_an_lr_hint(tmp_path):
    task = LDSTask(eval_episodes=4)
    task.train_x[::7] = np.nan
    with pytest.raises(ValueError, match="batch at step 0 holds NaN or inf values.*task.dataset") as info:
        train(task, {"name": "adamw"}, TrainerConfig(steps=5, progress=False), tmp_path, {})
    assert "opt.lr" not in str(info.value)


# --- robomimic: the dataset against its env -------------------------------------------------------
LIFT_SIZES = {"object": 10, "robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2}


def write_lift_file(path, action_dim=7, sizes=LIFT_SIZES, nan_in=None):
    """Two random Lift-shaped demos (one train, one valid) under Lift's real env_args."""
    from dopr.envs.robosuite_envs import make_env_args

    rng = np.random.default_rng(0)
    with DemoWriter(str(path), make_env_args("Lift"), valid_fraction=0.5) as writer:
        for _ in range(2):
            steps = 20
            obs = {k: rng.normal(size=(steps, n)) for k, n in sizes.items()}
            actions = rng.uniform(-1, 1, (steps, action_dim))
            if nan_in == "actions":
                actions[5, 0] = np.nan
            elif nan_in:
                obs[nan_in][3] = np.nan
            writer.add_demo(obs, obs, actions, np.zeros(steps), np.zeros(steps), np.zeros((steps, 3)))
    return str(path)


def robomimic_task(path, **overrides):
    from dopr.tasks.robomimic import RobomimicTask

    kwargs = dict(env_name="Lift", dataset=path, unet_channels=[8, 16], time_embed_dim=8, batch_size=4)
    return RobomimicTask(**{**kwargs, **overrides})


def test_matching_robomimic_file_passes_the_env_check(tmp_path):
    task = robomimic_task(write_lift_file(tmp_path / "ok.hdf5"))
    assert task.policy_spec.action_dim == 7


def test_robomimic_action_size_is_checked_against_the_env(tmp_path):
    with pytest.raises(ValueError, match="does not match its env: its actions have 5 dims, the env takes 7"):
        robomimic_task(write_lift_file(tmp_path / "a5.hdf5", action_dim=5))


def test_robomimic_observation_size_is_checked_against_the_env(tmp_path):
    path = write_lift_file(tmp_path / "o9.hdf5", sizes={**LIFT_SIZES, "object": 9})
    with pytest.raises(ValueError, match="observation 'object' has 9 values per step in the data, 10 in the env"):
        robomimic_task(path)


def test_robomimic_observation_key_missing_from_the_env(tmp_path):
    path = write_lift_file(tmp_path / "extra.hdf5", sizes={**LIFT_SIZES, "sonar": 2})
    with pytest.raises(ValueError, match=r"the env has no observation 'sonar' \(it has \[.*'robot0_eef_pos'"):
        robomimic_task(path, low_dim_keys=[*LIFT_SIZES, "sonar"])


def test_unknown_observation_key_names_the_real_keys(tmp_path):
    path = write_lift_file(tmp_path / "ok.hdf5")
    with pytest.raises(ValueError, match=r"task.low_dim_keys has \['objekt'\], which .* does not record; its "
                                         r"observation keys are \['object', 'robot0_eef_pos'"):
        robomimic_task(path, low_dim_keys=["objekt", "robot0_eef_pos"])


@pytest.mark.parametrize("where", ["actions", "object"])
def test_nan_in_a_robomimic_file_is_a_data_error(tmp_path, where):
    path = write_lift_file(tmp_path / "nan.hdf5", nan_in=where)
    with pytest.raises(RobomimicFormatError, match="NaN or inf values.*the data is broken"):
        robomimic_task(path)


@pytest.mark.parametrize("key", ["train_episodes", "batch_size", "eval_episodes"])
def test_robomimic_sizes(tmp_path, key):
    with pytest.raises(ValueError, match=f"task.{key}=0: set task.{key} to an integer >= 1"):
        robomimic_task(str(tmp_path / "never-read.hdf5"), **{key: 0})


# --- llm_sft offline on a local file ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    from dopr.data.sft import write_tiny_fixture

    return write_tiny_fixture(tmp_path_factory.mktemp("sft"))  # 64 rows


def sft_task(fixture, **overrides):
    from dopr.tasks.llm_sft import LLMSFTTask

    kwargs = dict(model=fixture["model"], dataset=fixture["dataset"], max_seq_len=128, max_new_tokens=8)
    return LLMSFTTask(**{**kwargs, **overrides})


def test_local_dataset_tests_on_its_own_rows_by_default(tiny_sft, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task = sft_task(tiny_sft, val_episodes=8, eval_episodes=8)
    assert (len(task.train_examples), len(task.val_examples), len(task.test_examples)) == (48, 8, 8)


def test_too_few_rows_counts_the_rows_it_read(tiny_sft):
    with pytest.raises(ValueError, match=r"has 64 rows; holding out task.val_episodes=256 and task.eval_episodes=500 leaves "
                                         r"none for training. Lower them \(e.g. task.val_episodes=8 task.eval_episodes=8\)"):
        sft_task(tiny_sft)


def test_unreachable_eval_dataset_names_its_key(tiny_sft, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"(?s)task.eval_dataset='nobody/nothing'.*task.eval_dataset=null"):
        sft_task(tiny_sft, val_episodes=8, eval_episodes=8, eval_dataset="nobody/nothing")
