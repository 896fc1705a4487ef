"""Flow-matching generative modeling: 2-D densities (``flow_2d``) and 8x8 digits (``flow_digits``).

Training objective (both tasks): the linear-interpolant / rectified-flow conditional flow-matching
loss. With noise x0 ~ N(0, I), data x1 and t ~ U[0, 1], x_t = (1 - t) x0 + t x1 and the model
regresses the velocity x1 - x0:  loss = mean |v(x_t, t) - (x1 - x0)|^2  (mean over batch and dims).

Test-time metric: samples come from integrating dx/dt = v(x, t) from t=0 to t=1 with k steps of a
fixed-step solver (Euler, or midpoint / Heun as options), for several k. The one-step loss is what
the optimizer minimizes; sample quality after k integration steps is what the user gets. Their
relation across optimizers is the question the DoPr study asks.

- flow_2d: targets with known densities; metrics are the sliced 2-Wasserstein distance to fresh
  ground-truth samples (``test/swd@k``) and the mean negative log-likelihood of the model's samples
  under the true density (``test/nll@k``).
- flow_digits: sklearn's bundled 8x8 digits, class-conditional; metrics are the Fréchet distance
  in the feature space of a small CNN digits classifier trained once and cached (``test/fid@k``)
  and that classifier's accuracy on the conditioning labels of the samples (``test/acc@k``).

Metric keys: ``test/<metric>@<k>`` for the first solver in ``solvers``,
``test/<metric>_<solver>@<k>`` for the others, and ``test/<metric>`` (no suffix) at
``headline_steps`` with the first solver.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from dopr.flow_metrics import frechet_distance_from_moments, gaussian_moments, sliced_wasserstein
from dopr.models.flow_nets import FlowMLP, SmallUNet
from dopr.tasks.base import Task

# ----------------------------------------------------------------------------------------------
# 2-D targets with known densities
# ----------------------------------------------------------------------------------------------

_LOG_2PI = math.log(2 * math.pi)


class Target2D:
    """A 2-D distribution we can sample and whose log-density we can evaluate."""

    name = "target"

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EightGaussians(Target2D):
    """Equal mixture of 8 isotropic Gaussians on a circle. The density is exact (closed form)."""

    name = "eight_gaussians"

    def __init__(self, radius: float = 2.0, std: float = 0.15):
        angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        self.centers = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
        self.std = std

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        component = torch.randint(0, 8, (n,), generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.centers[component] + self.std * noise).float()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return _isotropic_mixture_log_prob(x, self.centers, self.std)


def _isotropic_mixture_log_prob(x: torch.Tensor, centers: torch.Tensor, std: float,
                                chunk: int = 1024) -> torch.Tensor:
    """log (1/M) sum_j N(x; centers_j, std^2 I) for 2-D x, computed stably in float64 in chunks."""
    x = x.detach().to(dtype=torch.float64, device="cpu")
    centers = centers.to(torch.float64)
    log_norm = -_LOG_2PI - 2 * math.log(std) - math.log(len(centers))
    out = []
    for start in range(0, len(x), chunk):
        sq_dist = torch.cdist(x[start:start + chunk], centers) ** 2
        out.append(torch.logsumexp(-sq_dist / (2 * std ** 2), dim=1) + log_norm)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _log_normal_cdf_difference(upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """log(Phi(upper) - Phi(lower)) for upper > lower, accurate far in either tail.

    Where both arguments are positive, uses Phi(b) - Phi(a) = Phi(-a) - Phi(-b) so both terms are
    small-tail probabilities that log_ndtr resolves.
    """
    flip = lower > 0
    hi = torch.where(flip, -lower, upper)
    lo = torch.where(flip, -upper, lower)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log1p(-torch.exp(log_lo - log_hi))


class Checkerboard(Target2D):
    """Uniform on the 8 'black' unit squares of a 4x4 board over [-2, 2]^2, blurred by N(0, blur^2 I).

    The blurred density is exact: (1/8) sum over squares of a product of normal-CDF differences.
    The blur keeps the density positive everywhere, so NLL of any sample is finite.
    """

    name = "checkerboard"

    def __init__(self, blur: float = 0.1):
        corners = [(-2.0 + i, -2.0 + j) for i in range(4) for j in range(4) if (i + j) % 2 == 0]
        self.lower_corners = torch.tensor(corners, dtype=torch.float64)  # (8, 2)
        self.blur = blur

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        square = torch.randint(0, len(self.lower_corners), (n,), generator=generator)
        uniform = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.lower_corners[square] + uniform + self.blur * noise).float()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to(dtype=torch.float64, device="cpu")[:, None, :]  # (n, 1, 2)
        upper = (self.lower_corners + 1.0 - x) / self.blur  # (n, 8, 2)
        lower = (self.lower_corners - x) / self.blur
        per_square = _log_normal_cdf_difference(upper, lower).sum(dim=2)  # square area is 1
        return torch.logsumexp(per_square, dim=1) - math.log(len(self.lower_corners))


class _NoisyCurves(Target2D):
    """Pick one of ``num_arms`` curves uniformly, t ~ U[0, 1], return curve(arm, t) + N(0, noise^2 I).

    The density p(x) = mean over arms of the integral over t of N(x; curve(arm, t), noise^2 I) has
    no closed form; it is evaluated by midpoint quadrature over t with ``quadrature_points`` nodes
    per arm, i.e. as a mixture of that many Gaussians. The nodes are far closer together than the
    noise scale, so the quadrature error is negligible (the tests check the density integrates to 1
    and matches a histogram of samples).
    """

    num_arms = 1

    def __init__(self, noise: float, quadrature_points: int = 2048):
        self.noise = noise
        nodes = (torch.arange(quadrature_points, dtype=torch.float64) + 0.5) / quadrature_points
        self.quadrature_centers = torch.cat([self.curve(arm, nodes) for arm in range(self.num_arms)])

    def curve(self, arm: int, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        arm = torch.randint(0, self.num_arms, (n,), generator=generator)
        t = torch.rand(n, generator=generator, dtype=torch.float64)
        points = torch.zeros(n, 2, dtype=torch.float64)
        for a in range(self.num_arms):
            mask = arm == a
            points[mask] = self.curve(a, t[mask])
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (points + self.noise * noise).float()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return _isotropic_mixture_log_prob(x, self.quadrature_centers, self.noise)


class TwoMoons(_NoisyCurves):
    """scikit-learn's two interleaving half circles, centred and scaled by 1.5, with noise 0.1."""

    name = "two_moons"
    num_arms = 2

    def __init__(self, noise: float = 0.1, quadrature_points: int = 512):
        super().__init__(noise, quadrature_points)

    def curve(self, arm: int, t: torch.Tensor) -> torch.Tensor:
        angle = math.pi * t
        if arm == 0:
            xy = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        else:
            xy = torch.stack([1 - torch.cos(angle), 0.5 - torch.sin(angle)], dim=1)
        return 1.5 * (xy - torch.tensor([0.5, 0.25], dtype=torch.float64))


