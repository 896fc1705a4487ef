"""AP against dense reference math, and its invariance property (the paper's Sec. 4.2)."""

import copy
import math

import pytest
import torch
from torch import nn

from ap_reference import Reference
from dopr.optim import ActivationPreconditioner, APConfig, DoPr, damped_inverse


def dense_ap(G: torch.Tensor, Z: torch.Tensor, damping: float) -> torch.Tensor:
    """G (S + damping tr(S)/d I)^-1 with S = Z^T Z / n, by a plain float64 inverse."""
    Z = Z.double()
    S = Z.T @ Z / Z.shape[0]
    d = S.shape[0]
    return G.double() @ torch.linalg.inv(S + damping * torch.trace(S) / d * torch.eye(d, dtype=torch.float64))


def dense_linear_grads(raw: dict, Z: torch.Tensor, damping: float, bias_mode: str):
    """Reference AP gradients (weight, bias) of a Linear layer with raw gradients ``raw`` and input rows Z."""
    if bias_mode == "gp":
        return dense_ap(raw["weight"], Z, damping), raw["bias"]  # the bias is left to the plain GP
    Z = torch.cat([Z, torch.ones(len(Z), 1, dtype=Z.dtype)], 1)
    M = dense_ap(torch.cat([raw["weight"], raw["bias"][:, None]], 1), Z, damping)
    return M[:, :-1], M[:, -1]


def grads_after_ap(model, x, config):
    ap = ActivationPreconditioner(model, config)
    model.zero_grad()
    model(x).pow(2).sum().backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    ap.step()
    return raw, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("bias_mode", ["augment", "gp"])
def test_linear_matches_dense(bias_mode):
    torch.manual_seed(0)
    layer = nn.Linear(6, 4, dtype=torch.float64)
    x = torch.randn(3, 5, 6, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1, 1.0, 3.0, 0.5], dtype=torch.float64)
    raw, new = grads_after_ap(layer, x, APConfig(damping=1e-3, bias=bias_mode))
    weight, bias = dense_linear_grads(raw, x.reshape(-1, 6), 1e-3, bias_mode)
    torch.testing.assert_close(new["weight"], weight)
    torch.testing.assert_close(new["bias"], bias)


def conv_patches(x, kernel, stride, padding, dilation):
    """Independent patch extraction with explicit loops (rows ordered (c, kh, kw), like weight.view(out, -1))."""
    x = nn.functional.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    N, C, H, W = x.shape
    kh, kw = kernel
    rows = []
    for n in range(N):
        for i in range(0, H - dilation[0] * (kh - 1), stride[0]):
            for j in range(0, W - dilation[1] * (kw - 1), stride[1]):
                patch = x[n, :, i : i + dilation[0] * (kh - 1) + 1 : dilation[0], j : j + dilation[1] * (kw - 1) + 1 : dilation[1]]
                rows.append(patch.reshape(-1))
    return torch.stack(rows)


def test_conv2d_matches_dense():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, kernel_size=(3, 2), stride=(2, 1), padding=(1, 1), dilation=(1, 2), dtype=torch.float64)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    raw, new = grads_after_ap(conv, x, APConfig(damping=1e-2, bias="augment"))
    Z = conv_patches(x, (3, 2), (2, 1), (1, 1), (1, 2))
    Z = torch.cat([Z, torch.ones(len(Z), 1, dtype=Z.dtype)], 1)
    G = torch.cat([raw["weight"].reshape(4, -1), raw["bias"][:, None]], 1)
    M = dense_ap(G, Z, 1e-2)
    torch.testing.assert_close(new["weight"], M[:, :-1].reshape(conv.weight.shape))
    torch.testing.assert_close(new["bias"], M[:, -1])


def test_conv1d_same_padding_matches_dense():
    torch.manual_seed(2)
    conv = nn.Conv1d(2, 3, kernel_size=4, padding="same", bias=False, dtype=torch.float64)
    x = torch.randn(3, 2, 9, dtype=torch.float64)
    raw, new = grads_after_ap(conv, x, APConfig(damping=1e-3))
    xp = nn.functional.pad(x, (1, 2))  # 'same' for k=4: 1 left, 2 right
    Z = torch.stack([xp[n, :, t : t + 4].reshape(-1) for n in range(3) for t in range(9)])
    torch.testing.assert_close(new["weight"], dense_ap(raw["weight"].reshape(3, -1), Z, 1e-3).reshape(conv.weight.shape))


