"""The device check: the GPU paths no CPU test can reach, in one call of under 9 minutes on a machine with 1-8 GPUs.

    python scripts/gpu_check.py [--out DIR] [--nproc N] [--checks step1_loss,finite,...] [--budget-s S]

Prints one JSON line per check and a summary line last ({"summary": ...}); exit code 0 when nothing failed. The
same lines go to <out>/gpu_check.jsonl, each run's output to <out>/logs/<run>.log. Checks:
    environment  torch, CUDA, GPUs; colossalai and the engine's whole import chain load with this torch
    setup        (a line only on failure) the check's models could not be written
    kernels      HybridAdam's CPU and CUDA kernels build (gemini needs them; without nvcc gemini is not runnable)
    step1_loss   per run (gemini fp16/bf16, zero2 bf16/fp16, ddp bf16/fp16): the first logged loss equals the fp32
                 loss of the same initial weights, unboosted, on the same recorded batches, within the precision's
                 tolerance, while a freshly initialised model's loss lies far outside it (ColossalAI issue 5034:
                 gemini silently training from random weights)
    finite       per run: grad_norm finite on every step that was not skipped; loss_scale logged and finite in fp16
    overflow     gemini and zero2 in fp16, gradient_accumulation_steps=2, a huge initial loss scale: steps are
                 skipped, the scale backs off, and the last steps train again
    resume       per run: steps after a resume from the step-4 checkpoint log the straight run's losses
    packing      the step-1 check passes with packing=False (SDPA's causal flash path; the flash kernel alone is
                 probed on the same batch) and with packing=True (document masks)
    reload       per run: final/ loaded with Llama.from_pretrained gives the trained model's logits
    mfu          MFU and tokens/s per GPU at a ~1B shape (zero2, bf16, seq 2048) and the 7B LLaMA shape (zero2 bf16
                 with gradient checkpointing; on one GPU, where zero2's states do not fit, gemini fp16 with
                 placement "auto", which moves to CPU only what does not fit)
All pass/fail logic lives in the judge_* functions below, plain Python over the runs' metrics.jsonl records and the
JSON of scripts/gpu_check_device.py, so the tests drive it on CPU with recorded outputs through a stub Runner.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # training.metrics reads the runs' metrics.jsonl
DEVICE = REPO / "scripts" / "gpu_check_device.py"
CHECKS = ("step1_loss", "finite", "overflow", "resume", "packing", "reload", "mfu")

# ---- what runs ------------------------------------------------------------------------------------------------

# (plugin, precision, packing) of the small runs: every engine path, each packing mode under two plugins.
SMALL_RUNS = (("gemini", "fp16", False), ("gemini", "bf16", True), ("zero2", "bf16", False),
              ("zero2", "fp16", True), ("ddp", "bf16", False), ("ddp", "fp16", True))
SMALL_MODEL = ["--dim", "256", "--layers", "4", "--heads", "4", "--max-seq-len", "2048"]  # head_dim 64: flash-able
VOCAB = 32000  # LLaMA's; the tokenizer is trained on the bundled corpus with this many pieces
# Output projection x12: logits of std ~4 instead of ~0.3, so these weights' loss (~18) lies far from the ~ln(32000)
# = 10.4 of any freshly initialised model.
OUTPUT_SCALE = 12.0
# global_batch_size=0: batch_size and gradient_accumulation_steps as given, not the recipe's 160 samples per step.
SMALL_SETTINGS = ["global_batch_size=0", "max_steps=8", "saving_steps=4", "logging_steps=1", "keep_checkpoints=2",
                  "batch_size=4", "max_seq_length=256", "dropout_prob=0.0", "warmup_steps=2", "lr=5e-4", "min_lr=5e-5"]
RESUME_FROM_STEP = 4
OVERFLOW_SCALE = 2 ** 24  # far above any scale a fp16 gradient survives; the scaler must back off 8+ times
OVERFLOW_SETTINGS = ["global_batch_size=0", "max_steps=30", "max_bad_steps=30", "saving_steps=1000", "logging_steps=1",
                     "gradient_accumulation_steps=2", f"initial_loss_scale={OVERFLOW_SCALE}", "batch_size=4",
                     "max_seq_length=256", "packing=True", "dropout_prob=0.0", "warmup_steps=2", "lr=5e-4",
                     "min_lr=5e-5"]
# MFU shapes: (name, llama.tiny arguments, parameters in billions for the memory estimate).
MFU_1B = ("1b", ["--dim", "2048", "--layers", "22", "--heads", "32", "--kv-heads", "4"], 1.1)  # TinyLlama's shape
MFU_7B = ("7b", ["--dim", "4096", "--layers", "32", "--heads", "32"], 6.7)  # LLaMA-7B's shape
MFU_SETTINGS = ["global_batch_size=0", "max_steps=12", "logging_steps=6", "saving_steps=100000", "max_seq_length=2048",
                "packing=True", "dropout_prob=0.0", "warmup_steps=2", "lr=1e-5", "min_lr=1e-6"]
# zero2 in bf16 per parameter: bf16 weight 2 + bf16 gradient 2 on every GPU, fp32 master 4 + Adam 8 + fp32
# gradient 4 sharded over the GPUs; 10% for fragmentation, plus activations under gradient checkpointing.
ZERO2_BYTES = (4, 16)
ACTIVATION_GB = 12

# Relative tolerance of a logged loss against the fp32 reference: bf16 keeps 8 bits of mantissa, fp16 11.
LOSS_RTOL = {"bf16": 1e-2, "fp16": 3e-3, "fp32": 1e-5}
RESUME_ATOL = 1e-4  # fp32 round-off plus the few atomics-based kernels that stay nondeterministic
RELOAD_SHARE = 0.05  # reloaded-vs-trained logits: at most this share of training's own change of the logits
RECOVERED_STEPS = 5  # the overflow run's last steps that must all train


# ---- results --------------------------------------------------------------------------------------------------

@dataclass
class Result:
    check: str
    status: str  # "pass", "fail" or "skip"
    run: str = ""
    details: dict = field(default_factory=dict)

    def line(self) -> str:
        head = {"check": self.check, **({"run": self.run} if self.run else {}), "status": self.status}
        return json.dumps({**head, **self.details}, default=str)


def train_records(metrics_path: Path) -> list[dict]:
    """The training log lines of a run's metrics.jsonl (training.metrics.read_records); none before the run wrote
    one."""
    from training.metrics import read_records  # torch: imported when a run's records are judged, not at start-up

    return read_records(metrics_path, "loss") if metrics_path.is_file() else []


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ---- judges: plain functions of recorded figures ----------------------------------------------------------------

def judge_step1(run: str, precision: str, records: list[dict], ref: dict) -> Result:
    if "error" in ref:
        return Result("step1_loss", "fail", run, {"error": ref["error"]})
    first = next((r for r in records if r["step"] == 1), None)
    if first is None or not finite(first["loss"]):
        return Result("step1_loss", "fail", run, {"error": "no finite loss logged at step 1 (skipped or missing)"})
    tol = LOSS_RTOL[precision] * abs(ref["ref_loss"])
    details = {"logged": first["loss"], "fp32_reference": ref["ref_loss"],
               "abs_diff": abs(first["loss"] - ref["ref_loss"]), "tolerance": tol,
               "random_init_loss": ref["random_init_loss"]}
    if abs(ref["ref_loss"] - ref["random_init_loss"]) <= 10 * tol:
        return Result("step1_loss", "fail", run, {**details, "error": "inconclusive: a random model's loss lies "
                                                                      "within 10x the tolerance of the reference"})
    return Result("step1_loss", "pass" if details["abs_diff"] <= tol else "fail", run, details)


def judge_finite(run: str, precision: str, records: list[dict]) -> Result:
    trained = [r for r in records if r["skipped_steps"] == 0]
    bad = [r["step"] for r in trained if not (finite(r["loss"]) and finite(r.get("grad_norm")))]
    if precision == "fp16":
        bad += [r["step"] for r in records if not finite(r.get("loss_scale")) or r["loss_scale"] <= 0]
    details = {"steps_logged": len(records), "steps_trained": len(trained),
               "grad_norm_last": trained[-1].get("grad_norm") if trained else None,
               "loss_scale_last": records[-1].get("loss_scale") if records else None}
    if not trained:
        return Result("finite", "fail", run, {**details, "error": "no step trained"})
    if bad:
        return Result("finite", "fail", run, {**details, "error": f"missing or non-finite figures at steps "
                                                                  f"{sorted(set(bad))[:10]}"})
    return Result("finite", "pass", run, details)


def judge_overflow(run: str, records: list[dict], initial_scale: float) -> Result:
    skipped = [r["step"] for r in records if r["skipped_steps"] > 0]
    scales = [r["loss_scale"] for r in records if finite(r.get("loss_scale"))]
    tail = records[-RECOVERED_STEPS:]
    details = {"steps_logged": len(records), "skipped_steps": len(skipped),
               "last_skipped_step": max(skipped, default=None), "initial_scale": initial_scale,
               "last_scale": scales[-1] if scales else None, "last_loss": records[-1]["loss"] if records else None}
    problems = []
    if not skipped:
        problems.append("no step was skipped")
    if not scales or min(scales) >= initial_scale:
        problems.append("the loss scale never backed off")
    if len(tail) < RECOVERED_STEPS or any(r["skipped_steps"] > 0 or not finite(r["loss"]) for r in tail):
        problems.append(f"the last {RECOVERED_STEPS} steps did not all train (a skipped step poisoned the later ones)")
    if problems:
        return Result("overflow", "fail", run, {**details, "error": "; ".join(problems)})
    return Result("overflow", "pass", run, details)


def judge_resume(run: str, straight: list[dict], resumed: list[dict], from_step: int) -> Result:
    expected = {r["step"]: r["loss"] for r in straight if r["step"] > from_step}
    got = {r["step"]: r["loss"] for r in resumed}
    details = {"from_step": from_step, "steps": sorted(expected)}
    if not expected or sorted(got) != sorted(expected):
        return Result("resume", "fail", run, {**details, "resumed_steps": sorted(got),
                                              "error": "the resumed run did not log the straight run's later steps"})
    diffs = [abs(got[s] - expected[s]) if finite(got[s]) and finite(expected[s]) else math.inf for s in expected]
    details.update(max_abs_diff=max(diffs), tolerance=RESUME_ATOL,
                   losses={s: [expected[s], got[s]] for s in sorted(expected)})
    return Result("resume", "pass" if max(diffs) <= RESUME_ATOL else "fail", run, details)


def judge_packing(step1: dict[str, Result], packing_of: dict[str, bool], flash: dict | None) -> Result:
    by_mode = {mode: sorted(run for run, r in step1.items() if packing_of[run] == mode and r.status == "pass")
               for mode in (False, True)}
    details = {"unpacked_step1_passed": by_mode[False], "packed_step1_passed": by_mode[True], "flash_probe": flash}
    problems = [f"no packing={mode} run passed step1_loss" for mode in (False, True) if not by_mode[mode]]
    if not flash or not flash.get("ok"):
        problems.append("the flash-attention kernel did not run the unpacked batch")
    if problems:
        return Result("packing", "fail", "", {**details, "error": "; ".join(problems)})
    return Result("packing", "pass", "", details)


def judge_reload(run: str, reload: dict | None) -> Result:
    if not reload or "error" in reload:
        return Result("reload", "fail", run, {"error": (reload or {}).get("error", "no reload comparison")})
    details = {**reload, "allowed": RELOAD_SHARE * reload["train_change"]}
    if reload["train_change"] <= 0:
        return Result("reload", "fail", run, {**details, "error": "inconclusive: training did not change the logits"})
    return Result("reload", "pass" if reload["max_abs_diff"] <= details["allowed"] else "fail", run, details)


def judge_mfu(run: str, records: list[dict], shape: dict) -> Result:
    if not records:
        return Result("mfu", "fail", run, {**shape, "error": "no metrics logged"})
    last = records[-1]  # the last window: start-up and the first steps are behind it
    figures = {k: last.get(k) for k in ("mfu", "tokens_per_s_per_gpu", "tflops_per_gpu", "max_memory_gb")}
    ok = finite(last.get("tokens_per_s_per_gpu")) and last["tokens_per_s_per_gpu"] > 0 and finite(last.get("loss"))
    return Result("mfu", "pass" if ok else "fail", run, {**figures, "loss": last.get("loss"), **shape})


# ---- jobs -----------------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One subprocess: a torchrun training run, or a step of gpu_check_device.py whose last line is JSON."""
    name: str
    command: Callable[[], list[str]]  # built when the job starts (a resume needs the checkpoint's name)
    deps: tuple[str, ...] = ()
    timeout_s: float = 300
    estimate_s: float = 60  # not started when less than this is left of the budget
    env: dict = field(default_factory=dict)
    logdir: Path | None = None  # training runs: where metrics.jsonl and the records land
    uses_slot: bool = True  # counts against --parallel; the kernel build and the big models' writing do not
    exclusive: bool = False  # runs with no other slot job beside it (timings); once ready, later slot jobs wait


