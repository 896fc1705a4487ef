"""Which parameters AP covers, said plainly: ``coverage()`` and the warning for a layer whose
statistics never arrive (its weight got a gradient, but no forward of the module was recorded)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dopr.optim import ActivationPreconditioner, APConfig, DoPr, build_optimizer


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        x = self.embed(ids)
        x = self.norm(x + self.att(x, x, x, need_weights=False)[0])
        return self.head(x)


def step(model, opt, batch=None):
    batch = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(0)) if batch is None else batch
    opt.zero_grad()
    model(batch).pow(2).mean().backward()
    opt.step()


ATTENTION_PARAMS = ["att.in_proj_weight", "att.in_proj_bias", "att.out_proj.weight", "att.out_proj.bias"]


def test_coverage_names_preconditioned_and_plain_parameters():
    torch.manual_seed(0)
    model = Net()
    opt = build_optimizer(model, "dopr_adamw")
    coverage = opt.coverage()
    assert coverage == {"preconditioned": ATTENTION_PARAMS + ["head.weight", "head.bias"],
                        "plain": ["embed.weight", "norm.weight", "norm.bias"]}
    text = str(coverage)
    assert "AP preconditions 6 of 9 parameters" in text
    assert "GP only   embed.weight" in text and "AP + GP   att.in_proj_weight" in text
    assert repr(opt) == "DoPr(GP=[AdamW], AP=on, 5 layers)"  # q, k, v, out_proj and head


def test_coverage_follows_bias_mode_exclude_and_routing():
    torch.manual_seed(0)
    model = Net()
    gp_bias = build_optimizer(model, "dopr_adamw", ap={"bias": "gp"}).coverage()
    assert gp_bias["preconditioned"] == ["att.in_proj_weight", "att.out_proj.weight", "head.weight"]
    model = Net()
    partial = build_optimizer(model, "dopr_muon", ap={"exclude": ["att.k_proj", "head"]}).coverage()
    assert "att.in_proj_weight[rows 0:8]" in partial["preconditioned"]
    assert "att.in_proj_weight[rows 16:24]" in partial["preconditioned"]
    assert "att.in_proj_weight[rows 8:16]" in partial["plain"] and "att.in_proj_bias[rows 8:16]" in partial["plain"]
    assert "head.weight" in partial["plain"] and "embed.weight" in partial["plain"]  # Muon's AdamW side too
    plain = DoPr(torch.optim.AdamW(model.parameters()), None).coverage()
    assert plain["preconditioned"] == [] and len(plain["plain"]) == 9


def test_standalone_preconditioner_reports_its_scope():
    torch.manual_seed(0)
    model = Net()
    model.embed.weight.requires_grad_(False)
    coverage = ActivationPreconditioner(model).coverage()
    assert "embed.weight" not in coverage["plain"]  # frozen: no optimizer sees it
    assert coverage["plain"] == ["norm.weight", "norm.bias"]


class Functional(nn.Module):
    """Uses ``proj``'s weight without calling ``proj``: its forward hook never fires."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(F.linear(x, self.proj.weight, self.proj.bias)))


def test_warns_once_naming_a_layer_whose_statistics_never_arrive():
    torch.manual_seed(0)
    model = Functional()
    opt = build_optimizer(model, "dopr_adamw")
    x = torch.randn(16, 4)
    with pytest.warns(UserWarning, match=r"layer 'proj' \(Linear\) got a gradient at step 0 but none of its inputs"):
        step(model, opt, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(model, opt, x)  # once per layer


def test_warns_for_a_layer_trained_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = DoPr(torch.optim.SGD(model.parameters(), lr=0.1), ActivationPreconditioner(model, APConfig()))
    model[2].eval()
    with pytest.warns(UserWarning, match=r"layer '2'.*eval mode") as record:
        step(model, opt, torch.randn(16, 4))
    assert not any("'0'" in str(w.message) for w in record)


def test_no_warning_when_every_layer_is_seen():
    """Attention included (before, its out_proj was registered and never saw a row), and a layer whose
    output is unused this step (no gradient: nothing to warn about), and steps between statistics."""
    torch.manual_seed(0)
    model = Net()
    extra = nn.Linear(8, 8)
    model.extra = extra
    opt = build_optimizer(model, "dopr_adamw", ap={"stat_interval": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            step(model, opt)
    assert all(layer.has_inverse() for layer in opt.preconditioner.layers if layer.name != "extra")