def test_identity_statistics_leave_gradient_unchanged():
    d = 5
    layer = nn.Linear(d, 3, bias=False, dtype=torch.float64)
    x = math.sqrt(d) * torch.eye(d, dtype=torch.float64)  # S = x^T x / n = I exactly
    raw, new = grads_after_ap(layer, x, APConfig(damping=0.0))
    torch.testing.assert_close(new["weight"], raw["weight"])


def _two_layer(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def _sgd_trajectory(model, x, y, use_ap, steps=5, lr=0.05):
    inner = torch.optim.SGD(model.parameters(), lr=lr)
    opt = DoPr(inner, ActivationPreconditioner(model, APConfig(damping=0.0)) if use_ap else None)
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()
    return model


@pytest.mark.parametrize("use_ap", [True, False])
def test_invariance_to_input_reparametrization(use_ap):
    """z -> T z with W -> W T^-1 is the same function; AP's step keeps it the same, plain SGD does not."""
    torch.manual_seed(3)
    x, y = torch.randn(64, 4, dtype=torch.float64), torch.randn(64, 2, dtype=torch.float64)
    T = torch.tensor([[3.0, 1.0, 0.0, 0.0], [0.0, 0.2, 0.5, 0.0], [0.0, 0.0, 1.0, 2.0], [1.0, 0.0, 0.0, 0.5]], dtype=torch.float64)
    base, reparam = _two_layer(0), _two_layer(0)
    with torch.no_grad():
        reparam[0].weight.copy_(base[0].weight @ torch.linalg.inv(T))
    torch.testing.assert_close(reparam(x @ T.T), base(x))  # same function before training
    _sgd_trajectory(base, x, y, use_ap)
    _sgd_trajectory(reparam, x @ T.T, y, use_ap)
    gap = (reparam(x @ T.T) - base(x)).abs().max().item()
    if use_ap:
        assert gap < 1e-8, gap
    else:
        assert gap > 1e-3, gap


def test_eval_and_no_grad_passes_do_not_touch_statistics():
    torch.manual_seed(4)
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    runs = []
    for interleave in (False, True):
        model = _two_layer(0).float()
        opt = DoPr(torch.optim.Adam(model.parameters(), lr=1e-2), ActivationPreconditioner(model))
        for _ in range(5):
            if interleave:
                model.eval()
                model(torch.randn(7, 4) * 100)  # an "evaluation" pass
                model.train()
                with torch.no_grad():
                    model(torch.randn(9, 4) * 100)  # a "rollout" in train mode without grad
            opt.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_gradient_accumulation_sums_statistics():
    torch.manual_seed(5)
    x = torch.randn(16, 4)
    full, micro = nn.Linear(4, 3), nn.Linear(4, 3)
    micro.load_state_dict(full.state_dict())
    ap_full, ap_micro = ActivationPreconditioner(full), ActivationPreconditioner(micro)
    full(x).pow(2).mean().backward()
    for chunk in x.split(8):
        (micro(chunk).pow(2).mean() / 2).backward()
    raw = {name: torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).double() for name, m in (("full", full), ("micro", micro))}
    ap_full.step()
    ap_micro.step()
    # Both equal G P with the whole batch's S (rows summed over micro-batches), each from its own G,
    # within the derived bound (ap_reference; the bound holds for any order of the sums).
    Z = torch.cat([x, torch.ones(16, 1)], 1).double()
    for name, m in (("full", full), ("micro", micro)):
        exact, bound = Reference(APConfig()).step(0, Z, raw[name])
        got = torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).double()
        assert ((got - exact).norm() / exact.norm()).item() <= bound, name