@dataclass
class Outcome:
    returncode: int | None  # None: not run (see reason)
    output_tail: str = ""
    seconds: float = 0.0
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def json(self) -> dict | None:
        """The job's last JSON line (gpu_check_device.py steps)."""
        for line in reversed(self.output_tail.splitlines()):
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    return None
        return None

    def why(self) -> str:
        if self.returncode is None:
            return self.reason
        said = (self.json() or {}).get("error")  # a gpu_check_device.py step says what went wrong itself
        tail = said or "\n".join([line for line in self.output_tail.splitlines() if line.strip()][-12:])
        return f"exit {self.returncode}{' (timed out)' if self.returncode == 124 else ''}: {tail[-1500:]}"


class Runner:
    """Starts jobs as subprocesses in their own process group, with their output in <out>/logs/<name>.log."""

    def __init__(self, logs: Path):
        self.logs = logs

    def start(self, job: Job):
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{job.name}.log", "w", encoding="utf-8")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **job.env}
        proc = subprocess.Popen(job.command(), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        return _Started(proc, log, job, time.monotonic())


class _Started:
    def __init__(self, proc, log, job: Job, t0: float):
        self.proc, self.log, self.job, self.t0 = proc, log, job, t0

    def poll(self) -> Outcome | None:
        rc = self.proc.poll()
        if rc is None and time.monotonic() - self.t0 > self.job.timeout_s:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the job's own process group: torchrun and its workers
            self.proc.wait()
            rc = 124
        if rc is None:
            return None
        self.log.close()
        text = Path(self.log.name).read_text(encoding="utf-8", errors="replace")
        return Outcome(rc, text[-20000:], time.monotonic() - self.t0)


def run_jobs(jobs: list[Job], runner, parallel: int, deadline: float, say: Callable[[str], None],
             clock: Callable[[], float] = time.monotonic, earlier: dict[str, Outcome] | None = None
             ) -> dict[str, Outcome]:
    """Run jobs at most `parallel` at a time, each after its deps (among these jobs or `earlier` ones) succeeded; a
    job whose dep failed, or that would not end before the deadline, is not run and says why."""
    done: dict[str, Outcome] = dict(earlier or {})
    waiting, running = list(jobs), {}
    while waiting or running:
        if not running and waiting and not any(all(d in done for d in j.deps) for j in waiting):
            for job in waiting:  # deps that are not among the jobs: nothing will ever start these
                done[job.name] = Outcome(None, reason=f"needs {[d for d in job.deps if d not in done]}, not planned")
            break
        draining = False  # an exclusive job is ready and waits for the running slot jobs to end
        for job in list(waiting):
            slots = [j for j, _ in running.values() if j.uses_slot]
            if job.uses_slot and (draining or len(slots) >= parallel or any(j.exclusive for j in slots)
                                  or (job.exclusive and slots)):
                draining = draining or (job.exclusive and all(d in done for d in job.deps))
                continue
            failed = [d for d in job.deps if d in done and not done[d].ok]
            if failed:
                done[job.name] = Outcome(None, reason=f"{failed[0]} did not succeed: {done[failed[0]].why()}")
            elif all(d in done for d in job.deps):
                if clock() + job.estimate_s > deadline:
                    done[job.name] = Outcome(None, reason="not started: the time budget was spent")
                else:
                    job.timeout_s = min(job.timeout_s, max(30.0, deadline - clock() + 30))
                    try:
                        running[job.name] = job, runner.start(job)
                        say(f"started {job.name}")
                    except Exception as e:  # noqa: BLE001 - e.g. the checkpoint a resume needs is missing
                        done[job.name] = Outcome(None, reason=f"could not start: {e}")
            else:
                continue
            waiting.remove(job)
        for name, (_, started) in list(running.items()):
            outcome = started.poll()
            if outcome is not None:
                done[name] = outcome
                del running[name]
                say(f"{name}: exit {outcome.returncode} after {outcome.seconds:.0f} s")
        if running:
            time.sleep(0.5)
    return {job.name: done[job.name] for job in jobs}


# ---- the plan -------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "gpu_check", help="work dir (emptied first)")
    p.add_argument("--python", default=sys.executable, help="the Python with torch and colossalai")
    p.add_argument("--nproc", type=int, default=0, help="processes (GPUs) per run; 0: every GPU present")
    p.add_argument("--parallel", type=int, default=0,
                   help="small runs at once (they share the GPUs); 0: min(4, cpus / (2 x nproc))")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    p.add_argument("--budget-s", type=float, default=480, help="start no run that would end after this many seconds")
    args = p.parse_args(argv)
    chosen = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in CHECKS]
    if unknown or not chosen:
        p.error(f"--checks: unknown {unknown} (choose from {','.join(CHECKS)})" if unknown else "--checks is empty")
    args.checks = tuple(c for c in CHECKS if c in chosen)
    if args.out.exists() and any(args.out.iterdir()) and not (args.out / "gpu_check.jsonl").is_file():
        p.error(f"--out {args.out}: exists and is not an earlier gpu_check dir (it is emptied first)")
    if args.nproc < 0 or args.parallel < 0 or args.budget_s <= 0:
        p.error("--nproc and --parallel must be >= 0 and --budget-s > 0")
    return args


