"""scripts/gpu_check.py on CPU: its judges, its plan and its JSON report, driven through a stub runner that answers
each job with recorded output; and gpu_check_device.py's own train + reference steps on the CPU fallback."""
import json
import math
import sys
from pathlib import Path

import pytest

from training_runs import REPO, explain, tiny_model, torchrun  # noqa: F401

sys.path.insert(0, str(REPO / "scripts"))
import gpu_check  # noqa: E402
from gpu_check import Outcome  # noqa: E402

FACTS = {"torch": "2.11.0+cu130", "cuda": "13.0", "gpus": 1, "cpus": 16, "nvcc": "/usr/local/cuda/bin/nvcc",
         "python": "3.12.3", "toolchain_problem": None, "gpu_name": "NVIDIA H200", "gpu_memory_gb": 150.8,
         "capability": "9.0", "bf16": True, "colossalai": "0.5.0"}
REF_LOSS, RANDOM_LOSS = 18.2, 10.4


def record(step, loss, skipped=0, grad_norm=1.5, loss_scale=None, **extra):
    r = {"step": step, "loss": loss, "lr": 5e-4, "grad_norm": grad_norm if not skipped else math.nan,
         "tokens_per_s": 9000.0, "tokens_per_s_per_gpu": 9000.0, "tflops_per_gpu": 1.0, "skipped_steps": skipped,
         "skipped_steps_total": skipped}
    if loss_scale is not None:
        r["loss_scale"] = loss_scale
    return {**r, **extra}


def straight_records(precision, first_loss=REF_LOSS):
    scale = 65536.0 if precision == "fp16" else None
    return [record(s, first_loss - 0.1 * (s - 1), loss_scale=scale) for s in range(1, 9)]


def bench_line(shape, fast=1.6, old=1.0, hf=1.2):
    """bench/gpu_throughput.py's JSON line for one shape: tokens/s in units of 10,000, MFU from them."""
    def way(rate, checkpointing):
        return {"tokens_per_s_per_gpu": rate * 1e4, "mfu": 0.3 * rate, "hfu": 0.3 * rate * 1.1,
                "peak_memory_gb": 60.0, "checkpointing": checkpointing}
    line = {"shape": shape, "layers": 22, "seq": 2048, "batch_size": 8, "gpu": "NVIDIA H200", "note": "",
            "ways": {"fast": way(fast, "none"), "old": way(old, "full"), "transformers": way(hf, "none")}}
    return {**line, "ours_vs_transformers": fast / hf, "fast_vs_old": fast / old}


def overflow_records(recovers=True):
    records = [record(s, math.nan, skipped=1, loss_scale=2.0 ** (24 - s)) for s in range(1, 11)]
    return records + [record(s, 17.0, skipped=0 if recovers else 1, loss_scale=2.0 ** 14) for s in range(11, 31)]


