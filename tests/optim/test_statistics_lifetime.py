"""AP statistics belong to one optimizer step: what a skipped or abandoned step leaves behind must not
reach the next one, and a non-finite batch must not switch AP off for the rest of training."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dopr.optim import ActivationPreconditioner, APConfig, DoPr


def make(config=None, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = DoPr(torch.optim.SGD(model.parameters(), lr=0.1), ActivationPreconditioner(model, config or APConfig(solver="primal")))
    return model, opt


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=g) * torch.tensor([3.0, 1.0, 0.3, 1.0, 0.1]), torch.randn(16, 3, generator=g)


def clean_step(model, opt, x, y):
    opt.zero_grad()
    (model(x) - y).pow(2).mean().backward()
    opt.step()


def inverses(opt):
    return [layer.inverse().clone() for layer in opt.preconditioner.layers]


def assert_same(a, b):
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_forward_without_backward_leaks_nothing():
    """A loss that is not finite is skipped before backward; its forward's rows are not the next step's."""
    x, y = data()
    ref_model, ref_opt = make()
    clean_step(ref_model, ref_opt, x, y)
    model, opt = make()
    loss = (model(x * 1e3 + 5) - y).pow(2).mean()  # the skipped step's forward
    assert torch.isfinite(loss)  # (any loss the loop decides not to use)
    clean_step(model, opt, x, y)
    assert_same(inverses(opt), inverses(ref_opt))
    assert_same(model.parameters(), ref_model.parameters())


def test_abandoned_accumulation_is_dropped_by_zero_grad():
    x, y = data()
    ref_model, ref_opt = make()
    clean_step(ref_model, ref_opt, x, y)
    model, opt = make()
    (model(x[:8] * 10) - y[:8]).pow(2).mean().backward()  # a micro-batch of an accumulation then abandoned
    clean_step(model, opt, x, y)  # zero_grad() first, as every loop does
    assert_same(inverses(opt), inverses(ref_opt))


def test_standalone_preconditioner_discard_statistics():
    x, y = data()
    torch.manual_seed(0)
    ref_layer, layer = nn.Linear(5, 3), nn.Linear(5, 3)
    layer.load_state_dict(ref_layer.state_dict())
    ref_ap, ap = ActivationPreconditioner(ref_layer), ActivationPreconditioner(layer)
    layer(x * 7).sum().backward()
    ap.discard_statistics()
    layer.zero_grad()
    for lay, pre in ((layer, ap), (ref_layer, ref_ap)):
        (lay(x) - y).pow(2).mean().backward()
        pre.step()
    torch.testing.assert_close(layer.weight.grad, ref_layer.weight.grad, rtol=0, atol=0)


def test_zero_grad_between_forward_and_backward_keeps_the_rows():
    """``loss = model(x); opt.zero_grad(); loss.backward(); opt.step()`` is a common loop order."""
    x, y = data()
    ref_model, ref_opt = make()
    clean_step(ref_model, ref_opt, x, y)
    model, opt = make()
    loss = (model(x) - y).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert_same(inverses(opt), inverses(ref_opt))


@pytest.mark.parametrize("stat_decay", [0.0, 0.9])
def test_non_finite_batch_never_enters_the_statistics(stat_decay):
    x, y = data()
    model, opt = make(APConfig(stat_decay=stat_decay, solver="primal"))
    clean_step(model, opt, x, y)
    before = inverses(opt)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.warns(UserWarning, match="non-finite layer inputs"):
        opt.zero_grad()
        model(bad).sum().backward()
        opt.step()
    assert_same(inverses(opt), before)  # skipped: the last good inverse stays
    with torch.no_grad():  # the NaN step's update is the user's problem; restore finite weights
        for p in model.parameters():
            p.nan_to_num_(0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not every step
        clean_step(model, opt, *data(seed=2))
        opt.zero_grad()
        model(bad).sum().backward()
        opt.step()
    for layer in opt.preconditioner.layers:
        assert torch.isfinite(layer.inverse()).all()
        if stat_decay > 0:
            assert torch.isfinite(layer.S).all()
    # AP is still on: the inverse moved with the clean step and is not the identity fallback.
    assert not torch.equal(opt.preconditioner.layers[0].inverse(), before[0])


def test_non_reentrant_checkpointing_counts_rows_once():
    """Recomputing a forward during backward (activation checkpointing) must not add its rows again."""
    x, y = data()
    ref_model, ref_opt = make()
    clean_step(ref_model, ref_opt, x, y)
    model, opt = make()
    opt.zero_grad()
    out = checkpoint(model, x, use_reentrant=False)
    (out - y).pow(2).mean().backward()
    opt.step()
    for a, b in zip(inverses(opt), inverses(ref_opt)):
        torch.testing.assert_close(a, b)
