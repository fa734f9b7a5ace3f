"""The files of a checkpoint: their names, JSON written durably (fsync) and read with a clear error, integrity checks
before a load, and disk problems put in words.

The engine's own files (optimizer, fp32 masters, loss scalers, schedule) are named here too, so that a checkpoint's
whole layout is in one place; training/checkpoint.py's docstring describes it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from llama.model_files import weight_file_problem

TMP_SUFFIX = ".tmp"
TRAINER_STATE = "trainer_state.json"
FINAL_DIR = "final"
DATA_STATE = "data_state.rank{rank}.json"
RNG_STATE = "rng_state.rank{rank}.json"
# The engine's state (training/engine/): one of the three optimizer entries, and what the plugin's save leaves out.
OPTIMIZER_DIR = "optimizer"  # ColossalAI's sharded save
OPTIMIZER_FILE = "optimizer.bin"  # one torch file (ddp on the CPU fallback)
NO_OPTIMIZER_STATE = "optimizer.none.json"  # no optimizer step had succeeded yet
MASTER_WEIGHTS = "master_weights.rank{rank}.safetensors"
LOSS_SCALER = "loss_scaler.json"
GRAD_SCALER = "grad_scaler.json"
SCHEDULER = "scheduler.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run; the message names the path."""


class DamagedCheckpointError(CheckpointError):
    """A file of a checkpoint is missing, cut short or unreadable: an earlier checkpoint may still be whole."""


def write_json(path: Path, obj: Any, compact: bool = False) -> None:
    """compact: one line, no spaces (the data and RNG states: long lists of ints, read by programs only)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, **({"separators": (",", ":")} if compact else {"indent": 1}))
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise DamagedCheckpointError(f"checkpoint file missing: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedCheckpointError(f"{path.name} is damaged (not valid JSON: {e})") from None


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def verify_files(path: Path) -> None:
    """Check that every safetensors and torch file of checkpoint `path` is whole before loading any, so that a
    damaged one is named (safetensors' own error does not say which file)."""
    for file in [*sorted(path.rglob("*.safetensors")), *sorted(path.rglob("*.bin"))]:
        problem = weight_file_problem(file)
        if problem:
            raise DamagedCheckpointError(f"{file.relative_to(path)} is damaged: {problem}")


def io_cause(exc: BaseException, directory: Path) -> str | None:
    """The disk or file problem behind `exc`, in words, or None when `exc` is not one (a bug keeps its traceback)."""
    chain, seen = [], exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = " | ".join(f"{type(e).__name__}: {e}" for e in chain)
    free = _free_space(directory)
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain) or re.search(
            r"No space left|StorageFull|os error 28|Disk quota", text):
        return f"no space left on the device ({free})"
    for e in chain:
        if isinstance(e, OSError):
            return f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''} ({free})"
    # torch's zip writer and reader and safetensors report disk errors without an errno.
    if re.search(r"PytorchStream(Writer|Reader) failed|file write failed|SafetensorError|central directory", text):
        first = next(str(e).strip().splitlines()[0] for e in reversed(chain) if str(e).strip())
        return f"{first} ({free})"
    return None


def _free_space(directory: Path) -> str:
    existing = next((p for p in [directory, *directory.parents] if p.exists()), None)
    if existing is None:
        return "free space unknown"
    free = shutil.disk_usage(existing).free
    return f"{free / 2**30:.2f} GiB free on the disk of {existing}"
