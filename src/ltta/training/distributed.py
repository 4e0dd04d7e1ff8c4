"""Data-parallel training under ``torchrun`` (DistributedDataParallel), and nothing without it.

``torchrun --nproc_per_node=W -m ltta.cli train-target`` starts W copies of the stage, each with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its environment. :func:`distributed_session` turns
that into a process group (NCCL on CUDA, gloo on CPU) and a device per process (``cuda:LOCAL_RANK``);
launched any other way it is a no-op that yields rank 0 of 1 on the configured device, so the same
stage code runs in both cases.

The trainer then asks :meth:`BatchShard.current` which part of the work is its own. The split is
chosen so that W processes compute what one process would, up to batch-norm statistics and the
order of float sums:

- ``batch_size`` stays the *global* batch (the references' 128 images per SGD step), so the
  learning rate, schedule and step count do not depend on W; it must be divisible by W.
- Every process draws the same permutation from the same seeded generator and prepares the
  *whole* global batch (extra augmentation, crop/flip, cutout) with it, then keeps its contiguous
  shard ``rank``. Each image's augmentation draws are therefore those of the single-process run,
  and the shared generator stays in step on every process with no communication. Preparing W
  times the images costs little next to the forward/backward pass it feeds.
- DDP averages the gradients of the W shard-mean losses: for equal shards that is the gradient
  of the global-batch mean, so the SGD update is the single-process one. Only batch norm differs:
  each process normalises over its own shard (and DDP's default ``broadcast_buffers`` hands
  rank 0's running statistics to everyone before each forward pass).
- Randomness a process draws for its shard alone (dropout, and a training mode's own views such
  as AugMix's chains, drawn inside the loss) cannot match the single-process run without doing
  the whole batch's work. Those streams are reseeded at each epoch from (seed, epoch, rank), so
  they are independent across processes and need no per-process state in the checkpoint: rank 0
  alone writes it, every process resumes from it, and a resumed run equals an uninterrupted one
  bitwise on CPU. With W = 1 nothing changes: the trainer's single-process streams are untouched.

Rank 0 alone logs, shows progress, writes checkpoints and stage outputs; epoch figures (loss,
error) are all-reduced so that what it logs covers the global batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ltta.runtime import make_generator, resolve_device

T = TypeVar("T")

#: What torchrun (torch.distributed.run) exports to every process it starts.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: rank ``rank`` of ``world_size``, computing on ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0


def torchrun_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` when torchrun started this process with more than one
    process, else None (a single-process torchrun needs no process group)."""
    if not all(name in os.environ for name in TORCHRUN_ENV):
        return None
    try:
        rank, world, local = (int(os.environ[name]) for name in TORCHRUN_ENV)
    except ValueError as exc:
        raise RuntimeError(
            f"torchrun environment is malformed ({', '.join(f'{n}={os.environ[n]!r}' for n in TORCHRUN_ENV)}): {exc}"
        ) from None
    return (rank, world, local) if world > 1 else None


