"""Misuse of the optimizer library becomes a clear error before any work, or correct behavior (issue 20).

Numbers are checked against float64 dense math. The bound on the AP gradient M = G P computed in
working precision u (first order, deterministic constants, so it holds for any summation order;
Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., Thm 10.3 and sec. 3.5): forming
S from n rows and the Cholesky inverse of A = S + mu I (d x d) perturb A by at most (n + 3d + 2) u
relative, which moves P by kappa(A) times that; the product G P (inner dimension d) adds d u and
rounding the result u, all relative to ||G||_F ||P||_2:

    ||M_hat - M||_F <= ((n + 3d + 2) kappa + d + 1) u ||G||_F ||P||_2   (+ the rounding of M to the
                                                                         gradient's dtype, if coarser)
"""

import copy

import pytest
import torch
from torch import nn

import dopr.optim as optim
from dopr.optim import ActivationPreconditioner, APConfig, DoPr, build_optimizer

U64 = 2.0**-53
U32 = 2.0**-24
U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)


def mlp(width=8, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 3)).to(dtype)


def batch(seed=1, n=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([3.0, 1.0, 0.3, 1.0, 0.1], dtype=torch.float64)  # anisotropic: P far from a multiple of I
    x = torch.randn(n, 5, generator=g, dtype=torch.float64) * scales
    return x.to(dtype), torch.randn(n, 3, generator=g, dtype=torch.float64).to(dtype)


def backward(model, x, y):
    """Backward of the squared loss; returns each Linear's input rows (for the dense reference)."""
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a[0].detach()))
             for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    (model(x) - y).pow(2).mean().backward()
    for h in hooks:
        h.remove()
    return inputs


def dense_ap(layer: nn.Linear, G_aug: torch.Tensor, Z: torch.Tensor, damping: float = 1e-3):
    """[G b] (S + damping tr(S)/d I)^-1 with z augmented by 1, in float64; and the error bound above for
    working precision u is returned as a function of u."""
    Z = torch.cat([Z.double(), torch.ones(len(Z), 1, dtype=torch.float64)], 1)
    n, d = Z.shape
    S = Z.T @ Z / n
    A = S + damping * torch.trace(S) / d * torch.eye(d, dtype=torch.float64)
    P = torch.linalg.inv(A)
    G = G_aug.double()
    eig = torch.linalg.eigvalsh(A)
    kappa = (eig[-1] / eig[0]).item()

    def bound(u):
        return ((n + 3 * d + 2) * kappa + d + 1) * u * G.norm().item() * torch.linalg.matrix_norm(P, 2).item()

    return G @ P, bound


def grad_aug(layer: nn.Linear) -> torch.Tensor:
    return torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)


# -- 1. exclude patterns -------------------------------------------------------------------------------

def headed():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)))


def test_exclude_string_is_one_pattern():
    """``opt.ap.exclude=2.*`` (a str) excludes the modules under '2', not every module ('*' as a character)."""
    opt = build_optimizer(headed(), "dopr_adamw", ap={"exclude": "2.*"})
    assert [layer.name for layer in opt.preconditioner.layers] == ["0"]
    assert APConfig(exclude="2.0").exclude == ("2.0",)
    assert "AP=on, 1 layers" in repr(opt)


def test_exclude_pattern_matching_nothing_names_it_and_the_layers():
    with pytest.raises(ValueError, match=r"'encoder\.\*' matches none.*'0', '2\.0', '2\.2'"):
        build_optimizer(headed(), "dopr_adamw", ap={"exclude": ["encoder.*"]})


@pytest.mark.parametrize("bad", [3, [3], {"head": 1}, 1.5])
def test_exclude_of_wrong_type_is_refused(bad):
    with pytest.raises(ValueError, match=r"opt\.ap\.exclude must be a module-name pattern"):
        build_optimizer(headed(), "dopr_adamw", ap={"exclude": bad})
    with pytest.raises(ValueError, match=r"opt\.ap\.exclude must be"):
        optim.check_optimizer_args("dopr_adamw", ap={"exclude": bad})


# -- 2. no layer for AP ----------------------------------------------------------------------------------

