#!/usr/bin/env python
"""Per-step wall time of each DoPr variant against its base GP and of the peers (SOAP, PSGD-Kron)
against AdamW, as ratios measured in one process, beside the flop floor that AP's work sets.

Every optimizer trains its own copy of the same model on the same batch; repetitions are
interleaved (the order shuffled each round), so drift in machine load hits every optimizer alike.
A step is forward + backward + optimizer step (``zero_grad`` just before it, untimed). Per workload:

  - the pair table: each DoPr variant (default AP, cheap AP, and for AdamW solver=primal and P formed) against
    its base GP: median step time, ratio of medians, worst DoPr step against the base median, the
    base's optimizer state and the extra state AP holds; on CUDA also each optimizer's peak memory
    in training (parameters, optimizer state, and the largest step's activations, gradients and
    temporaries, from torch.cuda.max_memory_allocated) and AP's extra peak memory;
  - the flop floor: multiply-adds per step of the model's AP layers and of AP on them (statistics,
    inverse, G·P), and the ratio they set for exact AP (every step) and amortized AP (the cheap
    settings), from the layers AP itself covers (see flop_floor);
  - the optimizer table: every optimizer (AdamW, each pair, each peer) against AdamW: median
    ms/step, ratio, worst step / AdamW median, all of its state in MB (GP's, including tensors held
    in lists as SOAP's and Kron's are, plus AP's); for DoPr rows the floor and "x floor", the row's
    ratio to its own base GP over that floor. A peer that fails to build or step on a workload
    gets its error in the table instead of numbers; the others go on;
  - the kernels (with DoPr-AdamW): exact AP's statistics, Cholesky and triangular solves timed alone on
    the workload's shapes beside the model's matmuls, which splits DoPr-AdamW's time over the floor into
    the kernels' rate and the rest of AP's step (see kernel_floor).

    python scripts/bench_optim.py                       # residual-MLP BC policy on CPU, pairs and peers
    python scripts/bench_optim.py device=cuda           # adds a GPT-style block stack (bf16 autocast)
    python scripts/bench_optim.py device=cuda pairs=[adamw,muon] primal=false peers=[] out=results/bench
    python scripts/bench_optim.py threads=1 rounds=10 steps=5 out=results/bench
    python scripts/bench_optim.py threads=1 rounds=10 steps=5 workloads=[mlp,wide,lm] pairs=[adamw] \\
        primal=false peers=[soap,kron] out=results/bench tag=cpu_peers   # the peer table of docs/cost.md

Keys (key=value, like run.py's overrides):
    device        cpu or cuda[:i] (default cpu)
    workloads     any of mlp, wide, lm, gpt (default: [mlp] on CPU, [mlp,gpt] on CUDA):
                    mlp   residual MLP 348->256x3->17 (expansion 2), batch 256, MSE (the Gymnasium BC policy)
                    wide  3 x Linear(wide_width, wide_width), GELU between, batch wide_batch, MSE to random targets
                    lm    the lm_arith task's GPT (configs/task/lm_arith.yaml: 2 layers x 64, 4 heads, its
                          CharTokenizer's vocabulary, its sequence length, batch 32), next-token CE on random tokens
                    gpt   a GPT-style block stack, bf16 autocast (sized by the gpt_* keys; meant for CUDA)
    rounds        interleaved rounds, each optimizer's order shuffled per round (default 10)
    steps         timed steps per optimizer per round (default 10)
    warmup        untimed steps per optimizer before timing (default 5)
    threads       torch CPU threads (default: torch's own choice)
    pairs         base GPs to compare with their DoPr variant, default and cheap AP settings
                  (default [adamw,muon,signum,adamuon]); AdamW itself is always measured (the reference)
    peers         other optimizers to time against AdamW: [] or any of soap, kron (default [soap,kron]; both
                  pytorch-optimizer's, and kron needs opt_einsum: pip install 'dopr[optimizers]')
    primal        also DoPr-AdamW with solver=primal (the d x d path only), when pairs has adamw (default true)
    formed        also DoPr-AdamW with every inverse formed as P and multiplied, where by default AP applies an
                  inverse used once by solving with its Cholesky factor (what that saves), when pairs has adamw
                  (default true)
    kernels       also time exact AP's kernels alone on the workload's shapes (statistics, Cholesky, triangular
                  solves) beside the model's matmuls, when pairs has adamw: how much of DoPr-AdamW's time over
                  the flop floor is the kernels' rate and how much the rest of AP's step (default true)
    wide_width, wide_batch
                  size of the wide workload (default 1024, 1024)
    gpt_d_model, gpt_layers, gpt_seq_len, gpt_batch
                  size of the GPT workload (default 768, 12, 1024, 8: GPT-2 small's blocks, 85M parameters)
    tag           the name in the output files (default: cpu on CPU, the GPU's name on CUDA, e.g. h100_80gb_hbm3)
    out           folder for the tables (bench_<tag>.md) and raw numbers (bench_<tag>.json)
"""

