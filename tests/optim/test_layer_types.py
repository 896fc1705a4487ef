"""AP on attention (nn.MultiheadAttention, so nn.TransformerEncoderLayer) and Hugging Face Conv1D.

Three kinds of check, as for Linear and Conv layers:
1. Exact: the rows AP records are the rows each projection multiplies (bitwise), and AP's hooks
   change neither the module's output nor any gradient (bitwise), masks and dropout included.
2. Float64 dense math on the rows each layer saw, within the derived error bound of
   test_precision.py (``ap_reference.check_model``).
3. The invariance property (the paper's Sec. 4.2): reparametrizing a block's input z -> T z with
   W -> W T^-1 leaves the function after an AP gradient step unchanged; plain SGD does not.

Invariance tolerance (float64, damping 0, one SGD step of size lr): both runs compute the same
function in exact arithmetic. To first order in u = 2^-53 and with deterministic constants
(Higham 2002, Thm 10.3 and sec. 3.5, as in test_misuse.py), each run's AP update M = G A^-1 has
relative error at most (n + 3d + 2 + w) kappa_A u: the statistics (n rows), the Cholesky inverse
(3d + 1) and the product (d + 1), plus the raw gradient's own error from the forward and backward
products (w, the sum of the inner dimensions along the longest path), which A^-1 amplifies by kappa_A.
Forming x T^T and W T^-1 and mapping the result back costs kappa_T each on the reparametrized
run. So the outputs differ by at most

    gap <= 2 (n + 3d + 2 + w) kappa_A kappa_T^2 u (max|y| + lr ||M|| max|z|)

with kappa_A the largest condition number of any block's S, d its largest (bias-augmented) input
dimension and n its most rows. Plain SGD breaks the property by far more than that bound.
"""

import copy

import pytest
import torch
from ap_reference import (
    DAMPING,
    U64,
    LayerInputs,
    Reference,
    check_model,
    reference_grad,
    spread_inputs,
)
from torch import nn

from dopr.optim import ActivationPreconditioner, APConfig, DoPr, build_optimizer

E, HEADS = 8, 2

# name -> (MultiheadAttention kwargs, whether query, key and value are one tensor)
ATTENTION = {
    "self": ({}, True),
    "cross": ({}, False),
    "separate": ({"kdim": 6, "vdim": 5}, False),  # q_proj_weight / k_proj_weight / v_proj_weight
}


def attention(kind, batch_first, dtype=torch.float32, dropout=0.0, seed=0, embed_dim=E, **extra):
    torch.manual_seed(seed)
    kwargs, _ = ATTENTION[kind]
    return nn.MultiheadAttention(embed_dim, HEADS, dropout=dropout, batch_first=batch_first, dtype=dtype, **kwargs,
                                 **extra)


def qkv(kind, mha, L, S, N, g, spread=1.0, dtype=torch.float32):
    """query (L, N, E), key and value (S, N, kdim / vdim), or batch-first; one tensor for self-attention."""
    def make(length, dim):
        shape = (N, length, dim) if mha.batch_first else (length, N, dim)
        return spread_inputs(shape, spread, 2, g).to(dtype)

    query = make(L, mha.embed_dim)
    if ATTENTION[kind][1]:
        return query, query, query
    return query, make(S, mha.kdim), make(S, mha.vdim)


def causal_masks(mha, L, N):
    """A causal attn_mask (bool, L x L) and a key_padding_mask that hides the last key of every other sequence."""
    attn_mask = torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=1)
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[::2, -1] = True
    return {"attn_mask": attn_mask, "key_padding_mask": padding, "is_causal": True}


# -- 1. exact ------------------------------------------------------------------------------------------

CALLS = [
    ("self", False, {"need_weights": True}),
    ("self", True, {"need_weights": False}),
    ("cross", True, {"need_weights": True}),
    ("separate", False, {"need_weights": False}),
    ("self", True, {"need_weights": False, "masks": True}),
    ("self", False, {"need_weights": True, "masks": True}),
]


@pytest.mark.parametrize("kind,batch_first,call", CALLS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_attention_output_and_gradients_are_untouched_by_the_hooks(kind, batch_first, call, dropout):
    """The capture of the attention output changes nothing the user computes: outputs, attention
    weights and every raw gradient are bitwise those of the same module without AP."""
    L, N = 5, 3
    mha = attention(kind, batch_first, dropout=dropout, add_bias_kv=kind == "cross")
    plain = copy.deepcopy(mha)
    ActivationPreconditioner(mha)
    q, k, v = qkv(kind, mha, L, L, N, torch.Generator().manual_seed(1))
    kwargs = {"need_weights": call["need_weights"], **(causal_masks(mha, L, N) if call.get("masks") else {})}
    results = []
    for module in (mha, plain):
        torch.manual_seed(2)  # the same dropout draws
        out, weights = module(q, k, v, **kwargs)
        loss = out.pow(2).sum() + (weights.sum() if weights is not None else 0)
        loss.backward()
        results.append((out, weights, [p.grad for p in module.parameters()]))
    (out, weights, grads), (out_ref, weights_ref, grads_ref) = results
    assert torch.equal(out, out_ref)
    assert (weights is None and weights_ref is None) or torch.equal(weights, weights_ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref))


