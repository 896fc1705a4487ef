#!/usr/bin/env python
"""DoPr under DistributedDataParallel: each rank sees a shard of the batch; AP all-reduces its
statistics in one bucket, each layer's inverse is computed on one owner rank and broadcast.

    torchrun --nproc_per_node=2 scripts/ddp_example.py                 # CPU (gloo)
    torchrun --nproc_per_node=8 scripts/ddp_example.py backend=nccl    # one process per GPU

torchrun's own flags go before the script; the script's keys (key=value, like run.py's overrides)
after it:
    backend     gloo (CPU) or nccl (one GPU per process) (default gloo)
    steps       training steps (default 200)
    optimizer   any name build_optimizer knows, e.g. dopr_muon or adamw (default dopr_adamw)
"""

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dopr.cli import parse_script_args
from dopr.distributed import end_distributed_process
from dopr.optim import build_optimizer

BACKENDS = ("gloo", "nccl")


@dataclass
class DDPExampleArgs:
    backend: str = "gloo"
    steps: int = 200
    optimizer: str = "dopr_adamw"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: choose from {list(BACKENDS)}")


def main(argv: list[str]) -> None:
    args = parse_script_args(argv, DDPExampleArgs, __doc__)
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.backend == "nccl" else "cpu")
    torch.manual_seed(0)  # same init everywhere (DDP also broadcasts rank 0's weights)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4)).to(device)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = build_optimizer(model, args.optimizer, lr=1e-3)  # hooks go on the wrapped model's layers
    scales = torch.logspace(0, -2, 16, device=device)  # ill-conditioned inputs
    target = torch.randn(16, 4, device=device)
    gen = torch.Generator(device=device).manual_seed(1000 + rank)  # a different shard per rank
    for step in range(args.steps):
        x = torch.randn(64, 16, device=device, generator=gen) * scales
        loss = (ddp(x) - x @ target).pow(2).mean()
        opt.zero_grad()
        if opt.preconditioner is not None:  # overlap the statistics all-reduce with backward
            opt.preconditioner.start_statistics_sync()
        loss.backward()
        opt.step()
        if rank == 0 and (step + 1) % 50 == 0:
            print(f"step {step + 1} loss {loss.item():.5f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
    end_distributed_process()  # destroys the group; a plain return can abort at exit under gloo
