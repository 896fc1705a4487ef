"""Float64 reference math for AP tests, and the derived error bound of the fp32 computation.

The bound (``ap_error_bound``) is derived in tests/optim/test_precision.py's docstring; this module
holds the machinery so that every layer type's test uses the same reference and the same bound:
``check_model`` trains a few steps and compares every AP layer with float64 dense math on the rows
that layer saw. The rows and gradients here are read independently of AP's own layer helpers
(``layer_inputs`` / ``reference_grad``): hooks of this module and each layer type's definition.
"""

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from dopr.optim import ActivationPreconditioner, APConfig

U32 = 2.0**-24  # unit roundoff of fp32
U64 = 2.0**-53
LAMBDA = 6.0  # probabilistic rounding constant: failure probability ~ exp(-18) per bound
SPREADS = (1e-2, 1e-3, 1e-4)
DAMPING = 1e-3


def gamma(m: int, u: float = U32) -> float:
    """The probabilistic error constant of m accumulated roundings (Higham and Mary 2019)."""
    return LAMBDA * math.sqrt(m) * u


def ap_error_bound(G: torch.Tensor, ref: "Reference", batch_space: bool) -> float:
    """The module docstring's bound on ||M_hat - M||_F / ||M||_F for the path the layer took (float64)."""
    M = G @ ref.P
    if batch_space:
        return U32 + 2 * ref.kappa**2 * gamma(ref.rows + ref.P.shape[0], U64)
    M_norm = M.norm()
    GP = G.abs() @ ref.P.abs()
    product = gamma(ref.P.shape[0]) * GP.norm() / M_norm
    inverse = min((GP @ ref.E @ ref.P.abs()).norm() / M_norm, torch.linalg.matrix_norm(ref.E, 2) / ref.lam_min)
    return (U32 + product + inverse).item()


def spread_inputs(shape, spread, channel_dim, generator):
    """Gaussian inputs whose channels' scales are log-spaced from 1 down to ``spread``."""
    scales = torch.logspace(0, math.log10(spread), shape[channel_dim])
    view = [1] * len(shape)
    view[channel_dim] = -1
    return torch.randn(*shape, generator=generator) * scales.view(view)


def layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows the layer's weight multiplies, from the input it saw (float64)."""
    x = x.double()
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features)
    if isinstance(module, nn.Conv1d):
        x = F.pad(x, (module.padding[0], module.padding[0])).unsqueeze(2)
        patches = F.unfold(x, (1, module.kernel_size[0]), dilation=(1, module.dilation[0]), stride=(1, module.stride[0]))
    else:
        x = F.pad(x, (module.padding[1], module.padding[1], module.padding[0], module.padding[0]))
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


class Reference:
    """Float64 AP of one layer, following APConfig's schedule (EMA, intervals, rows, warmup), and the
    error bound of the fp32 computation that the optimizer ran (``ap_error_bound``)."""

    def __init__(self, config: APConfig):
        self.config, self.S, self.S_abs, self.rows = config, None, None, 0
        self.P = self.E = self.lam_min = self.kappa = None

    def step(self, step: int, Z: torch.Tensor, G: torch.Tensor, index: int = 0,
             batch_space: bool = False) -> tuple[torch.Tensor, float]:
        """(G P in float64, the bound on the relative error of the optimizer's fp32 G P) for this step."""
        cfg = self.config
        if step % cfg.stat_interval == 0:
            if cfg.max_rows is not None and Z.shape[0] > cfg.max_rows:
                stride = math.ceil(Z.shape[0] / cfg.max_rows)
                Z = Z[step % stride :: stride]
            n = Z.shape[0]
            S_batch, S_abs_batch = Z.T @ Z / n, Z.abs().T @ Z.abs() / n
            if cfg.stat_decay == 0 or self.S is None:
                self.S, self.S_abs = S_batch, S_abs_batch
            else:
                self.S = cfg.stat_decay * self.S + (1 - cfg.stat_decay) * S_batch
                self.S_abs = cfg.stat_decay * self.S_abs + (1 - cfg.stat_decay) * S_abs_batch
            self.rows = n
        if self.P is None or (step + index) % cfg.inverse_interval == 0:
            d = self.S.shape[0]
            A = self.S + cfg.damping * torch.trace(self.S) / d * torch.eye(d, dtype=torch.float64, device=self.S.device)
            L = torch.linalg.cholesky(A)
            eig = torch.linalg.eigvalsh(A)
            self.P, self.lam_min, self.kappa = torch.linalg.inv(A), eig[0].item(), (eig[-1] / eig[0]).item()
            # Componentwise backward error of the P the optimizer computed: the fp32 sums of S (n rows,
            # plus the EMA's and the damping's roundings), the Cholesky factorization and inverse
            # (|L||L^T|, Higham 2002 Thm 10.3-10.4), and the rounding of S + mu I.
            self.E = (gamma(self.rows + 2) * self.S_abs + gamma(3 * d + 1) * (L.abs() @ L.abs().T)
                      + gamma(d + 2) * A.abs())
        if step < cfg.start_step:
            return G, U32
        return G @ self.P, ap_error_bound(G, self, batch_space)


def full_grad(layer_module, augment):
    G = layer_module.weight.grad.reshape(layer_module.weight.shape[0], -1)
    if augment:
        G = torch.cat([G, layer_module.bias.grad[:, None]], 1)
    return G.double()


