"""Per-layer-type helpers: what AP preconditions in each kind of module, and how it reads it.

The shape is kfac-pytorch's ``kfac/layers/modules.py``: one small class per module type.

- A :class:`Block` is one weight matrix W (d_out x d_in) with its bias piece: a whole parameter, a
  row range of one (the q, k, v thirds of attention's packed ``in_proj_weight``), or one stored
  transposed (Hugging Face ``Conv1D``). It turns a layer input into the (n, d_in) rows W multiplies
  and gets / sets the gradient as a d_out x d_in matrix (x (d_in + 1) with an augmented bias).
  AP keeps one set of statistics per block.
- A :class:`ModuleHelper` knows one module type: its blocks, and the hooks that hand each block's
  layer input to AP during a forward pass. A new layer type is one new helper in ``HELPERS``.

Supported: ``nn.Linear`` (any leading dims), ``nn.Conv1d`` / ``nn.Conv2d`` (unfolded patches, not
grouped), ``nn.MultiheadAttention`` (so ``nn.TransformerEncoderLayer`` / ``DecoderLayer``), and Hugging
Face ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections), recognized by its class name and
module so that this package never imports transformers. LoRA adapters are ``nn.Linear`` layers.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
import threading
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without torch.distributed has no DTensor
    DTensor = ()

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)  # and transformers' Conv1D, by name

# on_forward(helper, inputs, outputs): inputs[i] is the layer input of helper.blocks[i] (or None),
# outputs the forward's output tensors, whose gradient marks the backward reaching the module.
OnForward = Callable[["ModuleHelper", list, list], None]
ShouldRecord = Callable[[nn.Module], bool]


def is_dtensor(tensor: torch.Tensor) -> bool:
    """A DTensor: FSDP2's sharded parameters and gradients."""
    return isinstance(tensor, DTensor)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class Block:
    """One weight matrix AP preconditions, read like ``nn.Linear``: G = d_out x d_in (+ a bias column).

    ``weight_rows`` / ``bias_rows`` select this block's rows of a shared parameter (None: all of it).
    ``bias`` is the bias parameter when it is preconditioned with the weight (``ap.bias=augment``).
    """

    def __init__(self, name: str, module: nn.Module, weight: nn.Parameter, bias: nn.Parameter | None = None,
                 weight_rows: slice | None = None, bias_rows: slice | None = None):
        self.name = name
        self.module = module
        self.weight = weight
        self.bias = bias
        self.weight_rows = weight_rows
        self.bias_rows = bias_rows
        self.in_dim, self.out_dim = self._shape()
        for parameter in (weight, bias):
            if parameter is not None and is_dtensor(parameter):
                self._check_sharding(parameter)

    def _shape(self) -> tuple[int, int]:
        """(d_in, d_out): d_in is C*kh*kw for convolutions."""
        rows = range(self.weight.shape[0])
        return math.prod(self.weight.shape[1:]), len(rows if self.weight_rows is None else rows[self.weight_rows])

    def _check_sharding(self, parameter: torch.Tensor) -> None:
        """FSDP2 (``fully_shard``) shards parameters by rows, Shard(0): each process rewrites its own
        rows of G as rows of G P. A shard along any other dimension would split rows of G."""
        wrong = [p for p in parameter.placements if p.is_shard() and p.dim != 0]
        if wrong:
            raise NotImplementedError(
                f"AP layer {self.name!r}: its parameter is sharded as {parameter.placements}; AP needs whole rows of "
                f"the gradient on each process, so shard dim 0 only (fully_shard's default), or exclude the layer "
                f"with opt.ap.exclude")

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The (n, d_in) matrix whose rows the weight multiplies."""
        return x.reshape(-1, self.in_dim)

    def _own_rows(self, tensor: torch.Tensor, rows: slice | None) -> torch.Tensor:
        """This block's rows of ``tensor`` that this process holds (a view): all of them, or under FSDP2
        the part of them in this process's row shard."""
        if not is_dtensor(tensor):
            return tensor if rows is None else tensor[rows]
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = tensor.to_local()  # the shard itself: writes into it are writes into the DTensor
        if rows is None:
            return local
        offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)[1][0]
        start, stop, _ = rows.indices(tensor.shape[0])
        lo, hi = max(start, offset) - offset, min(stop, offset + local.shape[0]) - offset
        return local[lo:max(lo, hi)]

    def _weight_matrix(self, grad: torch.Tensor) -> torch.Tensor:
        """This block's part of the weight's gradient, as d_out x d_in (a view; this process's rows)."""
        rows = self._own_rows(grad, self.weight_rows)
        return rows.reshape(rows.shape[0], -1)

    def _write_weight(self, grad: torch.Tensor, M: torch.Tensor) -> None:
        target = self._own_rows(grad, self.weight_rows)
        target.copy_(M.reshape(target.shape))

    def grad_matrix(self) -> torch.Tensor | None:
        """G (d_out x d_in), with the bias gradient as a last column when the bias is augmented."""
        if self.weight.grad is None:
            return None
        G = self._weight_matrix(self.weight.grad)
        if self.bias is None:
            return G
        b = self.bias.grad if self.bias.grad is not None else torch.zeros_like(self.bias)
        return torch.cat([G, self._own_rows(b, self.bias_rows).reshape(-1, 1)], dim=1)

    def set_grad_matrix(self, M: torch.Tensor) -> None:
        """Write M back into the gradients, in the gradients' own dtype."""
        self._write_weight(self.weight.grad, M[:, : self.in_dim])
        if self.bias is not None and self.bias.grad is not None:
            self._own_rows(self.bias.grad, self.bias_rows).copy_(M[:, -1])

    def covers(self) -> list[tuple[nn.Parameter, slice | None]]:
        """The parameters (and their row ranges) whose gradient this block rewrites."""
        return [(self.weight, self.weight_rows)] + ([(self.bias, self.bias_rows)] if self.bias is not None else [])


