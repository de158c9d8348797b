"""Data-parallel training whose bits do not depend on the number of workers.

An optimizer step consumes `gradient_accumulation_steps` micro-batches, numbered globally
(the data order is a pure function of seed and micro-batch index). Worker r computes the
micro-batches k with k % world_size == r, each one's LoRA gradient separately; every
worker then receives every micro-batch's gradient (torch.distributed all_gather over gloo)
and sums them in micro-batch order: the same additions, in the same order, as autograd's
accumulation in a single process. So every worker holds the same gradients, clips and steps
AdamW identically, and the weights after every step are the single-process weights, for any
world size. With one worker the same code runs without a collective.

LoRA gradients are small (the default adapter: 174,592 parameters, 0.7 MB in fp32), so
gathering all of them instead of reducing them costs little and fixes the order of the sum.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from qlorax.devices.base import Device
from qlorax.devices.cpu import CPU
from qlorax.errors import EXIT_RESOURCES, QloraxError, ResourceError
from qlorax.micro_batches import ONE_AT_A_TIME, MicroBatchPool

# How long a collective may wait for a peer before the worker gives up: covers rank 0's
# in-loop evaluation and checkpoint writes, which the others wait for at the next step.
DEFAULT_COLLECTIVE_TIMEOUT_S = 600


class WorkerLost(QloraxError):
    """A collective failed: another worker died, hung past the time-out, or lost its connection."""

    exit_code = EXIT_RESOURCES


@dataclass(frozen=True)
class World:
    """This process's place among the workers of one run (rank 0 writes every file)."""

    rank: int = 0
    size: int = 1

    @property
    def writes(self) -> bool:
        return self.rank == 0

    def owns(self, micro_batch: int) -> bool:
        return micro_batch % self.size == self.rank