import importlib.util
import json
import math
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dopr.models.residual_mlp import ResidualMLP
from dopr.optim import build_optimizer
from dopr.optim.config import AP_PRESETS
from dopr.records import machine as machine_info
from dopr.cli import parse_script_args

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = ("mlp", "wide", "lm", "gpt")
PAIRS = [("adamw", "dopr_adamw"), ("muon", "dopr_muon"), ("signum", "dopr_signum"), ("adamuon", "dopr_adamuon")]
# build_optimizer's GPs with a preconditioner of their own (it has no Shampoo); timed against AdamW.
PEERS = ("soap", "kron")
CHEAP = dict(ap=AP_PRESETS["cheap"])  # statistics and P every 10 steps (staggered), sub-sampled rows


def mlp_workload(device: str):
    """The Gymnasium behavior-cloning policy: Humanoid-v5 sizes (obs 348, act 17), batch 256."""
    torch.manual_seed(0)
    model = ResidualMLP(348, 17, width=256, depth=3, expansion=2).to(device)
    x, y = torch.randn(256, 348, device=device), torch.randn(256, 17, device=device)
    return model, lambda m: (m(x) - y).pow(2).mean(), "residual MLP 348->256x3->17, batch 256"


def wide_workload(device: str, width: int, batch: int):
    """Three square Linear layers with GELU between: the regime where rows (the batch) match the inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                          nn.Linear(width, width)).to(device)
    x, y = torch.randn(batch, width, device=device), torch.randn(batch, width, device=device)
    return model, lambda m: (m(x) - y).pow(2).mean(), f"wide MLP 3 x Linear({width}, {width}), batch {batch}"


def lm_workload(device: str):
    """The lm_arith task's GPT at the task's sizes (configs/task/lm_arith.yaml), on random tokens:
    the task's training step without its data pipeline (the model sees ids[:, :-1], as the task's loss)."""
    from omegaconf import OmegaConf

    from dopr.data.arith import ArithmeticProblems, CharTokenizer
    from dopr.models.gpt import GPT

    task = OmegaConf.load(REPO / "configs" / "task" / "lm_arith.yaml").task
    seq = ArithmeticProblems(tuple(task.operations), task.min_digits, task.max_digits,
                             task.mul_multiplier_digits).max_sequence_length()
    vocab = CharTokenizer().vocab_size
    torch.manual_seed(0)
    model = GPT(vocab, seq, n_layers=task.n_layers, d_model=task.d_model, n_heads=task.n_heads,
                bias=task.bias).to(device)
    ids = torch.randint(vocab, (task.batch_size, seq), device=device)

    def loss(m):
        logits = m(ids[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))

    return model, loss, (f"lm_arith GPT {task.n_layers} x {task.d_model}, {task.n_heads} heads, vocab {vocab}, "
                         f"seq {seq - 1}, batch {task.batch_size}")


def gpt_workload(device: str, d_model: int, layers: int, seq: int, batch: int):
    """A GPT-style stack of pre-norm transformer blocks (no embedding), bf16 autocast."""

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
            self.heads = d // 64

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(self.n1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
            return x + self.down(nn.functional.gelu(self.up(self.n2(x))))

    torch.manual_seed(0)
    model = nn.Sequential(*[Block(d_model) for _ in range(layers)], nn.LayerNorm(d_model), nn.Linear(d_model, d_model)).to(device)
    x = torch.randn(batch, seq, d_model, device=device)

    def loss(m):
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            return m(x).float().pow(2).mean()

    params = sum(p.numel() for p in model.parameters())
    return model, loss, (f"GPT blocks d={d_model} x{layers}, seq {seq}, batch {batch}, bf16 autocast "
                         f"({params / 1e6:.1f}M parameters)")


# -- the flop floor --------------------------------------------------------------------------------

def ap_layers(model: nn.Module, loss_fn, opt) -> list[dict]:
    """The layers a DoPr optimizer's AP preconditions, as AP itself sees them in one step of ``loss_fn``:
    name, n (rows AP records), d_in (the layer's own inputs), d (AP's, d_in + 1 when the bias is
    augmented), d_out. One forward + backward without a step; ``zero_grad`` then drops its statistics."""
    opt.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    layers = [dict(name=layer.name, n=layer.rows, d_in=layer.in_dim, d=layer.dim, d_out=layer.block.out_dim)
              for layer in opt.preconditioner.layers]
    opt.zero_grad(set_to_none=True)
    return layers


def sampled_rows(n: int, max_rows: int | None) -> int:
    """Rows left after AP's strided sub-sampling to about ``max_rows`` (statistics.LayerStats.commit)."""
    if max_rows is None or n <= max_rows:
        return n
    return len(range(0, n, math.ceil(n / max_rows)))