def run_name(plugin: str, precision: str) -> str:
    return f"{plugin}-{precision}"


def device_step(args, *step: str) -> list[str]:
    return [args.python, str(DEVICE), *step]


def torchrun(args, nproc: int, settings: list[str]) -> list[str]:
    return [args.python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(DEVICE),
            "train", *settings]


def checkpoint_at(output_dir: Path, step: int) -> Path:
    found = sorted(output_dir.glob(f"ckpt_step-{step}_*"))
    found = [p for p in found if not p.name.endswith(".tmp") and ".abandoned-" not in p.name]
    if not found:
        raise FileNotFoundError(f"no step-{step} checkpoint in {output_dir}")
    return found[0]


def train_job(args, name: str, nproc: int, settings: list[str], deps: tuple[str, ...], timeout_s: float,
              estimate_s: float, small: bool = True, resume_of: Path | None = None) -> Job:
    """A torchrun run of gpu_check_device.py train; small runs ask for deterministic kernels (the resume check)
    and record the trained logits (the reload check)."""
    out = args.out / "runs" / name
    logdir = out / "logs"
    base = [*settings, f"output_dir={out}", f"logdir={logdir}"]

    def command() -> list[str]:
        extra = [f"recover_training_from_checkpoint={checkpoint_at(resume_of, RESUME_FROM_STEP)}"] if resume_of else []
        return torchrun(args, nproc, base + extra)

    env = {"GPU_CHECK_DETERMINISTIC": "1", "GPU_CHECK_LOGITS": "1"} if small else {}
    return Job(name, command, deps, timeout_s, estimate_s, env, logdir)