class Spirals(_NoisyCurves):
    """Two interleaved Archimedean spirals (1.5 turns, radius 0.3 -> 2.7), with noise 0.08."""

    name = "spirals"
    num_arms = 2

    def __init__(self, noise: float = 0.08, quadrature_points: int = 1024):
        super().__init__(noise, quadrature_points)

    def curve(self, arm: int, t: torch.Tensor) -> torch.Tensor:
        angle = 3 * math.pi * t + math.pi * arm
        radius = 0.3 + 2.4 * t
        return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)


TARGETS_2D = {cls.name: cls for cls in (Checkerboard, EightGaussians, TwoMoons, Spirals)}


def make_target(name: str, **kwargs: Any) -> Target2D:
    if name not in TARGETS_2D:
        raise ValueError(f"unknown 2-D dataset {name!r}; choose task.dataset from {sorted(TARGETS_2D)}")
    return TARGETS_2D[name](**kwargs)


# ----------------------------------------------------------------------------------------------
# Flow matching: loss and fixed-step ODE solvers
# ----------------------------------------------------------------------------------------------

SOLVERS = ("euler", "midpoint", "heun")


def flow_matching_loss(model: nn.Module, x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
                       y: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between v(x_t, t) and x1 - x0 on the straight path x_t = (1-t) x0 + t x1."""
    t_b = t.reshape(-1, *([1] * (x1.ndim - 1)))
    x_t = (1 - t_b) * x0 + t_b * x1
    prediction = model(x_t, t) if y is None else model(x_t, t, y)
    return ((prediction - (x1 - x0)) ** 2).mean()


@torch.no_grad()
def integrate(model: nn.Module, x0: torch.Tensor, steps: int, solver: str = "euler",
              y: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t=0 to 1 with ``steps`` uniform steps of ``solver``.

    Euler uses one velocity evaluation per step; midpoint and Heun use two.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {SOLVERS}")

    def velocity(x: torch.Tensor, time: float) -> torch.Tensor:
        t = torch.full((len(x),), time, dtype=x.dtype, device=x.device)
        return model(x, t) if y is None else model(x, t, y)

    x, dt = x0, 1.0 / steps
    for i in range(steps):
        t = i * dt
        if solver == "euler":
            x = x + dt * velocity(x, t)
        elif solver == "midpoint":
            x = x + dt * velocity(x + 0.5 * dt * velocity(x, t), t + 0.5 * dt)
        else:  # heun
            v_start = velocity(x, t)
            v_end = velocity(x + dt * v_start, t + dt)
            x = x + 0.5 * dt * (v_start + v_end)
    return x


def _metric_key(metric: str, steps: int, solver: str, primary_solver: str) -> str:
    suffix = "" if solver == primary_solver else f"_{solver}"
    return f"test/{metric}{suffix}@{steps}"


def _check_eval_schedule(eval_steps: Sequence[int], solvers: Sequence[str], headline_steps: int) -> None:
    if not eval_steps or any(int(k) < 1 for k in eval_steps):
        raise ValueError(f"eval_steps must be a non-empty list of positive step counts, got {list(eval_steps)}")
    if headline_steps not in [int(k) for k in eval_steps]:
        raise ValueError(f"headline_steps={headline_steps} must be one of eval_steps={list(eval_steps)}")
    if not solvers or any(s not in SOLVERS for s in solvers):
        raise ValueError(f"solvers must be a non-empty list from {SOLVERS}, got {list(solvers)}")


class _FlowTaskBase(Task):
    """Shared batching, validation and bookkeeping for the flow-matching tasks."""

    higher_is_better = False

    def __init__(self, seed: int = 0, device: str = "cpu", batch_size: int = 256,
                 val_repeats: int = 4, eval_steps: Sequence[int] = (1, 2, 4, 8, 16, 64),
                 solvers: Sequence[str] = ("euler",), headline_steps: int = 8,
                 data_seed: int = 0, eval_seed: int = 1234, **kwargs: Any):
        super().__init__(seed=seed, device=device, **kwargs)
        self.eval_steps = [int(k) for k in eval_steps]
        self.solvers = list(solvers)
        self.headline_steps = int(headline_steps)
        _check_eval_schedule(self.eval_steps, self.solvers, self.headline_steps)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.val_repeats = int(val_repeats)
        self.data_seed = int(data_seed)
        self.eval_seed = int(eval_seed)

    # Subclasses set self.train_x, self.train_y (or None), self.val_x, self.val_y (or None).

    def _build_seeded(self, factory) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = factory()
        return model.to(self.device)

    def train_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Endless minibatches (sampled with replacement) with their own noise and times, seeded."""
        generator = torch.Generator().manual_seed(self.seed + 1_000_003)
        n = len(self.train_x)
        while True:
            index = torch.randint(0, n, (self.batch_size,), generator=generator)
            x1 = self.train_x[index]
            batch = {"x1": x1,
                     "x0": torch.randn(x1.shape, generator=generator),
                     "t": torch.rand(self.batch_size, generator=generator)}
            if self.train_y is not None:
                batch["y"] = self.train_y[index]
            yield {key: value.to(self.device) for key, value in batch.items()}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return flow_matching_loss(model, batch["x1"], batch["x0"], batch["t"], batch.get("y"))

    def _validation_batches(self) -> list[dict[str, torch.Tensor]]:
        """Held-out data, each point paired with ``val_repeats`` fixed (noise, t) draws."""
        if getattr(self, "_val_cache", None) is None:
            generator = torch.Generator().manual_seed(self.eval_seed + 17)
            x1 = self.val_x.repeat(self.val_repeats, *([1] * (self.val_x.ndim - 1)))
            batch = {"x1": x1, "x0": torch.randn(x1.shape, generator=generator),
                     "t": torch.rand(len(x1), generator=generator)}
            if self.val_y is not None:
                batch["y"] = self.val_y.repeat(self.val_repeats)
            chunk = 4096
            self._val_cache = [{k: v[s:s + chunk].to(self.device) for k, v in batch.items()}
                               for s in range(0, len(x1), chunk)]
        return self._val_cache

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        total, count = 0.0, 0
        for batch in self._validation_batches():
            total += float(self.loss(model, batch)) * len(batch["x1"])
            count += len(batch["x1"])
        return {"val/loss": total / count}

    def _add_headline(self, metrics: dict[str, float], names: Sequence[str]) -> dict[str, float]:
        for name in names:
            metrics[f"test/{name}"] = metrics[_metric_key(name, self.headline_steps, self.solvers[0],
                                                         self.solvers[0])]
        return metrics


# ----------------------------------------------------------------------------------------------
# flow_2d
# ----------------------------------------------------------------------------------------------


class Flow2DTask(_FlowTaskBase):
    """Flow matching on a 2-D target with a known density (``dataset``: checkerboard,
    eight_gaussians, two_moons, spirals). Model: FlowMLP with sinusoidal time features.

    Training data is a fixed set of ``n_train`` samples drawn with ``data_seed`` (shared by all
    seeds, so seeds vary initialization and minibatch order only); validation uses ``n_val`` other
    samples. Evaluation integrates ``eval_samples`` fixed noise vectors (drawn with ``eval_seed``,
    the same for every run, so optimizers are compared on the same starting points) and compares
    with ``eval_samples`` fresh ground-truth samples.
    """

    headline_metric = "test/swd"

    def __init__(self, dataset: str = "checkerboard", n_train: int = 20000, n_val: int = 4096,
                 hidden: int = 128, depth: int = 3, time_dim: int = 32, eval_samples: int = 2000,
                 num_projections: int = 128, target_kwargs: dict | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.dataset = dataset
        self.target = make_target(dataset, **(target_kwargs or {}))
        self.hidden, self.depth, self.time_dim = int(hidden), int(depth), int(time_dim)
        self.eval_samples, self.num_projections = int(eval_samples), int(num_projections)
        if n_train < 1 or n_val < 1 or eval_samples < 2:
            raise ValueError(f"need n_train >= 1, n_val >= 1, eval_samples >= 2; got {n_train}, {n_val}, {eval_samples}")
        data_gen = torch.Generator().manual_seed(self.data_seed)
        self.train_x, self.train_y = self.target.sample(int(n_train), data_gen), None
        self.val_x, self.val_y = self.target.sample(int(n_val), data_gen), None
        eval_gen = torch.Generator().manual_seed(self.eval_seed)
        self.eval_noise = torch.randn(self.eval_samples, 2, generator=eval_gen)
        self.eval_reference = self.target.sample(self.eval_samples, eval_gen)

    def build_model(self) -> nn.Module:
        return self._build_seeded(lambda: FlowMLP(2, hidden=self.hidden, depth=self.depth, time_dim=self.time_dim))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        metrics: dict[str, float] = {}
        noise = self.eval_noise.to(self.device)
        for solver in self.solvers:
            for steps in self.eval_steps:
                samples = integrate(model, noise, steps, solver).cpu()
                metrics[_metric_key("swd", steps, solver, self.solvers[0])] = sliced_wasserstein(
                    samples, self.eval_reference, self.num_projections)
                metrics[_metric_key("nll", steps, solver, self.solvers[0])] = float(
                    -self.target.log_prob(samples).mean())
        return self._add_headline(metrics, ["swd", "nll"])

    def reference_floor(self) -> dict[str, float]:
        """The metrics for a perfect sampler: fresh true samples in place of the model's samples.

        SWD at this sample size is not 0 for identical distributions (finite-sample noise), and NLL
        of true samples is the target's differential entropy; both are the floor to read results
        against.
        """
        generator = torch.Generator().manual_seed(self.eval_seed + 99)
        true_samples = self.target.sample(self.eval_samples, generator)
        return {"swd": sliced_wasserstein(true_samples, self.eval_reference, self.num_projections),
                "nll": float(-self.target.log_prob(true_samples).mean())}

    def state(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "data_seed": self.data_seed}


# ----------------------------------------------------------------------------------------------
# flow_digits
# ----------------------------------------------------------------------------------------------

DIGITS_SPLIT_SEED = 0
DIGITS_VAL, DIGITS_TEST = 200, 297  # the rest (1300 of 1797) is the training split
CLASSIFIER_VERSION = "v1"


def load_digits_splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """sklearn's bundled 8x8 digits (no download), scaled to [-1, 1], fixed train/val/test split.

    The split is the same for every run, so the cached classifier never sees val/test images.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 -> -1..1
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    test_idx, val_idx = order[:DIGITS_TEST], order[DIGITS_TEST:DIGITS_TEST + DIGITS_VAL]
    train_idx = order[DIGITS_TEST + DIGITS_VAL:]
    return {name: (images[idx], labels[idx]) for name, idx in
            (("train", train_idx), ("val", val_idx), ("test", test_idx))}


class DigitsClassifier(nn.Module):
    """Small CNN; ``features`` (64-d penultimate activations) define the digits Fréchet distance."""

    feature_dim = 64

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),  # 8x8 -> 4x4
            nn.Flatten(), nn.Linear(32 * 16, self.feature_dim), nn.ReLU())
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _train_digits_classifier(images: torch.Tensor, labels: torch.Tensor, seed: int,
                             steps: int = 400, batch_size: int = 128) -> DigitsClassifier:
    """Adam on cross-entropy with small random shifts (+-1 px) so features are not brittle."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = DigitsClassifier()
    generator = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    classifier.train()
    for _ in range(steps):
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
        batch = torch.roll(images[index], shifts=shift, dims=(2, 3))
        loss = nn.functional.cross_entropy(classifier(batch), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return classifier.eval()


def default_cache_dir() -> Path:
    return Path(os.environ.get("DOPR_CACHE", Path.home() / ".cache" / "dopr"))


def load_or_train_digits_classifier(cache_dir: str | Path | None = None, seed: int = 0
                                    ) -> tuple[DigitsClassifier, float]:
    """The digits classifier behind test/fid and test/acc, trained once (seeded) and cached.

    Returns (classifier in eval mode, its accuracy on the held-out test split). The cache file name
    carries a hash of the training data and the classifier version, so a changed split or
    architecture retrains instead of loading a stale file. Writes are atomic (parallel sweep jobs
    may race to create it; both write identical weights).
    """
    splits = load_digits_splits()
    train_images, train_labels = splits["train"]
    data_hash = hashlib.sha256(train_images.numpy().tobytes() + train_labels.numpy().tobytes()).hexdigest()[:12]
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path = cache_dir / f"digits_classifier_{CLASSIFIER_VERSION}_seed{seed}_{data_hash}.pt"
    classifier = DigitsClassifier()
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        classifier.load_state_dict(saved["state_dict"])
        classifier.eval()
    else:
        with torch.random.fork_rng(devices=[]):
            # one thread => the same weights on every machine regardless of core count
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                classifier = _train_digits_classifier(train_images, train_labels, seed)
            finally:
                torch.set_num_threads(threads)
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".tmp", delete=False) as handle:
            torch.save({"state_dict": classifier.state_dict(), "version": CLASSIFIER_VERSION}, handle)
        os.replace(handle.name, path)
    test_images, test_labels = splits["test"]
    with torch.no_grad():
        accuracy = float((classifier(test_images).argmax(1) == test_labels).float().mean())
    return classifier, accuracy


class FlowDigitsTask(_FlowTaskBase):
    """Class-conditional flow matching on sklearn's 8x8 digits with a conv U-Net (``model: unet``)
    or an MLP (``model: mlp``).

    Evaluation draws ``samples_per_class`` images for each digit from fixed noise (``eval_seed``),
    clamps them to the data range [-1, 1], and reports the Fréchet distance between the cached
    classifier's features of the samples and of the training images (``test/fid@k``) and the
    classifier's accuracy at recovering the conditioning label (``test/acc@k``).
    """

    headline_metric = "test/fid"

    def __init__(self, model: str = "unet", channels: int = 32, hidden: int = 512, depth: int = 3,
                 time_dim: int = 64, samples_per_class: int = 100, cache_dir: str | None = None,
                 classifier_seed: int = 0, **kwargs: Any):
        kwargs.setdefault("batch_size", 128)
        kwargs.setdefault("headline_steps", 16)
        super().__init__(**kwargs)
        if model not in ("unet", "mlp"):
            raise ValueError(f"task.model must be 'unet' or 'mlp', got {model!r}")
        self.model_kind, self.channels = model, int(channels)
        self.hidden, self.depth, self.time_dim = int(hidden), int(depth), int(time_dim)
        splits = load_digits_splits()
        self.train_x, self.train_y = splits["train"]
        self.val_x, self.val_y = splits["val"]
        self.classifier, self.classifier_test_accuracy = load_or_train_digits_classifier(cache_dir, classifier_seed)
        self.classifier.to(self.device)
        with torch.no_grad():
            self.reference_moments = gaussian_moments(self.classifier.features(self.train_x.to(self.device)).cpu())
        eval_gen = torch.Generator().manual_seed(self.eval_seed)
        self.eval_labels = torch.arange(10).repeat_interleave(int(samples_per_class))
        self.eval_noise = torch.randn(len(self.eval_labels), 1, 8, 8, generator=eval_gen)

    def build_model(self) -> nn.Module:
        if self.model_kind == "unet":
            return self._build_seeded(lambda: SmallUNet(1, 8, channels=self.channels, time_dim=self.time_dim,
                                                        num_classes=10))
        return self._build_seeded(lambda: FlowMLP(64, hidden=self.hidden, depth=self.depth,
                                                  time_dim=self.time_dim, num_classes=10))

    @torch.no_grad()
    def sample_quality(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Fréchet distance to the training images and label accuracy for a batch of images."""
        images = images.clamp(-1.0, 1.0).to(self.device)
        features = self.classifier.features(images)
        accuracy = float((self.classifier.head(features).argmax(1).cpu() == labels.cpu()).float().mean())
        fid = frechet_distance_from_moments(*gaussian_moments(features.cpu()), *self.reference_moments)
        return {"fid": fid, "acc": accuracy}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        metrics: dict[str, float] = {}
        noise, labels = self.eval_noise.to(self.device), self.eval_labels.to(self.device)
        for solver in self.solvers:
            for steps in self.eval_steps:
                quality = self.sample_quality(integrate(model, noise, steps, solver, labels), labels)
                for name, value in quality.items():
                    metrics[_metric_key(name, steps, solver, self.solvers[0])] = value
        return self._add_headline(metrics, ["fid", "acc"])

    def reference_floor(self) -> dict[str, float]:
        """Metrics of real held-out images (val + test) in place of samples: the floor for FID at
        this sample size and the classifier's accuracy on real data."""
        splits = load_digits_splits()
        images = torch.cat([splits["val"][0], splits["test"][0]])
        labels = torch.cat([splits["val"][1], splits["test"][1]])
        return self.sample_quality(images, labels)

    def state(self) -> dict[str, Any]:
        return {"model": self.model_kind, "classifier_version": CLASSIFIER_VERSION,
                "classifier_test_accuracy": self.classifier_test_accuracy}
