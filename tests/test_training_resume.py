"""Exact resume: 2N steps in one run == N steps, SIGKILL, resume for N more -- loss by loss, lr by lr, batch by
batch (fp32, CPU, 2 processes through torchrun, dropout on)."""
from training_runs import (HELDOUT, TINY_RUN, explain, read_batches, read_metrics, tiny_model,  # noqa: F401
                           torchrun)

N = 4


def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_model, tmp_path):
    """Held-out evaluation is on in the uninterrupted run (steps 0, 3, 6, 8) and in the resumed half, off in the
    killed half: equal losses at steps 1-4 also show that evaluation changes nothing in training (RNG, data)."""
    run = TINY_RUN + [f"init_model_path={tiny_model}", f"max_steps={2 * N}", f"saving_steps={N}", "packing=True"]
    evaluation = [f"eval_data_root_dir={HELDOUT}", "eval_steps=3", "eval_samples_per_set=4"]
    whole, split = tmp_path / "whole", tmp_path / "split"

    result = torchrun(run + evaluation + [f"output_dir={whole}", f"logdir={whole}/logs"],
                      env={"HARNESS_RECORD_BATCHES": "1"})
    assert result.returncode == 0, explain(result)

    killed = torchrun(run + [f"output_dir={split}", f"logdir={split}/logs"],
                      env={"HARNESS_RECORD_BATCHES": "1", "HARNESS_KILL_AFTER_SAVE": str(N)})
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr + killed.stdout, explain(killed)
    assert not (split / "final").exists()

    resumed = torchrun(run + evaluation + [f"output_dir={split}", f"logdir={split}/logs",
                                           "recover_training_from_checkpoint=latest"],
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
    # The resumed run scores the same held-out tokens with the same weights: bit-exact per-set losses.
    whole_evals, resumed_evals = read_metrics(whole / "logs", kind="eval"), read_metrics(split / "logs", kind="eval")
    assert sorted(whole_evals) == [0, 3, 6, 8] and sorted(resumed_evals) == [6, 8]
    for step in (6, 8):
        assert resumed_evals[step]["eval"]["sets"] == whole_evals[step]["eval"]["sets"], f"step {step}"
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


def test_resume_with_a_longer_max_steps_follows_the_new_schedule(tiny_model, tmp_path):
    """Training on past the first run's max_steps: the lr continues on the new cosine, not the saved one's."""
    import torch

    from training.lr_schedule import WarmupCosineLR

    run = TINY_RUN + [f"init_model_path={tiny_model}", "saving_steps=2", f"output_dir={tmp_path}",
                      f"logdir={tmp_path}/logs"]
    first = torchrun(run + ["max_steps=4"], nproc=1)
    assert first.returncode == 0, explain(first)
    longer = torchrun(run + ["max_steps=8", "recover_training_from_checkpoint=latest"], nproc=1)
    assert longer.returncode == 0, explain(longer)
    assert "lr schedule rebuilt" in longer.stdout + longer.stderr

    settings = dict(arg.split("=", 1) for arg in TINY_RUN)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=float(settings["lr"]))
    schedule = WarmupCosineLR(optimizer, total_steps=8, warmup_steps=int(settings["warmup_steps"]),
                              min_lr=float(settings["min_lr"]))  # ColossalAI's values: tests/test_training_lr_schedule.py
    expected = []
    for _ in range(8):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    got = read_metrics(tmp_path / "logs")
    assert [got[step]["lr"] for step in range(5, 9)] == expected[4:]
