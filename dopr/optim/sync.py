"""AP under torch.distributed: one all-reduce of every layer's statistics, and owner-rank inverses.

Each step's statistics (z^T z, sum z, row counts of every layer) travel in one bucket, so a step
costs one collective however many layers there are; it can be launched before backward
(``ActivationPreconditioner.start_statistics_sync``) to overlap with it. Each layer's inverse is
computed by one owner rank (``layer.index % world``) and broadcast, so the d^3 work is shared.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dopr.optim.statistics import LayerStats


def world() -> tuple[int, int]:
    """(world size, rank); (1, 0) without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def pack_statistics(layers: list[LayerStats]) -> torch.Tensor:
    """One bucket for every statistic and row count of the step (one collective for all layers)."""
    parts = []
    for layer in layers:
        layer.reduce_kept()  # rows kept for the batch-space path are reduced like any others
        if layer.xtx is None:
            layer.xtx = torch.zeros(layer.in_dim, layer.in_dim, device=layer.weight.device)
            if layer.bias is not None:
                layer.xsum = torch.zeros(layer.in_dim, device=layer.weight.device)
        elif layer.rows == 0:  # no rows on this process: its sums are a stale buffer, and it adds zeros
            layer.xtx.zero_()
            if layer.xsum is not None:
                layer.xsum.zero_()
        parts += [layer.xtx.flatten()] + ([layer.xsum] if layer.xsum is not None else [])
        parts.append(torch.tensor([float(layer.rows)], device=layer.xtx.device))
    return torch.cat(parts)


def unpack_statistics(layers: list[LayerStats], bucket: torch.Tensor) -> None:
    offset = 0
    for layer in layers:
        for tensor in [layer.xtx] + ([layer.xsum] if layer.xsum is not None else []):
            tensor.copy_(bucket[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()
        layer.rows = int(bucket[offset].item())
        offset += 1


class StatisticsSync:
    """The step's statistics all-reduce: launched early (async) or on demand, waited for once."""

    def __init__(self):
        self.pending: tuple[torch.Tensor, object] | None = None  # (bucket, work handle)

    def launch(self, layers: list[LayerStats]) -> None:
        bucket = pack_statistics(layers)
        self.pending = (bucket, dist.all_reduce(bucket, async_op=True))

    def finish(self, layers: list[LayerStats]) -> None:
        """All-reduce this step's statistics (launching the collective now unless it already runs)."""
        if self.pending is None:
            self.launch(layers)
        bucket, handle = self.pending
        self.pending = None
        handle.wait()
        unpack_statistics(layers, bucket)

    def drop(self) -> None:
        """Abandon a launched all-reduce: it still has to complete on every rank."""
        if self.pending is not None:
            self.pending[1].wait()
            self.pending = None


def owner(layer: LayerStats, world_size: int) -> int:
    """The rank that computes this layer's inverse."""
    return layer.index % world_size


def broadcast_inverses(due: list[LayerStats], world_size: int, rank: int) -> None:
    """Send each due layer's P from its owner to every other rank (which allocates it first)."""
    pending = []
    for layer in due:
        if owner(layer, world_size) != rank:
            dtype = torch.promote_types(layer.S.dtype, torch.float32)
            layer.set_inverse(P=torch.empty(layer.dim, layer.dim, device=layer.S.device, dtype=dtype))
        pending.append(dist.broadcast(layer.P, src=owner(layer, world_size), async_op=True))
    for handle in pending:
        handle.wait()