def plan_small(args, nproc: int) -> tuple[list[Job], dict]:
    """Jobs of checks 1-6: the small model (its tokenizer serves the MFU models too), the straight, resumed and
    overflow runs."""
    model = args.out / "models" / "small"
    tokenizer = model / "tokenizer.model"
    jobs = [Job("model-small", lambda: [args.python, "-m", "llama.tiny", "--corpus", str(REPO / "pretraining_corpora"),
                                        "--output", str(model), "--vocab-size", str(VOCAB), *SMALL_MODEL],
                timeout_s=240, estimate_s=40)]
    info = {"model": model, "tokenizer": tokenizer, "straight": {}, "overflow": {}}
    common = [f"init_model_path={model}", f"pretrain_data_root_dir={REPO / 'pretraining_corpora'}"]
    runs_needed = any(c in args.checks for c in ("step1_loss", "finite", "resume", "packing", "reload"))
    if runs_needed or "overflow" in args.checks:
        jobs.append(Job("scale-small", lambda: device_step(args, "scale-output", str(model), str(OUTPUT_SCALE)),
                        ("model-small",), 120, 15))
    for plugin, precision, packing in SMALL_RUNS if runs_needed else ():
        name = run_name(plugin, precision)
        deps = ("scale-small", "kernels") if plugin == "gemini" else ("scale-small",)
        settings = [*common, *SMALL_SETTINGS, f"plugin={plugin}", f"precision={precision}", f"packing={packing}"]
        jobs.append(train_job(args, name, nproc, settings, deps, 300, 45))
        info["straight"][name] = {"plugin": plugin, "precision": precision, "packing": packing}
        if "resume" in args.checks:
            jobs.append(train_job(args, f"{name}-resumed", nproc, settings, (name,), 300, 45,
                                  resume_of=args.out / "runs" / name))
    for plugin in ("gemini", "zero2") if "overflow" in args.checks else ():
        name = f"{plugin}-fp16-overflow"
        deps = ("scale-small", "kernels") if plugin == "gemini" else ("scale-small",)
        settings = [*common, *OVERFLOW_SETTINGS, f"plugin={plugin}", "precision=fp16"]
        jobs.append(train_job(args, name, nproc, settings, deps, 300, 60))
        info["overflow"][name] = plugin
    return jobs, info