def flop_floor(layers: list[dict], stat_interval: int = 1, inverse_interval: int = 1,
               max_rows: int | None = None) -> dict:
    """Multiply-adds per step of the AP layers' matmuls and of AP's work on them; the ratio they set.

    Per layer with n rows (batch x sequence for a GPT), d_in inputs, d = d_in + 1 when ap.bias=augment
    (AP's statistics carry a constant-1 column; d = d_in otherwise) and d_out outputs:

        model       3·n·d_in·d_out   forward, and backward's input and weight gradients. Only the AP
                    layers' matmuls: attention's score and value products (QKᵀ, AV), embeddings, norms
                    and elementwise ops are left out, so it is a lower bound on the model's work
        statistics  n·d²             zᵀz
        factor      d³/3             Cholesky of S + mu I
        inverse     2d³/3            P from the factor
        G·P         d_out·d²         one GEMM with P, or two triangular solves with the factor

    AP's elementwise work (damping, casts, copies) is left out too: every term is a lower bound.
    Each floor counts the algorithm AP runs at those settings. Exact AP (the paper's defaults: statistics
    and inverse every step) factors and solves every step, never forming P (solvers.factor_once_cheaper).
    Amortized AP (the cheap settings) does G·P every step with a P formed (factor + inverse) once per
    ``inverse_interval`` steps and the statistics once per ``stat_interval`` steps on rows sub-sampled
    to ``max_rows``. "Formed" is exact AP with P formed every step (``formed=true``'s row). Floor = (model + AP) / model: DoPr's ratio to its base if time went as these
    multiply-adds and the base GP cost nothing; for the d x d path (AP's batch-space path can cost
    less where n is far below d).
    """
    model = sum(3 * x["n"] * x["d_in"] * x["d_out"] for x in layers)
    stats = sum(x["n"] * x["d"] ** 2 for x in layers)
    factor = sum(x["d"] ** 3 for x in layers) / 3
    inverse = 2 * factor
    gp = sum(x["d_out"] * x["d"] ** 2 for x in layers)
    stats_sampled = sum(sampled_rows(x["n"], max_rows) * x["d"] ** 2 for x in layers)
    amortized = gp + stats_sampled / stat_interval + (factor + inverse) / inverse_interval
    return dict(layers=layers, model=model, stats=stats, factor=factor, inverse=inverse, gp=gp,
                exact=(model + stats + factor + gp) / model, amortized=(model + amortized) / model,
                formed=(model + stats + factor + inverse + gp) / model,
                stat_interval=stat_interval, inverse_interval=inverse_interval, max_rows=max_rows)


