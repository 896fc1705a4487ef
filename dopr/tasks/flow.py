"""Flow-matching generative modeling: 2-D densities (``flow_2d``) and 8x8 digits (``flow_digits``).

Training objective (both tasks): the linear-interpolant conditional flow-matching loss of
``dopr.models.flow_ode`` (noise x0 ~ N(0, I), data x1, t ~ U[0, 1]; the model regresses x1 - x0).

Test-time metric: samples come from integrating dx/dt = v(x, t) from t=0 to t=1 with k steps of a
fixed-step solver (Euler, or midpoint / Heun as options), for several k. The one-step loss is what
the optimizer minimizes; sample quality after k integration steps is what the user gets. Their
relation across optimizers is the question the DoPr study asks.

- flow_2d: targets with known densities (``dopr.data.targets_2d``); metrics are the sliced
  2-Wasserstein distance to fresh ground-truth samples (``test/swd@k``) and the mean negative
  log-likelihood of the model's samples under the true density (``test/nll@k``).
- flow_digits: sklearn's bundled 8x8 digits (``dopr.data.digits``), class-conditional; metrics are
  the Fréchet distance in the feature space of a small CNN digits classifier trained once and
  cached (``dopr.models.digits_classifier``; ``test/fid@k``) and that classifier's accuracy on the
  conditioning labels of the samples (``test/acc@k``).

Metric keys: ``test/<metric>@<k>`` for the first solver in ``solvers``,
``test/<metric>_<solver>@<k>`` for the others, and ``test/<metric>`` (no suffix) at
``headline_steps`` with the first solver.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch import nn

from dopr.data.digits import load_digits_splits
from dopr.data.targets_2d import TARGETS_2D, make_target
from dopr.flow_metrics import sliced_wasserstein
from dopr.models.digits_classifier import CLASSIFIER_VERSION, DigitsSampleQuality, load_or_train_digits_classifier
from dopr.models.flow_nets import FlowMLP, SmallUNet
from dopr.models.flow_ode import SOLVERS, flow_matching_loss, integrate
from dopr.tasks.base import Task


def _metric_key(metric: str, steps: int, solver: str, primary_solver: str) -> str:
    suffix = "" if solver == primary_solver else f"_{solver}"
    return f"test/{metric}{suffix}@{steps}"


def _check_integration_schedule(integration_steps: Sequence[int], solvers: Sequence[str],
                                headline_steps: int) -> None:
    if not integration_steps or any(int(k) < 1 for k in integration_steps):
        raise ValueError(f"task.integration_steps must be a non-empty list of positive step counts, "
                         f"got {list(integration_steps)}")
    if headline_steps not in [int(k) for k in integration_steps]:
        raise ValueError(f"task.headline_steps={headline_steps} must be one of "
                         f"task.integration_steps={list(integration_steps)}")
    if not solvers or any(s not in SOLVERS for s in solvers):
        raise ValueError(f"solvers must be a non-empty list from {SOLVERS}, got {list(solvers)}")


class _FlowTaskBase(Task):
    """Shared batching, validation and bookkeeping for the flow-matching tasks."""

    higher_is_better = False

    def __init__(self, seed: int = 0, device: str = "cpu", batch_size: int = 256,
                 val_repeats: int = 4, integration_steps: Sequence[int] = (1, 2, 4, 8, 16, 64),
                 solvers: Sequence[str] = ("euler",), headline_steps: int = 8,
                 data_seed: int = 0, eval_seed: int = 1234, **kwargs: Any):
        super().__init__(seed=seed, device=device, **kwargs)
        self.integration_steps = [int(k) for k in integration_steps]
        self.solvers = list(solvers)
        self.headline_steps = int(headline_steps)
        _check_integration_schedule(self.integration_steps, self.solvers, self.headline_steps)
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

    Training data is a fixed set of ``train_episodes`` samples drawn with ``data_seed`` (shared by all
    seeds, so seeds vary initialization and minibatch order only); validation uses ``val_episodes`` other
    samples. Evaluation integrates ``eval_episodes`` fixed noise vectors (drawn with ``eval_seed``,
    the same for every run, so optimizers are compared on the same starting points) and compares
    with ``eval_episodes`` fresh ground-truth samples.
    """

    headline_metric = "test/swd"

    def __init__(self, dataset: str = "checkerboard", train_episodes: int = 20000, val_episodes: int = 4096,
                 hidden: int = 128, depth: int = 3, time_dim: int = 32, eval_episodes: int = 2000,
                 num_projections: int = 128, target_kwargs: dict | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if dataset not in TARGETS_2D:
            raise ValueError(f"task.dataset={dataset!r} is not a 2-D target; choose from {sorted(TARGETS_2D)}")
        self.dataset = dataset
        self.target = make_target(dataset, **(target_kwargs or {}))
        self.hidden, self.depth, self.time_dim = int(hidden), int(depth), int(time_dim)
        self.eval_episodes, self.num_projections = int(eval_episodes), int(num_projections)
        if train_episodes < 1 or val_episodes < 1 or eval_episodes < 2:
            raise ValueError(f"need task.train_episodes >= 1, task.val_episodes >= 1, task.eval_episodes >= 2; "
                             f"got {train_episodes}, {val_episodes}, {eval_episodes}")
        data_gen = torch.Generator().manual_seed(self.data_seed)
        self.train_x, self.train_y = self.target.sample(int(train_episodes), data_gen), None
        self.val_x, self.val_y = self.target.sample(int(val_episodes), data_gen), None
        eval_gen = torch.Generator().manual_seed(self.eval_seed)
        self.eval_noise = torch.randn(self.eval_episodes, 2, generator=eval_gen)
        self.eval_reference = self.target.sample(self.eval_episodes, eval_gen)

    def build_model(self) -> nn.Module:
        return self._build_seeded(lambda: FlowMLP(2, hidden=self.hidden, depth=self.depth, time_dim=self.time_dim))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        metrics: dict[str, float] = {}
        noise = self.eval_noise.to(self.device)
        for solver in self.solvers:
            for steps in self.integration_steps:
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
        true_samples = self.target.sample(self.eval_episodes, generator)
        return {"swd": sliced_wasserstein(true_samples, self.eval_reference, self.num_projections),
                "nll": float(-self.target.log_prob(true_samples).mean())}

    def state(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "data_seed": self.data_seed}


# ----------------------------------------------------------------------------------------------
# flow_digits
# ----------------------------------------------------------------------------------------------

class FlowDigitsTask(_FlowTaskBase):
    """Class-conditional flow matching on sklearn's 8x8 digits with a conv U-Net (``model: unet``)
    or an MLP (``model: mlp``).

    Evaluation draws ``eval_episodes_per_class`` images for each digit from fixed noise (``eval_seed``),
    clamps them to the data range [-1, 1], and reports the Fréchet distance between the cached
    classifier's features of the samples and of the training images (``test/fid@k``) and the
    classifier's accuracy at recovering the conditioning label (``test/acc@k``).
    """

    headline_metric = "test/fid"

    def __init__(self, model: str = "unet", channels: int = 32, hidden: int = 512, depth: int = 3,
                 time_dim: int = 64, eval_episodes_per_class: int = 100, cache_dir: str | None = None,
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
        classifier, self.classifier_test_accuracy = load_or_train_digits_classifier(cache_dir, classifier_seed)
        self.sample_quality = DigitsSampleQuality(classifier, self.train_x, self.device)
        eval_gen = torch.Generator().manual_seed(self.eval_seed)
        self.eval_labels = torch.arange(10).repeat_interleave(int(eval_episodes_per_class))
        self.eval_noise = torch.randn(len(self.eval_labels), 1, 8, 8, generator=eval_gen)

    def build_model(self) -> nn.Module:
        if self.model_kind == "unet":
            return self._build_seeded(lambda: SmallUNet(1, 8, channels=self.channels, time_dim=self.time_dim,
                                                        num_classes=10))
        return self._build_seeded(lambda: FlowMLP(64, hidden=self.hidden, depth=self.depth,
                                                  time_dim=self.time_dim, num_classes=10))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        metrics: dict[str, float] = {}
        noise, labels = self.eval_noise.to(self.device), self.eval_labels.to(self.device)
        for solver in self.solvers:
            for steps in self.integration_steps:
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