def mfu_shape(facts: dict, nproc: int, shape: tuple) -> dict:
    """Plugin and batch for an MFU shape: zero2 bf16 where its states fit the GPUs, else gemini fp16 'auto'."""
    name, tiny_args, billions = shape
    need_gb = billions * (ZERO2_BYTES[0] + ZERO2_BYTES[1] / nproc) * 1.1 + ACTIVATION_GB
    fits = need_gb < facts.get("gpu_memory_gb", 0)
    plan = {"shape": name, "params_billion": billions, "nproc": nproc, "seq": 2048,
            "zero2_need_gb_per_gpu": round(need_gb, 1)}
    if name == "1b":
        return {**plan, "plugin": "zero2", "precision": "bf16", "batch_size": 8, "gradient_checkpointing": False}
    if fits:
        return {**plan, "plugin": "zero2", "precision": "bf16", "batch_size": 4, "gradient_checkpointing": True}
    return {**plan, "plugin": "gemini", "precision": "fp16", "batch_size": 4, "gradient_checkpointing": True,
            "gemini_placement_policy": "auto"}


def plan_mfu(args, facts: dict, nproc: int, tokenizer: Path) -> tuple[list[Job], dict]:
    jobs, shapes = [], {}
    for shape in (MFU_1B, MFU_7B):
        name, tiny_args, _ = shape
        plan = mfu_shape(facts, nproc, shape)
        model = args.out / "models" / name
        jobs.append(Job(f"model-{name}", lambda model=model, tiny_args=tiny_args: [
            args.python, "-m", "llama.tiny", "--tokenizer", str(tokenizer), "--output", str(model), *tiny_args,
            "--max-seq-len", "2048", "--device", "cuda", "--dtype", "bfloat16"], ("model-small",), 300, 40,
            uses_slot=False))
        settings = [f"init_model_path={model}", f"pretrain_data_root_dir={REPO / 'pretraining_corpora'}",
                    *MFU_SETTINGS, f"plugin={plan['plugin']}", f"precision={plan['precision']}",
                    f"batch_size={plan['batch_size']}", f"gradient_checkpointing={plan['gradient_checkpointing']}"]
        if "gemini_placement_policy" in plan:
            settings.append(f"gemini_placement_policy={plan['gemini_placement_policy']}")
        deps = (f"model-{name}", "kernels") if plan["plugin"] == "gemini" else (f"model-{name}",)
        jobs.append(train_job(args, f"mfu-{name}", nproc, settings, deps, 420 if name == "7b" else 240,
                              150 if name == "7b" else 60, small=False))
        jobs[-1].exclusive = True
        shapes[f"mfu-{name}"] = plan
    return jobs, shapes