class StubRunner:
    """Answers every job at once with recorded output, leaving the files a real run leaves (metrics.jsonl, the
    step-4 checkpoint dir). `metrics` and `answers` override the recorded defaults per job name."""

    def __init__(self, facts=None, metrics=None, answers=None):
        self.facts = facts or FACTS
        self.metrics = metrics or {}
        self.answers = answers or {}
        self.commands: dict[str, list[str]] = {}

    def start(self, job):
        command = job.command()
        self.commands[job.name] = command
        rc, text = self.answers.get(job.name) or self.answer(job, command)
        return _Done(Outcome(rc, text, 1.0))

    def answer(self, job, command):
        if job.name == "facts":
            return 0, json.dumps(self.facts)
        if job.name == "kernels":
            return 0, json.dumps({"ok": True, "seconds": 95.0})
        if job.name == "reference":
            spec = json.loads(Path(command[-1]).read_text())
            runs = {r["name"]: {"ref_loss": REF_LOSS, "random_init_loss": RANDOM_LOSS,
                                "reload": {"max_abs_diff": 0.0, "train_change": 2.5}} for r in spec["runs"]}
            return 0, json.dumps({"runs": runs, "flash": {"ok": True, "max_abs_diff_vs_math": 0.01}})
        if job.name.startswith("mfu-"):
            return 0, "compiling...\n" + json.dumps(bench_line(job.name[len("mfu-"):])) + "\n"
        if job.logdir is None:  # models
            return 0, "wrote model\n"
        settings = dict(a.split("=", 1) for a in command if "=" in a and not a.startswith("--"))
        records = self.metrics.get(job.name)
        if records is None:
            if job.name.endswith("-overflow"):
                records = overflow_records()
            elif job.name.endswith("-resumed"):
                straight = self.metrics.get(job.name[:-len("-resumed")]) or straight_records(settings["precision"])
                records = [r for r in straight if r["step"] > 4]
            else:
                records = straight_records(settings["precision"])
        if not job.name.endswith(("-overflow", "-resumed")):
            (Path(settings["output_dir"]) / "ckpt_step-4_loss-17.9000").mkdir(parents=True)
        job.logdir.mkdir(parents=True, exist_ok=True)
        (job.logdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return 0, "finished\n"


class _Done:
    def __init__(self, outcome):
        self.outcome = outcome

    def poll(self):
        return self.outcome


def run_check(tmp_path, capsys, runner, *argv, with_plan=False):
    """(exit code, the check lines, the summary), and the plan line first when `with_plan`."""
    code = gpu_check.main(["--out", str(tmp_path / "gc"), "--python", "python3", *argv], runner=runner)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    plans = [line for line in lines if "plan" in line]
    checks = [line for line in lines[:-1] if "plan" not in line]
    return (code, checks, lines[-1], plans[0] if plans else None) if with_plan else (code, checks, lines[-1])


def by_check(lines):
    found = {}
    for line in lines:
        found.setdefault(line["check"], {})[line.get("run", "")] = line
    return found


def test_recorded_passing_outputs_give_one_passing_line_per_check_and_a_summary(tmp_path, capsys):
    runner = StubRunner()
    code, lines, summary = run_check(tmp_path, capsys, runner)
    checks = by_check(lines)
    runs = ["gemini-fp16", "gemini-bf16", "zero2-bf16", "zero2-fp16", "ddp-bf16", "ddp-fp16"]
    for name in ("step1_loss", "finite", "resume", "reload"):
        assert sorted(checks[name]) == sorted(runs), name
    assert sorted(checks["overflow"]) == ["gemini-fp16-overflow", "zero2-fp16-overflow"]
    assert sorted(checks["mfu"]) == ["mfu-1b", "mfu-7b"]
    assert all(line["status"] == "pass" for line in lines), [line for line in lines if line["status"] != "pass"]
    assert code == 0 and summary["ok"] and (summary["pass"], summary["fail"], summary["skip"]) == (len(lines), 0, 0)
    assert summary["unplanned_skips"] == [] and summary["not_tested"] == {} and "mfu-7b" in summary["tested"]["runs"]
    # The report file holds the plan, the same lines and the summary; a resume starts from the straight run's step-4
    # checkpoint; the MFU runs are the bench, one shape each.
    report = [json.loads(line) for line in (tmp_path / "gc" / "gpu_check.jsonl").read_text().splitlines()]
    assert [line for line in report if "plan" not in line] == [*lines, summary]
    assert any(a.startswith("recover_training_from_checkpoint=") and a.endswith("ckpt_step-4_loss-17.9000")
               for a in runner.commands["zero2-bf16-resumed"])
    for shape in ("1b", "7b"):
        assert runner.commands[f"mfu-{shape}"][1:4] == [str(gpu_check.BENCH), "--shapes", shape]
    assert f"initial_loss_scale={gpu_check.SMALL_LOSS_SCALE}" in runner.commands["zero2-fp16"]
    assert checks["step1_loss"]["zero2-bf16"]["logged"] == REF_LOSS
    # Order: zero2 and ddp (while the kernels build), gemini, the reference, MFU 1B, MFU 7B.
    order = list(runner.commands)
    assert order.index("kernels") < order.index("zero2-bf16") < order.index("ddp-fp16-resumed") < \
        order.index("gemini-fp16") < order.index("gemini-fp16-resumed") < order.index("reference") < \
        order.index("mfu-1b") < order.index("mfu-7b") == len(order) - 1


def test_the_plan_fits_one_call_and_names_each_phase_budget(tmp_path, capsys):
    _, _, summary, plan = run_check(tmp_path, capsys, StubRunner(), with_plan=True)
    phases = {p["phase"]: p["budget_s"] for p in plan["phases"]}
    assert list(phases) == ["facts", "small", "gemini", "reference", "mfu-1b", "mfu-7b"]
    assert all(p["basis"] for p in plan["phases"]) and plan["optional"] == {"mfu-7b": gpu_check.OPTIONAL["mfu-7b"]}
    # Without the optional 7B the phases fit the budget; the budget and ~25 s of wheel install fit one 420 s call.
    assert sum(phases.values()) - phases["mfu-7b"] <= plan["budget_s"] <= 420 - 25
    assert set(summary["phase_seconds"]) == set(phases)


def test_a_skip_the_plan_did_not_state_fails_the_check(tmp_path, capsys):
    """The MFU 7B run is optional (stated in the plan); a zero2 run cut by the time budget is not."""
    now = [0.0]

    class Slow(StubRunner):
        def start(self, job):
            now[0] += 60 if job.name.startswith("ddp") else 1  # each ddp run takes a minute
            return super().start(job)

    code = gpu_check.main(["--out", str(tmp_path / "gc"), "--python", "python3", "--budget-s", "200"],
                          runner=Slow(), clock=lambda: now[0])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    summary, checks = lines[-1], by_check([line for line in lines[:-1] if "plan" not in line])
    assert checks["mfu"]["mfu-7b"]["status"] == "skip" and checks["mfu"]["mfu-7b"]["planned"]
    cut = [name for name in summary["unplanned_skips"] if name.startswith(("resume:ddp", "mfu:mfu-1b"))]
    assert cut and code == 1 and not summary["ok"] and summary["fail"] == 0
    assert "mfu:mfu-7b" not in summary["unplanned_skips"] and "mfu:mfu-7b" in summary["not_tested"]


def test_without_a_toolchain_the_plan_states_gemini_untested_and_the_rest_runs(tmp_path, capsys):
    problem = "CUDA_HOME is not set and no nvcc is on PATH"
    runner = StubRunner(facts={**FACTS, "nvcc": None, "toolchain_problem": problem})
    code, lines, summary, plan = run_check(tmp_path, capsys, runner, with_plan=True)
    checks = by_check(lines)
    stated = f"{problem}: gemini and HybridAdam not testable on this image"
    assert plan["not_tested"]["gemini"] == stated and "mfu-7b" not in plan["not_tested"]  # the bench needs no gemini
    gemini = [line for line in lines if line.get("run", "").startswith("gemini")]
    assert gemini and all(line["status"] == "skip" and line["planned"] for line in gemini)
    assert checks["kernels"][""]["status"] == "skip" and problem in checks["kernels"][""]["planned"]
    assert not any(name.startswith("gemini") or name == "kernels" for name in runner.commands)
    others = [line for line in lines if line not in gemini and line["check"] != "kernels"]
    assert all(line["status"] == "pass" for line in others)  # packing too: zero2 and ddp cover both modes
    # ok, but the summary says what was not tested and why
    assert code == 0 and summary["ok"] and summary["skip"] == len(gemini) + 1 and summary["unplanned_skips"] == []
    assert summary["not_tested"]["step1_loss:gemini-fp16"] == stated
    assert not any(run.startswith("gemini") for run in summary["tested"]["runs"])


def test_a_kernel_build_that_fails_where_the_toolchain_looked_fine_fails_the_check(tmp_path, capsys):
    runner = StubRunner(answers={"kernels": (1, '{"ok": false, "error": "fatal error: cublas_v2.h: No such file"}')})
    code, lines, summary = run_check(tmp_path, capsys, runner)
    checks = by_check(lines)
    assert checks["kernels"][""]["status"] == "fail" and "cublas_v2.h" in checks["kernels"][""]["error"]
    assert checks["step1_loss"]["gemini-fp16"]["status"] == "skip" and "kernels did not succeed" in \
        checks["step1_loss"]["gemini-fp16"]["reason"]
    assert code == 1 and "step1_loss:gemini-fp16" in summary["unplanned_skips"]


def test_wrong_figures_fail_their_checks_and_name_them(tmp_path, capsys):
    runner = StubRunner(
        metrics={"gemini-fp16": straight_records("fp16", first_loss=RANDOM_LOSS),  # trained from random weights
                 "zero2-bf16-resumed": [record(s, REF_LOSS - 0.1 * (s - 1) + 3e-3) for s in range(5, 9)],
                 "gemini-fp16-overflow": overflow_records(recovers=False),
                 "ddp-bf16": [record(1, REF_LOSS, grad_norm=math.nan), *straight_records("bf16")[1:]]},
        answers={"zero2-fp16": (1, "Traceback ...\nKeyError: 0\n"),
                 "mfu-1b": (1, "torch.OutOfMemoryError: CUDA out of memory\n")})
    code, lines, summary = run_check(tmp_path, capsys, runner)
    checks = by_check(lines)
    assert checks["step1_loss"]["gemini-fp16"]["status"] == "fail"
    assert checks["step1_loss"]["gemini-fp16"]["logged"] == RANDOM_LOSS
    assert checks["resume"]["zero2-bf16"]["status"] == "fail"
    assert checks["resume"]["zero2-bf16"]["max_abs_diff"] == pytest.approx(3e-3)
    assert "poisoned" in checks["overflow"]["gemini-fp16-overflow"]["error"]
    assert "non-finite figures at steps [1]" in checks["finite"]["ddp-bf16"]["error"]
    crashed = [line for line in lines if line.get("run") == "zero2-fp16" and line["check"] != "resume"]
    assert crashed and all(line["status"] == "fail" and "KeyError: 0" in line["error"] for line in crashed)
    assert checks["resume"]["zero2-fp16"]["status"] == "skip"  # its straight run failed: nothing to resume
    assert checks["mfu"]["mfu-1b"]["status"] == "fail" and "out of memory" in checks["mfu"]["mfu-1b"]["error"]
    assert checks["mfu"]["mfu-7b"]["status"] == "pass"
    assert code == 1 and not summary["ok"], summary
    assert summary["failed"] == sorted(["mfu:mfu-1b", "step1_loss:gemini-fp16", "resume:zero2-bf16",
                                        "overflow:gemini-fp16-overflow", "finite:ddp-bf16", "step1_loss:zero2-fp16",
                                        "finite:zero2-fp16", "reload:zero2-fp16"])


def test_no_gpu_or_no_colossalai_fails_the_environment_and_skips_the_rest(tmp_path, capsys):
    code, lines, summary = run_check(tmp_path, capsys, StubRunner(facts={**FACTS, "colossalai": None,
                                                                         "colossalai_error": "ImportError: x"}))
    assert lines[0]["check"] == "environment" and lines[0]["status"] == "fail" and "ImportError: x" in lines[0]["error"]
    assert [line["check"] for line in lines[1:]] == list(gpu_check.CHECKS)
    assert all(line["status"] == "skip" for line in lines[1:]) and code == 1


def test_checks_option_plans_only_the_runs_they_need(tmp_path, capsys):
    runner = StubRunner(facts={**FACTS, "gpus": 2})
    code, lines, _ = run_check(tmp_path, capsys, runner, "--checks", "resume")
    assert code == 0 and {line["check"] for line in lines} == {"environment", "kernels", "resume"}
    assert all("--nproc_per_node=2" in cmd for name, cmd in runner.commands.items() if name.startswith(("g", "z", "d")))
    assert not any(name.startswith("mfu") or name.endswith("overflow")
                   for name in runner.commands)


@pytest.mark.parametrize("argv, message", [
    (["--checks", "step1_loss,speed"], "--checks: unknown ['speed']"),
    (["--nproc", "-1"], "--nproc and --parallel must be >= 0"),
])
def test_bad_arguments_end_in_one_usage_error(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(["--out", str(tmp_path / "gc"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_an_out_dir_that_is_not_a_gpu_check_dir_is_not_emptied(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep")
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", str(tmp_path)])
    assert (tmp_path / "precious.txt").read_text() == "keep" and "is not an earlier gpu_check dir" in \
        capsys.readouterr().err


def test_jobs_that_would_end_after_the_budget_are_not_started():
    now = [0.0]

    class Slow(StubRunner):
        def start(self, job):
            now[0] += 100  # each job takes 100 s
            return _Done(Outcome(0, "{}"))

    jobs = [gpu_check.Job(name, lambda: [], deps, estimate_s=60) for name, deps in
            (("a", ()), ("b", ("a",)), ("c", ("b",)), ("d", ("missing",)))]
    outcomes = gpu_check.run_jobs(jobs, Slow(), 1, deadline=150, say=lambda m: None, clock=lambda: now[0])
    assert outcomes["a"].ok and outcomes["b"].returncode is None and "time budget" in outcomes["b"].reason
    assert "b did not succeed" in outcomes["c"].reason and "not planned" in outcomes["d"].reason


def test_an_exclusive_job_runs_alone_and_the_jobs_after_it_wait():
    log = []

    class TwoPolls:
        def __init__(self, name):
            self.name, self.polls = name, 0

        def poll(self):
            self.polls += 1
            if self.polls < 2:
                return None
            log.append(f"end {self.name}")
            return Outcome(0, "")

    class Runner:
        def start(self, job):
            log.append(f"start {job.name}")
            return TwoPolls(job.name)

    jobs = [gpu_check.Job("a", lambda: []), gpu_check.Job("b", lambda: []), gpu_check.Job("x", lambda: []),
            gpu_check.Job("c", lambda: []), gpu_check.Job("build", lambda: [], uses_slot=False)]
    jobs[2].exclusive = True
    outcomes = gpu_check.run_jobs(jobs, Runner(), 2, deadline=1e9, say=lambda m: None)
    assert all(o.ok for o in outcomes.values())
    assert log == ["start a", "start b", "start build", "end a", "end b", "end build", "start x", "end x",
                   "start c", "end c"]


def test_train_records_keep_training_lines_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [record(1, 9.0), {"step": 2, "eval_loss": 8.0, "eval_tokens": 100}, record(2, 8.0), record(3, 7.5),
             record(3, 7.0)]  # a resumed run appends step 3 again: the last wins
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')
    assert [(r["step"], r["loss"]) for r in gpu_check.train_records(path)] == [(1, 9.0), (2, 8.0), (3, 7.0)]


def test_mfu_judge_passes_a_complete_line_and_names_what_is_wrong_in_one():
    line = bench_line("1b", fast=1.6, old=1.0, hf=1.2)
    passed = gpu_check.judge_mfu("mfu-1b", line, 1.0)
    assert passed.status == "pass" and passed.details["fast_mfu"] == pytest.approx(0.48)
    assert passed.details["ours_vs_transformers"] == pytest.approx(1.6 / 1.2)
    slower = gpu_check.judge_mfu("mfu-1b", bench_line("1b", fast=0.9, old=1.0), 1.0)
    assert slower.status == "fail" and "0.90x the old one" in slower.details["error"]
    assert gpu_check.judge_mfu("mfu-1b", bench_line("1b", fast=0.9, old=1.0), 0.0).status == "pass"  # rehearsal
    out_of_memory = bench_line("7b")
    out_of_memory["ways"]["old"] = {"error": "out of memory even with checkpointing=full"}
    oom = gpu_check.judge_mfu("mfu-7b", out_of_memory, 1.0)
    assert oom.status == "fail" and "old: out of memory" in oom.details["error"]
    no_peak = bench_line("1b")
    no_peak["ways"]["transformers"].update(mfu=None, hfu=None)
    assert "transformers: no MFU or HFU" in gpu_check.judge_mfu("mfu-1b", no_peak, 1.0).details["error"]
    assert gpu_check.judge_mfu("mfu-1b", None, 1.0).status == "fail"


def test_step1_check_is_inconclusive_when_a_random_model_would_pass():
    result = gpu_check.judge_step1("r", "bf16", [record(1, 10.4)], {"ref_loss": 10.4, "random_init_loss": 10.45})
    assert result.status == "fail" and "inconclusive" in result.details["error"]


def test_device_steps_record_and_recompute_the_first_step_on_the_cpu_fallback(tmp_path, tiny_model):
    """gpu_check_device.py's train and reference for real (2 CPU processes, fp32): the logged step-1 loss is the
    fp32 loss recomputed from the recorded batches, and final/ reloads to the trained logits."""
    import gpu_check_device

    from llama import load_tokenizer

    model = tmp_path / "model"
    gpu_check_device.Llama.from_pretrained(tiny_model).save_pretrained(model)
    load_tokenizer(tiny_model).save(model)
    gpu_check_device.scale_output(str(model), gpu_check.OUTPUT_SCALE)
    run = {"name": "ddp-fp32", "plugin": "ddp", "precision": "fp32", "packing": True, "reload": True,
           "output_dir": str(tmp_path / "run"), "logdir": str(tmp_path / "run" / "logs")}
    settings = ["global_batch_size=0", f"init_model_path={model}",
                f"pretrain_data_root_dir={REPO / 'pretraining_corpora'}", "max_steps=2",
                "logging_steps=1", "saving_steps=100", "batch_size=2", "max_seq_length=64", "dropout_prob=0.0",
                "warmup_steps=1", "lr=5e-3", "packing=True", f"output_dir={run['output_dir']}",
                f"logdir={run['logdir']}"]
    result = torchrun(["train", *settings], script=gpu_check.DEVICE, env={"GPU_CHECK_LOGITS": "1"})
    assert result.returncode == 0, explain(result)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"init_model": str(model), "runs": [run]}))
    ref = gpu_check_device.reference(str(spec))["runs"]["ddp-fp32"]
    records = gpu_check.train_records(Path(run["logdir"]) / "metrics.jsonl")
    step1 = gpu_check.judge_step1("ddp-fp32", "fp32", records, ref)
    assert step1.status == "pass", step1.details
    assert step1.details["abs_diff"] < 1e-5
    reload = gpu_check.judge_reload("ddp-fp32", ref["reload"])
    assert reload.status == "pass" and ref["reload"]["max_abs_diff"] == 0.0, reload.details
    assert gpu_check.judge_finite("ddp-fp32", "fp32", records).status == "pass"
