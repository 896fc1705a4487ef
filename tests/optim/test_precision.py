"""Every AP path returns G P within a derived error bound of float64 dense math, for fp32 inputs.

The float64 reference is computed here from the rows each layer really saw, so nothing depends on
the machine, and the bound is derived from what each path computes, never fitted to a CPU. Notation:
u = 2^-24 (fp32 unit roundoff), A = S + mu I, M = G A^-1, kappa = kappa(A), L = chol(A); all
bounds are on ||M_hat - M||_F / ||M||_F, to first order in u (Higham, Accuracy and Stability of
Numerical Algorithms, 2nd ed., 2002; section numbers below are that book's).

d x d path (fp32: S = z^T z / n from n rows, A = S + mu I, Cholesky, P = its inverse, M = G P):
- P is the exact inverse of a perturbed A, column by column (Thm 10.3-10.4 for the factorization
  and solves; forming S and A adds their own sums): |P_hat - P| <= |P| E |P| with
  E = g(n + 2) |z|^T|z| / n + g(3d + 1) |L||L^T| + g(d + 2) |A|, so G (P_hat - P) is at most
  min(|| |G||P| E |P| ||_F, ||M||_F ||E||_2 / lambda_min(A)) (componentwise, or normwise);
- the product G P_hat (inner dimension d) adds g(d) || |G||P| ||_F (sec. 3.5), and rounding the
  result u ||M||_F.
Where each inverse is applied once (statistics and inverse every step, on CPU), G P is two triangular
solves with L instead: each row of M_hat solves a perturbed system exactly, (A + dA_row), |dA_row| <=
g(3d + 1) |L||L^T| (Thm 10.4), which E already holds, and there is no product term, so the same
bound covers that path.
Batch-space path ((G - (G z^T)(n mu I + z z^T)^-1 z) / mu, in float64, rounded once): the n x n
solve and products have backward error g64(n + d); the subtraction of nearly equal terms amplifies
it by kappa(n mu I + z z^T) kappa(A) <= kappa^2, so the bound is u + 2 kappa^2 g64(n + d).

The deterministic constant g(m) = m u holds for every order of operations but is loose by orders
of magnitude, and blocked, vectorized kernels (ATen's default, AVX2 and AVX-512 sets, MKL) each sum
in their own order. We use the probabilistic constant g(m) = LAMBDA sqrt(m) u of Higham and Mary
(SIAM J. Sci. Comput. 41(5), 2019): it holds for any order when rounding errors are independent
and mean zero, and fails with probability falling like exp(-LAMBDA^2 / 2). Every term carries its
dimension constant. The d x d bound is loose for n < d (the absolute values |P| lose the
cancellations of a rank-deficient S): the measured error there is ~1 kappa u, reported by
scripts/ap_accuracy.py, not asserted. The batch-space bound is tight enough that the same formula
in plain fp32 (the former default) breaks it by orders of magnitude
(``test_the_bound_catches_the_fp32_woodbury_formula``).

Inputs are ill-conditioned on purpose: column scales spread from 1 down to 1e-2..1e-4, with damping
1e-3 of tr(S)/d, batches with fewer rows than inputs (the batch-space path) and more (the d x d path).
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ap_reference import DAMPING, SPREADS, Reference, check_model, full_grad, spread_inputs

from dopr.distributed import end_distributed_process
from dopr.optim import ActivationPreconditioner, APConfig


@pytest.mark.parametrize("spread", SPREADS)
# (inputs, rows, outputs, whether the batch-space path is taken); the last is the gym policy's down
# projection at batch 256, where the former fp32 batch-space path was 4-12 x over the bound.
@pytest.mark.parametrize("d_in,rows,d_out,expect_batch_space", [(96, 12, 24, True), (96, 300, 24, False),
                                                                (512, 256, 256, None)])
@pytest.mark.parametrize("bias", ["augment", "gp"])
def test_linear_default_path(spread, d_in, rows, d_out, expect_batch_space, bias):
    torch.manual_seed(0)
    model = nn.Linear(d_in, d_out, bias=True)
    check_model(model, lambda g: spread_inputs((rows, d_in), spread, 1, g), APConfig(damping=DAMPING, bias=bias),
                expect_batch_space=expect_batch_space, steps=2)


@pytest.mark.parametrize("spread", SPREADS)
@pytest.mark.parametrize("rows", [12, 300])
def test_linear_forced_primal_path(spread, rows):
    torch.manual_seed(0)
    check_model(nn.Linear(96, 24), lambda g: spread_inputs((rows, 96), spread, 1, g),
                APConfig(damping=DAMPING, solver="primal"), expect_batch_space=False)


@pytest.mark.parametrize("spread", SPREADS)
@pytest.mark.parametrize("options", [dict(stat_decay=0.9), dict(inverse_interval=2), dict(stat_interval=2),
                                     dict(max_rows=50), dict(start_step=1), dict(stat_decay=0.5, inverse_interval=3)])
def test_schedules_and_subsampling(spread, options):
    torch.manual_seed(1)
    check_model(nn.Sequential(nn.Linear(40, 64), nn.Tanh(), nn.Linear(64, 8)),
                lambda g: spread_inputs((200, 40), spread, 1, g), APConfig(damping=DAMPING, **options), steps=5)


@pytest.mark.parametrize("spread", SPREADS)
@pytest.mark.parametrize("batch", [1, 16])
def test_conv1d_and_conv2d(spread, batch):
    torch.manual_seed(2)
    conv1 = nn.Conv1d(6, 5, kernel_size=3, padding=1)
    check_model(conv1, lambda g: spread_inputs((batch, 6, 11), spread, 1, g), APConfig(damping=DAMPING))
    conv2 = nn.Conv2d(4, 3, kernel_size=(3, 3), stride=(2, 1), padding=(1, 1))
    check_model(conv2, lambda g: spread_inputs((batch, 4, 7, 6), spread, 1, g), APConfig(damping=DAMPING))


@pytest.mark.parametrize("spread", SPREADS)
def test_lora_adapters(spread):
    peft = pytest.importorskip("peft")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(48, 16)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(3)
    model = peft.get_peft_model(Tiny(), peft.LoraConfig(r=4, target_modules=["proj"], lora_dropout=0.0,
                                                        init_lora_weights=False))
    for rows in (10, 200):
        check_model(model, lambda g: spread_inputs((rows, 48), spread, 1, g), APConfig(damping=DAMPING))


@pytest.mark.parametrize("spread", SPREADS)
def test_the_bound_catches_the_fp32_woodbury_formula(spread):
    """The batch-space bound has teeth: the same formula in plain fp32 (the former default) breaks it
    by orders of magnitude, while the optimizer's float64 evaluation of it stays within it."""
    n, d, d_out = 12, 96, 24
    g = torch.Generator().manual_seed(0)
    Z = spread_inputs((n, d), spread, 1, g)
    torch.manual_seed(0)
    model = nn.Linear(d, d_out, bias=False)
    ap = ActivationPreconditioner(model, APConfig(damping=DAMPING))
    (model(Z) * torch.randn(n, d_out, generator=g)).sum().backward()
    G = model.weight.grad.clone()
    assert ap.layers[0].batch_space_cheaper()
    ap.step()
    exact, bound = Reference(APConfig(damping=DAMPING)).step(0, Z.double(), G.double(), batch_space=True)
    ours = ((model.weight.grad.double() - exact).norm() / exact.norm()).item()
    assert ours <= bound, (ours, bound)
    mu = DAMPING * (Z * Z).sum() / (n * d)
    K = Z @ Z.T + n * mu * torch.eye(n)
    fp32 = (G - ((G @ Z.T) @ torch.linalg.inv(K)) @ Z) / mu
    woodbury = ((fp32.double() - exact).norm() / exact.norm()).item()
    assert woodbury > 10 * bound, (woodbury, bound)


