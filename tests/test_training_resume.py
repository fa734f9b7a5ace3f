"""Exact resume: 2N steps in one run == N steps, SIGKILL, resume for N more -- loss by loss, lr by lr, batch by
batch (fp32, CPU, 2 processes through torchrun, dropout on)."""
from training_runs import TINY_RUN, explain, read_batches, read_metrics, tiny_model, torchrun  # noqa: F401

N = 4


def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_model, tmp_path):
    run = TINY_RUN + [f"init_model_path={tiny_model}", f"max_steps={2 * N}", f"saving_steps={N}", "packing=True"]
    whole, split = tmp_path / "whole", tmp_path / "split"

    result = torchrun(run + [f"output_dir={whole}", f"logdir={whole}/logs"], env={"HARNESS_RECORD_BATCHES": "1"})
    assert result.returncode == 0, explain(result)

    killed = torchrun(run + [f"output_dir={split}", f"logdir={split}/logs"],
                      env={"HARNESS_RECORD_BATCHES": "1", "HARNESS_KILL_AFTER_SAVE": str(N)})
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr + killed.stdout, explain(killed)
    assert not (split / "final").exists()

    resumed = torchrun(run + [f"output_dir={split}", f"logdir={split}/logs", "recover_training_from_checkpoint=latest"],
                       env={"HARNESS_RECORD_BATCHES": "1"})
    assert resumed.returncode == 0, explain(resumed)
    assert f"resumed from {split}/ckpt_step-{N}_" in resumed.stdout

    expected, got = read_metrics(whole / "logs"), read_metrics(split / "logs")
    assert sorted(got) == sorted(expected) == list(range(1, 2 * N + 1))
    for step in expected:
        # Bit-exact: same data, same dropout masks, same optimizer state, same lr.
        assert got[step]["loss"] == expected[step]["loss"], f"step {step}"
        assert got[step]["lr"] == expected[step]["lr"], f"step {step}"
        assert got[step]["grad_norm"] == expected[step]["grad_norm"], f"step {step}"
    for rank in (0, 1):
        # No replay: the killed run handed out N batches, the resumed one the next N -- the uninterrupted 2N.
        assert read_batches(split / "logs", rank) == read_batches(whole / "logs", rank)
    assert len(set(read_batches(whole / "logs", 0)) & set(read_batches(whole / "logs", 1))) == 0

    # Both finals hold the same weights.
    from safetensors.torch import load_file

    def weights(model_dir):
        out = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = weights(whole / "final"), weights(split / "final")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
