"""Multi-GPU single runs through torch.distributed (launched with torchrun), with DDP semantics.

    torchrun --nproc_per_node 4 run_shell.py --recipe configs/trainers/clip_lora.yaml \
        --dataset-config configs/datasets/synthetic.yaml --shots 16 --seeds 1

Every process draws the same global batch from the same seeded sampler, keeps its contiguous
shard (`shard_range`), and the trainable gradients are averaged with weights local/global batch
size, so each step equals the single-process step on the global batch (up to float summation
order). Evaluation splits the images the same way and gathers the rows back in order, padded to
equal length and trimmed, so no sample is counted twice. Only rank 0 writes run files.
Without torchrun (WORLD_SIZE unset or 1) every function here is the identity.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def init_from_env() -> bool:
    """Join the process group described by torchrun's variables; False when running alone.

    Backend: NCCL on GPUs (each process on cuda:LOCAL_RANK), gloo on CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def is_main_process() -> bool:
    """True on rank 0 (and when not distributed): the one process that writes run files."""
    return rank() == 0


def shard_range(count: int, shard: int, shards: int) -> tuple[int, int]:
    """[start, stop) of shard `shard` of `count` items in `shards` contiguous parts; the first
    `count % shards` parts hold one item more. The parts cover every item exactly once."""
    base, extra = divmod(count, shards)
    start = shard * base + min(shard, extra)
    return start, start + base + (1 if shard < extra else 0)


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_batch(*arrays: Any) -> tuple:
    """This process's contiguous part of each array (a global batch, first dimension)."""
    if not is_active():
        return arrays
    start, stop = shard_range(len(arrays[0]), rank(), world_size())
    return tuple(array[start:stop] for array in arrays)


def check_batch_size(batch_size: int) -> None:
    if batch_size < world_size():
        raise ValueError(
            f"OPTIM.BATCH_SIZE {batch_size} (or the training set size) is smaller than the "
            f"{world_size()} processes: every process needs at least one image per step"
        )


def reduce_loss(loss: torch.Tensor, local_count: int, global_count: int) -> torch.Tensor:
    """The global-batch mean of a per-shard mean loss: sum over ranks of loss * local/global."""
    if not is_active():
        return loss.detach()
    value = (loss.detach().float() * (local_count / global_count)).to(_device())
    dist.all_reduce(value)
    return value.to(loss.device)


def broadcast_parameters(parameters: Sequence[torch.nn.Parameter]) -> None:
    """Copy rank 0's values into every process (as DDP does when it wraps a model)."""
    if not is_active():
        return
    device = _device()
    with torch.no_grad():
        for p in parameters:
            value = p.detach().to(device).clone()
            dist.broadcast(value, src=0)
            p.copy_(value.to(p.device))


def average_gradients(
    parameters: Sequence[torch.nn.Parameter], local_count: int, global_count: int
) -> None:
    """Replace each gradient by sum over ranks of grad * local/global (the global-batch gradient
    of a mean loss). A parameter without a gradient on every rank keeps none, as alone."""
    if not is_active():
        return
    device = _device()
    has_grad = torch.tensor([p.grad is not None for p in parameters], dtype=torch.float32)
    has_grad = has_grad.to(device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    used = [p for p, flag in zip(parameters, has_grad.tolist()) if flag > 0]
    for dtype in sorted({p.dtype for p in used}, key=str):
        group = [p for p in used if p.dtype == dtype]
        flat = torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device)
                for p in group
            ]
        )
        flat.mul_(local_count / global_count)
        dist.all_reduce(flat)
        offset = 0
        for p in group:
            part = flat[offset : offset + p.numel()].view_as(p).to(p.device)
            offset += p.numel()
            if p.grad is None:
                p.grad = part.clone()
            else:
                p.grad.copy_(part)


def gather_rows(compute: Callable[[Any], np.ndarray], data: Any) -> np.ndarray:
    """`compute(data)` for an (N, ...) array-like, split over processes and gathered in order.

    Each rank computes its contiguous rows -> (n_r, C); rows are padded to the largest n_r,
    all-gathered, trimmed to each rank's true count and concatenated: exactly N rows, in order.
    """
    if not is_active():
        return compute(data)
    shards = world_size()
    bounds = [shard_range(len(data), r, shards) for r in range(shards)]
    start, stop = bounds[rank()]
    local = np.asarray(compute(data[start:stop]))
    largest = max(b - a for a, b in bounds)
    padded = np.zeros((largest, *local.shape[1:]), dtype=local.dtype)
    padded[: len(local)] = local
    device = _device()
    tensor = torch.from_numpy(padded).to(device)
    parts = [torch.empty_like(tensor) for _ in range(shards)]
    dist.all_gather(parts, tensor)
    rows = [part[: b - a].cpu().numpy() for part, (a, b) in zip(parts, bounds)]
    return np.concatenate(rows)


def gather_concatenated(array: np.ndarray) -> np.ndarray:
    """Concatenate each rank's (n_r, ...) array in rank order (sizes may differ)."""
    if not is_active():
        return array
    objects: list[Any] = [None] * world_size()
    dist.all_gather_object(objects, np.asarray(array))
    return np.concatenate(objects)


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's `value` on every process (so all take the same decision)."""
    if not is_active():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
