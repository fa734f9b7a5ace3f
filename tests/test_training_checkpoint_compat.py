"""A checkpoint written by an earlier version of this code (tests/fixtures/old_checkpoint/, made by
tests/fixtures/make_old_checkpoint.py) still resumes, exactly: the resumed steps equal an uninterrupted run's from
the same starting model, loss by loss, lr by lr, batch by batch (fp32, CPU, 2 processes, dropout on)."""
import shutil

from fixtures.make_old_checkpoint import FIXTURE, INIT_MODEL, MAX_STEPS, RESUME_STEP, SETTINGS, checkpoint_dir
from training_runs import TINY_RUN, explain, read_batches, read_metrics, torchrun


def test_old_checkpoint_resumes_as_an_uninterrupted_run(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "fixture")  # a resume writes beside nothing of the repo's
    old = checkpoint_dir(tmp_path / "fixture")
    run = TINY_RUN + SETTINGS + [f"init_model_path={tmp_path / 'fixture' / INIT_MODEL}"]
    whole, resumed_dir = tmp_path / "whole", tmp_path / "resumed"
    straight = torchrun(run + [f"output_dir={whole}", f"logdir={whole}/logs"], env={"HARNESS_RECORD_BATCHES": "1"})
    assert straight.returncode == 0, explain(straight)
    resumed = torchrun(run + [f"output_dir={resumed_dir}", f"logdir={resumed_dir}/logs",
                              f"recover_training_from_checkpoint={old}"], env={"HARNESS_RECORD_BATCHES": "1"})
    assert resumed.returncode == 0, explain(resumed)
    assert f"resumed from {old} at step {RESUME_STEP}" in resumed.stdout

    expected, got = read_metrics(whole / "logs"), read_metrics(resumed_dir / "logs")
    assert sorted(got) == list(range(RESUME_STEP + 1, MAX_STEPS + 1))
    for step in got:
        for key in ("loss", "lr", "grad_norm"):
            assert got[step][key] == expected[step][key], f"step {step} {key}"
    for rank in (0, 1):
        batches = read_batches(resumed_dir / "logs", rank)
        assert batches == read_batches(whole / "logs", rank)[RESUME_STEP:] and batches
