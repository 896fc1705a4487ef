"""Rollout videos (task.video=true): one episode per evaluation, to <run_dir>/videos and W&B, with the
evaluation's results unchanged; skipped where no headless OpenGL works."""

import json
import os

import numpy as np
import pytest
import torch

from dopr.data.robomimic_hdf5 import read_env_args
from dopr.envs.gym_envs import rollout_policy
from dopr.envs.rollout import EnvPool
from dopr.envs.video import VIDEO_SIZE

torch.set_num_threads(1)
KEYS = ["object", "robot0_eef_pos"]


@pytest.fixture(scope="module", autouse=True)
def headless_gl():
    from dopr.envs.robosuite_envs import select_gl_backend

    if os.environ.get("DOPR_SKIP_RENDER") == "1":  # as the image-observation tests
        pytest.skip("rendering disabled")
    try:
        select_gl_backend()
    except RuntimeError as exc:
        pytest.skip(str(exc))


def reach(window):  # toward the cube: observation-dependent, deterministic
    delta = window["object"][:, -1, :3] - window["robot0_eef_pos"][:, -1]
    action = np.concatenate([np.clip(10 * delta, -1, 1), np.zeros((len(delta), 4))], 1)
    return np.repeat(action[:, None], 4, axis=1)


def played_frames(path, fps):
    """How many frames of 1/fps s the file plays (a GIF merges identical frames into longer ones)."""
    if path.suffix == ".gif":
        from PIL import Image

        with Image.open(path) as gif:
            milliseconds = 0
            for index in range(gif.n_frames):
                gif.seek(index)
                milliseconds += gif.info["duration"]
                assert gif.size == (VIDEO_SIZE, VIDEO_SIZE)
        return round(milliseconds * fps / 1000)
    import imageio.v3 as iio

    return len(iio.imread(path, index=None))


@pytest.mark.slow  # >10 s on 2 cores
@pytest.mark.parametrize("workers", [0, 2])
def test_pool_records_the_first_seed_and_results_do_not_change(lift_file, workers):
    env_args = read_env_args(str(lift_file))
    plain = EnvPool(env_args, num_workers=workers)
    recording = EnvPool(env_args, num_workers=workers, video=True)
    try:
        without = plain.rollout(reach, [4, 5, 6], 10, 2, 3, KEYS)
        with_video = recording.rollout(reach, [4, 5, 6], 10, 2, 3, KEYS, video=True)
        again = recording.rollout(reach, [4, 5, 6], 10, 2, 3, KEYS)
        if workers == 0:  # no video asked: no offscreen renderer, no rendering cost
            assert not plain.envs.envs[0].env.env.has_offscreen_renderer
    finally:
        plain.close()
        recording.close()
    assert [(r.seed, r.success, r.length) for r in with_video] == [(r.seed, r.success, r.length) for r in without]
    for a, b in zip(without, with_video):
        np.testing.assert_array_equal(a.final_obs["robot0_eef_pos"], b.final_obs["robot0_eef_pos"])
    first = with_video[0].video
    assert first.frames.shape == (with_video[0].length + 1, VIDEO_SIZE, VIDEO_SIZE, 3) and first.fps == 20
    assert first.frames.std() > 5 and np.abs(first.frames[-1].astype(int) - first.frames[0]).max() > 0  # it moves
    assert all(r.video is None for r in with_video[1:]) and all(r.video is None for r in again)
    with pytest.raises(ValueError, match="video=True"):
        plain.rollout(reach, [4], 10, 2, 3, KEYS, video=True)


def test_robomimic_run_writes_one_video_per_evaluation_and_logs_it_to_wandb(lift_file, tmp_path):
    from dopr.tasks.robomimic import RobomimicTask
    from dopr.train import TrainerConfig, train

    task = RobomimicTask(env_name="Lift", dataset=str(lift_file), unet_channels=[8, 16], time_embed_dim=8,
                         integration_steps=[2, 1], batch_size=4, eval_episodes=2, max_episode_steps=12,
                         val_samples=8, video=True)
    trainer = TrainerConfig(steps=4, eval_every=2, warmup_steps=0, progress=False)
    summary = train(task, {"name": "adamw", "lr": 1e-3}, trainer, tmp_path, {"task": {"name": "robomimic_lift"}},
                    logger={"name": "wandb", "mode": "offline"})
    videos = sorted((tmp_path / "videos").iterdir())
    assert [p.stem for p in videos] == ["step2", "step4"] and all(p.stat().st_size > 0 for p in videos)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["test/episode_length"] for r in records] == [12, 12]  # one episode of each evaluation runs to max_episode_steps (an untrained policy)
    assert [played_frames(p, fps=20) for p in videos] == [13, 13]  # the reset state, then one per step
    assert "test/video" not in summary["last"] and "test/video" not in records[0]  # media, not a metric
    media = list((tmp_path / "wandb").glob("offline-run-*/files/media/videos/test/*"))
    assert len(media) == 2, media


def test_gym_rollout_records_the_first_episode_and_returns_do_not_change():
    weight = np.random.default_rng(1).standard_normal((3, 11)) * 0.2
    policy = lambda obs: obs @ weight.T  # noqa: E731
    plain = rollout_policy(policy, "Hopper-v5", episodes=2, seed=7)
    recorded = rollout_policy(policy, "Hopper-v5", episodes=2, seed=7, video=True)
    np.testing.assert_array_equal(recorded.returns, plain.returns)
    assert plain.video is None
    assert recorded.video.frames.shape == (recorded.lengths[0] + 1, VIDEO_SIZE, VIDEO_SIZE, 3)
    assert recorded.video.frames.std() > 5
