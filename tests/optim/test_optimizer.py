"""The composed optimizer: equivalence with torch.optim, the GPs' math, state, errors, distributed."""

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dopr.distributed import end_distributed_process
from ap_reference import Reference
from dopr.optim import (KNOWN_OPTIMIZERS, ActivationPreconditioner, AdaMuon, APConfig, build_optimizer, newton_schulz5,
                        route_params)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def batches(n=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g)) for _ in range(n)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()


def test_ap_off_matches_torch_adamw():
    data = batches(10)
    ours, ref = mlp(), mlp()
    train(ours, build_optimizer(ours, "adamw", lr=3e-3, weight_decay=0.1, betas=(0.8, 0.99)), data)
    train(ref, torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.8, 0.99)), data)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)


def test_muon_matches_reference_newton_schulz():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 10))
    opt = build_optimizer(model, "muon", lr=0.01, momentum=0.9)  # fp32 Newton-Schulz on CPU
    before = model[2].weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grad = model[2].weight.grad.clone()
    opt.step()
    # First step: momentum and Nesterov only rescale G, and Newton-Schulz normalizes scale away.
    scale = 0.01 * 0.2 * math.sqrt(12)  # lr * Moonlight's AdamW-matching factor
    expected = before - scale * newton_schulz5(grad, dtype=torch.float32)
    torch.testing.assert_close(model[2].weight, expected)


def test_muon_agrees_with_pytorch_optimizer_muon_in_bf16():
    """Cross-check against an independent implementation (pytorch-optimizer, bf16 only) over 5 steps."""
    from pytorch_optimizer import Muon as ReferenceMuon

    torch.manual_seed(0)
    ours, ref = nn.Linear(12, 8, bias=False), nn.Linear(12, 8, bias=False)
    ref.load_state_dict(ours.state_dict())
    opt = build_optimizer(ours, "muon", lr=0.01, momentum=0.9, weight_decay=0.1, ns_dtype="bfloat16", io_to_adamw=False)
    ref_opt = ReferenceMuon([dict(params=list(ref.parameters()), use_muon=True, lr=0.01, momentum=0.9, nesterov=True,
                                  weight_decay=0.1, use_adjusted_lr=True)])
    start = ours.weight.detach().clone()
    for _ in range(5):
        g = torch.randn(8, 12)  # well conditioned, so the bf16 iteration converges in both
        ours.weight.grad, ref.weight.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    error = (ours.weight - ref.weight).norm() / (ref.weight - start).norm()
    assert error < 0.05, error


def test_newton_schulz_is_near_orthogonal():
    torch.manual_seed(0)
    G = torch.randn(12, 7)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    O = newton_schulz5(G).float()
    sv = torch.linalg.svdvals(O)
    assert sv.min() > 0.5 and sv.max() < 1.5
    cos = (O * (U @ Vh)).sum() / (O.norm() * (U @ Vh).norm())
    assert cos > 0.95


def test_adamuon_follows_its_formula():
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(5, 3))
    opt = AdaMuon([W], lr=0.1, betas=(0.5, 0.9), eps=1e-8, weight_decay=0.01)
    M = torch.zeros(5, 3)
    V = torch.zeros(5, 3)
    W_ref = W.detach().clone()
    for _ in range(3):
        G = torch.randn(5, 3)
        W.grad = G.clone()
        opt.step()
        M = 0.5 * M + 0.5 * G
        O = newton_schulz5(torch.sign(M), dtype=torch.float32)
        V = 0.9 * V + 0.1 * O * O
        O_hat = O / (V.sqrt() + 1e-8)
        W_ref = W_ref * (1 - 0.1 * 0.01) - 0.1 * 0.2 * math.sqrt(15) * O_hat / (O_hat.norm() + 1e-8)
        torch.testing.assert_close(W.detach(), W_ref)


def test_routing_sends_io_embeddings_and_vectors_to_adamw():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Conv1d(8, 8, 3), nn.Linear(8, 2))
    matrix, other = route_params(model)
    assert {id(p) for p in matrix} == {id(model[2].weight), id(model[3].weight)}
    assert len(matrix) + len(other) == len(list(model.parameters()))
    emb = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10))
    matrix, _ = route_params(emb)
    assert [id(p) for p in matrix] == [id(emb[1].weight)]  # first Linear is hidden when an Embedding leads