def _gloo_worker(rank, world, port, x, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], 6)
    ap = ActivationPreconditioner(model, APConfig(damping=DAMPING))
    out = model(x.chunk(world)[rank])
    out.pow(2).sum().backward()
    for p in model.parameters():  # DDP's gradient average, by hand: G of the whole batch
        dist.all_reduce(p.grad)
    raw = full_grad(model, True)
    ap.step()
    torch.save({"raw": raw, "new": full_grad(model, True)}, os.path.join(result_dir, f"rank{rank}.pt"))
    end_distributed_process()  # a plain return can abort at exit under gloo


@pytest.mark.parametrize("spread", [1e-4])
def test_distributed_statistics(tmp_path, spread):
    """Two gloo processes, fewer rows per rank than inputs: all-reduced statistics, same bound."""
    x = spread_inputs((16, 40), spread, 1, torch.Generator().manual_seed(5))
    port = 29700 + os.getpid() % 1000
    mp.spawn(_gloo_worker, args=(2, port, x, str(tmp_path)), nprocs=2, join=True)
    Z = torch.cat([x.double(), torch.ones(16, 1, dtype=torch.float64)], 1)
    ref = Reference(APConfig(damping=DAMPING))
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        exact, bound = ref.step(0, Z, saved["raw"])
        error = ((saved["new"] - exact).norm() / exact.norm()).item()
        assert error <= bound, (rank, error, bound)


def _matmul_error() -> float:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(128, 128, generator=g), torch.randn(128, 128, generator=g)
    exact = a.double() @ b.double()
    return ((a @ b).double() - exact).norm().item() / exact.norm().item()


@pytest.mark.parametrize("rows", [12, 300])
def test_reduced_precision_settings_do_not_reach_ap_on_cpu(rows):
    """A user who lets oneDNN run fp32 matmuls in bf16, and steps inside autocast, still gets exact AP."""
    backend = torch.backends.mkldnn.matmul
    saved = backend.fp32_precision
    try:
        backend.fp32_precision = "bf16"
        if _matmul_error() < 1e-5:
            pytest.skip("this CPU has no bf16 matmul path: the setting changes nothing here")
        torch.manual_seed(0)
        model = nn.Linear(96, 24)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            check_model(model, lambda g: spread_inputs((rows, 96), 1e-3, 1, g).float(), APConfig(damping=DAMPING))
        assert backend.fp32_precision == "bf16"  # the user's setting is restored
        assert _matmul_error() > 1e-5
    finally:
        backend.fp32_precision = saved


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [12, 300])
def test_tf32_and_autocast_do_not_reach_ap_on_cuda(rows):
    saved = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.manual_seed(0)
        model = nn.Linear(96, 24).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            check_model(model, lambda g: spread_inputs((rows, 96), 1e-3, 1, g).cuda(), APConfig(damping=DAMPING))
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved
