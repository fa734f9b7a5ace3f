"""A bad record deep in a file (past the start-up checks) ends the run on 2 processes with a checkpoint of the last
completed step; mending the file changes it, and the resume names the changed file before any step; with
accept_changed_files=True the resume reads that file again from its start and says how many lines it may re-read."""
import re
import shutil

from training.checkpoint import find_latest
from training.record_rules import CHECK_LINES
from training_runs import CORPUS, TINY_RUN, explain, read_metrics, tiny_model, torchrun  # noqa: F401

BAD_LINE = 20  # of zh/10001.jsonl, rank 0's zh file: past the CHECK_LINES the start-up reads


def test_bad_line_mid_run_leaves_a_checkpoint_and_a_changed_file_is_named_at_resume(tiny_model, tmp_path):
    assert BAD_LINE > CHECK_LINES
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS, corpus)
    bad_file = corpus / "zh" / "10001.jsonl"
    lines = bad_file.read_text(encoding="utf-8").splitlines(keepends=True)
    good = lines[BAD_LINE - 1]
    lines[BAD_LINE - 1] = good.replace('{"text":', '{"txet":', 1)
    bad_file.write_text("".join(lines), encoding="utf-8")
    out = tmp_path / "out"
    run = [*TINY_RUN, f"pretrain_data_root_dir={corpus}", f"init_model_path={tiny_model}", "max_steps=300",
           "saving_steps=100000", f"output_dir={out}", f"logdir={out}/logs"]

    failed = torchrun(run)
    assert failed.returncode != 0, explain(failed)
    assert "Traceback" not in failed.stdout, explain(failed)
    last = max(read_metrics(out / "logs"))
    saved = find_latest(out)
    assert saved is not None and saved.name.startswith(f"ckpt_step-{last}_"), (last, explain(failed))
    log0 = (out / "logs" / "log.txt.0").read_text()
    assert re.search(rf"error: DataError: .*{re.escape(str(bad_file))}, line {BAD_LINE}: .*; saved a checkpoint of step "
                     rf"{last}, the last completed step: {re.escape(str(saved))}", log0), log0[-3000:]
    assert "a record failed on another rank" in (out / "logs" / "log.txt.1").read_text()

    # Mended: the file differs from the one the checkpoint read, so the resume stops before any step and names it.
    lines[BAD_LINE - 1] = good
    bad_file.write_text("".join(lines), encoding="utf-8")
    resume = run[:-3] + [f"max_steps={last + 2}", "saving_steps=100000", f"output_dir={out}", f"logdir={out}/logs",
                         "recover_training_from_checkpoint=latest"]
    refused = torchrun(resume)
    assert refused.returncode != 0, explain(refused)
    assert f"set 'zh', file {bad_file} changed since the checkpoint (its first/last 64 KB differ" in refused.stdout, \
        explain(refused)
    assert max(read_metrics(out / "logs")) == last  # no step

    accepted = torchrun(resume + ["accept_changed_files=True"])
    assert accepted.returncode == 0, explain(accepted)
    assert re.search(r"set 'zh': accept_changed_files=True: 10001.jsonl changed since the checkpoint .* read again "
                     r"from its start; this may re-read up to [1-9]\d* line\(s\)", accepted.stdout), explain(accepted)
    assert max(read_metrics(out / "logs")) == last + 2