@pytest.mark.parametrize("model,ap,match", [
    (nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)), None, "no nn.Linear"),
    (nn.Sequential(nn.Conv3d(2, 3, 2)), None, "Conv3d"),
    (nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), {"exclude": "*"}, "remove the exclude patterns"),
])
def test_dopr_without_a_layer_for_ap_is_refused(model, ap, match):
    with pytest.raises(ValueError, match=f"dopr_adamw: AP has no layer to precondition.*{match}.*adamw rather than dopr_"):
        build_optimizer(model, "dopr_adamw", ap=ap)
    build_optimizer(model, "adamw")  # the plain GP is what the user gets told to use


# -- 3. a parameter in two inner optimizers --------------------------------------------------------------

def test_parameter_in_two_inner_optimizers_is_refused():
    model = mlp()
    with pytest.raises(ValueError, match=r"update them twice: '0\.weight' \(inner optimizers 0 and 1"):
        DoPr([torch.optim.SGD([model[0].weight], lr=0.1), torch.optim.SGD([model[0].weight, model[0].bias], lr=0.1)],
             ActivationPreconditioner(model))


# -- 4. step() twice after one backward ------------------------------------------------------------------

@pytest.mark.parametrize("gp", ["sgd_momentum", "adamw"])
def test_second_step_without_backward_leaves_the_gradient_alone(gp):
    """step(); step() after one backward equals the plain GP stepping twice on G P (float64)."""
    lr = 0.01
    model = mlp()
    ref = copy.deepcopy(model)
    if gp == "adamw":
        opt, ref_opt = build_optimizer(model, "dopr_adamw", lr=lr), torch.optim.AdamW(ref.parameters(), lr=lr)
    else:
        opt = DoPr(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), ActivationPreconditioner(model))
        ref_opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9)
    inputs = backward(model, *batch())
    expected, bounds = {}, {}
    for i in (0, 2):
        expected[i], bound = dense_ap(model[i], grad_aug(model[i]), inputs[i])
        bounds[i] = bound(U64)
    opt.step()
    opt.step()
    for i in (0, 2):
        error = (grad_aug(model[i]) - expected[i]).norm().item()
        assert error <= bounds[i], (i, error, bounds[i])  # before the fix: G P P, ~1.8 relative
        ref[i].weight.grad, ref[i].bias.grad = expected[i][:, :-1].clone(), expected[i][:, -1].clone()
    ref_opt.step()
    ref_opt.step()
    # Parameters: SGD with momentum moves them by lr (1 + 1.9) M, so by at most 2.9 lr times the
    # gradient's error. AdamW's first two steps on one gradient g both move by lr g / (|g| + eps),
    # whose derivative in g is at most 1 / (4 eps): at most 2 lr / (4 eps) times it. Plus the
    # rounding of the parameters themselves.
    gain = 2.9 * lr if gp == "sgd_momentum" else 2 * lr / (4 * 1e-8)
    for i in (0, 2):
        atol = gain * bounds[i] + 4 * U64 * model[i].weight.abs().max().item()
        torch.testing.assert_close(model[i].weight, ref[i].weight, rtol=0, atol=atol)
        torch.testing.assert_close(model[i].bias, ref[i].bias, rtol=0, atol=atol)


def test_warmup_counts_only_steps_with_a_new_gradient():
    model = mlp()
    opt = DoPr(torch.optim.SGD(model.parameters(), lr=0.01), ActivationPreconditioner(model, APConfig(start_step=2)))
    backward(model, *batch(1))
    opt.step()
    opt.step()  # no new gradient: not a step of the warmup
    opt.zero_grad()
    backward(model, *batch(2))
    raw = model[0].weight.grad.clone()
    opt.step()  # the second real step: still warmup, the gradient stays raw
    assert torch.equal(model[0].weight.grad, raw)
    opt.zero_grad(set_to_none=False)  # an in-place zeroing: the next backward's gradient is new too
    inputs = backward(model, *batch(3))
    expected, bound = dense_ap(model[0], grad_aug(model[0]), inputs[0])
    opt.step()
    assert (grad_aug(model[0]) - expected).norm().item() <= bound(U64)


