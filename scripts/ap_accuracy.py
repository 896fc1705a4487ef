#!/usr/bin/env python
"""Accuracy and cost of the ways to compute the AP gradient G P = G (S + mu I)^-1, S = Z^T Z / n.

    python scripts/ap_accuracy.py                      # the table for the default shapes
    python scripts/ap_accuracy.py n=256 d=513 d_out=256 threads=1 repeats=20 out=results/bench/ap_accuracy.md

For fp32 inputs (rows Z, output gradients Delta, G = Delta^T Z), each candidate's relative Frobenius
error against float64 dense math on the same fp32 G is printed in units of kappa(S + mu I) * eps_fp32,
the bound a backward-stable solve meets, over inputs whose column scales spread from 1 down to
1e-2 .. 1e-4 (damping 1e-3 of tr(S)/d). Timing: median ms of each candidate on the given shape.
Candidates (n < d: the batch-space forms apply):
  primal_fp32       d x d Cholesky inverse, then G @ P (the d x d path where P is reused)
  primal_solve_fp32 d x d Cholesky, then two triangular solves of G against the factor (the d x d path where
                    each inverse is used once: statistics and inverse every step, one process, CPU)
  woodbury_fp32     (G - (G Z^T)(n mu I + Z Z^T)^-1 Z) / mu, all fp32 (subtracts nearly equal terms)
  woodbury_nn64     the same with the n x n Gram and its solve in float64, the products with G in fp32
  woodbury_refine   woodbury_fp32 plus one step of iterative refinement in fp32
  woodbury_fp64     the same formula, every product in float64, result rounded to fp32
  pushthrough_fp32  Delta^T (Z Z^T / n + mu I)^-1 Z from the output gradients (no subtraction)
"""

import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dopr.cli import parse_script_args  # noqa: E402
from dopr.records import git_revision  # noqa: E402
from dopr.records import machine as machine_info  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
DAMPING = 1e-3


def problem(n: int, d: int, d_out: int, spread: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, torch.log10(torch.tensor(spread)).item(), d)
    Z = (torch.randn(n, d, generator=g) * scales).float()
    Delta = torch.randn(n, d_out, generator=g).float() / n
    G = Delta.T @ Z  # fp32, as autograd computes it
    return Z, Delta, G


def reference(G: torch.Tensor, Z: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    Z64, G64 = Z.double(), G.double()
    S = Z64.T @ Z64 / Z.shape[0]
    mu = DAMPING * torch.trace(S).item() / S.shape[0]
    A = S + mu * torch.eye(S.shape[0], dtype=torch.float64)
    eig = torch.linalg.eigvalsh(A)
    return G64 @ torch.linalg.inv(A), (eig[-1] / eig[0]).item(), mu


def primal_fp32(G, Z, Delta, mu):
    n, d = Z.shape
    S = Z.T @ Z / n
    L = torch.linalg.cholesky(S + mu * torch.eye(d))
    return G @ torch.cholesky_inverse(L)


def primal_solve_fp32(G, Z, Delta, mu):
    from dopr.optim.solvers import solve_with_factor

    n, d = Z.shape
    S = Z.T @ Z / n
    return solve_with_factor(G, torch.linalg.cholesky(S + mu * torch.eye(d)))


def _woodbury(G, Z, mu, gram_dtype=None):
    n = Z.shape[0]
    Zg = Z if gram_dtype is None else Z.to(gram_dtype)
    K = Zg @ Zg.T + n * mu * torch.eye(n, dtype=Zg.dtype)
    K_inv = torch.cholesky_inverse(torch.linalg.cholesky(K)).to(Z.dtype)
    return (G - ((G @ Z.T) @ K_inv) @ Z) / mu


def woodbury_fp32(G, Z, Delta, mu):
    return _woodbury(G, Z, mu)


def woodbury_nn64(G, Z, Delta, mu):
    return _woodbury(G, Z, mu, torch.float64)


def woodbury_refine(G, Z, Delta, mu):
    n = Z.shape[0]
    M = _woodbury(G, Z, mu)
    residual = G - ((M @ Z.T) @ Z / n + mu * M)  # G - M (S + mu I)
    return M + _woodbury(residual, Z, mu)


def woodbury_fp64(G, Z, Delta, mu):
    return _woodbury(G.double(), Z.double(), mu).float()


def pushthrough_fp32(G, Z, Delta, mu):
    n = Z.shape[0]
    K = Z @ Z.T / n + mu * torch.eye(n)
    W = torch.cholesky_solve(Delta, torch.linalg.cholesky(K))  # (n, d_out)
    return W.T @ Z


CANDIDATES = [primal_fp32, primal_solve_fp32, woodbury_fp32, woodbury_nn64, woodbury_refine, woodbury_fp64, pushthrough_fp32]


def machine() -> str:
    info = machine_info()
    sha = git_revision()["sha"]
    return f"{info['cpu']} ({info['platform']}), torch {torch.__version__}, git {sha[:7] if sha else 'unknown'}"


@dataclass
class APAccuracyArgs:
    n: int = 256  # rows of Z (the batch)
    d: int = 513  # columns of Z (the layer's input width)
    d_out: int = 256
    threads: int = 1
    repeats: int = 20  # timed calls per candidate
    seeds: int = 3
    out: str = ""  # a .md file for the table; default: print only


def main(argv: list[str]) -> None:
    cfg = asdict(parse_script_args(argv, APAccuracyArgs, __doc__))
    torch.set_num_threads(cfg["threads"])
    n, d, d_out = cfg["n"], cfg["d"], cfg["d_out"]
    lines = [f"# AP gradient accuracy and cost (n={n}, d={d}, d_out={d_out}, damping={DAMPING}, "
             f"{cfg['threads']} thread(s))", "", f"Machine: {machine()}. Command: "
             f"`python scripts/ap_accuracy.py {' '.join(argv)}`", "",
             "Relative Frobenius error against float64 dense math, in units of kappa(S + mu I) * eps_fp32 "
             "(worst over seeds); time: median ms per call.", "",
             "| candidate | " + " | ".join(f"spread {s:g}" for s in (1e-2, 1e-3, 1e-4)) + " | ms |",
             "|---|" + "---|" * 4]
    errors = {c.__name__: [] for c in CANDIDATES}
    for spread in (1e-2, 1e-3, 1e-4):
        worst = {c.__name__: 0.0 for c in CANDIDATES}
        for seed in range(cfg["seeds"]):
            Z, Delta, G = problem(n, d, d_out, spread, seed)
            exact, kappa, mu = reference(G, Z)
            for cand in CANDIDATES:
                got = cand(G, Z, Delta, mu).double()
                err = ((got - exact).norm() / exact.norm()).item() / (kappa * EPS32)
                worst[cand.__name__] = max(worst[cand.__name__], err)
        for name, value in worst.items():
            errors[name].append(value)
    Z, Delta, G = problem(n, d, d_out, 1e-3, 0)
    _, _, mu = reference(G, Z)
    for cand in CANDIDATES:
        times = []
        for _ in range(cfg["repeats"]):
            t0 = time.perf_counter()
            cand(G, Z, Delta, mu)
            times.append(1e3 * (time.perf_counter() - t0))
        lines.append(f"| {cand.__name__} | " + " | ".join(f"{e:.3g}" for e in errors[cand.__name__])
                     + f" | {statistics.median(times):.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if cfg["out"]:
        Path(cfg["out"]).write_text(text)


if __name__ == "__main__":
    main(sys.argv[1:])
