"""A 2-node job simulated on one machine: two torchrun launchers meet through c10d rendezvous on localhost. Ranks
are global (0 and 1, each local rank 0), the data is sharded by global rank, and the job trains and saves."""
import json

from training_runs import TINY_RUN, explain, free_port, read_batches, read_metrics, tiny_model, torchrun  # noqa: F401


def test_two_launchers_form_one_job(tiny_model, tmp_path):
    out = tmp_path / "out"
    run = TINY_RUN + [f"init_model_path={tiny_model}", "max_steps=3", "saving_steps=3", f"output_dir={out}",
                      f"logdir={out}/logs"]
    launcher = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}",
                "--rdzv_id=two-node-test"]
    nodes = [torchrun(run, launcher=launcher, env={"HARNESS_RECORD_BATCHES": "1"}, wait=False) for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-6000:]

    for rank in (0, 1):
        log = (out / "logs" / f"log.txt.{rank}").read_text()
        assert f"rank {rank} of 2 (local rank 0)" in log
    assert sorted(read_metrics(out / "logs")) == [1, 2, 3]

    # Each global rank read its own share: different files, different batches, and its own saved position.
    batches = [read_batches(out / "logs", rank) for rank in (0, 1)]
    assert len(batches[0]) == len(batches[1]) == 3 and not set(batches[0]) & set(batches[1])
    checkpoint = next(out.glob("ckpt_step-3_*"))
    states = [json.loads((checkpoint / f"data_state.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [s["rank"] for s in states] == [0, 1] and all(s["world_size"] == 2 for s in states)
    for name in states[0]["sets"]:
        assert states[0]["sets"][name]["file"] != states[1]["sets"][name]["file"], name
    assert (out / "final" / "config.json").exists()