@pytest.mark.parametrize("kind", ["zeros", "rank1", "huge"])
def test_degenerate_activations_give_finite_steps(kind):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2))
    x = {"zeros": torch.zeros(8, 5), "rank1": torch.randn(1, 5).repeat(8, 1), "huge": torch.randn(8, 5) * 1e18}[kind]
    opt = DoPr(torch.optim.SGD(model.parameters(), lr=1e-3), ActivationPreconditioner(model, APConfig(damping=0.0)))
    opt.zero_grad()
    (model(x) - 1).pow(2).mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_damped_inverse_fallbacks_are_finite():
    S = torch.stack([torch.zeros(3, 3), torch.full((3, 3), float("nan")), torch.ones(3, 3), torch.eye(3) * 4])
    P = damped_inverse(S, damping=0.0)
    assert torch.isfinite(P).all()
    torch.testing.assert_close(P[0], torch.eye(3))  # zero statistics: identity
    torch.testing.assert_close(P[3], torch.eye(3) / 4)  # exact inverse when well posed


def test_damped_cholesky_factors_the_damped_statistics_and_leaves_them_alone():
    """L L^T = S + damping tr(S)/d I per matrix of the batch, in float64 (the residual is ~d u64 |S|, far
    inside assert_close's float64 rtol of 1e-7), and the caller's S is unchanged: the damping goes onto a
    copy, or S's moving average would accumulate it."""
    from dopr.optim.solvers import damped_cholesky

    z = torch.randn(2, 50, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    S = z.mT @ z / 50
    before = S.clone()
    L = damped_cholesky(S, damping=0.1)
    mu = 0.1 * torch.diagonal(S, dim1=-2, dim2=-1).sum(-1) / 7
    torch.testing.assert_close(L @ L.mT, S + mu[:, None, None] * torch.eye(7, dtype=torch.float64))
    assert torch.equal(S, before)
    # overwrite=True (a caller's scratch copy) damps S in place: the same sums, so the same factor
    assert torch.equal(damped_cholesky(S.clone(), damping=0.1, overwrite=True), L)


def test_a_layer_without_rows_adds_zeros_to_the_statistics_all_reduce():
    """reset() leaves a layer's sums as a buffer for the next step's first rows to overwrite; a process that
    records no rows for the layer in a step must still add zeros, not last step's sums, to the all-reduce."""
    from dopr.optim.sync import pack_statistics

    model = nn.Linear(4, 3)
    ap = ActivationPreconditioner(model)
    model(torch.randn(8, 4)).sum().backward()
    ap.step()
    (layer,) = ap.layers
    assert layer.rows == 0 and bool(layer.xtx.abs().sum() > 0)  # last step's sums are still in the buffer
    bucket = pack_statistics(ap.layers)
    assert torch.equal(bucket, torch.zeros_like(bucket))
    # and the next step's statistics are that step's rows alone: within the fp32 dot-product bound
    # |fl(a.b) - a.b| <= gamma_n |a|.|b| (Higham 2002, eq. 3.5), n = 6 rows, against float64 math on the same rows
    z = torch.randn(6, 4).double()
    model(z.float()).sum().backward()
    assert layer.rows == 6
    u = 2.0**-24
    gamma = 6 * u / (1 - 6 * u)
    assert bool(((layer.xtx.double() - z.T @ z).abs() <= gamma * (z.abs().T @ z.abs())).all())


@pytest.mark.parametrize("options,held", [(dict(), "factor"), (dict(stat_decay=0.5), "factor"),
                                          (dict(inverse_interval=2), "P"), (dict(stat_interval=2), "P")])
def test_an_inverse_used_once_is_held_as_its_factor(options, held):
    """With statistics and the inverse refreshed every step (on CPU) each inverse is applied once, by
    solving with its Cholesky factor; one that is reused is formed as P. Either way the gradient is
    G P of the layer's inverse: in float64 with damping 1e-2 (kappa(A) <= 101, d = 41) the two ways
    differ by about kappa d u64 ~ 1e-12, far inside assert_close's float64 rtol of 1e-7."""
    torch.manual_seed(8)
    layer = nn.Linear(40, 6).double()
    ap = ActivationPreconditioner(layer, APConfig(damping=1e-2, solver="primal", **options))
    for step in range(3):
        layer.zero_grad()
        layer(torch.randn(60, 40, dtype=torch.float64)).pow(2).sum().backward()
        G = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
        ap.step()
        stats = ap.layers[0]
        assert (stats.factor is not None, stats.P is not None) == (held == "factor", held == "P")
        expected = G @ stats.inverse()
        torch.testing.assert_close(torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1), expected)