def kernel_floor(layers: list[dict], device: str, repeats: int = 15) -> dict:
    """Exact AP's kernels alone, on the workload's shapes, at the speed they run here: where its time over the
    flop floor goes.

    Each term of flop_floor's exact AP is timed with the call AP makes for it: zᵀz by ``addmm_`` into the
    layer's sum (statistics.LayerStats), one batched ``cholesky_ex`` per input size d (AP batches layers of one
    size), G·P by ``solvers.solve_with_factor`` (two triangular solves); beside them the model's matmuls of
    the same layers (forward, input gradient, weight gradient). Each call is timed ``repeats`` times,
    the terms interleaved, and the median kept. Its ms against the same multiply-adds at the model matmuls'
    rate splits DoPr's time over the flop floor into the kernels' own rate (a Cholesky or a triangular solve
    slower per multiply-add than a GEMM) and the rest of AP's step (the gap between these kernels and the
    measured DoPr − base: copies, casts, checks, Python).
    """
    from dopr.optim.solvers import solve_with_factor

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    gen = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device)
    calls: dict[str, list] = {"model": [], "statistics": [], "factor": [], "solve": []}
    gradients = []  # (G, d) per layer, solved with its size's factor below
    for x in layers:
        n, d_in, d, d_out = x["n"], x["d_in"], x["d"], x["d_out"]
        inp, weight, grad_out = rand(n, d_in), rand(d_out, d_in), rand(n, d_out)
        calls["model"] += [lambda a=inp, w=weight: a @ w.T, lambda g=grad_out, w=weight: g @ w,
                           lambda g=grad_out, a=inp: g.T @ a]
        xtx = torch.zeros(d_in, d_in, device=device)
        calls["statistics"].append(lambda s=xtx, a=inp: s.addmm_(a.T, a))
        gradients.append((rand(d_out, d), d))
    factors = {}
    for d in sorted({x["d"] for x in layers}):
        count = sum(x["d"] == d for x in layers)
        z = rand(2 * d, d)
        S = ((z.T @ z) / (2 * d) + torch.eye(d, device=device)).expand(count, d, d).contiguous()
        factors[d] = torch.linalg.cholesky_ex(S)[0]
        calls["factor"].append(lambda S=S: torch.linalg.cholesky_ex(S))
    calls["solve"] = [lambda G=G, L=factors[d][0]: solve_with_factor(G, L) for G, d in gradients]
    times = {term: [[] for _ in fns] for term, fns in calls.items()}
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        for term, fns in calls.items():
            for i, fn in enumerate(fns):
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[term][i].append(time.perf_counter() - start)
    ms = {term: 1e3 * sum(statistics.median(t[1:]) for t in ts) for term, ts in times.items()}
    floor = flop_floor(layers)
    macs = dict(model=floor["model"], statistics=floor["stats"], factor=floor["factor"], solve=floor["gp"])
    model_rate = macs["model"] / ms["model"]  # multiply-adds per ms
    at_model_rate = {t: macs[t] / model_rate for t in ms}
    ap_terms = ("statistics", "factor", "solve")
    return dict(ms=ms, macs=macs, gmacs={t: macs[t] / ms[t] / 1e6 for t in ms}, at_model_rate=at_model_rate,
                ap_ms=sum(ms[t] for t in ap_terms), ap_ms_at_model_rate=sum(at_model_rate[t] for t in ap_terms),
                repeats=repeats)


