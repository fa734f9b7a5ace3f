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
    # SIGUSR1's default action kills the process: a Slurm notice that arrives while the model loads (minutes at 7B)
    # is kept for the loop's StopRequest instead, which saves after the first step.
    signal.signal(signal.SIGUSR1, _save_requested_before_the_loop)
    return Run(rank, world_size, local_rank, device)


_early_save_request = False


def _save_requested_before_the_loop(signum, frame) -> None:
    global _early_save_request
    _early_save_request = True
    logger.warning("SIGUSR1 received during start-up: a checkpoint will be saved after the first step")


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
    """Signals the loop reads at the end of a step (every rank's, summed in the step's all-reduce):

    SIGTERM / SIGINT  stop: save a checkpoint if it fits the grace that is left, then exit cleanly. The grace is
                      `grace_seconds` from the first signal (torchrun SIGKILLs its workers 30 s after forwarding one;
                      a cluster's preemption notice may give more). The save fits when the last save of this run (or,
                      before one, the save of the checkpoint resumed from) took at most the grace left at the end of
                      the step; otherwise the run exits at once and names the checkpoint a resume will use. Before any
                      save has been timed the run tries: a save cut off by SIGKILL leaves only a .tmp, which is never
                      counted as a checkpoint, so trying can lose nothing.
    SIGUSR1           save a checkpoint at the end of this step, then go on (Slurm: --signal=B:USR1@<seconds>).

    Ctrl-C under torchrun reaches a worker twice at once (from the terminal, then forwarded by torchrun), so a repeat
    within ECHO_SECONDS is the same request. A later repeat means the user insists: the default handlers come back
    and the run is interrupted at once.
    """

    ECHO_SECONDS = 3.0

    def __init__(self, grace_seconds: float, last_save_seconds: float | None = None) -> None:
        self.grace_seconds = grace_seconds
        self.last_save_seconds = last_save_seconds  # the loop updates it after each save
        self.signal_name: str | None = None
        self._first_at = 0.0
        global _early_save_request
        self._save_requested, _early_save_request = _early_save_request, False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        self._previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._handle_save)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signal_name is None:
            self.signal_name, self._first_at = signal.Signals(signum).name, now
            last = ("no save timed yet: it will try" if self.last_save_seconds is None
                    else f"the last save took {self.last_save_seconds:.1f} s")
            logger.warning("%s received: after this step, a checkpoint if it fits the %.0f s of stop_grace_seconds "
                           "(%s), then exiting", self.signal_name, self.grace_seconds, last)
        elif now - self._first_at > self.ECHO_SECONDS:
            self.restore()
            raise KeyboardInterrupt

    def _handle_save(self, signum, frame) -> None:
        self._save_requested = True
        logger.warning("SIGUSR1 received: saving a checkpoint after this step, then going on")

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def take_save_request(self) -> bool:
        """Whether SIGUSR1 came since the last call."""
        requested, self._save_requested = self._save_requested, False
        return requested

    def grace_left(self) -> float:
        return self.grace_seconds - (time.monotonic() - self._first_at)

    def save_fits(self) -> bool:
        """Whether a stop may save (see the class docstring); True when no stop was requested on this rank."""
        if not self.requested or self.last_save_seconds is None:
            return True
        return self.last_save_seconds <= self.grace_left()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
