"""Checkpoints: "latest" only sees complete ones, a crash mid-save leaves the previous one in charge, RNG round trip,
and the layout a checkpoint promises (a loadable model dir plus the resume state)."""
import json
import logging
import random
import re

import pytest
import torch

from training.checkpoint import checkpoint_name, find_latest, remove_leftovers, resolve_resume, set_aside_newer
from training.checkpoint_files import CheckpointError
from training.rng_state import capture_rng_state, restore_rng_state
from training_runs import TINY_RUN, explain, read_metrics, tiny_model, torchrun  # noqa: F401


def _fake_checkpoint(root, step, complete=True, tmp=False):
    path = root / (checkpoint_name(step, 1.5) + (".tmp" if tmp else ""))
    path.mkdir(parents=True)
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    return path


def test_latest_ignores_tmp_and_incomplete_and_sorts_by_number(tmp_path):
    assert find_latest(tmp_path / "nothing-here") is None
    _fake_checkpoint(tmp_path, 9)
    ten = _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path, 11, tmp=True)  # a save that never finished
    _fake_checkpoint(tmp_path, 12, complete=False)  # renamed dirs always have the marker; be safe anyway
    (tmp_path / "final").mkdir()
    assert find_latest(tmp_path) == ten  # 10 > 9 numerically, not as text
    assert resolve_resume("latest", tmp_path) == ten
    assert resolve_resume("", tmp_path / "empty") is None
    assert resolve_resume("latest", tmp_path / "empty") is None  # "latest" with nothing yet: a fresh start
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        resolve_resume(str(tmp_path / "missing"), tmp_path)
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(str(tmp_path / (checkpoint_name(11, 1.5) + ".tmp")), tmp_path)
    assert checkpoint_name(3, float("nan")) == "ckpt_step-3_loss-nan"


def test_latest_without_a_checkpoint_warns_and_names_the_leftovers(tmp_path, caplog):
    _fake_checkpoint(tmp_path, 7, tmp=True)  # a save cut off: everything but its rename
    with caplog.at_level(logging.INFO, logger="training.checkpoint"):
        assert resolve_resume("latest", tmp_path) is None  # still a fresh start, so a job script can restart itself
        remove_leftovers(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "starting FRESH" in warnings[0] and "ckpt_step-7_loss-1.5000.tmp" in warnings[0], warnings
    assert "never counted as a checkpoint; removed" in warnings[1], warnings
    assert not list(tmp_path.iterdir())


def test_fresh_start_into_a_used_output_dir_is_refused(tmp_path):
    _fake_checkpoint(tmp_path, 5000)
    with pytest.raises(CheckpointError, match="already holds checkpoints.*recover_training_from_checkpoint=latest"):
        resolve_resume("", tmp_path)


def test_resuming_an_earlier_checkpoint_sets_later_ones_aside(tmp_path):
    two, _, _ = (_fake_checkpoint(tmp_path, step) for step in (2, 4, 6))
    moved = set_aside_newer(tmp_path, 2)
    assert sorted(p.name.split(".abandoned-")[0] for p in moved) == [checkpoint_name(4, 1.5), checkpoint_name(6, 1.5)]
    assert all(p.exists() for p in moved)  # renamed, not deleted
    assert find_latest(tmp_path) == two


def test_rng_state_round_trips_through_json():
    torch.manual_seed(1)
    random.seed(2)
    state = json.loads(json.dumps(capture_rng_state()))
    expected = (torch.rand(3), random.random())
    restore_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_crash_while_saving_keeps_the_previous_checkpoint(tiny_model, tmp_path):
    out = tmp_path / "out"
    run = TINY_RUN + [f"init_model_path={tiny_model}", "max_steps=6", "saving_steps=2", "keep_checkpoints=2",
                      f"output_dir={out}", f"logdir={out}/logs"]
    crashed = torchrun(run, env={"HARNESS_CRASH_DURING_SAVE": "4"})
    assert crashed.returncode != 0, explain(crashed)
    names = sorted(p.name for p in out.iterdir())
    # Everything of step 4 but its trainer_state.json was written: still a .tmp, not a checkpoint.
    step4 = [n for n in names if n.startswith("ckpt_step-4_")]
    assert len(step4) == 1 and step4[0].endswith(".tmp"), names
    assert (out / step4[0] / "model.safetensors.index.json").exists()
    latest = find_latest(out)
    assert latest is not None and latest.name.startswith("ckpt_step-2_")

    # The layout of a complete checkpoint: a loadable model dir plus everything resume needs.
    files = {p.name for p in latest.iterdir()}
    assert {"config.json", "tokenizer.model", "model.safetensors.index.json", "optimizer.bin", "scheduler.json",
            "data_state.rank0.json", "data_state.rank1.json", "rng_state.rank0.json", "rng_state.rank1.json",
            "trainer_state.json"} <= files
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["world_size"] == 2 and state["tokens_seen"] > 0
    assert state["settings"]["saving_steps"] == 2  # the resolved settings travel with the checkpoint
    from llama.llama_model import Llama

    Llama.from_pretrained(latest)  # usable as the next stage's init_model_path

    resumed = torchrun(run + ["recover_training_from_checkpoint=latest"])
    assert resumed.returncode == 0, explain(resumed)
    assert "resumed from" in resumed.stdout and "ckpt_step-2_" in resumed.stdout
    # The next start names the leftover, says it never counted, and removes it before any step.
    log = (out / "logs" / "log.txt.0").read_text().split("resumed from")[0]
    assert re.search(rf"WARNING.*leftover {re.escape(str(out / step4[0]))} \(\d+\.\d+ GiB, no trainer_state.json\): "
                     rf"a save that did not finish, never counted as a checkpoint; removed", log), log[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert not any(n.endswith(".tmp") for n in names), names
    steps = sorted(int(n.split("_")[1].split("-")[1]) for n in names if n.startswith("ckpt_step-"))
    assert steps == [4, 6], names  # keep_checkpoints=2
    assert (out / "final" / "config.json").exists()
    assert max(read_metrics(out / "logs")) == 6