def kernel_markdown(kernels: dict, measured_ms: float) -> str:
    names = dict(model="model matmuls (3·n·d_in·d_out)", statistics="statistics zᵀz (n·d²)",
                 factor="Cholesky (d³/3)", solve="G·P, two triangular solves (d_out·d²)")
    out = ["Exact AP's kernels alone (the calls AP makes, on these layers' shapes; median of "
           f"{kernels['repeats']}):", "",
           "| term | multiply-adds | ms | GMAC/s | ms at the model matmuls' rate |", "|---|---|---|---|---|"]
    for term, label in names.items():
        out.append(f"| {label} | {kernels['macs'][term]:.3g} | {kernels['ms'][term]:.2f} | "
                   f"{kernels['gmacs'][term]:.1f} | {kernels['at_model_rate'][term]:.2f} |")
    floor_ms = kernels["ap_ms_at_model_rate"]
    out.append(f"| AP's kernels | | {kernels['ap_ms']:.2f} | | {floor_ms:.2f} |")
    out += ["", f"DoPr-AdamW − AdamW in the timing above: {measured_ms:.2f} ms a step. Of it, AP's flops at the "
                f"model's rate: {floor_ms:.2f} ms; the kernels' slower rate: {kernels['ap_ms'] - floor_ms:+.2f} ms; "
                f"the rest of AP's step (copies, casts, checks, Python): {measured_ms - kernels['ap_ms']:+.2f} ms."]
    return "\n".join(out)


# -- timing ----------------------------------------------------------------------------------------

@dataclass
class Entry:
    """One optimizer of the run: its label, build_optimizer's name and settings, and what it is compared with."""

    label: str
    name: str
    extra: dict = field(default_factory=dict)
    base: str | None = None  # a DoPr row's base GP (its label)
    floor: str | None = None  # a DoPr row's flop floor: "exact", "amortized" or "formed"
    peer: bool = False  # a failure to build or step is reported, not raised
    form_inverse: bool = False  # AP forms every inverse as P, even where it would solve with the factor


def entries(pairs: list[str], peers: list[str], primal: bool, formed: bool = False) -> list[Entry]:
    """AdamW first (every ratio of the optimizer table is to it), then each chosen pair's base, DoPr
    and DoPr cheap, DoPr-AdamW primal, DoPr-AdamW with P formed, the peers."""
    chosen = [(b, d) for b, d in PAIRS if b in pairs]
    out = [Entry("adamw", "adamw")]
    out += [Entry(b, b) for b, _ in chosen if b != "adamw"]
    out += [Entry(d, d, base=b, floor="exact") for b, d in chosen]
    out += [Entry(f"{d}+cheap", d, CHEAP, base=b, floor="amortized") for b, d in chosen]
    if primal and "adamw" in pairs:  # without the batch-space path
        out.append(Entry("dopr_adamw+primal", "dopr_adamw", dict(ap=dict(solver="primal")), base="adamw",
                         floor="exact"))
    if formed and "adamw" in pairs:  # what solving with the factor saves, in the same run
        out.append(Entry("dopr_adamw+formed", "dopr_adamw", base="adamw", floor="formed", form_inverse=True))
    out += [Entry(p, p, peer=True) for p in peers]
    return out


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]


def bench(workload, names: list[Entry], device: str, rounds: int, steps: int, warmup: int) -> dict:
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    runs, layers = {}, None
    for entry in names:
        model, loss_fn, desc = workload()
        try:
            opt = build_optimizer(model, entry.name, lr=1e-4, **entry.extra)
        except Exception as error:
            if not entry.peer:
                raise
            runs[entry.label] = dict(error=_error(error))
            continue
        if entry.form_inverse:
            opt.preconditioner.always_form_inverse = True
        if layers is None and entry.floor == "exact":  # the layers AP covers, from AP itself
            layers = ap_layers(model, loss_fn, opt)
        runs[entry.label] = dict(model=model, loss=loss_fn, opt=opt, times=[], step_peak=0, peer=entry.peer)
    live = lambda: [label for label, run in runs.items() if "error" not in run]
    for label in live():  # warm caches, allocate state, compute first inverses
        run = runs[label]
        for _ in range(warmup):
            run["opt"].zero_grad(set_to_none=True)
            _guarded_step(run, runs, label)
            if "error" in runs[label]:
                break
    sync()
    order = live()
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for label in order:
            run = runs[label]
            for _ in range(steps):
                if "error" in runs[label]:
                    break
                run["opt"].zero_grad(set_to_none=True)
                sync()
                if cuda:  # what this step allocates above what every model and optimizer already hold
                    before = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                t = time.perf_counter()
                if not _guarded_step(run, runs, label):
                    break
                sync()
                run["times"].append(time.perf_counter() - t)
                if cuda:
                    run["step_peak"] = max(run["step_peak"], torch.cuda.max_memory_allocated(device) - before)
    out = {}
    for label, r in runs.items():
        if "error" in r:
            out[label] = dict(error=r["error"])
            continue
        memory = r["opt"].memory_bytes()
        params = sum(p.numel() * p.element_size() for p in r["model"].parameters())
        # Training this model alone with this optimizer: parameters, GP and AP state, and the step's peak.
        peak = params + memory["gp"] + memory["ap"] + r["step_peak"] if cuda else None
        out[label] = dict(times=r["times"], memory=memory, peak=peak)
    return out | {"_desc": desc, "_layers": layers}


