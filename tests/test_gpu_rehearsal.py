"""The device check rehearsed end to end on CPU: `scripts/gpu_check.sh --rehearse` runs every small run, overflow run
and MFU run of the check (one process, as on the one-GPU device) under the ZeRO-on-CPU stand-ins (tests/zero_cpu.py)
at small sizes with the check's own settings, then the reference step, every judge and the JSON report. It must come
back ok with no skip; then defects planted in its recorded outputs must turn exactly their judges red (--replay judges
the recorded outputs again and reruns only the reference step, so the runs are shared)."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import gpu_check  # noqa: E402


def check_sh(*argv, timeout=900):
    env = dict(os.environ, PY=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def report(result):
    """(plan, check lines, summary) from the check's stdout."""
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    plan = next(line for line in lines if "plan" in line)
    return plan, [line for line in lines[:-1] if "plan" not in line], lines[-1]


def by_check(lines):
    found = {}
    for line in lines:
        found.setdefault(line["check"], {})[line.get("run", "")] = line
    return found


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("rehearsal") / "gc"
    result = check_sh("--rehearse", "--out", str(out))
    return out, result


def test_the_rehearsal_passes_every_check_with_nothing_skipped(rehearsal):
    out, result = rehearsal
    explain = f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-3000:]}"
    plan, lines, summary = report(result)
    assert result.returncode == 0 and summary["ok"], explain
    assert summary["skip"] == 0 and summary["fail"] == 0 and summary["not_tested"] == {}, explain
    assert plan["rehearsal"] and plan["not_tested"] == {} and plan["nproc"] == 1
    checks = by_check(lines)
    runs = [gpu_check.run_name(plugin, precision) for plugin, precision, _ in gpu_check.SMALL_RUNS]
    for name in ("step1_loss", "finite", "resume", "reload"):
        assert sorted(checks[name]) == sorted(runs), name
    assert sorted(checks["overflow"]) == ["gemini-fp16-overflow", "zero2-fp16-overflow"]
    assert sorted(checks["mfu"]) == ["mfu-1b", "mfu-7b"]
    for line in checks["mfu"].values():  # the bench at its tiny shape, every way measured
        assert line["shape"] == "tiny" and line["fast_checkpointing"] == "none" and line["old_checkpointing"] == "full"
        assert all(line[f"{way}_tokens_per_s_per_gpu"] > 0 and line[f"{way}_hfu"] >= line[f"{way}_mfu"] > 0
                   for way in gpu_check.MFU_WAYS)
        assert line["fast_vs_old"] == pytest.approx(line["fast_tokens_per_s_per_gpu"] / line["old_tokens_per_s_per_gpu"])
    assert checks["packing"][""]["flash_probe"]["ok"]
    # The resumes repeat the straight runs exactly; no small fp16 run skipped a step at the check's loss scale.
    assert all(line["max_abs_diff"] == 0.0 for line in checks["resume"].values())
    assert all(line["loss_scale_last"] == gpu_check.SMALL_LOSS_SCALE for run, line in checks["finite"].items()
               if run.endswith("fp16") and not run.startswith("ddp"))  # ddp's GradScaler is off on CPU
    assert set(summary["phase_seconds"]) == {phase for phase, _, _ in gpu_check.PHASES}
    # the trained logits are plain tensors (gemini's were ColoTensors, which weights_only loading refuses)
    logits = torch.load(out / "runs" / "gemini-fp16" / "logs" / "trained_logits.pt", weights_only=True)["logits"]
    assert type(logits) is torch.Tensor


def _edit_records(metrics: Path, step: int, change) -> None:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    for record in records:
        if record.get("step") == step and "loss" in record:
            change(record)
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_defects_planted_in_the_recorded_outputs_turn_exactly_their_judges_red(rehearsal, tmp_path):
    out, result = rehearsal
    assert result.returncode == 0, result.stdout[-3000:]
    copy = tmp_path / "gc"
    shutil.copytree(out, copy)
    runs = copy / "runs"
    # wrong logits: what final/ reloads to no longer matches what the trained model gave
    path = runs / "zero2-bf16" / "logs" / "trained_logits.pt"
    trained = torch.load(path, weights_only=True)
    torch.save({"logits": trained["logits"] + 1.0}, path)
    # a NaN step 1 (a skipped first step, as an overflowing loss scale gives)
    _edit_records(runs / "ddp-bf16" / "logs" / "metrics.jsonl", 1, lambda r: r.update(loss=math.nan))
    # a resume that does not repeat the straight run
    _edit_records(runs / "gemini-fp16-resumed" / "logs" / "metrics.jsonl", 6, lambda r: r.update(loss=r["loss"] + 1e-3))

    replay = check_sh("--rehearse", "--replay", "--out", str(copy), timeout=300)
    _, lines, summary = report(replay)
    assert replay.returncode == 1 and not summary["ok"], replay.stdout[-3000:] + replay.stderr[-3000:]
    assert summary["failed"] == ["finite:ddp-bf16", "reload:zero2-bf16", "resume:gemini-fp16",
                                 "step1_loss:ddp-bf16"]
    checks = by_check(lines)
    assert checks["reload"]["zero2-bf16"]["max_abs_diff"] > checks["reload"]["zero2-bf16"]["allowed"]
    assert "no finite loss logged at step 1" in checks["step1_loss"]["ddp-bf16"]["error"]
    assert checks["resume"]["gemini-fp16"]["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert summary["skip"] == 0
