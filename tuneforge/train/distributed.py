"""Data parallelism through PyTorch's own engine: torchrun starts the processes, this module joins them.

What the loop needs and nothing more: the rank and world size, sums across ranks (the one normalisation
point stays one: counts and loss sums are added over ranks before anything is divided), a barrier, rank-0
duties (logs, checkpoints, final folder), and the DDP wrapper with its gradient sync switched off on all but
the last micro-batch of an update. A single process (no torchrun) gets the same functions as no-ops. FSDP2
(`torch.distributed.fsdp.fully_shard`) will plug in at `wrap`: the loop only ever talks to this module.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> torch.device:
    """Join the process group that torchrun describes (WORLD_SIZE > 1); return this rank's device.

    gloo on CPU (this project's machines and CI), NCCL on CUDA."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not active():
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
    return torch.device(f"cuda:{local}" if cuda else "cpu")


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def _reduce_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum of `values` over ranks (float64, so counts stay exact)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_agree(flag: bool) -> bool:
    """True only if `flag` is true on every rank (a non-finite step on one rank is skipped on all)."""
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def union_keys(keys: list[str]) -> list[str]:
    """The sorted union of every rank's `keys` (metric names a rank with no data would lack)."""
    if not active():
        return list(keys)
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, list(keys))
    return sorted({k for ks in gathered for k in ks})


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (a list of one without torchrun)."""
    if not active():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around the TrainModule under torchrun; the module itself otherwise.

    broadcast_buffers=False: the model's buffers (rotary frequencies) are constants, and a buffer broadcast
    in every forward would make an uneven number of evaluation batches across ranks hang."""
    if world_size() == 1:
        return module
    import inspect
    ids = [device.index] if device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel
    # the buffer switch was renamed in newer torch; the buffers are constants, syncing them once at init is fine
    new_name = "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
    no_buffer_sync = {"forward_sync_buffers" if new_name else "broadcast_buffers": False}
    return ddp(module, device_ids=ids, **no_buffer_sync)


def sync_context(module: torch.nn.Module, sync: bool):
    """Gradients all-reduced in this backward only when `sync` (the last micro-batch of an update)."""
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. builds the token cache); the others wait, then run it (and find
    the cache). A failure on rank 0 is raised there; the others then fail at the barrier's timeout."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()
