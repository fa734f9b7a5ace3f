"""This process's random streams (torch CPU, every CUDA device, Python's `random`): seeded at launch, saved with each
checkpoint as JSON, restored on resume, or seeded afresh when the number of processes changed."""
from __future__ import annotations

import random
from typing import Any

import torch


def seed_rng(value: int) -> None:
    """Seed torch (CPU and every CUDA device) and Python's `random`."""
    random.seed(value)
    torch.manual_seed(value)


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG streams as JSON: torch CPU, every CUDA device, Python's `random`."""
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state().tolist(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def reseed_rng(seed: int, step: int, rank: int, world_size: int) -> None:
    """After a world-size change: an old rank's RNG streams cannot be a new rank's (there are more or fewer of them,
    and two ranks sharing one would draw the same dropout masks), so they are seeded with seed + rank + world_size *
    step: distinct across the new ranks, reproducible for a resume at this step, and never a seed of the fresh start
    (seed + rank, rank < world_size; training/launch.py)."""
    seed_rng(seed + rank + world_size * step)