@pytest.mark.parametrize("kind", ["self", "separate"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_attention_rows_are_what_each_projection_multiplies(kind, batch_first, dropout):
    """AP's rows for q/k/v are the query/key/value inputs, and for out_proj the attention output a
    (after attention dropout), bitwise. a is read back from autograd independently: with the loss
    sum_r out[r, c_r] over distinct columns c_r, out_proj.weight.grad[c_r] = 1 * a[r] exactly."""
    # Fewer rows than any projection has inputs (9, or 9, 7 and 6 when separate), so AP keeps them as they are.
    L, N = (3, 2) if kind == "self" else (5, 1)
    mha = attention(kind, batch_first, dropout=dropout)
    ap = ActivationPreconditioner(mha)
    q, k, v = qkv(kind, mha, L, L, N, torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    out, _ = mha(q, k, v, need_weights=False)
    out_lne = out.transpose(0, 1) if batch_first else out  # (L, N, E): the functional's row order
    rows = out_lne.reshape(L * N, E)
    rows[torch.arange(L * N), torch.arange(L * N)].sum().backward()
    layers = {layer.name: layer for layer in ap.layers}
    assert sorted(layers) == ["k_proj", "out_proj", "q_proj", "v_proj"]
    a = mha.out_proj.weight.grad[: L * N]
    assert torch.equal(layers["out_proj"].kept_rows(), a)
    for name, x in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
        assert torch.equal(layers[name].kept_rows(), x.reshape(-1, x.shape[-1]))


# -- 2. float64 dense math, derived bound -----------------------------------------------------------

@pytest.mark.parametrize("kind", list(ATTENTION))
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("rows", ["few", "many"])  # fewer rows than inputs (batch space) and more (d x d)
@pytest.mark.parametrize("spread", [1e-2, 1e-4])
def test_attention_matches_float64_reference(kind, batch_first, rows, spread):
    mha = attention(kind, batch_first, embed_dim=16)
    # 4 rows: the batch-space path is cheaper for the 17-input projections (not for the 7- and 6-input
    # key and value projections of "separate"); 48 rows: every projection takes the d x d path.
    L, N = (2, 2) if rows == "few" else (6, 8)
    expect = (None if kind == "separate" else True) if rows == "few" else False
    check_model(mha, lambda g: qkv(kind, mha, L, L, N, g, spread), APConfig(damping=DAMPING),
                expect_batch_space=expect, steps=2, forward=lambda m, x: m(*x, need_weights=False)[0])


@pytest.mark.parametrize("bias", ["augment", "gp"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_masked_attention_matches_float64_reference(bias, need_weights):
    mha = attention("self", batch_first=True)
    L, N = 6, 8
    masks = causal_masks(mha, L, N)
    check_model(mha, lambda g: qkv("self", mha, L, L, N, g, 1e-3), APConfig(damping=DAMPING, bias=bias), steps=2,
                forward=lambda m, x: m(*x, need_weights=need_weights, **masks)[0])


def test_transformer_encoder_layer_end_to_end():
    """build_optimizer(model, "dopr_adamw") and one step: every weight of the attention block (and the
    feed-forward block) holds G P of float64 dense math, within the derived bound; norms get the plain GP."""
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    opt = build_optimizer(model, "dopr_adamw", lr=1e-3)
    layers = opt.preconditioner.layers
    assert sorted(layer.name for layer in layers) == ["linear1", "linear2", "self_attn.k_proj", "self_attn.out_proj",
                                                      "self_attn.q_proj", "self_attn.v_proj"]
    coverage = opt.coverage()
    assert sorted(coverage["plain"]) == ["norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight"]
    assert {"self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
            "self_attn.out_proj.bias"} <= set(coverage["preconditioned"])
    inputs = LayerInputs(layers)
    x = spread_inputs((8, 6, 16), 1e-2, 2, torch.Generator().manual_seed(1))  # 48 rows > every layer's inputs: d x d
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    raw = {layer.name: reference_grad(layer) for layer in layers}
    rows = {layer.name: inputs.rows(layer) for layer in layers}
    before = {name: p.grad.clone() for name, p in model.named_parameters()}
    opt.step()
    for layer in layers:
        exact, bound = Reference(opt.preconditioner.config).step(0, rows[layer.name], raw[layer.name], layer.index)
        error = ((reference_grad(layer) - exact).norm() / exact.norm()).item()
        assert error <= bound, (layer.name, error, bound)
    for name in ("self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
                 "self_attn.out_proj.bias"):
        assert not torch.equal(dict(model.named_parameters())[name].grad, before[name]), name
    inputs.remove()


def hf():
    """transformers, or a skip (only the Conv1D tests need it)."""
    return pytest.importorskip("transformers", reason="Hugging Face Conv1D needs transformers")


@pytest.mark.parametrize("spread", [1e-2, 1e-4])
@pytest.mark.parametrize("rows", [10, 200])
@pytest.mark.parametrize("bias", ["augment", "gp"])
def test_hf_conv1d_matches_float64_reference(spread, rows, bias):
    Conv1D = hf().pytorch_utils.Conv1D
    torch.manual_seed(4)
    model = nn.Sequential(Conv1D(24, 48), nn.Tanh(), Conv1D(6, 24))  # Conv1D(nf=d_out, nx=d_in)
    check_model(model, lambda g: spread_inputs((rows, 48), spread, 1, g), APConfig(damping=DAMPING, bias=bias))


def test_gpt2_projections_are_preconditioned():
    """GPT-2's attention and MLP projections are Conv1D: AP covers them all, checked against float64."""
    transformers = hf()
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=20, n_positions=8, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(5)
    model = transformers.GPT2Model(config)
    opt = build_optimizer(model, "dopr_adamw")
    assert sorted(layer.name for layer in opt.preconditioner.layers) == [
        "h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj"]
    plain = opt.coverage()["plain"]
    assert all(name.startswith(("wte", "wpe", "ln_f", "h.0.ln_")) for name in plain), plain
    opt.preconditioner.remove_hooks()
    check_model(model, lambda g: torch.randint(0, 20, (4, 8), generator=g), APConfig(damping=DAMPING),
                forward=lambda m, ids: m(input_ids=ids).last_hidden_state, steps=2)


# -- 3. invariance ----------------------------------------------------------------------------------

def _transform(d, g, dtype=torch.float64):
    """A random invertible d x d matrix with condition number ~10."""
    Q1, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dtype))
    Q2, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dtype))
    return Q1 @ torch.diag(torch.logspace(0, 1, d, dtype=dtype)) @ Q2


def _kappa(T):
    s = torch.linalg.svdvals(T)
    return (s[0] / s[-1]).item()


def invariance_bound(rows: dict, kappa_T: float, w: int, y_max: float, step_size: float) -> float:
    """The module docstring's bound, from every AP layer's float64 rows (bias-augmented)."""
    n = max(Z.shape[0] for Z in rows.values())
    d = max(Z.shape[1] for Z in rows.values())
    kappa_A = max(torch.linalg.cond(Z.T @ Z / Z.shape[0]).item() for Z in rows.values())
    return 2 * (n + 3 * d + 2 + w) * kappa_A * kappa_T**2 * U64 * (y_max + step_size)


def _one_step(model, forward, x, target, use_ap, lr):
    """One SGD step (on AP gradients when use_ap, damping 0); returns the rows AP saw and lr ||M|| max|z|."""
    ap = ActivationPreconditioner(model, APConfig(damping=0.0)) if use_ap else None
    opt = DoPr(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr), ap)
    inputs = LayerInputs(ap.layers) if use_ap else None
    opt.zero_grad()
    (forward(model, x) - target).pow(2).mean().backward()
    rows = {layer.name: inputs.rows(layer) for layer in ap.layers} if use_ap else {}
    opt.step()
    step = max((lr * reference_grad(layer).norm() * rows[layer.name].abs().max()).item() for layer in ap.layers) \
        if use_ap else 0.0
    if use_ap:
        inputs.remove()
        ap.remove_hooks()
    return rows, step