def _step(run):
    run["loss"](run["model"]).backward()
    run["opt"].step()


def _guarded_step(run, runs: dict, label: str) -> bool:
    """One step; a peer that raises is dropped from the run with its error (its model and state freed)."""
    if not run["peer"]:
        _step(run)
        return True
    try:
        _step(run)
        return True
    except Exception as error:
        runs[label] = dict(error=_error(error))
        return False


# -- tables ----------------------------------------------------------------------------------------

def table(results: dict, pairs: list[tuple[str, str]]) -> list[dict]:
    rows = []
    for base, dopr in pairs:
        tb, td = results[base]["times"], results[dopr]["times"]
        mb, md = statistics.median(tb), statistics.median(td)
        pb, pd = results[base]["peak"], results[dopr]["peak"]
        rows.append(dict(base=base, dopr=dopr, base_ms=1e3 * mb, dopr_ms=1e3 * md, ratio=md / mb,
                         worst_ratio=max(td) / mb, base_state_mb=results[base]["memory"]["gp"] / 2**20,
                         ap_extra_mb=results[dopr]["memory"]["ap"] / 2**20,
                         base_peak_mb=None if pb is None else pb / 2**20,
                         dopr_peak_mb=None if pd is None else pd / 2**20,
                         ap_extra_peak_mb=None if pb is None or pd is None else (pd - pb) / 2**20))
    return rows


def optimizer_table(results: dict, names: list[Entry], floor: dict | None) -> list[dict]:
    """Every optimizer against AdamW; DoPr rows with their floor and their ratio to their base over it."""
    ref = statistics.median(results["adamw"]["times"])
    rows = []
    for entry in names:
        r = results[entry.label]
        if "error" in r:
            rows.append(dict(optimizer=entry.label, error=r["error"]))
            continue
        med = statistics.median(r["times"])
        row = dict(optimizer=entry.label, ms=1e3 * med, ratio=med / ref, worst_ratio=max(r["times"]) / ref,
                   state_mb=(r["memory"]["gp"] + r["memory"]["ap"]) / 2**20, base=entry.base,
                   floor_kind=entry.floor, floor=None, ratio_to_base=None, x_floor=None)
        if entry.base is not None:
            row["ratio_to_base"] = med / statistics.median(results[entry.base]["times"])
            if floor is not None:
                row["floor"] = floor[entry.floor]
                row["x_floor"] = row["ratio_to_base"] / row["floor"]
        rows.append(row)
    return rows


def markdown(rows: list[dict], title: str) -> str:
    peaks = any(r.get("base_peak_mb") is not None for r in rows)  # CUDA only
    head = ("| DoPr variant | base | base ms/step | DoPr ms/step | ratio (median) | worst step / base median "
            "| base GP state MB | AP extra MB |")
    out = [f"**{title}**", "", head + (" base peak MB | DoPr peak MB | AP extra peak MB |" if peaks else ""),
           "|---|---|---|---|---|---|---|---|" + ("---|---|---|" if peaks else "")]
    for r in rows:
        line = (f"| {r['dopr']} | {r['base']} | {r['base_ms']:.2f} | {r['dopr_ms']:.2f} | {r['ratio']:.3f} | "
                f"{r['worst_ratio']:.2f} | {r['base_state_mb']:.2f} | {r['ap_extra_mb']:.2f} |")
        if peaks:
            line += f" {r['base_peak_mb']:.0f} | {r['dopr_peak_mb']:.0f} | {r['ap_extra_peak_mb']:.0f} |"
        out.append(line)
    return "\n".join(out)


