"""Several processes, one run: the world a launcher (torchrun, ``accelerate launch``) starts us in.

A launcher sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and the rendezvous (``MASTER_ADDR``/``PORT``);
with ``WORLD_SIZE`` above 1, :func:`world_from_env` joins the process group: ``gloo`` on CPUs, ``nccl``
when the run's device is CUDA (each rank on ``LOCAL_RANK``'s GPU), with a ``gloo`` group beside it
for the few small messages ranks exchange (the run's id, the batch size). No activations travel
through collectives: each rank writes its batches to the shared activation store, and rank 0 reads
them from there (see :mod:`tokenprobe.extract.peers`).

Which batches a rank runs is decided by the batch's number alone (``number % size == rank``), never
by a sampler that pads or reorders, so every batch is run exactly once and the store a run ends with
is the same whatever the world size.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from tokenprobe.errors import TokenprobeError

T = TypeVar("T")

# How long collectives wait (rank 0 loading and preparing first, the others after it): generous,
# because a first load converts the model; a dead rank is found sooner by its heartbeat (peers.py).
GROUP_TIMEOUT_S = 3 * 3600
RANK_TIMEOUT_ENV = "TOKENPROBE_RANK_TIMEOUT"  # seconds without a heartbeat before a rank counts as lost
DEFAULT_RANK_TIMEOUT_S = 300.0


def launched_processes() -> int:
    """WORLD_SIZE as a launcher set it (1 when unset); reads the environment only (no torch)."""
    return _env_int("WORLD_SIZE") or 1


def refuse_distributed(what: str) -> None:
    """Commands other than `train` run in one process: under a launcher each rank would do the whole job."""
    if launched_processes() > 1:
        raise TokenprobeError(f"{what} runs in one process; only `train` splits its forward pass over several: start it "
                              "without torchrun (or unset WORLD_SIZE)")


def rank_timeout() -> float:
    value = os.environ.get(RANK_TIMEOUT_ENV, "")
    try:
        seconds = float(value) if value else DEFAULT_RANK_TIMEOUT_S
    except ValueError:
        raise TokenprobeError(f"{RANK_TIMEOUT_ENV}={value!r} is not a number of seconds; unset it or give one") from None
    if seconds <= 0:
        raise TokenprobeError(f"{RANK_TIMEOUT_ENV} must be a positive number of seconds, not {value}")
    return seconds


@dataclass
class World:
    """This process's place among the run's processes (one process: rank 0 of 1)."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_size: int = 1
    backend: str | None = None
    run_id: str = ""  # the same on every rank: names the log folder
    log_dir: Path | None = None  # where ranks other than 0 write their output (set by the CLI)
    gpu: int | None = None  # the CUDA device this rank runs on (None: the CPU, or a --device-map)
    _control: Any = None  # the gloo group small messages go through (None: the default group, itself gloo)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def owns(self, batch_number: int) -> bool:
        """Whether this rank runs the plan's batch of this number (0, 1, 2, ... in plan order)."""
        return batch_number % self.size == self.rank

    def broadcast(self, value: T) -> T:
        """Rank 0's `value`, on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def gather(self, value: T) -> list[T]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value, group=self._control)
        return values

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self._control)

    def first_then_others(self, work: Callable[[], T]) -> T:
        """Runs `work` on rank 0, then on the other ranks: what rank 0 writes to the cache (the model's
        ready copy, the tokenized corpus), the others read instead of writing it at the same time."""
        if self.main:
            value = work()
            self.barrier()
            return value
        self.barrier()
        return work()

    def record(self) -> dict[str, Any]:
        return {"world_size": self.size, "backend": self.backend, "processes_per_node": self.local_size}

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise TokenprobeError(f"{name}={value!r} is not a whole number; launch with torchrun or accelerate launch, "
                              "which set it") from None


def world_from_env(device: str = "auto", device_map: Any = None) -> World:
    """The world a launcher set up (WORLD_SIZE > 1: the process group is joined here), or one process.

    On CUDA each rank takes LOCAL_RANK's GPU, or the one GPU it sees when the launcher gave each process its
    own (CUDA_VISIBLE_DEVICES); with `device_map` the rank's model goes where the map puts it."""
    size = launched_processes()
    if size <= 1:
        return World()
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    missing = [name for name, value in (("RANK", rank), ("MASTER_ADDR", os.environ.get("MASTER_ADDR")),
                                        ("MASTER_PORT", os.environ.get("MASTER_PORT"))) if value is None]
    if missing:
        raise TokenprobeError(f"WORLD_SIZE is {size} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                              "not set; launch the processes with torchrun (or accelerate launch), or unset WORLD_SIZE "
                              "for one process")
    rank_timeout()  # a bad TOKENPROBE_RANK_TIMEOUT is said now, not after the model has loaded
    local_rank = rank if local_rank is None else local_rank
    local_size = _env_int("LOCAL_WORLD_SIZE") or 1
    import torch
    import torch.distributed as dist

    from tokenprobe.device import resolve_device

    if not dist.is_available():
        raise TokenprobeError("this PyTorch build has no torch.distributed; run one process (unset WORLD_SIZE)")
    on_cuda = resolve_device(device).type == "cuda"
    gpu = None
    if on_cuda:
        if ":" in str(device):
            raise TokenprobeError(f"--device {device} would put every rank on one GPU; use --device cuda (each rank "
                                  "takes LOCAL_RANK's GPU) or --device-map")
        count = torch.cuda.device_count()
        gpu = local_rank if local_rank < count else 0 if count == 1 else None
        if gpu is None and device_map is None:
            raise TokenprobeError(f"LOCAL_RANK {local_rank} has no GPU: this node shows {count}; start at most that "
                                  "many processes per node, or give each its own with CUDA_VISIBLE_DEVICES")
        if device_map is None:
            torch.cuda.set_device(gpu)
    backend = "nccl" if on_cuda else "gloo"
    timeout = datetime.timedelta(seconds=GROUP_TIMEOUT_S)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    else:
        backend = str(dist.get_backend())  # the caller's group (an Accelerator's, say)
    # Small messages go through gloo: its collectives take CPU objects and time out cleanly.
    control = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    world = World(size=size, rank=rank, local_rank=local_rank, local_size=local_size, backend=backend,
                  gpu=gpu if device_map is None else None, _control=control)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    world.run_id = world.broadcast(f"{stamp}-{socket.gethostname()}-{os.getpid()}")
    return world


def device_for(world: World, device: str) -> str:
    """The device a rank runs on: ``cuda`` (or ``auto`` on a CUDA machine) means the rank's own GPU."""
    return f"cuda:{world.gpu}" if world.distributed and world.gpu is not None else device