def _gap_after_one_step(base, reparam, forward, x, x_reparam, target, use_ap, lr, kappa_T, w):
    y_max = forward(base, x).abs().max().item()
    rows, step = _one_step(base, forward, x, target, use_ap, lr)
    _, step_reparam = _one_step(reparam, forward, x_reparam, target, use_ap, lr)
    with torch.no_grad():
        gap = (forward(reparam, x_reparam) - forward(base, x)).abs().max().item()
    bound = invariance_bound(rows, kappa_T, w, y_max, max(step, step_reparam)) if use_ap else None
    return gap, bound


@pytest.mark.parametrize("kind", list(ATTENTION))
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("use_ap", [True, False])
def test_attention_invariance_to_input_reparametrization(kind, batch_first, use_ap):
    """query, key, value -> x T_q^T, x T_k^T, x T_v^T with the q/k/v weights -> W T^-1: the same function,
    before and after an AP step. Self-attention uses one T for all three (one input tensor)."""
    g = torch.Generator().manual_seed(6)
    L, N = 6, 8
    base = attention(kind, batch_first, dtype=torch.float64)
    x = qkv(kind, base, L, L, N, g, 1e-1, torch.float64)
    dims = (E, base.kdim, base.vdim)
    T = [_transform(d, g) for d in dims]
    if ATTENTION[kind][1]:
        T = [T[0]] * 3
    reparam = copy.deepcopy(base)
    with torch.no_grad():
        for i, Ti in enumerate(T):
            if reparam.in_proj_weight is not None:
                rows = slice(i * E, (i + 1) * E)
                reparam.in_proj_weight[rows] = base.in_proj_weight[rows] @ torch.linalg.inv(Ti)
            else:
                name = ("q", "k", "v")[i] + "_proj_weight"
                getattr(reparam, name).copy_(getattr(base, name) @ torch.linalg.inv(Ti))
    x_reparam = tuple(xi @ Ti.T for xi, Ti in zip(x, T))
    if ATTENTION[kind][1]:
        x_reparam = (x_reparam[0],) * 3  # still one tensor: self-attention
    target = torch.randn(x[0].shape, generator=g, dtype=torch.float64)

    def forward(m, inputs):
        return m(*inputs, need_weights=False)[0]

    kappa_T = max(_kappa(Ti) for Ti in T)
    w = 2 * (max(dims) + E // HEADS + 2 * L + E)  # in-projection, q k^T, softmax and a v, out-projection
    gap, bound = _gap_after_one_step(base, reparam, forward, x, x_reparam, target, use_ap, 0.2, kappa_T, w)
    if use_ap:
        assert gap <= bound, (gap, bound)
    else:
        assert gap > 1e-3, gap


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("use_ap", [True, False])
def test_attention_invariance_of_the_output_projection(batch_first, use_ap):
    """The attention output a -> a T^T (T block-diagonal over heads, made by W_v -> T W_v, b_v -> T b_v)
    with out_proj.weight -> W_o T^-1: the same function. Only out_proj trains, so this tests that its
    statistics are those of a (any other statistics would break the property)."""
    g = torch.Generator().manual_seed(7)
    L, N, hd = 6, 8, E // HEADS
    base = attention("self", batch_first, dtype=torch.float64)
    for p in (base.in_proj_weight, base.in_proj_bias):
        p.requires_grad_(False)
    T = torch.block_diag(*[_transform(hd, g) for _ in range(HEADS)])
    reparam = copy.deepcopy(base)
    with torch.no_grad():
        reparam.in_proj_weight[2 * E :] = T @ base.in_proj_weight[2 * E :]
        reparam.in_proj_bias[2 * E :] = T @ base.in_proj_bias[2 * E :]
        reparam.out_proj.weight.copy_(base.out_proj.weight @ torch.linalg.inv(T))
    x = qkv("self", base, L, L, N, g, 1e-1, torch.float64)
    target = torch.randn(x[0].shape, generator=g, dtype=torch.float64)

    def forward(m, inputs):
        return m(*inputs, need_weights=False)[0]

    w = 2 * (E + hd + 2 * L + E)
    gap, bound = _gap_after_one_step(base, reparam, forward, x, x, target, use_ap, 0.2, _kappa(T), w)
    if use_ap:
        assert gap <= bound, (gap, bound)
    else:
        assert gap > 1e-3, gap


@pytest.mark.parametrize("use_ap", [True, False])
def test_hf_conv1d_invariance_to_input_reparametrization(use_ap):
    """x -> x T^T with Conv1D's weight (d_in x d_out, y = x W + b) -> T^-T W: the same function."""
    Conv1D = hf().pytorch_utils.Conv1D
    g = torch.Generator().manual_seed(8)
    torch.manual_seed(8)
    base = nn.Sequential(Conv1D(4, 6), nn.Tanh(), Conv1D(2, 4)).double()
    T = _transform(6, g)
    reparam = copy.deepcopy(base)
    with torch.no_grad():
        reparam[0].weight.copy_(torch.linalg.inv(T).T @ base[0].weight)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    target = torch.randn(64, 2, generator=g, dtype=torch.float64)
    gap, bound = _gap_after_one_step(base, reparam, lambda m, z: m(z), x, x @ T.T, target, use_ap, 0.2, _kappa(T),
                                     w=2 * (6 + 4))
    if use_ap:
        assert gap <= bound, (gap, bound)
    else:
        assert gap > 1e-3, gap


def test_hf_conv1d_is_recognized_by_name_not_shape():
    """A layer that only looks like Conv1D (an ``nf`` and a 2-D weight) is not read as one."""

    class LooksLikeConv1D(nn.Module):
        def __init__(self):
            super().__init__()
            self.nf, self.weight = 3, nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return x @ self.weight

    with pytest.raises(ValueError, match="no layer to precondition"):
        ActivationPreconditioner(LooksLikeConv1D())
