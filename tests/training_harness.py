"""Worker script for the training tests: runs a stage's DataProcessor through training.loop.train, with faults.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/training_harness.py key=value ...

Environment:
    HARNESS_STAGE             pretrain | task_instruct_tuning | alignment_sft (default pretrain)
    HARNESS_KILL_AFTER_SAVE   N: SIGKILL this process right after the step-N checkpoint is complete
    HARNESS_CRASH_DURING_SAVE N: SIGKILL rank 0 while the step-N checkpoint is being written (everything but
                              trainer_state.json is on disk)
    HARNESS_NAN_STEPS         "3,4": the model returns a NaN loss on these steps (1-based, every rank)
    HARNESS_DISK_FULL_AT_SAVE N: the disk is full while the step-N checkpoint is written: torch.save into it (the
                              optimizer, rank 0 on the CPU fallback) leaves an empty file and gets the kernel's
                              ENOSPC, by writing its bytes to /dev/full
    HARNESS_RECORD_BATCHES    1: append a hash of every batch to <logdir>/batches.rank<R>.jsonl
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import training.checkpoint as checkpoint  # noqa: E402
import training.loop as loop  # noqa: E402
from training.settings import load_settings  # noqa: E402


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def kill_after_save(step: int) -> None:
    original = loop.save_checkpoint

    def save_then_die(engine, data, state, *args, **kwargs):
        path = original(engine, data, state, *args, **kwargs)
        if state.step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    loop.save_checkpoint = save_then_die


def crash_during_save(step: int) -> None:
    original = checkpoint._write_json

    def write_or_die(path, obj):
        if path.name == checkpoint.TRAINER_STATE and f"ckpt_step-{step}_" in path.parent.name:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(path, obj)

    checkpoint._write_json = write_or_die


def disk_full_at_save(step: int) -> None:
    import torch

    original = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and f"ckpt_step-{step}_" in str(f):
            Path(f).touch()
            with open("/dev/full", "wb") as full:
                return original(obj, full, *args, **kwargs)
        return original(obj, f, *args, **kwargs)

    torch.save = save


def nan_at_steps(steps: set[int]) -> None:
    from llama.llama_model import Llama

    original = Llama.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        loss, logits = original(self, *args, **kwargs)
        if self.training and loss is not None:
            calls["n"] += 1
            if calls["n"] in steps:
                loss = loss * float("nan")
        return loss, logits

    Llama.forward = forward


def recording(data_processor_cls):
    class Recording(data_processor_cls):
        """Records every batch handed to the loop (not the ones prefetched behind it)."""

        def __iter__(self):
            return self

        def __next__(self):
            batch = super().__next__()
            digest = hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest()
            with open(Path(self._harness_logdir) / f"batches.rank{_rank()}.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"sha1": digest, "num_tokens": batch["num_tokens"]}) + "\n")
            return batch

    return Recording


def main() -> None:
    stage = os.environ.get("HARNESS_STAGE", "pretrain")
    main_module = importlib.import_module(f"{stage}_main")
    settings = load_settings(importlib.import_module(f"{stage}_args"), sys.argv[1:])
    data_processor_cls = main_module.DataProcessor
    if os.environ.get("HARNESS_KILL_AFTER_SAVE"):
        kill_after_save(int(os.environ["HARNESS_KILL_AFTER_SAVE"]))
    if os.environ.get("HARNESS_CRASH_DURING_SAVE"):
        crash_during_save(int(os.environ["HARNESS_CRASH_DURING_SAVE"]))
    if os.environ.get("HARNESS_DISK_FULL_AT_SAVE"):
        disk_full_at_save(int(os.environ["HARNESS_DISK_FULL_AT_SAVE"]))
    if os.environ.get("HARNESS_NAN_STEPS"):
        nan_at_steps({int(s) for s in os.environ["HARNESS_NAN_STEPS"].split(",")})
    if os.environ.get("HARNESS_RECORD_BATCHES"):
        data_processor_cls = recording(data_processor_cls)
        data_processor_cls._harness_logdir = settings.logdir
    loop.train(settings, data_processor_cls)


if __name__ == "__main__":
    main()