def test_stat_interval_counts_only_steps_with_a_new_gradient():
    """With stat_interval=2, the second real step reuses the first batch's P (layer 0 sees x only)."""
    model = mlp()
    opt = DoPr(torch.optim.SGD(model.parameters(), lr=0.01), ActivationPreconditioner(model, APConfig(stat_interval=2)))
    x1, y1 = batch(1)
    backward(model, x1, y1)
    opt.step()
    opt.step()
    opt.zero_grad()
    backward(model, *batch(2))
    expected, bound = dense_ap(model[0], grad_aug(model[0]), x1)  # P of the first batch
    opt.step()
    assert (grad_aug(model[0]) - expected).norm().item() <= bound(U64)


# -- 5 and 6. hyperparameters, checked without the model -------------------------------------------------

BAD = [
    ("adamw", {"betas": [0.9]}, r"opt\.betas must be a list of two numbers"),
    ("adamw", {"betas": "0.9,0.99"}, r"opt\.betas must be"),
    ("adamw", {"eps": "abc"}, r"opt\.eps must be a number >= 0"),
    ("adamw", {"lr": "1e-3"}, r"opt\.lr must be a number > 0"),
    ("adamw", {"lr": True}, r"opt\.lr must be"),
    ("adamw", {"weight_decay": None}, r"opt\.weight_decay must be"),
    ("muon", {"momentum": "0.9"}, r"opt\.momentum must be a number in \[0, 1\)"),
    ("muon", {"nesterov": "yes"}, r"opt\.nesterov must be true or false"),
    ("muon", {"ns_steps": 2.5}, r"opt\.ns_steps must be an integer"),
    ("dopr_muon", {"adamw_betas": [0.9, 1.5]}, r"opt\.adamw_betas must be"),
    ("signum", {"momentum": [0.9]}, r"opt\.momentum must be a number in \(0, 1\)"),
    ("dopr_adamw", {"ap": {"damping": -1}}, r"opt\.ap\.damping must be a finite number >= 0"),
    ("dopr_adamw", {"ap": {"damping": "abc"}}, r"opt\.ap\.damping must be"),
    ("dopr_adamw", {"ap": {"stat_interval": 1.5}}, r"opt\.ap\.stat_interval must be an integer"),
    ("dopr_adamw", {"ap": {"stat_decay": None}}, r"opt\.ap\.stat_decay must be"),
    ("dopr_adamw", {"ap": "damping=1"}, r"opt\.ap must be a dict"),
    ("dopr_adamz", {}, "unknown optimizer"),
    ("dopr_adamw", {"dampng": 1}, "unknown hyperparameters"),
]


@pytest.mark.parametrize("name,kwargs,match", BAD)
def test_bad_hyperparameters_name_the_key_and_the_form(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_optimizer(mlp(), name, **kwargs)
    with pytest.raises(ValueError, match=match):
        optim.check_optimizer_args(name, **kwargs)


def test_check_optimizer_args_takes_the_hydra_opt_dict():
    """What Hydra composes for opt=dopr_muon (configs/opt, configs/ap/default.yaml), as plain containers."""
    opt = {"name": "dopr_muon", "lr": 1e-3, "weight_decay": 0.0, "momentum": 0.95, "nesterov": True, "ns_steps": 5,
           "ns_dtype": "auto", "adamw_betas": [0.9, 0.999],
           "ap": {"damping": 1e-3, "stat_decay": 0.0, "stat_interval": 1, "inverse_interval": 1, "max_rows": None,
                  "bias": "augment", "start_step": 0, "exclude": [], "solver": "auto"}}
    assert optim.check_optimizer_args(**opt) is None
    assert "check_optimizer_args" in optim.__all__
    build_optimizer(mlp(), **opt)


# -- 7. state dicts -----------------------------------------------------------------------------------------

def trained(name, width=8):
    model = mlp(width)
    opt = build_optimizer(model, name, lr=1e-2)
    for seed in (1, 2):
        opt.zero_grad()
        backward(model, *batch(seed))
        opt.step()
    return model, opt


def test_plain_torch_state_into_dopr_says_so():
    model = mlp()
    plain = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=r"plain torch optimizer's state dict.*opt\.optimizers\[0\]\.load_state_dict"):
        build_optimizer(model, "dopr_adamw").load_state_dict(plain.state_dict())