class ConvBlock(Block):
    """``nn.Conv1d`` / ``nn.Conv2d``: the rows are the unfolded input patches (KFAC's convolution factor)."""

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if isinstance(m, nn.Conv1d):
            x = x.unsqueeze(2)
            kernel, stride, dilation = (1, m.kernel_size[0]), (1, m.stride[0]), (1, m.dilation[0])
            pads = _explicit_padding(m.padding, m.kernel_size, m.dilation)  # (left, right)
        else:
            kernel, stride, dilation = m.kernel_size, m.stride, m.dilation
            pads = _explicit_padding(m.padding, m.kernel_size, m.dilation)  # (l, r, t, b)
        if any(pads):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, pads, mode=mode)
        patches = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (N, d_in, L)
        return patches.transpose(1, 2).reshape(-1, self.in_dim)


class TransposedBlock(Block):
    """A weight stored as (d_in, d_out), y = x W + b: Hugging Face ``Conv1D``. Read as Linear's W^T."""

    def _shape(self) -> tuple[int, int]:
        return self.weight.shape[0], self.weight.shape[1]

    def _check_sharding(self, parameter: torch.Tensor) -> None:
        if parameter is self.weight and any(p.is_shard() for p in parameter.placements):
            raise NotImplementedError(
                f"AP layer {self.name!r}: a Conv1D weight is stored (d_in, d_out), so FSDP2's row shards split the "
                f"columns of G that G P mixes; exclude it with opt.ap.exclude, or leave this module unsharded")

    def _weight_matrix(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.T

    def _write_weight(self, grad: torch.Tensor, M: torch.Tensor) -> None:
        grad.copy_(M.T)


def _explicit_padding(padding, kernel_size, dilation) -> tuple[int, ...]:
    """Conv padding as an F.pad tuple (last spatial dim first), resolving 'same' / 'valid'."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * (2 * len(kernel_size))
        pads: list[int] = []
        for k, d in zip(reversed(kernel_size), reversed(dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]  # torch puts the odd extra on the right
        return tuple(pads)
    pads = []
    for p in reversed(padding):
        pads += [p, p]
    return tuple(pads)


# -- module helpers --------------------------------------------------------------------------------

class ModuleHelper:
    """How AP reads one module type: its blocks, and the hooks that deliver their layer inputs."""

    def __init__(self, name: str, module: nn.Module, augment_bias: bool):
        self.name = name
        self.module = module
        self.blocks = self.make_blocks(augment_bias)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        raise NotImplementedError

    def make_blocks(self, augment_bias: bool) -> list[Block]:
        raise NotImplementedError

    def register(self, should_record: ShouldRecord, on_forward: OnForward) -> list:
        """Hook the module; returns the handles. Default: one input, the module's first argument."""

        def hook(module, args, output):
            if args and should_record(module):
                on_forward(self, [args[0]], [output])

        return [self.module.register_forward_hook(hook)]

    def claims(self) -> list[nn.Module]:
        """Submodules this helper reads itself, which must not be registered on their own."""
        return []

    def unsupported(self) -> str | None:
        """Why AP skips this module (it then gets the plain GP, with a warning), or None."""
        return None

    def names(self) -> list[str]:
        """Names an exclude pattern can match: the module's, and each block's when it has several."""
        blocks = [b.name for b in self.blocks]
        return [self.name] if blocks == [self.name] else [self.name] + blocks


class LinearHelper(ModuleHelper):
    @classmethod
    def matches(cls, module):
        return isinstance(module, nn.Linear)

    def make_blocks(self, augment_bias):
        m = self.module
        return [Block(self.name, m, m.weight, m.bias if augment_bias else None)]


class ConvHelper(ModuleHelper):
    @classmethod
    def matches(cls, module):
        return isinstance(module, (nn.Conv1d, nn.Conv2d))

    def make_blocks(self, augment_bias):
        m = self.module
        return [ConvBlock(self.name, m, m.weight, m.bias if augment_bias else None)]

    def unsupported(self):
        if self.module.groups != 1:
            return f"AP skips grouped convolution {self.name!r} (groups={self.module.groups}); it gets the plain GP"
        return None


class HFConv1DHelper(ModuleHelper):
    """Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2's attention and MLP projections):
    weight (d_in, d_out), y = x W + b. Recognized by class name and defining module (no import of
    transformers), subclasses included; duck typing on ``nf`` would also catch unrelated layers."""

    @classmethod
    def matches(cls, module):
        return any(k.__name__ == "Conv1D" and k.__module__ == "transformers.pytorch_utils"
                   for k in type(module).__mro__)

    def make_blocks(self, augment_bias):
        m = self.module
        return [TransposedBlock(self.name, m, m.weight, m.bias if augment_bias else None)]


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


class _AttentionOutputCapture(TorchFunctionMode):
    """Active during one recorded ``nn.MultiheadAttention`` forward: keeps the attention output a, the
    input of the output projection, which the module never exposes.

    ``nn.MultiheadAttention.forward`` passes ``out_proj.weight`` to ``F.multi_head_attention_forward``,
    whose last operation is ``linear(a, out_proj_weight, out_proj_bias)``; no hook on ``out_proj``
    fires (torch issue 78109, kfac-pytorch issue 267). This mode intercepts the call of the functional
    (a mode sees it as one call whose body runs with the mode off, so the inner linear itself
    cannot be intercepted) and makes it with
    the identity as the output projection and no bias, which returns a itself, then applies the real
    projection to a with ``F.linear``, exactly as the functional would have. The module's output and
    every gradient are bit-for-bit the same as without AP (a I = a exactly for finite a: each entry
    is one product by 1 plus zeros), dropout and masks included (the functional runs once, as
    before, and draws the same random numbers). Cost, on statistics steps only: one product with the
    E x E identity in the forward and one in the backward (2 n E^2 multiply-adds for n rows, half of
    what AP's statistics of the module's four projections cost, 4 n E^2), plus Python dispatch of the ~10 torch calls
    the module makes before the functional; nothing is recomputed and nothing extra is kept.
    Re-running attention instead would cost the whole attention forward again and, with dropout,
    a replay of the random state. With reduced-precision fp32 matmuls (TF32, oneDNN bf16) the
    identity product rounds a as the out-projection itself does, so the output is unchanged and a
    is recorded at that precision.
    """

    def __init__(self, out_weight: torch.Tensor):
        super().__init__()
        self.out_weight = out_weight
        self.attention: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.multi_head_attention_forward or self.attention is not None:
            return func(*args, **kwargs)
        call = _MHA_SIGNATURE.bind(*args, **kwargs)
        W = call.arguments.get("out_proj_weight")
        if W is not self.out_weight:  # not this module's attention
            return func(*args, **kwargs)
        bias = call.arguments.get("out_proj_bias")
        call.arguments["out_proj_weight"] = torch.eye(W.shape[1], dtype=W.dtype, device=W.device)
        call.arguments["out_proj_bias"] = None
        attention, weights = func(*call.args, **call.kwargs)
        self.attention = attention
        out = F.linear(attention.reshape(-1, W.shape[1]), W, bias)  # the functional's own last step
        return out.view(*attention.shape[:-1], W.shape[0]), weights


class MultiheadAttentionHelper(ModuleHelper):
    """``nn.MultiheadAttention``: four blocks. The q, k and v projections (the row thirds of the packed
    ``in_proj_weight``, or ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` when kdim or vdim
    differ from embed_dim; their thirds of ``in_proj_bias`` go with them) are preconditioned by the
    second moments of the query, key and value inputs; ``out_proj`` by that of the attention output,
    captured by :class:`_AttentionOutputCapture`. ``bias_k`` / ``bias_v`` (add_bias_kv) are added after
    the projections and stay with the plain GP. Batch-first or not, masks, ``is_causal``,
    ``need_weights`` and dropout are all the module's own: the capture changes none of them.
    """

    @classmethod
    def matches(cls, module):
        return isinstance(module, nn.MultiheadAttention)

    def make_blocks(self, augment_bias):
        m, E = self.module, self.module.embed_dim
        in_bias = m.in_proj_bias if augment_bias else None
        blocks = []
        for i, part in enumerate(("q", "k", "v")):
            rows = slice(i * E, (i + 1) * E)
            name = _join(self.name, f"{part}_proj")
            if m.in_proj_weight is not None:
                blocks.append(Block(name, m, m.in_proj_weight, in_bias, weight_rows=rows, bias_rows=rows))
            else:
                blocks.append(Block(name, m, getattr(m, f"{part}_proj_weight"), in_bias, bias_rows=rows))
        out = m.out_proj
        blocks.append(Block(_join(self.name, "out_proj"), m, out.weight, out.bias if augment_bias else None))
        return blocks

    def claims(self):
        return [self.module.out_proj]

    def register(self, should_record, on_forward):
        local = threading.local()  # torch's mode stack is per thread, and so is this one

        def before(module, args, kwargs):
            capture = None
            if should_record(module):
                capture = _AttentionOutputCapture(module.out_proj.weight)
                capture.__enter__()
            local.__dict__.setdefault("active", []).append(capture)

        def after(module, args, kwargs, output):  # always_call: runs (and leaves the mode) if forward raised
            active = local.__dict__.get("active")
            capture = active.pop() if active else None
            if capture is None:
                return
            capture.__exit__(None, None, None)
            if capture.attention is None or output is None:
                return
            inputs = _query_key_value(args, kwargs) + [capture.attention]
            on_forward(self, inputs, list(output) if isinstance(output, tuple) else [output])

        return [self.module.register_forward_pre_hook(before, with_kwargs=True),
                self.module.register_forward_hook(after, with_kwargs=True, always_call=True)]


def _query_key_value(args: tuple, kwargs: dict) -> list:
    """query, key, value of an ``nn.MultiheadAttention`` call, given by position or by name."""
    names = ("query", "key", "value")
    return [args[i] if i < len(args) else kwargs.get(name) for i, name in enumerate(names)]


# Tried in order; the first that matches a module reads it.
HELPERS: tuple[type[ModuleHelper], ...] = (MultiheadAttentionHelper, LinearHelper, ConvHelper, HFConv1DHelper)


def helper_for(module: nn.Module) -> type[ModuleHelper] | None:
    return next((h for h in HELPERS if h.matches(module)), None)


def _names(names: list[str], limit: int = 30) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def select_layers(model: nn.Module, config, params: Iterable[torch.Tensor] | None = None
                  ) -> list[tuple[ModuleHelper, list[Block]]]:
    """The modules AP preconditions, each with the blocks it preconditions: every block of a supported
    module whose weight is trainable and in ``params`` (when given), minus ``config.exclude`` (fnmatch
    patterns over module and block names) and grouped convolutions.

    Raises ValueError when an exclude pattern matches none of those names (a typo would otherwise
    leave AP on where the user meant it off), or when no block is left: AP with no layer is the
    plain gradient preconditioner under DoPr's name.
    """
    wanted = None if params is None else {id(p) for p in params}
    claimed: set[int] = set()
    eligible: list[tuple[ModuleHelper, list[Block]]] = []
    augment = config.bias == "augment"
    for name, module in model.named_modules():
        kind = None if id(module) in claimed else helper_for(module)
        if kind is None:
            continue
        helper = kind(name, module, augment)
        claimed.update(id(m) for m in helper.claims())
        blocks = [b for b in helper.blocks if b.weight.requires_grad and (wanted is None or id(b.weight) in wanted)]
        if blocks:
            eligible.append((helper, blocks))
    names = [n for helper, _ in eligible for n in helper.names()]
    for pattern in config.exclude:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ValueError(f"AP: exclude pattern {pattern!r} matches none of the layers AP preconditions; "
                             f"it can match (fnmatch over module names): {_names(names) or 'none'}")

    def excluded(*names: str) -> bool:
        return any(fnmatch.fnmatchcase(n, p) for n in names for p in config.exclude)

    selected = []
    for helper, blocks in eligible:
        blocks = [b for b in blocks if not excluded(helper.name, b.name)]
        if not blocks:
            continue
        reason = helper.unsupported()
        if reason:
            warnings.warn(reason)
            continue
        selected.append((helper, blocks))
    if not selected:
        if eligible:
            why = (f"exclude patterns {list(config.exclude)} and grouped convolutions leave none of "
                   f"{_names(names)}; remove the exclude patterns, or")
        else:
            why = ("the model has no nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention or Hugging Face "
                   "Conv1D layer with a trainable weight among the optimizer's parameters (AP does not handle "
                   "Conv3d, transposed convolutions or embeddings);")
        raise ValueError(f"AP has no layer to precondition: {why} use the gradient preconditioner alone "
                         "(adamw rather than dopr_adamw, opt=adamw on the command line; or DoPr(optimizer, None))")
    return selected
