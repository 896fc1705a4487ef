"""Expert policies for Gymnasium MuJoCo behavior cloning (trained by scripts/train_expert.py)."""

from dopr.experts.linear_policy import LinearPolicy, load_expert

__all__ = ["LinearPolicy", "load_expert"]
