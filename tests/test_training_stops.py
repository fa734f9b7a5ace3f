"""Stops on 2 processes: SIGUSR1 to one worker saves a checkpoint on every rank and training goes on; a SIGTERM
whose grace (stop_grace_seconds) the last save does not fit exits at once, without a save, and names the checkpoint
a resume will use."""
import os
import re
import signal
import time

import psutil

from training.checkpoint import find_latest, resolve_resume
from training_runs import TINY_RUN, read_metrics, tiny_model, torchrun  # noqa: F401


def _wait_for(condition, what: str, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _step_of(path) -> int:
    return int(re.match(r"ckpt_step-(\d+)_", path.name).group(1))


def test_sigusr1_saves_and_goes_on_then_a_stop_without_time_exits_naming_the_checkpoint(tiny_model, tmp_path):
    out = tmp_path / "out"
    metrics_file = out / "logs" / "metrics.jsonl"
    run = TINY_RUN + [f"init_model_path={tiny_model}", "max_steps=100000", "saving_steps=100000",
                      "stop_grace_seconds=0", f"output_dir={out}", f"logdir={out}/logs"]
    proc = torchrun(run, wait=False)
    try:
        _wait_for(metrics_file.exists, "the first step")
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2, workers
        workers[-1].send_signal(signal.SIGUSR1)  # one worker only: its request reaches every rank
        _wait_for(lambda: find_latest(out) is not None, "the SIGUSR1 checkpoint")
        saved = find_latest(out)
        _wait_for(lambda: max(read_metrics(out / "logs")) > _step_of(saved) + 2, "training to go on")
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    log = (out / "logs" / "log.txt.0").read_text()
    assert f"save requested (SIGUSR1): checkpoint saved at step {_step_of(saved)}, training goes on" in log, log[-3000:]
    assert re.search(rf"saved checkpoint {re.escape(str(saved))} \(\d+\.\d\d GiB in \d+\.\d s\)", log), log[-3000:]
    # Stopped later, with no time to save (the grace is 0 s and a save has been timed): no new checkpoint, and the
    # line names the one a resume uses.
    assert max(read_metrics(out / "logs")) > _step_of(saved)
    assert find_latest(out) == saved, sorted(p.name for p in out.iterdir())
    assert not list(out.glob("*.tmp")) and not (out / "final").exists()
    assert re.search(rf"stop requested \(SIGTERM\) at step \d+: no checkpoint, since the last save took \d+\.\d s, "
                     rf"more than the grace left of stop_grace_seconds=0.*recover_training_from_checkpoint=latest "
                     rf"will use {re.escape(str(saved))} \(step {_step_of(saved)}\)", log), log[-3000:]
    assert resolve_resume("latest", out) == saved


def test_a_sigusr1_during_start_up_is_kept_for_the_first_step():
    """launch() installs the start-up handler: SIGUSR1 while the model loads neither kills the worker (its default
    action) nor is lost; the loop's StopRequest takes it once."""
    from training import launch

    previous = signal.signal(signal.SIGUSR1, launch._save_requested_before_the_loop)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        stop = launch.StopRequest(25.0)
        try:
            assert stop.take_save_request() and not stop.take_save_request()
        finally:
            stop.restore()
        again = launch.StopRequest(25.0)
        again.restore()
        assert not again.take_save_request()
    finally:
        signal.signal(signal.SIGUSR1, previous)
