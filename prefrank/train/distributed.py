"""torch.distributed plumbing: process group from torchrun's environment, DDP / FSDP2 wrapping, reductions."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistState:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed():
    """Under torchrun (WORLD_SIZE > 1): NCCL with one GPU per local rank, or gloo on CPU. Else one process,
    on the GPU when there is one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world_size == 1:
        return DistState(device=torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    return DistState(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def shutdown(state):
    if state.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module, state, strategy):
    """DDP, or FSDP2 (`fully_shard` on every transformer layer, then the root), when distributed."""
    if not state.enabled:
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # VLMs routinely hold parameters outside the loss path (LLaVA never uses CLIP's post_layernorm)
        device_ids = [state.device.index] if state.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)
    from torch.distributed.fsdp import fully_shard

    for submodule in list(module.modules()):
        if type(submodule).__name__.endswith(("DecoderLayer", "EncoderLayer")):
            fully_shard(submodule)
    fully_shard(module)
    return module


def fsdp_modules(module):
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def mean_across_ranks(values, state):
    """Average a dict of scalar tensors over ranks (a no-op in one process)."""
    if not state.enabled or not values:
        return values
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float().to(state.device) for k in keys])
    dist.all_reduce(stacked)
    return dict(zip(keys, (stacked / state.world_size).cpu(), strict=True))


def sum_across_ranks(value, state):
    if not state.enabled:
        return value
    tensor = torch.tensor(value, dtype=torch.float64, device=state.device)
    dist.all_reduce(tensor)
    return tensor.item()


def any_rank(flag, state):
    """True on every rank if `flag` is True on any (so all ranks stop together after a SIGTERM)."""
    if not state.enabled:
        return flag
    tensor = torch.tensor(int(flag), device=state.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def barrier(state):
    if state.enabled:
        dist.barrier()


def all_gather_strings(text, state):
    if not state.enabled:
        return [text]
    gathered = [None] * state.world_size
    dist.all_gather_object(gathered, text)
    return gathered