def floor_markdown(floor: dict) -> str:
    rows = sorted({x["n"] for x in floor["layers"]})
    n = str(rows[0]) if len(rows) == 1 else f"{rows[0]}-{rows[-1]}"
    cheap = (f"statistics every {floor['stat_interval']} steps on rows sub-sampled to {floor['max_rows']}, "
             f"inverse every {floor['inverse_interval']}")
    return "\n".join([
        f"Flop floor (multiply-adds per step over the {len(floor['layers'])} layers AP covers; d_in: a layer's "
        f"inputs, d: AP's (d_in + 1 with the bias augmented); amortized: {cheap}):",
        "",
        "| AP layers | rows n | model 3·n·d_in·d_out | statistics n·d² | factor d³/3 | inverse 2d³/3 "
        "| G·P d_out·d² | floor, exact AP | floor, amortized AP |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {len(floor['layers'])} | {n} | {floor['model']:.3g} | {floor['stats']:.3g} | {floor['factor']:.3g} | "
        f"{floor['inverse']:.3g} | {floor['gp']:.3g} | {floor['exact']:.3f} | {floor['amortized']:.3f} |",
        "",
        "Exact AP factors and solves every step (statistics, factor, G·P); amortized AP forms P (factor and "
        "inverse) once per interval and multiplies every step."])


def optimizer_markdown(rows: list[dict]) -> str:
    out = ["| optimizer | ms/step | ratio to AdamW | worst step / AdamW median | state MB | AP floor | x floor |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['optimizer']} | failed: {r['error'].replace('|', '/')} | | | | | |")
            continue
        floor = "" if r["floor"] is None else f"{r['floor']:.3f} ({r['floor_kind']})"
        x = "" if r["x_floor"] is None else f"{r['x_floor']:.2f}"
        out.append(f"| {r['optimizer']} | {r['ms']:.2f} | {r['ratio']:.3f} | {r['worst_ratio']:.2f} | "
                   f"{r['state_mb']:.2f} | {floor} | {x} |")
    out += ["", "x floor: a DoPr row's ratio to its own base GP (the pair table's ratio) over its AP floor. "
                "State: every tensor the optimizer holds (GP and AP)."]
    return "\n".join(out)


def device_tag(device: str) -> str:
    """``cpu``, or the GPU's name as a file name (``NVIDIA H100 80GB HBM3`` -> ``h100_80gb_hbm3``)."""
    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(torch.device(device)).lower().removeprefix("nvidia").strip()
    return re.sub(r"[^a-z0-9]+", "_", name).strip("_") or "cuda"


