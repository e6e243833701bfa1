"""Process group and FSDP2 sharding for ``torchrun --nproc-per-node N dflare train ...``.

One process is plain training. Under torchrun (``WORLD_SIZE > 1``) every rank joins a process
group (NCCL on CUDA, gloo on CPU), loads its own replica of the frozen target, and the draft
is sharded with FSDP2 ``fully_shard`` as ONE unit: the draft's forward reads every layer's
context projections together (``layer_mix_weights``), so per-layer units would not be
gathered when they are read. Drafts are small (a few layers), so one unit costs little.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> Dist:
    """Join torchrun's process group when launched by it; ``device`` is "cpu" or "cuda"."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, torch.device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), world, dev)


def shard_model(model: nn.Module, d: Dist) -> nn.Module:
    """FSDP2-shard ``model`` over all ranks (a no-op for one process)."""
    if not d.enabled:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world_size,))
    return fully_shard(model, mesh=mesh)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
