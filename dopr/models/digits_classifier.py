"""The digits classifier behind the flow_digits metrics: a small CNN, trained once (seeded) and cached.

Its 64-d penultimate features define the digits Fréchet distance (FID-style) and its predictions
the label accuracy of class-conditional samples (``DigitsSampleQuality``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from dopr.data.digits import load_digits_splits
from dopr.flow_metrics import frechet_distance_from_moments, gaussian_moments
from dopr.paths import DEFAULT_DATA, resolve

CLASSIFIER_VERSION = "v1"
DEFAULT_CACHE_DIR = DEFAULT_DATA / "cache"  # the flow_digits config passes ${paths.data}/cache


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
    cache_dir = resolve(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
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


class DigitsSampleQuality:
    """Scores images in ``classifier``'s feature space: the Fréchet distance of their features to
    those of ``reference_images`` (``fid``) and the accuracy of its predicted labels (``acc``)."""

    def __init__(self, classifier: DigitsClassifier, reference_images: torch.Tensor,
                 device: str | torch.device = "cpu"):
        self.classifier = classifier.to(device)
        self.device = device
        with torch.no_grad():
            self.reference_moments = gaussian_moments(self.classifier.features(reference_images.to(device)).cpu())

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Images are clamped to the data range [-1, 1] first (a sampler may overshoot it)."""
        features = self.classifier.features(images.clamp(-1.0, 1.0).to(self.device))
        accuracy = float((self.classifier.head(features).argmax(1).cpu() == labels.cpu()).float().mean())
        fid = frechet_distance_from_moments(*gaussian_moments(features.cpu()), *self.reference_moments)
        return {"fid": fid, "acc": accuracy}