def _process_device(device: str, local_rank: int) -> torch.device:
    """``cuda:LOCAL_RANK`` when ``device`` resolves to CUDA (one GPU per process), else the CPU."""
    base = resolve_device(device)
    if base.type != "cuda":
        return base
    visible = torch.cuda.device_count()
    if local_rank >= visible:
        raise RuntimeError(
            f"torchrun started process LOCAL_RANK={local_rank} but only {visible} CUDA device(s) are visible; "
            f"launch with --nproc_per_node={visible} or fewer (one process per GPU)."
        )
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def distributed_session(device: str = "auto") -> Iterator[DistContext]:
    """The process group for the block when launched by torchrun; a no-op context otherwise.

    ``device`` is the params' ``auto``/``cpu``/``cuda``. Under torchrun a CUDA device means
    ``cuda:LOCAL_RANK`` and NCCL, a CPU one gloo (MASTER_ADDR/MASTER_PORT come from torchrun).
    A process group that already exists (a caller's) is used and left alone. On a clean exit
    every process waits at a barrier, so no process leaves while rank 0 still writes outputs;
    on an error the group is torn down at once and torchrun stops the other processes.
    """
    env = torchrun_env()
    if env is None:
        yield DistContext(0, 1, 0, resolve_device(device))
        return
    rank, world, local = env
    dev = _process_device(device, local)
    owned = not dist.is_initialized()
    if owned:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    try:
        yield DistContext(dist.get_rank(), dist.get_world_size(), local, dev)
        if dev.type == "cuda":
            dist.barrier(device_ids=[dev.index])  # NCCL: on this process's GPU, not a guessed one
        else:
            dist.barrier()
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def _stream_seed(purpose: str, seed: int, epoch: int, rank: int) -> int:
    """A 63-bit seed for one process's private random stream in one epoch (stable across runs)."""
    digest = hashlib.blake2b(f"ltta/{purpose}/{seed}/{epoch}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class BatchShard:
    """The slice of data-parallel training this process does (the whole of it when alone).

    Built by the trainer from the current process group (:meth:`current`); with world size 1
    every method is the identity or a no-op, so single-process training is unchanged.
    """

    def __init__(self, rank: int, world_size: int, seed: int, device: torch.device | str) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) (got rank {rank} of {world_size})")
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.device = torch.device(device)
        self._generator = make_generator(seed, self.device) if world_size > 1 else None

    @classmethod
    def current(cls, seed: int, device: torch.device | str) -> BatchShard:
        """This process's shard in the initialised process group; rank 0 of 1 without one."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), seed, device)
        return cls(0, 1, seed, device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def check_batch(self, batch_size: int, n_train: int) -> None:
        """The global batch must split into equal shards (equal shards make DDP's mean of the shard
        losses' gradients the gradient of the global mean)."""
        if batch_size % self.world_size == 0:
            return
        smaller = f" (the training set has only {n_train} images, so that is the batch)" if batch_size == n_train else ""
        raise ValueError(
            f"the global batch of {batch_size} images{smaller} does not split evenly over {self.world_size} processes: "
            f"batch_size counts images per SGD step over all processes, so set train_target.batch_size to a multiple "
            f"of {self.world_size} (e.g. {max(self.world_size, batch_size - batch_size % self.world_size)}), or launch "
            f"torchrun with a --nproc_per_node that divides it."
        )

    def local(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's contiguous shard of a global batch (dim 0)."""
        if not self.active:
            return batch
        size = batch.shape[0] // self.world_size
        return batch[self.rank * size : (self.rank + 1) * size]

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` under DDP (which first copies rank 0's parameters and buffers to every process)."""
        if not self.active:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def epoch_generator(self, shared: torch.Generator, epoch: int) -> torch.Generator:
        """The generator for the draws a process makes on its shard alone (a mode's own views).

        Alone, that is ``shared`` (single-process training as before). Under DDP the process's own
        generator and its dropout stream (torch's global RNG) are reseeded from (seed, epoch, rank):
        independent across processes, and restartable at any epoch without saved state.
        """
        if self._generator is None:
            return shared
        torch.default_generator.manual_seed(_stream_seed("dropout", self.seed, epoch, self.rank))
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(_stream_seed("dropout", self.seed, epoch, self.rank))
        self._generator.manual_seed(_stream_seed("mode", self.seed, epoch, self.rank))
        return self._generator

    def sum_(self, *tensors: torch.Tensor) -> None:
        """All-reduce each tensor in place to its sum over the processes."""
        if self.active:
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def mean_(self, tensor: torch.Tensor) -> None:
        """All-reduce ``tensor`` in place to its mean over the processes: for shard-mean losses of
        equal shards, the global batch's mean loss."""
        if self.active:
            self.sum_(tensor)
            tensor.div_(self.world_size)

    def agree(self, flag: bool, what: str) -> bool:
        """``flag``, after checking that every process sees the same value (e.g. that a checkpoint
        exists): processes that disagree would take different paths and deadlock in a collective."""
        if not self.active:
            return flag
        count = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        if int(count) not in (0, self.world_size):
            raise RuntimeError(
                f"processes disagree on {what}: {int(count)} of {self.world_size} say yes. Every process must see the "
                f"same files (run all processes on one machine, or put the path on a shared filesystem)."
            )
        return flag

    def from_main(self, obj: T) -> T:
        """Rank 0's ``obj`` on every process (a picklable object; for small per-epoch records)."""
        if not self.active:
            return obj
        box: list[Any] = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]