@pytest.mark.parametrize("name", ["adamw", "dopr_adamw", "dopr_muon", "signum"])
def test_state_of_another_width_is_refused_at_load(name):
    _, small = trained(name, width=8)
    model = mlp(width=16)
    opt = build_optimizer(model, name, lr=1e-2)
    with pytest.raises(ValueError, match=r"shape \(8, 5\).*saved from a model of another shape"):
        opt.load_state_dict(small.state_dict())


def test_ap_state_of_another_width_names_the_layer():
    _, small = trained("dopr_adamw", width=8)
    ap = ActivationPreconditioner(mlp(width=16))
    with pytest.raises(ValueError, match=r"layer '2': P has shape \(9, 9\), but the layer has 17 inputs"):
        ap.load_state_dict(small.preconditioner.state_dict())


def test_failed_load_changes_nothing():
    """An AdamW (AP off) state loaded into dopr_adamw is refused before the inner state is touched."""
    _, plain = trained("adamw")
    _, opt = trained("dopr_adamw")
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="activation preconditioning"):
        opt.load_state_dict(plain.state_dict())
    after = opt.state_dict()
    for b, a in zip(before["optimizers"], after["optimizers"]):
        for key in b["state"]:
            for k, v in b["state"][key].items():
                assert torch.equal(v, a["state"][key][k])


# -- 8. the model's dtype changes after the optimizer was built ---------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_change_after_steps(dtype):
    """AP follows the new dtype (statistics and P in at least fp32, gradient written back in its own
    dtype); the GP state follows the parameters as torch's load_state_dict casts it, so stepping on
    equals saving the state and loading it into an optimizer rebuilt for the converted model."""
    model = mlp(dtype=torch.float32)
    opt = build_optimizer(model, "dopr_adamw", lr=1e-2)
    for seed in (1, 2):
        opt.zero_grad()
        backward(model, *batch(seed, dtype=torch.float32))
        opt.step()
    ref = mlp(dtype=torch.float32)  # not a deepcopy: that would copy AP's hooks, bound to the original
    ref.load_state_dict(model.state_dict())
    ref.to(dtype)
    saved = copy.deepcopy(opt.state_dict())
    model.to(dtype)
    ref_opt = build_optimizer(ref, "dopr_adamw", lr=1e-2)
    ref_opt.load_state_dict(saved)

    x, y = batch(3, dtype=dtype)
    opt.zero_grad()
    inputs = backward(model, x, y)
    expected, bound = dense_ap(model[0], grad_aug(model[0]), inputs[0])
    opt.step()
    u = U64 if dtype == torch.float64 else U32  # AP computes in fp32 for bf16 and rounds the result to bf16
    rounding = 0.0 if dtype == torch.float64 else U_BF16 * expected.norm().item()
    error = (grad_aug(model[0]).double() - expected).norm().item()
    assert error <= bound(u) + rounding, (error, bound(u), rounding)
    assert all(v.dtype == dtype for s in opt.optimizers[0].state.values() for k, v in s.items() if k != "step")

    ref_opt.zero_grad()
    backward(ref, x, y)
    ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_a_preset_name_is_its_dopr_optimizer_with_the_preset_under_the_given_ap():
    from dopr.optim.config import AP_PRESETS

    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    cheap = build_optimizer(model, "dopr_adamw_cheap", lr=1e-3)
    config = cheap.preconditioner.config
    assert {k: getattr(config, k) for k in AP_PRESETS["cheap"]} == AP_PRESETS["cheap"]
    assert config.damping == APConfig().damping  # everything else stays the default
    tuned = build_optimizer(model, "dopr_muon_cheap", lr=1e-3, ap={"stat_interval": 5, "damping": 1e-2})
    assert tuned.preconditioner.config.stat_interval == 5 and tuned.preconditioner.config.inverse_interval == 10
    assert tuned.preconditioner.config.damping == 1e-2
    with pytest.raises(ValueError, match=r"dopr_adamw_cheap: the 'cheap' preset sets .* build dopr_adamw instead"):
        build_optimizer(model, "dopr_adamw_cheap", ap=APConfig())
    with pytest.raises(ValueError, match="unknown optimizer 'adamw_cheap'"):
        build_optimizer(model, "adamw_cheap")
