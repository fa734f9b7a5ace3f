"""Process launch: read torchrun's environment, join the process group, seed this rank, catch stop signals.

    torchrun --standalone --nproc_per_node=N <stage>_main.py ...           one node
    torchrun --nnodes=2 --node_rank=K --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT --nproc_per_node=N ...
A plain `python <stage>_main.py` runs as a single process (rank 0 of 1).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from training.rng_state import seed_rng

logger = logging.getLogger(__name__)


@dataclass
class Run:
    rank: int  # global rank: shards data files and lines across all nodes
    world_size: int
    local_rank: int  # GPU index on this node
    device: torch.device


def launch(seed: int) -> Run:
    """Join the job (nccl on GPU, gloo on CPU) and seed torch and Python per rank, so dropout differs across ranks
    and a resumed run can restore each rank's own stream."""
    if "RANK" not in os.environ:  # not under torchrun: a job of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        # 30 minutes: rank 0 may write a 7B checkpoint while the others wait in a barrier.
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    seed_rng(seed + rank)
    return Run(rank, world_size, local_rank, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank in the job; 0 outside a process group."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop reads it at the end of a step, saves a checkpoint and exits cleanly.

    Ctrl-C under torchrun reaches a worker twice at once (from the terminal, then forwarded by torchrun, which
    SIGKILLs workers still alive 30 s later), so a repeat within ECHO_SECONDS is the same request. A later repeat
    means the user insists: the default handlers come back and the run is interrupted at once.
    """

    ECHO_SECONDS = 3.0

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._first_at = 0.0
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signal_name is None:
            self.signal_name, self._first_at = signal.Signals(signum).name, now
            logger.warning("%s received: saving a checkpoint after this step, then exiting",
                           self.signal_name)
        elif now - self._first_at > self.ECHO_SECONDS:
            self.restore()
            raise KeyboardInterrupt

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
