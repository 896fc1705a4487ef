"""Golden artifacts: three steps of every optimizer on a fixed model and batch must reproduce the
saved parameter statistics. Catches silent drift (a changed default, a reordered operation).

Computed and compared in float64 (initialization, data, AP and Newton-Schulz all in float64), so the
values do not depend on the CPU's vector kernels, the BLAS vendor or the thread count: fp32 results
differ across machines by far more than any tolerance that would still catch drift. Checked here
with ATEN_CPU_CAPABILITY=default and MKL_ENABLE_INSTRUCTIONS=SSE4_2 against the AVX-512 default.

Regenerate deliberately, after checking why they changed:  python tests/optim/test_golden.py --update
(--add computes only the optimizers the file lacks).
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dopr.optim import KNOWN_OPTIMIZERS, build_optimizer

GOLDEN = Path(__file__).with_name("golden") / "three_steps.json"
# No golden values for the peers, whose float64 steps depend on the CPU's kernels: PSGD-Kron keeps its
# preconditioner in float32 whatever the parameters' dtype (pytorch-optimizer's precondition_dtype), and
# SOAP's eigenbasis differs between the default and AVX-512 kernel sets (parameter sum after 3 steps
# -1.4925 against -1.4203, measured). Their tests are in test_optimizer.py.
PEERS = ("soap", "dopr_soap", "kron", "dopr_kron")
# presets (dopr_<gp>_cheap) are dopr_<gp> with other AP settings, which test_precision checks against float64
NAMES = [n for n in KNOWN_OPTIMIZERS if n not in ("adam", "dopr_adam", *PEERS) and not n.endswith("_cheap")]


def three_steps(name: str) -> dict:
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # init and data drawn in float64: fp32 sampling differs by CPU kernel
    try:
        return _three_steps(name)
    finally:
        torch.set_default_dtype(default)


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
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {"losses": losses, "sum": flat.sum().item(), "abs_sum": flat.abs().sum().item(), "sq_sum": flat.pow(2).sum().item()}


@pytest.mark.parametrize("name", NAMES)
def test_matches_golden(name):
    if not GOLDEN.exists():
        pytest.fail(f"{GOLDEN} missing; run: python {__file__} --update")
    expected = json.loads(GOLDEN.read_text())[name]
    got = three_steps(name)
    for key, value in expected.items():
        # float64 rounding differences across machines are ~1e-15; drift is orders of magnitude larger.
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, key)


if __name__ == "__main__" and ("--update" in sys.argv or "--add" in sys.argv):
    # --add: only the optimizers the file lacks (a new GP), leaving the others' values as they were
    saved = json.loads(GOLDEN.read_text()) if ("--add" in sys.argv and GOLDEN.exists()) else {}
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({n: saved[n] if n in saved else three_steps(n) for n in NAMES}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