@dataclass
class BenchArgs:
    device: str = "cpu"
    workloads: list[str] | None = None
    rounds: int = 10
    steps: int = 10
    warmup: int = 5
    threads: int | None = None
    pairs: list[str] | None = None
    peers: list[str] | None = None
    primal: bool = True
    formed: bool = True
    kernels: bool = True
    wide_width: int = 1024
    wide_batch: int = 1024
    gpt_d_model: int = 768
    gpt_layers: int = 12
    gpt_seq_len: int = 1024
    gpt_batch: int = 8
    tag: str | None = None
    out: Path | None = None

    def __post_init__(self):
        if self.workloads is None:
            self.workloads = ["mlp", "gpt"] if self.device.startswith("cuda") else ["mlp"]
        unknown = sorted(set(self.workloads) - set(WORKLOADS))
        if unknown or not self.workloads:
            raise ValueError(f"workloads={self.workloads}: choose a non-empty list from {list(WORKLOADS)}")
        if self.gpt_d_model % 64:
            raise ValueError(f"gpt_d_model={self.gpt_d_model} must be a multiple of 64 (the attention head size)")
        bases = [b for b, _ in PAIRS]
        if self.pairs is None:
            self.pairs = bases
        if not self.pairs or sorted(set(self.pairs) - set(bases)):
            raise ValueError(f"pairs={self.pairs}: choose a non-empty list from {bases}")
        if self.peers is None:
            self.peers = list(PEERS)
        if sorted(set(self.peers) - set(PEERS)) or len(set(self.peers)) != len(self.peers):
            raise ValueError(f"peers={self.peers}: choose from {list(PEERS)}, each once, or [] for none")
        if self.peers and importlib.util.find_spec("pytorch_optimizer") is None:
            raise ValueError(f"peers={self.peers} are pytorch-optimizer's, which is not installed: "
                             f"pip install 'dopr[optimizers]', or peers=[]")
        if "kron" in self.peers and not torch.backends.opt_einsum.is_available():
            raise ValueError(f"peers={self.peers}: kron needs the opt_einsum package (pip install 'dopr[optimizers]'), "
                             f"or leave kron out")
        if self.tag is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", self.tag):
            raise ValueError(f"tag={self.tag!r}: letters, digits, '.', '_' and '-' only (it names files)")
        for key in ("rounds", "steps", "wide_width", "wide_batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")


def main(argv: list[str]) -> None:
    args = parse_script_args(argv, BenchArgs, __doc__)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    machine = (f"{info['cpu']} ({info['cores']} cores, {info['platform']}), ATen CPU capability "
               f"{info.get('aten_cpu_capability')}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
               + (f", {info['gpu']}, CUDA {torch.version.cuda}" if "gpu" in info else ""))
    names = entries(args.pairs, args.peers, args.primal, args.formed)
    pairs = [(e.base, e.label) for e in names if e.base is not None]  # each DoPr row with its base
    builders = {"mlp": lambda: mlp_workload(args.device),
                "wide": lambda: wide_workload(args.device, args.wide_width, args.wide_batch),
                "lm": lambda: lm_workload(args.device),
                "gpt": lambda: gpt_workload(args.device, args.gpt_d_model, args.gpt_layers, args.gpt_seq_len,
                                            args.gpt_batch)}
    cheap = CHEAP["ap"]
    report = [f"Machine: {machine}. Cheap settings: {CHEAP}. Peers: {args.peers or 'none'}.", ""]
    raw, optimizers, floors = {}, {}, {}
    for workload in (builders[w] for w in args.workloads):
        results = bench(workload, names, args.device, args.rounds, args.steps, args.warmup)
        desc = results["_desc"]
        floor = flop_floor(results["_layers"], cheap["stat_interval"], cheap["inverse_interval"], cheap["max_rows"])
        rows = table(results, pairs)
        every = optimizer_table(results, names, floor)
        parts = [markdown(rows, desc), floor_markdown(floor), optimizer_markdown(every)]
        if args.kernels and "dopr_adamw" in results:
            floor["kernels"] = kernel_floor(results["_layers"], args.device)
            gap = 1e3 * (statistics.median(results["dopr_adamw"]["times"]) - statistics.median(results["adamw"]["times"]))
            parts.append(kernel_markdown(floor["kernels"], gap))
        text = "\n\n".join(parts)
        print(text + "\n", flush=True)
        report += [text, ""]
        raw[desc], optimizers[desc], floors[desc] = rows, every, floor
        if args.out:  # after each workload: a run stopped at a time limit keeps what it finished
            write(args, machine, report, raw, optimizers, floors)


def write(args: BenchArgs, machine: str, report: list[str], raw: dict, optimizers: dict | None = None,
          floors: dict | None = None) -> None:
    tag = args.tag or device_tag(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_{tag}.md").write_text("\n".join(report))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / f"bench_{tag}.json").write_text(json.dumps({"machine": machine, "args": settings, "cheap": CHEAP,
                                                            "results": raw, "optimizers": optimizers or {},
                                                            "floors": floors or {}}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
