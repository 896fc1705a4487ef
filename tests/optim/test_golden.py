"""Golden artifacts: three steps of every optimizer on a fixed model and batch must reproduce the
saved parameter statistics. Catches silent drift (a changed default, a reordered operation).

Regenerate deliberately, after checking why they changed:  python tests/optim/test_golden.py --update
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dopr.optim import KNOWN_OPTIMIZERS, build_optimizer

GOLDEN = Path(__file__).with_name("golden") / "three_steps.json"
NAMES = [n for n in KNOWN_OPTIMIZERS if n not in ("adam", "dopr_adam")]


def three_steps(name: str) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # BLAS reduction order depends on the thread count, and Newton-Schulz amplifies it
    try:
        return _three_steps(name)
    finally:
        torch.set_num_threads(threads)


def _three_steps(name: str) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Unflatten(1, (1, 12)), nn.Conv1d(1, 2, 3, padding=1),
                          nn.Flatten(), nn.Linear(24, 3))
    opt = build_optimizer(model, name, lr=1e-2, weight_decay=0.01)
    x, y = torch.randn(16, 5) * torch.tensor([3.0, 1.0, 0.3, 1.0, 0.1]), torch.randn(16, 3)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    return {"losses": losses, "sum": flat.sum().item(), "abs_sum": flat.abs().sum().item(), "sq_sum": flat.pow(2).sum().item()}


@pytest.mark.parametrize("name", NAMES)
def test_matches_golden(name):
    if not GOLDEN.exists():
        pytest.fail(f"{GOLDEN} missing; run: python {__file__} --update")
    expected = json.loads(GOLDEN.read_text())[name]
    got = three_steps(name)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)


if __name__ == "__main__" and "--update" in sys.argv:
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({n: three_steps(n) for n in NAMES}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
