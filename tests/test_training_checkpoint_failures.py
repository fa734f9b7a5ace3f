"""Checkpoint I/O failures on 2 processes: a disk that fills during a save and a truncated safetensors file at resume
each end every rank with one `error:` line that names the checkpoint, the cause and the checkpoint to resume from;
the previous checkpoint stays whole and is the one `latest` resumes from."""
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from training.checkpoint import find_latest, resolve_resume
from training.checkpoint_files import CheckpointError, io_cause, verify_files
from training_runs import TINY_RUN, explain, tiny_model, torchrun  # noqa: F401


def _error_lines(logdir) -> dict[int, list[str]]:
    """rank -> the `error:` lines of its log file."""
    return {int(path.name.rsplit(".", 1)[1]): [line for line in path.read_text().splitlines() if "error:" in line]
            for path in sorted(logdir.glob("log.txt.*"))}


def test_full_disk_and_truncated_file_end_every_rank_with_one_line(tiny_model, tmp_path):
    out = tmp_path / "out"
    run = TINY_RUN + [f"init_model_path={tiny_model}", "max_steps=3", "warmup_steps=1", "saving_steps=1",
                      "keep_checkpoints=3", f"output_dir={out}", f"logdir={out}/logs"]

    # The disk fills while rank 0 writes step 3's optimizer file; rank 1 waits in a barrier meanwhile.
    full = torchrun(run, env={"HARNESS_DISK_FULL_AT_SAVE": "3"})
    assert full.returncode != 0, explain(full)
    assert "Traceback" not in full.stdout, explain(full)
    step2 = find_latest(out)
    assert step2 is not None and step2.name.startswith("ckpt_step-2_"), sorted(p.name for p in out.iterdir())
    assert not list(out.glob("ckpt_step-3_*")), sorted(p.name for p in out.iterdir())  # the partial .tmp is gone
    verify_files(step2)  # whole
    assert resolve_resume("latest", out) == step2
    lines = _error_lines(out / "logs")
    assert sorted(lines) == [0, 1] and all(len(found) == 1 for found in lines.values()), lines
    for line in (found[0] for found in lines.values()):
        assert re.search(r"CheckpointError: saving \S+/ckpt_step-3_\S+ failed on rank 0: no space left on the "
                         r"device", line), line
        assert f"the last complete checkpoint is {step2}" in line and "recover_training_from_checkpoint=latest" in line

    # `latest` is step 2; with its model file cut short, the line names the file and the checkpoint before it.
    shard = next(step2.glob("model*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    damaged = torchrun(run + ["recover_training_from_checkpoint=latest"])
    assert damaged.returncode != 0, explain(damaged)
    assert "Traceback" not in damaged.stdout, explain(damaged)
    step1 = next(out.glob("ckpt_step-1_*"))
    lines = _error_lines(out / "logs")
    for rank in (0, 1):
        assert len(lines[rank]) == 2, lines  # one line per run
        line = lines[rank][-1]
        assert f"cannot resume from {step2} (rank {rank}): {shard.name} is damaged" in line, line
        assert f"recover_training_from_checkpoint={step1}" in line, line
    assert step1.is_dir() and step2.is_dir()  # a failed resume deletes nothing


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a device that is always full")
def test_each_writers_full_disk_error_is_named(tmp_path):
    """The errors torch.save and safetensors really raise on a full disk; torch's carries no errno, so the line
    quotes it with the free space instead."""
    with pytest.raises(Exception) as torch_error:
        torch.save({"w": torch.zeros(4096)}, "/dev/full")
    cause = io_cause(torch_error.value, tmp_path)
    assert "PytorchStreamWriter failed writing file" in cause and "free on the disk of" in cause
    with pytest.raises(Exception) as safetensors_error:
        save_file({"w": torch.zeros(4096)}, "/dev/full")
    assert io_cause(safetensors_error.value, tmp_path).startswith("no space left on the device")
    assert io_cause(ValueError("a bug"), tmp_path) is None  # not a disk problem: keeps its traceback


def test_a_torch_file_cut_short_is_named(tmp_path):
    torch.save({"state": torch.ones(1000)}, tmp_path / "optimizer.bin")
    verify_files(tmp_path)
    data = (tmp_path / "optimizer.bin").read_bytes()
    (tmp_path / "optimizer.bin").write_bytes(data[:len(data) - 100])
    with pytest.raises(CheckpointError, match="optimizer.bin is damaged: not a whole torch file"):
        verify_files(tmp_path)
