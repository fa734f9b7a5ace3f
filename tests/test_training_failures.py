"""Failures: a non-finite loss skips the step and is counted; max_bad_steps in a row stops the run with the last good
checkpoint intact; SIGTERM saves a checkpoint and exits cleanly."""
import os
import signal
import time

import pytest

from training.checkpoint import find_latest
from training_runs import TINY_RUN, explain, read_metrics, tiny_model, torchrun  # noqa: F401


def test_nan_steps_are_skipped_then_too_many_stop_the_run(tiny_model, tmp_path):
    out = tmp_path / "skip"
    run = TINY_RUN + [f"init_model_path={tiny_model}", "max_steps=5", "saving_steps=100", f"output_dir={out}",
                      f"logdir={out}/logs"]
    result = torchrun(run, env={"HARNESS_NAN_STEPS": "3"})
    assert result.returncode == 0, explain(result)
    metrics = read_metrics(out / "logs")
    assert metrics[3]["skipped_steps"] == 1 and metrics[5]["skipped_steps_total"] == 1
    assert all(metrics[s]["skipped_steps"] == 0 for s in (1, 2, 4, 5))
    assert (out / "final").is_dir()

    out = tmp_path / "stop"
    run = TINY_RUN + [f"init_model_path={tiny_model}", "max_steps=10", "saving_steps=2", "max_bad_steps=3",
                      f"output_dir={out}", f"logdir={out}/logs"]
    result = torchrun(run, env={"HARNESS_NAN_STEPS": "3,4,5,6"})
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "3 consecutive steps with a non-finite loss" in output and "max_bad_steps=3" in output, explain(result)
    assert "Traceback" not in result.stdout
    latest = find_latest(out)
    assert latest is not None and latest.name.startswith("ckpt_step-2_"), sorted(p.name for p in out.iterdir())
    assert f"Last good checkpoint: {latest}" in output
    assert not (out / "final").exists()


@pytest.mark.parametrize("how", ["SIGTERM to torchrun", "Ctrl-C to the process group"])
def test_stop_signal_saves_a_checkpoint_and_exits_cleanly(tiny_model, tmp_path, how):
    out = tmp_path / "out"
    run = TINY_RUN + [f"init_model_path={tiny_model}", "max_steps=100000", "saving_steps=100000",
                      f"output_dir={out}", f"logdir={out}/logs"]
    proc = torchrun(run, wait=False)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (out / "logs" / "metrics.jsonl").exists():
            time.sleep(0.5)
        assert (out / "logs" / "metrics.jsonl").exists(), "training never started"
        if how.startswith("SIGTERM"):
            proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
        else:
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: launcher and workers all get it
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    name = "SIGTERM" if how.startswith("SIGTERM") else "SIGINT"
    log = (out / "logs" / "log.txt.0").read_text()
    assert f"stop requested ({name})" in log and "exiting cleanly" in log, output[-4000:]
    assert "exiting cleanly" in (out / "logs" / "log.txt.1").read_text()
    latest = find_latest(out)
    assert latest is not None, output[-4000:]
    step = int(latest.name.split("_")[1].split("-")[1])
    assert step == max(read_metrics(out / "logs"))  # saved at the step it stopped on