def join_world(rank: int, size: int, address: str, port: int, timeout_s: float, device: Device = CPU,
               listen_fd: int | None = None) -> World:
    """Join the run's process group (gloo on the CPU; a no-op for one worker). Rank 0 serves the
    rendezvous store, on the listening socket the launcher handed it (`listen_fd`: bound to
    127.0.0.1 by the parent) or else on `address:port`."""
    if size == 1:
        return World()
    import torch.distributed as dist

    try:
        store = dist.TCPStore(address, port, size, is_master=rank == 0, timeout=timedelta(seconds=timeout_s),
                              master_listen_fd=listen_fd if rank == 0 else None)
        dist.init_process_group(device.distributed_backend, store=store, rank=rank, world_size=size,
                                timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as exc:
        raise WorkerLost(f"could not join the run's other workers at {address}:{port} within "
                         f"{timeout_s:.0f} s ({first_line(exc)})") from None
    return World(rank=rank, size=size)


def leave_world(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def first_line(exc: BaseException) -> str:
    """gloo's message without its source location and advice: 'Connection closed by peer [addr]:port'."""
    text = re.sub(r"^\[[^\]]*:\d+\]\s*", "", str(exc).strip())
    text = text.splitlines()[0] if text else type(exc).__name__
    return text.split(". ", 1)[0].rstrip(".")[:300]


def flat_gradient(params: list[Any], grads: list[Any]) -> Any:
    """One micro-batch's gradients `grads` of `params` (one dtype) as a single row, zeros where
    none (`gradient_marks` tells those apart from a gradient of zeros)."""
    import torch

    return torch.cat([(grad if grad is not None else torch.zeros_like(param)).reshape(-1)
                      for param, grad in zip(params, grads, strict=True)])


def gradient_marks(grads: list[Any]) -> Any:
    """1 for each parameter that got a gradient in this micro-batch, 0 for one outside its graph
    (None): one process's accumulation skips those micro-batches, and AdamW a parameter that none
    of the window's reached."""
    import torch

    return torch.tensor([grad is not None for grad in grads], dtype=torch.uint8)


def dtype_groups(trainable: list[Any]) -> list[list[int]]:
    """Positions of the trainable parameters, grouped by dtype (in first-seen order): a row of a
    group is one tensor."""
    groups: dict[Any, list[int]] = {}
    for position, param in enumerate(trainable):
        groups.setdefault(param.dtype, []).append(position)
    return list(groups.values())


def exchange(world: World, rows: dict[int, Any], micro_batches: int) -> list[Any]:
    """Every micro-batch's row, in micro-batch order, on every worker.

    `rows` holds this worker's own micro-batches {index: 1-D tensor}; all rows have one
    length and dtype. Workers own unequal counts when micro_batches % size != 0, so each
    sends a fixed number of slots (ceil(micro_batches / size)), unused ones zero."""
    if world.size == 1:
        return [rows[k] for k in range(micro_batches)]
    import torch
    import torch.distributed as dist

    sample = next(iter(rows.values()))
    slots = math.ceil(micro_batches / world.size)
    mine = torch.zeros((slots, sample.numel()), dtype=sample.dtype)
    for k, row in rows.items():
        mine[k // world.size] = row
    gathered = [torch.empty_like(mine) for _ in range(world.size)]
    try:
        dist.all_gather(gathered, mine)
    except RuntimeError as exc:
        raise WorkerLost(f"lost contact with the run's other workers ({first_line(exc)})") from None
    return [gathered[k % world.size][k // world.size] for k in range(micro_batches)]


def sum_in_order(rows: list[Any]) -> Any:
    """rows[0] + rows[1] + ... left to right, as autograd accumulates micro-batch gradients."""
    total = rows[0].clone()
    for row in rows[1:]:
        total += row
    return total


def agree_to_stop(world: World, requested: bool) -> bool:
    """Whether any worker was asked to stop (SIGINT/SIGTERM) by the end of this step: all stop
    after the same step, or the ones that go on would wait for the others forever."""
    if world.size == 1:
        return requested
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if requested else 0], dtype=torch.int32)
    try:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    except RuntimeError as exc:
        raise WorkerLost(f"lost contact with the run's other workers ({first_line(exc)})") from None
    return bool(flag.item())


def agree_on_start(world: World, step: int) -> None:
    """Every worker continues from the same checkpoint step, or none trains: a worker that
    restored another state would compute other gradients and the bits would be neither run's."""
    if world.size == 1:
        return
    import torch
    import torch.distributed as dist

    steps = [torch.zeros(1, dtype=torch.int64) for _ in range(world.size)]
    try:
        dist.all_gather(steps, torch.tensor([step], dtype=torch.int64))
    except RuntimeError as exc:
        raise WorkerLost(f"lost contact with the run's other workers ({first_line(exc)})") from None
    seen = [int(value.item()) for value in steps]
    if len(set(seen)) > 1:
        raise ResourceError(f"the run's workers would continue from different checkpoints (steps {seen} by rank): "
                            "each worker must see the same checkpoints; nothing was trained")


def assign_gradients(params: list[Any], rows: list[Any], marks: list[Any]) -> None:
    """Each parameter's .grad from every micro-batch's row (`params`' dtype group) and marks:
    the in-order sum over the micro-batches that gave it a gradient, as autograd accumulates in
    one process; None where none did, so the optimizer skips it as it would in one process. With
    every mark set this is the whole rows' sum, element for element: the same bits."""
    offset = 0
    for index, param in enumerate(params):
        count = param.numel()
        reached = [row[offset : offset + count] for row, mark in zip(rows, marks, strict=True) if mark[index]]
        param.grad = sum_in_order(reached).view_as(param) if reached else None
        offset += count


def window_gradients(world: World, trainable: list[Any], micro_batches: int,
                     loss_and_gradients: Callable[[int], tuple[Any, Sequence[Any]]],
                     pool: MicroBatchPool = ONE_AT_A_TIME) -> tuple[list[Any], float]:
    """Compute this worker's micro-batches (`loss_and_gradients(k)`: micro-batch k's loss and the
    gradient of each trainable tensor, None where its graph did not reach; up to `pool.threads`
    of them side by side), then leave on every worker the .grad that autograd's accumulation
    leaves in one process: each micro-batch's gradient added in micro-batch order, skipping those
    whose graph did not reach the tensor, and None for a tensor no micro-batch reached (AdamW
    skips it). Returns every micro-batch's loss, in order, and the seconds spent exchanging."""
    groups = dtype_groups(trainable)
    grouped = [position for group in groups for position in group]

    def rows(k: int) -> tuple[Any, Any, list[Any]]:
        loss, grads = loss_and_gradients(k)
        return (loss.detach().double().reshape(1), gradient_marks([grads[i] for i in grouped]),
                [flat_gradient([trainable[i] for i in group], [grads[i] for i in group]) for group in groups])

    owned = [k for k in range(micro_batches) if world.owns(k)]
    mine = dict(zip(owned, pool.map(rows, owned), strict=True))
    exchanged = time.perf_counter()
    every_gradient = [exchange(world, {k: row[2][g] for k, row in mine.items()}, micro_batches)
                      for g in range(len(groups))]
    every_mark = exchange(world, {k: row[1] for k, row in mine.items()}, micro_batches)
    every_loss = exchange(world, {k: row[0] for k, row in mine.items()}, micro_batches)
    seconds = time.perf_counter() - exchanged
    first = 0
    for group, group_rows in zip(groups, every_gradient, strict=True):
        assign_gradients([trainable[i] for i in group], group_rows,
                         [mark[first : first + len(group)].tolist() for mark in every_mark])
        first += len(group)
    return every_loss, seconds