def check(args, runner, say: Callable[[str], None], emit: Callable[[Result], None],
          clock: Callable[[], float] = time.monotonic) -> None:
    start = clock()
    deadline = start + args.budget_s
    facts_run = run_jobs([Job("facts", lambda: device_step(args, "facts"), timeout_s=180, estimate_s=5)], runner, 1,
                         deadline, say, clock)["facts"]
    facts = facts_run.json() or {}
    env_problems = []
    if not facts:
        env_problems.append(f"facts step failed: {facts_run.why()}")
    elif not facts.get("gpus"):
        env_problems.append("no CUDA device")
    elif not facts.get("colossalai"):
        env_problems.append(f"colossalai does not import: {facts.get('colossalai_error')}")
    emit(Result("environment", "fail" if env_problems else "pass", "",
                {**facts, **({"error": "; ".join(env_problems)} if env_problems else {})}))
    if env_problems:
        for name in args.checks:
            emit(Result(name, "skip", "", {"reason": "environment check failed"}))
        return
    nproc = args.nproc or facts["gpus"]
    parallel = args.parallel or max(1, min(4, (facts.get("cpus") or 2) // (2 * nproc)))
    small, info = plan_small(args, nproc)
    mfu, shapes = plan_mfu(args, facts, nproc, info["tokenizer"]) if "mfu" in args.checks else ([], {})
    setup = [j for j in small + mfu if not j.logdir]  # models (the MFU ones are written while small runs train)
    runs, mfu_runs = [j for j in small if j.logdir], [j for j in mfu if j.logdir]

    def needs_kernels(job: Job) -> bool:
        return "kernels" in job.deps or job.name.startswith("gemini")

    if any(needs_kernels(j) for j in runs + mfu_runs):
        setup.insert(0, Job("kernels", lambda: device_step(args, "build-kernels"), timeout_s=420, estimate_s=60,
                            uses_slot=False))
    # In this order: what needs no kernel, while the kernels build; the MFU runs that need none, each alone on the
    # GPUs (the build may still take CPU cores); gemini's runs; the reference; a gemini MFU run, alone.
    outcomes = run_jobs(setup + [j for j in runs if not needs_kernels(j)]
                        + [j for j in mfu_runs if not needs_kernels(j)] + [j for j in runs if needs_kernels(j)],
                        runner, parallel, deadline, say, clock)
    for job in setup:  # a model that could not be written fails here; what needs it is skipped, saying why
        if job.name != "kernels" and outcomes[job.name].returncode not in (0, None):
            emit(Result("setup", "fail", job.name, {"error": outcomes[job.name].why()}))
    if "kernels" in outcomes:
        kernels = outcomes["kernels"]
        status = "pass" if kernels.ok else ("skip" if not facts.get("nvcc") else "fail")
        emit(Result("kernels", status, "", {**(kernels.json() or {}), "nvcc": facts.get("nvcc"), **(
            {} if kernels.ok else {"reason": "gemini is not runnable here: " + kernels.why()})}))
    judge_small(args, runner, say, emit, outcomes, info, deadline, clock)
    if mfu_runs:
        outcomes.update(run_jobs([j for j in mfu_runs if needs_kernels(j)], runner, 1, deadline, say, clock,
                                 earlier=outcomes))
        for name, shape in shapes.items():
            emit(judged_run(outcomes, name, lambda: judge_mfu(name, train_records(
                args.out / "runs" / name / "logs" / "metrics.jsonl"), shape), "mfu"))


def judged_run(outcomes: dict[str, Outcome], job: str, judge: Callable[[], Result], check_name: str,
               run: str = "") -> Result:
    """The judgement of a job's output, or why there is none: the job failed (fail) or never started (skip)."""
    outcome = outcomes.get(job)
    if outcome is None or outcome.returncode is None:
        return Result(check_name, "skip", run or job, {"reason": outcome.reason if outcome else "not planned"})
    if not outcome.ok:
        return Result(check_name, "fail", run or job, {"error": outcome.why()})
    return judge()


def judge_small(args, runner, say, emit, outcomes: dict[str, Outcome], info: dict, deadline: float,
                clock) -> None:
    straight = info["straight"]
    wants_reference = any(c in args.checks for c in ("step1_loss", "packing", "reload"))
    reference: dict = {}
    ran = [name for name in straight if outcomes.get(name) and outcomes[name].ok]
    if wants_reference and ran:
        spec = {"init_model": str(info["model"]), "flash_probe": "packing" in args.checks,
                "runs": [{"name": name, "logdir": str(args.out / "runs" / name / "logs"),
                          "output_dir": str(args.out / "runs" / name), "reload": "reload" in args.checks,
                          **straight[name]} for name in ran]}
        spec_path = args.out / "reference_spec.json"
        spec_path.write_text(json.dumps(spec, indent=1), encoding="utf-8")
        ref_job = Job("reference", lambda: device_step(args, "reference", str(spec_path)), timeout_s=240,
                      estimate_s=20)
        ref_outcome = run_jobs([ref_job], runner, 1, deadline + 60, say, clock)["reference"]
        outcomes["reference"] = ref_outcome
        reference = ref_outcome.json() or {"error": ref_outcome.why()}

    def ref(name: str) -> dict:
        return reference.get("runs", {}).get(name) or {"error": reference.get("error", "no reference computed")}

    def records(name: str) -> list[dict]:
        return train_records(args.out / "runs" / name / "logs" / "metrics.jsonl")

    step1: dict[str, Result] = {}
    for name, run in straight.items():
        if "step1_loss" in args.checks or "packing" in args.checks:
            step1[name] = judged_run(outcomes, name, lambda: judge_step1(name, run["precision"], records(name),
                                                                         ref(name)), "step1_loss")
            if "step1_loss" in args.checks:
                emit(step1[name])
        if "finite" in args.checks:
            emit(judged_run(outcomes, name, lambda: judge_finite(name, run["precision"], records(name)), "finite"))
        if "resume" in args.checks:
            emit(judged_run(outcomes, f"{name}-resumed", lambda: judge_resume(
                name, records(name), records(f"{name}-resumed"), RESUME_FROM_STEP), "resume", name))
        if "reload" in args.checks:
            emit(judged_run(outcomes, name, lambda: judge_reload(
                name, ref(name).get("reload", {"error": ref(name).get("error", "no reload comparison")})), "reload"))
    for name in info["overflow"]:
        emit(judged_run(outcomes, name, lambda: judge_overflow(name, records(name), OVERFLOW_SCALE), "overflow"))
    if "packing" in args.checks:
        emit(judge_packing(step1, {n: r["packing"] for n, r in straight.items()}, reference.get("flash")))


def summarize(results: list[Result], seconds: float) -> dict:
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
    failed = sorted({f"{r.check}{':' + r.run if r.run else ''}" for r in results if r.status == "fail"})
    return {"summary": True, **counts, "ok": counts["fail"] == 0, "failed": failed, "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None, runner=None, clock: Callable[[], float] = time.monotonic) -> int:
    args = parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    runner = runner or Runner(args.out / "logs")
    start = clock()
    results: list[Result] = []
    report = open(args.out / "gpu_check.jsonl", "w", encoding="utf-8")

    def emit(result: Result) -> None:
        results.append(result)
        print(result.line(), flush=True)
        report.write(result.line() + "\n")
        report.flush()

    def say(message: str) -> None:
        print(f"[gpu_check {clock() - start:4.0f} s] {message}", file=sys.stderr, flush=True)

    try:
        check(args, runner, say, emit, clock)
    finally:
        summary = json.dumps(summarize(results, clock() - start))
        print(summary, flush=True)
        report.write(summary + "\n")
        report.close()
    return 0 if not any(r.status == "fail" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