def test_options_ema_interval_subsample_warmup_exclude():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    cfg = APConfig(stat_decay=0.9, stat_interval=2, inverse_interval=3, max_rows=10, start_step=2, exclude=("2",))
    ap = ActivationPreconditioner(model, cfg)
    assert [layer.name for layer in ap.layers] == ["0"]
    for step in range(6):
        model.zero_grad()
        model(torch.randn(40, 4)).sum().backward()
        raw = model[0].weight.grad.clone()
        ap.step()
        if step < 2:
            assert torch.equal(model[0].weight.grad, raw)  # warmup: plain gradient
        else:
            assert not torch.equal(model[0].weight.grad, raw)
    assert ap.layers[0].S is not None and ap.memory_bytes() > 0


def test_bad_config_raises():
    for bad in (dict(damping=-1), dict(stat_decay=1.0), dict(stat_interval=0), dict(bias="nope"), dict(max_rows=0), dict(solver="nope")):
        with pytest.raises(ValueError):
            APConfig(**bad)


def test_lora_adapters_are_preconditioned():
    peft = pytest.importorskip("peft")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 6)

        def forward(self, x):
            return self.proj(x)

    model = peft.get_peft_model(Tiny(), peft.LoraConfig(r=2, target_modules=["proj"], lora_dropout=0.0, init_lora_weights=False))
    ap = ActivationPreconditioner(model)
    names = sorted(layer.name for layer in ap.layers)
    assert len(names) == 2 and all("lora_A" in n or "lora_B" in n for n in names)  # frozen base layer skipped
    x = torch.randn(10, 6)
    model(x).pow(2).sum().backward()
    lora_a = next(layer for layer in ap.layers if "lora_A" in layer.name)
    raw = lora_a.weight.grad.clone()
    ap.step()
    exact, bound = Reference(APConfig()).step(0, x.double(), raw.double())  # lora_A sees the layer input
    assert ((lora_a.weight.grad.double() - exact).norm() / exact.norm()).item() <= bound
    copy.deepcopy(ap.state_dict())


def _wide_layer_grads(solver, bias_mode, dtype, chunks=1, seed=11):
    """A layer with more inputs (48) than batch rows (10): the batch-space path applies."""
    torch.manual_seed(seed)
    layer = nn.Linear(48, 5, dtype=dtype)
    scales = torch.logspace(-1, 1, 48, dtype=dtype)  # anisotropic inputs, so P is far from a multiple of I
    x = torch.randn(10, 48, dtype=dtype) * scales
    ap = ActivationPreconditioner(layer, APConfig(damping=1e-2, bias=bias_mode, solver=solver))
    for part in x.chunk(chunks):
        layer(part).pow(2).sum().backward()
    raw = {n: p.grad.clone() for n, p in layer.named_parameters()}
    kept = bool(ap.layers[0].kept)
    ap.step()
    return x, raw, {n: p.grad.clone() for n, p in layer.named_parameters()}, kept


@pytest.mark.parametrize("bias_mode", ["augment", "gp"])
@pytest.mark.parametrize("chunks", [1, 2])
def test_batch_space_path_matches_dense(bias_mode, chunks):
    x, raw, new, kept = _wide_layer_grads("auto", bias_mode, torch.float64, chunks)
    assert kept  # the Woodbury path was taken
    weight, bias = dense_linear_grads(raw, x, 1e-2, bias_mode)
    torch.testing.assert_close(new["weight"], weight)
    torch.testing.assert_close(new["bias"], bias)


@pytest.mark.parametrize("config", [dict(stat_decay=0.5), dict(inverse_interval=2), dict(stat_interval=2), dict(damping=0.0)])
def test_batch_space_path_only_for_per_batch_damped_statistics(config):
    layer = nn.Linear(48, 5)
    ap = ActivationPreconditioner(layer, APConfig(**config))
    layer(torch.randn(10, 48)).sum().backward()
    assert not ap.layers[0].kept and ap.layers[0].rows == 10  # reduced to z^T z in the hook
    ap.step()
    assert torch.isfinite(layer.weight.grad).all()
