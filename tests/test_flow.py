"""Flow-matching tasks: metrics against known answers, targets against their densities, solvers
against exact solutions, and tiny real training runs of both tasks (AdamW and DoPr)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dopr.flow_metrics import (energy_distance, frechet_distance, frechet_distance_from_moments,
                               sliced_wasserstein)
from dopr.data.targets_2d import TARGETS_2D, EightGaussians, make_target
from dopr.models.digits_classifier import load_or_train_digits_classifier
from dopr.models.flow_nets import FlowMLP, SmallUNet
from dopr.models.flow_ode import flow_matching_loss, integrate
from dopr.tasks.flow import Flow2DTask, FlowDigitsTask

torch.set_num_threads(1)


def gaussian(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- metrics with known answers


def test_sliced_wasserstein_known_answers():
    x = gaussian(4000, 2, 0)
    delta = torch.tensor([0.6, -0.8], dtype=torch.float64)  # |delta| = 1
    assert sliced_wasserstein(x, x) == 0.0
    # a translation moves every 1-D projection by theta.delta; the mean of cos^2 over the directions is 1/2
    assert sliced_wasserstein(x, x + delta) == pytest.approx(1 / math.sqrt(2), rel=1e-9)
    # independent samples: ~0 for the same law, the translation distance for a shifted one
    assert sliced_wasserstein(x, gaussian(4000, 2, 1)) < 0.1  # finite-sample floor, ~0.05 at n=4000
    assert sliced_wasserstein(x, gaussian(4000, 2, 1) + delta) == pytest.approx(1 / math.sqrt(2), abs=0.05)
    # higher dimension (random directions): the mean of (theta.delta)^2 over the sphere is |delta|^2 / d
    x5 = gaussian(2000, 5, 2)
    shift5 = torch.full((5,), 1.0, dtype=torch.float64)  # |shift|^2 / d = 1
    assert sliced_wasserstein(x5, x5 + shift5, num_projections=1000) == pytest.approx(1.0, rel=0.1)


def test_energy_distance_known_answers():
    def mean_abs_normal(mu: float, var: float) -> float:  # E|N(mu, var)|
        s = math.sqrt(var)
        return s * math.sqrt(2 / math.pi) * math.exp(-mu ** 2 / (2 * var)) + mu * math.erf(mu / (s * math.sqrt(2)))

    x, y = gaussian(3000, 1, 0), gaussian(3000, 1, 1)
    assert abs(energy_distance(x, y)) < 0.01
    delta = 1.5
    expected = 2 * (mean_abs_normal(delta, 2.0) - mean_abs_normal(0.0, 2.0))
    assert energy_distance(x, y + delta) == pytest.approx(expected, rel=0.05)


def test_frechet_distance_known_answers():
    feats = gaussian(2000, 6, 0)
    shift = torch.arange(6, dtype=torch.float64)
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-9)
    # identical covariances: only the mean term |shift|^2 remains
    assert frechet_distance(feats, feats + shift) == pytest.approx(float((shift ** 2).sum()), rel=1e-9)
    # diagonal covariances: sum (sqrt(a) - sqrt(b))^2 + |mu_a - mu_b|^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.0])  # a rank-deficient one too
    mu_a, mu_b = np.zeros(3), np.array([1.0, 0.0, 2.0])
    expected = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum() + 5.0
    assert frechet_distance_from_moments(mu_a, np.diag(a), mu_b, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # a rotated version of the same pair has the same distance
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    rotated = frechet_distance_from_moments(q @ mu_a, q @ np.diag(a) @ q.T, q @ mu_b, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-7)


def test_metrics_reject_bad_input():
    x = gaussian(10, 2, 0)
    with pytest.raises(ValueError, match="equal-size"):
        sliced_wasserstein(x, gaussian(11, 2, 1))
    with pytest.raises(ValueError, match="NaN"):
        sliced_wasserstein(x, torch.full((10, 2), float("nan")))
    with pytest.raises(ValueError, match="flatten"):
        frechet_distance(torch.zeros(10, 1, 2, 2), torch.zeros(10, 1, 2, 2))


# ---------------------------------------------------------------- 2-D targets


@pytest.mark.parametrize("name", sorted(TARGETS_2D))
def test_target_density_is_normalized_and_matches_its_samples(name):
    target = make_target(name)
    fine = torch.linspace(-4, 4, 161, dtype=torch.float64)
    fine = (fine[1:] + fine[:-1]) / 2  # 160 cell centres, cell side 0.05
    gx, gy = torch.meshgrid(fine, fine, indexing="ij")
    density = target.log_prob(torch.stack([gx.ravel(), gy.ravel()], 1)).exp().reshape(160, 160)
    fine_mass = density * 0.05 ** 2
    assert float(fine_mass.sum()) == pytest.approx(1.0, abs=2e-3)
    # the sampler and the density describe the same law: total variation between a histogram of
    # samples and the density's mass on 0.2 x 0.2 bins (finite-sample noise alone gives ~0.02)
    bin_mass = fine_mass.reshape(40, 4, 40, 4).sum(dim=(1, 3)).numpy()
    samples = target.sample(100_000, torch.Generator().manual_seed(0)).double().numpy()
    edges = np.linspace(-4, 4, 41)
    hist, _, _ = np.histogram2d(samples[:, 0], samples[:, 1], bins=[edges, edges])
    total_variation = 0.5 * np.abs(hist / len(samples) - bin_mass).sum()
    assert total_variation < 0.035, f"{name}: sampler and log_prob disagree (TV={total_variation:.3f})"
    # and the check has teeth: the same histogram against a slightly shifted density fails it
    shifted = np.roll(bin_mass, 1, axis=0)
    assert 0.5 * np.abs(hist / len(samples) - shifted).sum() > 0.1
    # far from the support the log-density is finite (NLL of a bad sample must not be inf)
    assert torch.isfinite(target.log_prob(torch.tensor([[30.0, -30.0]]))).all()


def test_eight_gaussians_nll_of_true_samples_is_its_entropy():
    target = EightGaussians(radius=2.0, std=0.15)  # modes far apart: entropy = log 8 + log(2 pi e std^2)
    samples = target.sample(50_000, torch.Generator().manual_seed(1))
    entropy = math.log(8) + math.log(2 * math.pi * math.e * 0.15 ** 2)
    assert float(-target.log_prob(samples).mean()) == pytest.approx(entropy, abs=0.02)


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="two_moons"):
        make_target("moons")
    with pytest.raises(ValueError, match=r"task\.dataset='moons'.*two_moons"):
        Flow2DTask(dataset="moons", train_episodes=10, val_episodes=10)


# ---------------------------------------------------------------- loss and solvers


class _FunctionModel(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, t, y=None):
        return self.fn(x, t)


def test_loss_is_zero_for_the_exact_velocity_of_a_point_mass():
    target_point = torch.tensor([1.0, -2.0])
    oracle = _FunctionModel(lambda x, t: (target_point - x) / (1 - t[:, None]))  # E[x1 - x0 | x_t]
    x0 = torch.randn(64, 2)
    t = torch.rand(64) * 0.99
    assert float(flow_matching_loss(oracle, target_point.expand(64, 2), x0, t)) < 1e-10
    # one Euler step of that oracle lands exactly on the point
    assert torch.allclose(integrate(oracle, x0, 1, "euler"), target_point.expand(64, 2), atol=1e-6)


def test_solvers_match_their_exact_step_formulas():
    growth = _FunctionModel(lambda x, t: x)  # dx/dt = x, exact x(1) = e x(0)
    x0 = torch.ones(1, 1, dtype=torch.float64)
    for steps in (1, 4):
        h = 1.0 / steps
        assert float(integrate(growth, x0, steps, "euler")) == pytest.approx((1 + h) ** steps, rel=1e-12)
        assert float(integrate(growth, x0, steps, "midpoint")) == pytest.approx((1 + h + h * h / 2) ** steps, rel=1e-12)
        assert float(integrate(growth, x0, steps, "heun")) == pytest.approx((1 + h + h * h / 2) ** steps, rel=1e-12)
    errors = [abs(float(integrate(growth, x0, 8, s)) - math.e) for s in ("euler", "midpoint")]
    assert errors[1] < errors[0] / 10  # second order beats first order
    with pytest.raises(ValueError, match="solver"):
        integrate(growth, x0, 2, "rk4")


# ---------------------------------------------------------------- models


def test_models_map_inputs_to_velocities_of_the_same_shape():
    mlp = FlowMLP(2, hidden=16, depth=2)
    assert mlp(torch.randn(5, 2), torch.rand(5)).shape == (5, 2)
    unet = SmallUNet(1, 8, channels=8, time_dim=16, num_classes=10)
    images, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 4, 9])
    out = unet(images, torch.rand(3), labels)
    assert out.shape == images.shape
    # the class label changes the output (conditioning is wired in)
    assert not torch.allclose(out, unet(images, torch.rand(3) * 0 + 0.5, labels))
    with pytest.raises(ValueError, match="class labels"):
        unet(images, torch.rand(3))
    assert any(isinstance(m, nn.Conv2d) for m in unet.modules())
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in unet.modules())


# ---------------------------------------------------------------- tasks, trained for real (tiny)


def _train(task, model, steps: int, optimizer):
    batches = task.train_batches()
    for _ in range(steps):
        model.train()
        loss = task.loss(model, next(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def test_flow_2d_training_improves_loss_and_samples():
    task = Flow2DTask(dataset="eight_gaussians", seed=0, train_episodes=4000, val_episodes=512, hidden=64, depth=2,
                      eval_episodes=500, integration_steps=[1, 8], headline_steps=8, solvers=["euler", "midpoint"])
    model = task.build_model()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), task.build_model().parameters()))
    model.eval()
    before = {**task.validate(model), **task.evaluate(model)}
    assert task.validate(model) == {"val/loss": before["val/loss"]}  # validation is deterministic
    _train(task, model, 400, torch.optim.AdamW(model.parameters(), lr=3e-3))
    after = {**task.validate(model), **task.evaluate(model)}
    expected_keys = {"val/loss", "test/swd", "test/nll"} | {f"test/{m}{s}@{k}" for m in ("swd", "nll")
                                                          for s in ("", "_midpoint") for k in (1, 8)}
    assert set(after) == expected_keys
    assert after["test/swd"] == after["test/swd@8"]
    assert after["val/loss"] < 0.8 * before["val/loss"]
    assert after["test/swd@8"] < 0.5 * before["test/swd@8"]
    floor = task.reference_floor()
    assert floor["swd"] < after["test/swd@8"]
    # the untrained sampler puts mass where the density is tiny
    assert after["test/nll@8"] < before["test/nll@8"]


def test_flow_2d_rejects_bad_schedules():
    with pytest.raises(ValueError, match="headline_steps"):
        Flow2DTask(train_episodes=10, val_episodes=10, integration_steps=[1, 2], headline_steps=8)
    with pytest.raises(ValueError, match="solvers"):
        Flow2DTask(train_episodes=10, val_episodes=10, solvers=["rk45"])


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("data") / "cache"  # where paths.data=<data> puts it
    classifier, accuracy = load_or_train_digits_classifier(cache, seed=0)
    return cache, accuracy


def test_digits_classifier_is_accurate_and_cached(digits_cache):
    cache, accuracy = digits_cache
    assert accuracy > 0.93
    files = list(cache.glob("digits_classifier_*.pt"))
    assert len(files) == 1
    _, again = load_or_train_digits_classifier(cache, seed=0)  # loads, does not retrain
    assert again == accuracy


def test_digits_metrics_on_real_and_corrupted_images(digits_cache):
    cache, _ = digits_cache
    task = FlowDigitsTask(cache_dir=str(cache), eval_episodes_per_class=5, integration_steps=[1, 2], headline_steps=2)
    real = task.reference_floor()
    assert real["acc"] > 0.9
    images, labels = task.val_x, task.val_y
    noisy = task.sample_quality(images + 0.8 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0)), labels)
    shuffled_labels = task.sample_quality(images, labels.roll(1))
    assert noisy["fid"] > 3 * real["fid"]
    assert shuffled_labels["acc"] < 0.3


@pytest.mark.parametrize("model_kind", ["unet", "mlp"])
def test_flow_digits_trains_and_reports_every_step_count(digits_cache, model_kind):
    cache, _ = digits_cache
    task = FlowDigitsTask(model=model_kind, channels=8, hidden=64, cache_dir=str(cache), eval_episodes_per_class=5,
                          integration_steps=[1, 4], headline_steps=4, batch_size=32)
    model = task.build_model()
    model.eval()
    before = task.validate(model)["val/loss"]
    _train(task, model, 30, torch.optim.AdamW(model.parameters(), lr=2e-3))
    metrics = {**task.validate(model), **task.evaluate(model)}
    assert metrics["val/loss"] < before
    assert set(metrics) == {"val/loss", "test/fid", "test/acc", "test/fid@1", "test/fid@4", "test/acc@1", "test/acc@4"}
    assert all(math.isfinite(v) for v in metrics.values())


def test_dopr_trains_the_conv_unet_through_the_generic_loop(digits_cache, tmp_path):
    """Both task configs compose; DoPr (AP on every Conv2d/Linear) runs the U-Net task end to end."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from dopr.train import TrainerConfig, train
    from pathlib import Path

    cache, _ = digits_cache
    config_dir = str(Path(__file__).resolve().parents[1] / "configs")
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        cfg_2d = compose("config", overrides=["task=flow_2d", "task.dataset=spirals", "logger=none"])
        assert cfg_2d.task.name == "flow_2d_spirals"
        cfg = compose("config", overrides=["task=flow_digits", "opt=dopr_adamw", "logger=none",
                                           f"paths.data={cache.parent}", "task.channels=8",
                                           "task.eval_episodes_per_class=3", "task.integration_steps=[1,2]",
                                           "task.headline_steps=2", "task.batch_size=16",
                                           "trainer.steps=4", "trainer.eval_every=4", "trainer.progress=false"])
    assert cfg.task.cache_dir == str(cache)  # the data root moves the classifier cache
    task = instantiate(cfg.task, _convert_="all")
    assert isinstance(task, FlowDigitsTask) and len(list(cache.glob("digits_classifier_*.pt"))) == 1
    summary = train(task, OmegaConf.to_container(cfg.opt, resolve=True),
                    TrainerConfig(**OmegaConf.to_container(cfg.trainer, resolve=True)), tmp_path,
                    OmegaConf.to_container(cfg, resolve=True), logger=OmegaConf.to_container(cfg.logger, resolve=True))
    assert math.isfinite(summary["last"]["test/fid"]) and math.isfinite(summary["last"]["val/loss"])
