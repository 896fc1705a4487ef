#!/usr/bin/env python
"""Per-step wall time of each DoPr variant against its base GP, as a ratio measured in one process.

Every optimizer trains its own copy of the same model on the same batch; repetitions are
interleaved (the order shuffled each round), so drift in machine load hits base and DoPr alike.
A step is forward + backward + optimizer step (``zero_grad`` just before it, untimed). Reports the
median step time, the ratio of medians, the worst DoPr step against the base median, and the extra
optimizer-state bytes AP holds; on CUDA also each optimizer's peak memory in training (parameters,
optimizer state, and the largest step's activations, gradients and temporaries, from
torch.cuda.max_memory_allocated) and AP's extra peak memory (DoPr's minus its base's).

    python scripts/bench_optim.py                       # residual-MLP BC policy on CPU
    python scripts/bench_optim.py device=cuda           # adds a GPT-style block stack (bf16 autocast)
    python scripts/bench_optim.py device=cuda pairs=[adamw,muon] primal=false out=results/bench
    python scripts/bench_optim.py threads=1 rounds=10 steps=5 out=results/bench

Keys (key=value, like run.py's overrides):
    device        cpu or cuda[:i] (default cpu)
    workloads     [mlp], [gpt] or [mlp,gpt] (default: [mlp] on CPU, [mlp,gpt] on CUDA)
    rounds        interleaved rounds, each optimizer's order shuffled per round (default 10)
    steps         timed steps per optimizer per round (default 10)
    warmup        untimed steps per optimizer before timing (default 5)
    threads       torch CPU threads (default: torch's own choice)
    pairs         base GPs to compare with their DoPr variant, default and cheap AP settings
                  (default [adamw,muon,signum,adamuon])
    primal        also DoPr-AdamW with solver=primal (the d x d path only) (default true)
    gpt_d_model, gpt_layers, gpt_seq_len, gpt_batch
                  size of the GPT workload (default 768, 12, 1024, 8: GPT-2 small's blocks, 85M parameters)
    tag           the name in the output files (default: cpu on CPU, the GPU's name on CUDA, e.g. h100_80gb_hbm3)
    out           folder for the tables (bench_<tag>.md) and raw numbers (bench_<tag>.json)
"""

import json
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dopr.models.residual_mlp import ResidualMLP
from dopr.optim import build_optimizer
from dopr.records import machine as machine_info
from dopr.cli import parse_script_args

WORKLOADS = ("mlp", "gpt")
PAIRS = [("adamw", "dopr_adamw"), ("muon", "dopr_muon"), ("signum", "dopr_signum"), ("adamuon", "dopr_adamuon")]
CHEAP = dict(ap=dict(stat_interval=10, inverse_interval=10, max_rows=1024))  # statistics and P every 10 steps (staggered), sub-sampled rows


def mlp_workload(device: str):
    """The Gymnasium behavior-cloning policy: Humanoid-v5 sizes (obs 348, act 17), batch 256."""
    torch.manual_seed(0)
    model = ResidualMLP(348, 17, width=256, depth=3, expansion=2).to(device)
    x, y = torch.randn(256, 348, device=device), torch.randn(256, 17, device=device)
    return model, lambda m: (m(x) - y).pow(2).mean(), "residual MLP 348->256x3->17, batch 256"


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


def bench(workload, names: list[tuple[str, dict]], device: str, rounds: int, steps: int, warmup: int) -> dict:
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    runs = {}
    for label, (name, extra) in names:
        model, loss_fn, desc = workload()
        opt = build_optimizer(model, name, lr=1e-4, **extra)
        runs[label] = dict(model=model, loss=loss_fn, opt=opt, times=[], step_peak=0)
    for run in runs.values():  # warm caches, allocate state, compute first inverses
        for _ in range(warmup):
            run["opt"].zero_grad(set_to_none=True)
            _step(run)
    sync()
    order = list(runs)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for label in order:
            run = runs[label]
            for _ in range(steps):
                run["opt"].zero_grad(set_to_none=True)
                sync()
                if cuda:  # what this step allocates above what every model and optimizer already hold
                    before = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                t = time.perf_counter()
                _step(run)
                sync()
                run["times"].append(time.perf_counter() - t)
                if cuda:
                    run["step_peak"] = max(run["step_peak"], torch.cuda.max_memory_allocated(device) - before)
    out = {}
    for label, r in runs.items():
        memory = r["opt"].memory_bytes()
        params = sum(p.numel() * p.element_size() for p in r["model"].parameters())
        # Training this model alone with this optimizer: parameters, GP and AP state, and the step's peak.
        peak = params + memory["gp"] + memory["ap"] + r["step_peak"] if cuda else None
        out[label] = dict(times=r["times"], memory=memory, peak=peak)
    return out | {"_desc": desc}


def _step(run):
    run["loss"](run["model"]).backward()
    run["opt"].step()


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
    primal: bool = True
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
        if self.tag is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", self.tag):
            raise ValueError(f"tag={self.tag!r}: letters, digits, '.', '_' and '-' only (it names files)")
        for key in ("rounds", "steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")


def main(argv: list[str]) -> None:
    args = parse_script_args(argv, BenchArgs, __doc__)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    machine = (f"{info['cpu']} ({info['cores']} cores, {info['platform']}), {torch.get_num_threads()} torch threads, "
               f"torch {torch.__version__}" + (f", {info['gpu']}, CUDA {torch.version.cuda}" if "gpu" in info else ""))
    chosen = [(b, d) for b, d in PAIRS if b in args.pairs]
    names = [(n, (n, {})) for pair in chosen for n in pair]
    names += [(f"{d}+cheap", (d, CHEAP)) for _, d in chosen]
    pairs = chosen + [(b, f"{d}+cheap") for b, d in chosen]
    if args.primal and "adamw" in args.pairs:  # without the batch-space path
        names += [("dopr_adamw+primal", ("dopr_adamw", dict(ap=dict(solver="primal"))))]
        pairs += [("adamw", "dopr_adamw+primal")]
    builders = {"mlp": lambda: mlp_workload(args.device),
                "gpt": lambda: gpt_workload(args.device, args.gpt_d_model, args.gpt_layers, args.gpt_seq_len,
                                            args.gpt_batch)}
    workloads = [builders[w] for w in args.workloads]
    report, raw = [f"Machine: {machine}. Cheap settings: {CHEAP}.", ""], {}
    for workload in workloads:
        results = bench(workload, names, args.device, args.rounds, args.steps, args.warmup)
        rows = table(results, pairs)
        text = markdown(rows, results["_desc"])
        print(text + "\n", flush=True)
        report += [text, ""]
        raw[results["_desc"]] = rows
        if args.out:  # after each workload: a run stopped at a time limit keeps what it finished
            write(args, machine, report, raw)


def write(args: BenchArgs, machine: str, report: list[str], raw: dict) -> None:
    tag = args.tag or device_tag(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_{tag}.md").write_text("\n".join(report))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / f"bench_{tag}.json").write_text(json.dumps({"machine": machine, "args": settings, "cheap": CHEAP,
                                                            "results": raw}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
