"""AP under FSDP2 (``torch.distributed.fsdp.fully_shard``): two gloo processes on CPU.

fully_shard splits every parameter, and so its gradient, by rows (Shard(0)). Each process holds the
full inputs of its own half of the batch; AP all-reduces the statistics, so P is the full batch's on
every process, and each process rewrites its own rows of G as rows of G P. The reference is float64
dense math on the whole batch's rows, within the derived bound of ap_reference (test_precision.py's
docstring), row shard by row shard.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ap_reference import DAMPING, Reference, spread_inputs
from dopr.distributed import end_distributed_process
from dopr.optim import ActivationPreconditioner, APConfig, build_optimizer

fsdp = pytest.importorskip("torch.distributed.fsdp")
WORLD = 2


def make_model():
    torch.manual_seed(0)
    # 9 and 5 output rows: the two processes hold uneven row shards (5 + 4, 3 + 2)
    return nn.Sequential(nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 5))


def shard(model):
    for module in model:
        if isinstance(module, nn.Linear):
            fsdp.fully_shard(module)
    fsdp.fully_shard(model)
    return model


def local_grad(linear: nn.Linear) -> torch.Tensor:
    """This process's rows of [G_W  g_b] (the bias preconditioned with the weight)."""
    return torch.cat([linear.weight.grad.to_local(), linear.bias.grad.to_local()[:, None]], 1).double()


def _worker(rank, port, x, out_grad, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    result = {}
    try:
        model = shard(make_model())
        ap = ActivationPreconditioner(model, APConfig(damping=DAMPING))
        inputs = {}
        for i in (0, 2):
            model[i].register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a[0].detach()))
        (model(x.chunk(WORLD)[rank]) * out_grad.chunk(WORLD)[rank]).sum().backward()
        raw = {i: local_grad(model[i]) for i in (0, 2)}
        ap.step()
        for i in (0, 2):
            gathered = [torch.empty_like(inputs[i]) for _ in range(WORLD)]
            dist.all_gather(gathered, inputs[i])
            result[i] = {"raw": raw[i], "new": local_grad(model[i]), "rows": torch.cat(gathered).double()}

        # The whole optimizer: dopr_adamw, built after sharding, trains; every process ends with the same P.
        model = shard(make_model())
        opt = build_optimizer(model, "dopr_adamw", lr=1e-2)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = (model(x.chunk(WORLD)[rank]) - 1).pow(2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        result["losses"] = losses
        result["P"] = [layer.inverse() for layer in opt.preconditioner.layers]
        result["coverage"] = opt.coverage()

        # A column shard would split rows of G: refused at construction, naming the layer and the fix.
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (WORLD,))
        column_sharded = nn.Linear(6, 4)
        column_sharded.weight = nn.Parameter(distribute_tensor(column_sharded.weight.detach(), mesh, [Shard(1)]))
        try:
            ActivationPreconditioner(nn.Sequential(column_sharded))
            result["column_shard"] = "accepted"
        except NotImplementedError as error:
            result["column_shard"] = str(error)
    except Exception as error:  # reported by the test, not lost in a child's stderr
        result["error"] = f"{type(error).__name__}: {error}"
    torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
    end_distributed_process()  # a plain return can abort at exit under gloo


def test_fsdp2_row_shards_are_preconditioned_with_the_whole_batch_statistics(tmp_path):
    g = torch.Generator().manual_seed(7)
    x = spread_inputs((16, 12), 1e-3, 1, g)
    out_grad = torch.randn(16, 5, generator=g)
    port = 29900 + os.getpid() % 500
    mp.spawn(_worker, args=(port, x, out_grad, str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    for result in results:
        assert "error" not in result, result["error"]
    for i, d_out in ((0, 9), (2, 5)):
        assert sum(r[i]["raw"].shape[0] for r in results) == d_out  # the shards cover every row once
        for rank, result in enumerate(results):
            Z = result[i]["rows"]
            Z = torch.cat([Z, Z.new_ones(len(Z), 1)], 1)  # bias augmentation
            exact, bound = Reference(APConfig(damping=DAMPING)).step(0, Z, result[i]["raw"])
            error = ((result[i]["new"] - exact).norm() / exact.norm()).item()
            assert error <= bound, (i, rank, error, bound)
    for a, b in zip(results[0]["P"], results[1]["P"]):
        assert torch.equal(a, b)  # one owner computes each inverse and broadcasts it
    assert results[0]["losses"][-1] < results[0]["losses"][0]
    assert results[0]["coverage"]["preconditioned"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert "shard dim 0 only" in results[0]["column_shard"] and "'0'" in results[0]["column_shard"]
