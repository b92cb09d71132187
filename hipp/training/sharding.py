"""The frozen base sharded across processes while the controller trains (Accelerate's FSDP config).

Under `accelerate launch --config_file configs/accelerate_fsdp.yaml hipp train ...` every process
holds 1/N of each block's weights (torch's FSDP2 `fully_shard`: one shard group per gated block, the
rest of the model as the root group); a block's weights are gathered only for its forward and its
backward, which the gates' gradients need. The base is frozen, so nothing of it is reduced or stepped.
The controller is a few tens of thousands of parameters: it stays whole on every process and its
gradients are averaged by one all-reduce (`average_gradients`), so its checkpoint stays an ordinary
state dict and a sharded run resumes like any other. Every forward of a sharded base is collective:
all processes must run it (the end-of-training check included).
"""
from __future__ import annotations

import torch

from ..backends import prunable_blocks


def uses_fsdp(acc) -> bool:
    """Launched with an FSDP config: on GPUs Accelerate says FSDP; on CPUs it runs plain multi-CPU
    processes (its FSDP plugin is for accelerators) and only the launcher's flag tells."""
    import os

    from accelerate.utils import DistributedType
    flagged = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return acc.distributed_type == DistributedType.FSDP or (flagged and acc.distributed_type == DistributedType.MULTI_CPU)


def shard_base(acc, model: torch.nn.Module) -> None:
    """Shard the (prunable, frozen) model across the launch's processes in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.requires_grad_(False)
    mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
    for block in prunable_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def average_gradients(module: torch.nn.Module, processes: int) -> None:
    for p in module.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(processes)