@pytest.mark.parametrize("name", [n for n in KNOWN_OPTIMIZERS])
def test_every_optimizer_trains_and_round_trips_state(name):
    """Save mid-training, load into a fresh model+optimizer, continue: bit-identical to uninterrupted."""
    data = batches(12)
    model = mlp()
    opt = build_optimizer(model, name, lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12)
    def mean_loss(m):  # over all 12 batches: one batch's loss is too noisy a sign of training
        with torch.no_grad():
            return sum((m(x) - y).pow(2).mean().item() for x, y in data) / len(data)

    first_loss = mean_loss(model)
    for x, y in data[:6]:
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()
        sched.step()
    # the RNGs too, as the trainer's checkpoints do: PSGD-Kron draws from torch's (its preconditioner
    # updates) and numpy's global generator (whether to rebalance)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                           "rng": torch.get_rng_state(), "np_rng": np.random.get_state()})
    train_rest = lambda m, o, s: [  # noqa: E731
        (o.zero_grad(), (m(x) - y).pow(2).mean().backward(), o.step(), s.step()) for x, y in data[6:]
    ]
    train_rest(model, opt, sched)
    resumed = mlp(seed=99)
    resumed.load_state_dict(saved["model"])
    opt2 = build_optimizer(resumed, name, lr=3e-3)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=12)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    torch.set_rng_state(saved["rng"])
    np.random.set_state(saved["np_rng"])
    train_rest(resumed, opt2, sched2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    last_loss = mean_loss(model)
    assert math.isfinite(last_loss) and last_loss < first_loss, (name, first_loss, last_loss)


def test_lr_scheduler_reaches_inner_groups():
    model = mlp()
    opt = build_optimizer(model, "dopr_muon", lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert all(g["lr"] == pytest.approx(5e-3) for o in opt.optimizers for g in o.param_groups)
    sched.step()
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("adamz", {}, "known: adamw"),
        ("adamw", {"lr": -1.0}, "lr must be"),
        ("adamw", {"weight_decay": -0.1}, "weight_decay"),
        ("adamw", {"ap": {"damping": 1e-3}}, "only apply with activation preconditioning"),
        ("dopr_adamw", {"ap": {"damping": -1.0}}, "damping"),
        ("dopr_adamw", {"damping": 1e-3}, "activation-preconditioning settings; pass them as ap="),
        ("dopr_adamw", {"ap": {"dampening": 1e-3}}, "unknown ap settings"),
        ("dopr_adamw", {"momentum": 0.9}, "unknown hyperparameters"),
        ("signum", {"momentum": 0.0}, "momentum"),
        ("adamw", {"adamw_lr": 1e-3}, "matrix GPs"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_optimizer(mlp(), name, **kwargs)


def test_memory_accounting():
    model = mlp()
    opt = build_optimizer(model, "dopr_adamw", lr=1e-3)
    train(model, opt, batches(2))
    mem = opt.memory_bytes()
    n_params = sum(p.numel() for p in model.parameters())
    assert mem["gp"] == 2 * 4 * n_params + 4 * 6  # exp_avg, exp_avg_sq (+ a scalar step per param tensor)
    # AP holds per layer the z^T z (d^2) and z (d) accumulators and P of the bias-augmented input ((d+1)^2).
    assert mem["ap"] == sum(4 * (d * d + d + (d + 1) ** 2) for d in (6, 16, 16))


def test_memory_accounting_counts_the_tensors_soap_keeps_in_lists():
    pytest.importorskip("pytorch_optimizer")
    model = nn.Linear(4, 3)
    for name in ("adamw", "soap"):
        opt = build_optimizer(model, name)
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(5, 4)).sum().backward()
            opt.step()
        flat = sum(t.numel() * t.element_size() for o in opt.optimizers for state in o.state.values()
                   for t in state.values() if torch.is_tensor(t))  # tensors held directly in each parameter's state
        if name == "adamw":
            assert opt.memory_bytes() == {"gp": flat, "ap": 0}
        else:  # SOAP's GG and Q factor lists: (3x3 + 4x4) floats each for the weight
            assert opt.memory_bytes()["gp"] >= flat + 2 * 4 * (9 + 16)


def _gloo_worker(rank, world, port, x, result_dir, overlap):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = build_optimizer(model, "dopr_adamw", lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        loss = ddp(x.chunk(world)[rank]).pow(2).sum()
        if overlap:  # statistics all-reduce runs during backward
            opt.preconditioner.start_statistics_sync()
        loss.backward()
        opt.step()
    torch.save({"P": [layer.inverse() for layer in opt.preconditioner.layers], "params": list(model.parameters())},
               os.path.join(result_dir, f"rank{rank}.pt"))
    end_distributed_process()  # a plain return can abort at exit under gloo


@pytest.mark.parametrize("overlap", [False, True])
def test_ddp_statistics_all_reduce_and_owner_inverses_over_gloo(tmp_path, overlap):
    """2 processes, half the batch each: every rank ends with the full batch's inverses (3 layers, so
    both ranks own some) and identical parameters. Each rank's 3 rows are fewer than any layer's
    inputs, so rows are first kept for the batch-space path and must still be all-reduced."""
    torch.manual_seed(1)
    x = torch.randn(6, 4) * torch.tensor([5.0, 1.0, 0.1, 2.0])
    port = 29500 + os.getpid() % 1000
    port += 1 if overlap else 0
    mp.spawn(_gloo_worker, args=(2, port, x, str(tmp_path), overlap), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for a, b in zip(r0["P"], r1["P"]):
        assert torch.equal(a, b)  # each inverse was computed once, by its owner, and broadcast
    for a, b in zip(r0["params"], r1["params"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # gloo's gradient sums may differ by an ulp
    # Reference for the first layer: its input is x itself (same on every step).
    # P itself is I P: the derived bound of ap_reference with G = I, on the whole batch's rows.
    Z = torch.cat([x, torch.ones(6, 1)], 1).double()
    exact, bound = Reference(APConfig(damping=1e-3)).step(0, Z, torch.eye(5, dtype=torch.float64))
    assert ((r0["P"][0].double() - exact).norm() / exact.norm()).item() <= bound


@pytest.mark.slow  # >10 s on 2 cores
def test_ddp_example_exits_cleanly_under_torchrun():
    """The README's DDP command, as torchrun launches it: 2 gloo processes train and both exit 0.
    Before end_distributed_process, half of these launches died of SIGABRT after training, so
    three in a row pass by chance one time in eight."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "ddp_example.py"
    for _ in range(3):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(script), "steps=50"], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        assert "step 50 loss" in done.stdout