def is_hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and type(module).__module__ == "transformers.pytorch_utils"


def _mha_part(layer) -> str:
    """q_proj, k_proj, v_proj or out_proj: which projection of an attention module an AP layer is."""
    return layer.name.rsplit(".", 1)[-1]


def reference_grad(layer) -> torch.Tensor:
    """The raw gradient of one AP layer as d_out x d_in (+ the bias column when it is augmented), float64,
    read from the module's parameters by the layer type's own definition."""
    m = layer.module
    if isinstance(m, nn.MultiheadAttention):
        part, E = _mha_part(layer), m.embed_dim
        if part == "out_proj":
            W, b = m.out_proj.weight.grad, None if m.out_proj.bias is None else m.out_proj.bias.grad
        else:
            i = "qkv".index(part[0])
            packed = m.in_proj_weight is not None
            W = m.in_proj_weight.grad[i * E : (i + 1) * E] if packed else getattr(m, f"{part}_weight").grad
            b = None if m.in_proj_bias is None else m.in_proj_bias.grad[i * E : (i + 1) * E]
    elif is_hf_conv1d(m):
        W, b = m.weight.grad.T, m.bias.grad  # y = x W + b: W is (d_in, d_out)
    else:
        return full_grad(m, layer.bias is not None)
    G = torch.cat([W, b[:, None]], 1) if layer.bias is not None else W
    return G.double()


class LayerInputs:
    """The inputs each AP layer's module saw in its last forward, captured by hooks of its own.

    For ``nn.MultiheadAttention`` the q/k/v rows are the call's query/key/value, and the output
    projection's rows (the attention output a, which the module never exposes) are recomputed
    under no_grad by a copy of the module whose output projection is the identity with zero bias:
    the same functional on the same inputs returns a itself (needs dropout 0)."""

    def __init__(self, layers):
        self.calls, self.handles = {}, []
        for module in {id(layer.module): layer.module for layer in layers}.values():
            self.handles.append(module.register_forward_hook(self._hook, with_kwargs=True))

    def _hook(self, module, args, kwargs, output):
        if torch.is_grad_enabled():
            self.calls[module] = (tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs))

    def remove(self):
        for h in self.handles:
            h.remove()

    def rows(self, layer) -> torch.Tensor:
        """Float64 rows of ``layer`` (augmented with a ones column when its bias is)."""
        m = layer.module
        args, kwargs = self.calls[m]
        if isinstance(m, nn.MultiheadAttention):
            part = _mha_part(layer)
            if part == "out_proj":
                Z = attention_output(m, args, kwargs).reshape(-1, m.embed_dim)
            else:
                x = args[i] if len(args) > (i := "qkv".index(part[0])) else kwargs[("query", "key", "value")[i]]
                Z = x.reshape(-1, x.shape[-1])
            Z = Z.double()
        elif is_hf_conv1d(m):
            Z = args[0].double().reshape(-1, m.weight.shape[0])
        else:
            Z = layer_rows(m, args[0])
        return torch.cat([Z, Z.new_ones(len(Z), 1)], 1) if layer.bias is not None else Z


def attention_output(mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> torch.Tensor:
    """The input of ``mha``'s output projection in the call ``mha(*args, **kwargs)`` (module layout)."""
    assert mha.dropout == 0.0 or not mha.training, "recomputing a needs the same dropout mask: use dropout 0"
    clone = copy.deepcopy(mha)
    clone._forward_hooks.clear()
    clone._forward_pre_hooks.clear()
    with torch.no_grad():
        clone.out_proj.weight.copy_(torch.eye(mha.embed_dim))
        clone.out_proj.bias.zero_() if clone.out_proj.bias is not None else None
        return clone(*args, **kwargs)[0]


def check_model(model, make_input, config, steps=3, expect_batch_space=None, seed=0, forward=None):
    """Train ``steps`` steps with a random linear loss; compare every AP layer with float64 math.

    ``forward(model, inputs)`` computes the output from ``make_input``'s result (default: ``model(inputs)``).
    Returns the worst ratio of error to bound."""
    g = torch.Generator().manual_seed(seed)
    ap = ActivationPreconditioner(model, config)
    inputs = LayerInputs(ap.layers)
    refs = {layer.name: Reference(config) for layer in ap.layers}
    batch_space = set()  # the layers of this step that took the batch-space path
    run_batch_space = ap._batch_space_step
    ap._batch_space_step = lambda layers: (batch_space.update(layer.name for layer in layers), run_batch_space(layers))
    worst = 0.0
    for step in range(steps):
        batch_space.clear()
        model.zero_grad()
        out = model(make_input(g)) if forward is None else forward(model, make_input(g))
        (out * torch.randn(out.shape, generator=g).to(out.device)).sum().backward()
        raw = {layer.name: reference_grad(layer) for layer in ap.layers}
        rows = {layer.name: inputs.rows(layer) for layer in ap.layers}
        ap.step()
        if expect_batch_space is not None:
            assert all((layer.name in batch_space) == expect_batch_space for layer in ap.layers), batch_space
        for layer in ap.layers:
            exact, bound = refs[layer.name].step(step, rows[layer.name], raw[layer.name], layer.index,
                                                 batch_space=layer.name in batch_space)
            got = reference_grad(layer)
            error = ((got - exact).norm() / exact.norm()).item()
            assert error <= bound, (layer.name, step, error, bound, error / bound)
            worst = max(worst, error / bound)
    inputs.remove()
    return worst
