"""AP under torch.compile (hooks are traced, not skipped) and under autocast (bf16 inputs, fp32 statistics)."""

import torch
from torch import nn

from dopr.optim import build_optimizer


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 2))


def train(model, forward, steps=4, autocast=False):
    torch.manual_seed(1)
    x, y = torch.randn(64, 6), torch.randn(64, 2)
    opt = build_optimizer(model, "dopr_adamw", lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = (forward(x).float() - y).pow(2).mean()
        loss.backward()
        opt.step()
    return opt


def test_compiled_model_matches_eager():
    eager, compiled = make(), make()
    opt_eager = train(eager, eager)
    # aot_eager traces forward and backward through dynamo/AOTAutograd like inductor does, without C++ codegen.
    torch._dynamo.reset()
    opt_compiled = train(compiled, torch.compile(compiled, backend="aot_eager"))
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(a, b)
    for la, lb in zip(opt_eager.preconditioner.layers, opt_compiled.preconditioner.layers):
        torch.testing.assert_close(la.P, lb.P)  # the hooks ran inside the compiled forward


def test_autocast_bf16_statistics_are_fp32_and_finite():
    model = make()
    opt = train(model, model, autocast=True)
    for layer in opt.preconditioner.layers:
        assert layer.P.dtype == torch.float32 and torch.isfinite(layer.P).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
