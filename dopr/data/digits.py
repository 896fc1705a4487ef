"""scikit-learn's bundled 8x8 digits (no download) with one fixed train/val/test split."""

from __future__ import annotations

import torch

DIGITS_SPLIT_SEED = 0
DIGITS_VAL, DIGITS_TEST = 200, 297  # the rest (1300 of 1797) is the training split


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
