"""The device check: the GPU paths no CPU test can reach, in one run of at most 420 s (wheel install included) on a
machine with 1-8 GPUs; docs/device_check.md.

    python scripts/gpu_check.py [--out DIR] [--nproc N] [--checks step1_loss,finite,...] [--budget-s S]
    python scripts/gpu_check.py --rehearse [--out DIR]        the whole check on CPU under the ZeRO-on-CPU stand-ins
    python scripts/gpu_check.py --replay --out DIR            judge DIR's recorded outputs again (rerun: reference)

Prints the environment line, the plan ({"plan": true, ...}: each phase's budget and what it is derived from, what
will not be tested and why, what is optional), one JSON line per check and a summary line last ({"summary": ...}:
what was tested and what not). Exit code 0 when nothing failed and every skip was stated in the plan. The same
lines go to <out>/gpu_check.jsonl, each run's output to <out>/logs/<run>.log. Checks:
    environment  torch, CUDA, GPUs; colossalai and the engine's whole import chain load with this torch
    setup        (a line only on failure) the check's models could not be written
    kernels      HybridAdam's CPU and CUDA kernels build for this GPU (gemini needs them); where facts found the
                 toolchain incomplete, the plan states gemini untested and nothing of it runs
    step1_loss   per run (gemini fp16/bf16, zero2 bf16/fp16, ddp bf16/fp16): the first logged loss equals the fp32
                 loss of the same initial weights, unboosted, on the same recorded batches, within the precision's
                 tolerance, while a freshly initialised model's loss lies far outside it (ColossalAI issue 5034:
                 gemini silently training from random weights)
    finite       per run: every step trains (none skipped at SMALL_LOSS_SCALE), grad_norm finite; loss_scale logged
                 and finite in fp16
    overflow     gemini and zero2 in fp16, gradient_accumulation_steps=2, a huge initial loss scale: steps are
                 skipped, the scale backs off, and the last steps train again
    resume       per run: steps after a resume from the step-4 checkpoint log the straight run's losses (the small
                 runs use deterministic kernels and SDPA's math attention)
    packing      the step-1 check passes with packing=False and with packing=True (document masks); SDPA's flash
                 kernel alone is probed on the unpacked batch
    reload       per run: final/ loaded with Llama.from_pretrained gives the trained model's logits
    mfu          bench/gpu_throughput.py at the ~1B shape (TinyLlama's) and the 7B shape (its width with as many
                 layers as fit the GPU), seq 2048, bf16: tokens/s per GPU, MFU, HFU and peak memory of our fast path
                 (flex attention, compiled blocks, the cheapest checkpointing that fits), our old path (dense mask,
                 full checkpointing) and transformers' LLaMA (sdpa), with the ratios ours/transformers and fast/old;
                 fails where a way does not run or the fast path is slower than the old one; the 7B run only if time
                 remains
All pass/fail logic lives in the judge_* functions below, plain Python over the runs' metrics.jsonl records and the
JSON of scripts/gpu_check_device.py, so the tests drive it on CPU with recorded outputs through a stub Runner, and
tests/test_gpu_rehearsal.py runs all of it for real on CPU (--rehearse).
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
# fp16's first loss scale for the small runs. The sharpened model's fp16 gradients overflow at the recipe's 2**14:
# measured at the check's sizes under the stand-ins, zero2 skipped step 2 there (gemini on an H200: steps 1 and
# 4, a NaN step-1 loss and a step-4 checkpoint deferred past the resume point). At 2**8 all 8 steps trained, with
# unscaled gradient norms of 22-97; no element exceeds the norm, so every scaled element stays below 256 x 100 =
# 25600, under fp16's 65504 with 2.5x to spare, while the smallest gradients (~1e-6) scale to ~3e-4, far above
# fp16's subnormals. judge_finite fails a small run that skips a step.
SMALL_LOSS_SCALE = 2 ** 8
# global_batch_size=0: batch_size and gradient_accumulation_steps as given, not the recipe's 160 samples per step.
SMALL_SETTINGS = ["global_batch_size=0", "max_steps=8", "saving_steps=4", "logging_steps=1", "keep_checkpoints=2",
                  "batch_size=4", "max_seq_length=256", "dropout_prob=0.0", "warmup_steps=2", "lr=5e-4", "min_lr=5e-5",
                  f"initial_loss_scale={SMALL_LOSS_SCALE}"]
RESUME_FROM_STEP = 4
OVERFLOW_SCALE = 2 ** 24  # far above any scale a fp16 gradient survives; the scaler must back off 8+ times
OVERFLOW_SETTINGS = ["global_batch_size=0", "max_steps=30", "max_bad_steps=30", "saving_steps=1000", "logging_steps=1",
                     "gradient_accumulation_steps=2", f"initial_loss_scale={OVERFLOW_SCALE}", "batch_size=4",
                     "max_seq_length=256", "packing=True", "dropout_prob=0.0", "warmup_steps=2", "lr=5e-4",
                     "min_lr=5e-5"]
# MFU: bench/gpu_throughput.py, one shape per run (its SHAPES: "1b" TinyLlama's, "7b" LLaMA-7B's), on one GPU.
BENCH = REPO / "bench" / "gpu_throughput.py"
MFU_SHAPES = ("1b", "7b")
MFU_BENCH_ARGS = ["--steps", "4", "--warmup", "2"]  # per way: 2 untimed steps (compilation), 4 timed
MFU_REHEARSAL_ARGS = ["--shapes", "tiny", "--device", "cpu", "--peak-tflops", "1", "--seq", "64", "--steps", "1",
                      "--warmup", "1"]
MFU_WAYS = ("fast", "old", "transformers")

# Relative tolerance of a logged loss against the fp32 reference: bf16 keeps 8 bits of mantissa, fp16 11.
LOSS_RTOL = {"bf16": 1e-2, "fp16": 3e-3, "fp32": 1e-5}
# The resume runs use deterministic kernels and SDPA's math attention (gpu_check_device.py train), so a resume
# repeats the straight run bit for bit, as on CPU; 1e-4 only allows for fp32 round-off in a kernel torch cannot
# make deterministic, and stays 30x below the 3e-3 loss change a wrong restore gives (tests/test_gpu_check.py).
RESUME_ATOL = 1e-4
RELOAD_SHARE = 0.05  # reloaded-vs-trained logits: at most this share of training's own change of the logits
RECOVERED_STEPS = 5  # the overflow run's last steps that must all train

# The rehearsal (--rehearse): every run above on CPU under the ZeRO-on-CPU stand-ins (tests/zero_cpu.py), one
# process, at these sizes; every other setting is the check's own.
REHEARSAL_MODEL = ["--dim", "64", "--layers", "2", "--heads", "2", "--max-seq-len", "128"]
REHEARSAL_VOCAB = 1000
REHEARSAL_SIZES = {"batch_size": "2", "max_seq_length": "64"}  # small, overflow and MFU runs

# The plan on one H200, the whole check in at most 420 s with the wheel install, so that it fits one short
# reservation of a GPU node and a rerun after a fix costs minutes: (phase, budget in seconds on the GPU, what the
# budget is derived from). Phases run in this order; docs/device_check.md has the figures.
PHASES = (
    ("facts", 20, "rehearsal: 11 s on 2 loaded CPU cores, all of it the colossalai import; the H200 node's 16 cores "
                  "import as fast, CUDA init adds ~5 s"),
    ("small", 150, "zero2+ddp: 9 runs, 4 at a time; rehearsal: ~15 s per run, all start-up (imports, boost); on the "
                   "GPU the 8 steps of a 20M model add ~5 s: 3 waves x ~25 s, plus the 32000-piece tokenizer "
                   "(~25 s). The kernels build beside them and set the phase's end: the CPU Adam took 75 CPU-s here "
                   "against torch 2.14 (one file, one compiler process), the fused Adam's 5 .cu files for this "
                   "GPU's arch alone ~60 s after it"),
    ("gemini", 60, "gemini: 5 runs, 4 at a time, after the kernels: 2 waves x ~25 s"),
    ("reference", 20, "rehearsal: 14 s, all start-up; 6 fp32 forwards of a 20M model on the GPU"),
    ("mfu-1b", 70, "bench/gpu_throughput.py 1b, 3 ways x 6 steps of 8 x 2048 tokens: ~10 s imports and CUDA init, "
                   "~20 s compiling one block and the flex kernel (the fast way), ~0.4-1.2 s per step (40k tokens/s "
                   "at MFU 0.3 measured for the old path: 0.4 s)"),
    ("mfu-7b", 110, "optional, only if time remains: bench/gpu_throughput.py 7b, 3 ways x 6 steps of 4 x 2048 "
                    "tokens at 16 bytes per parameter (all 32 layers on a 141 GB H200, 16 on an 80 GB GPU): ~25 s "
                    "compile, ~1-2.5 s per step"),
)
OPTIONAL = {"mfu-7b": "optional: runs only if time remains after mfu-1b"}
# 420 s less ~25 s of wheel install and the 30 s a job started near the deadline may run past it (run_jobs): 365;
# the phases without mfu-7b sum to 320.
DEFAULT_BUDGET_S = 360


# ---- results --------------------------------------------------------------------------------------------------

@dataclass
class Result:
    check: str
    status: str  # "pass", "fail" or "skip"
    run: str = ""
    details: dict = field(default_factory=dict)
    planned: str = ""  # a skip the plan stated beforehand, with its reason; any other skip fails the check

    def line(self) -> str:
        head = {"check": self.check, **({"run": self.run} if self.run else {}), "status": self.status,
                **({"planned": self.planned} if self.planned else {})}
        return json.dumps({**head, **self.details}, default=str)

    @property
    def name(self) -> str:
        return f"{self.check}{':' + self.run if self.run else ''}"


def stated_skip(not_tested: dict[str, str], result: Result) -> str:
    """The plan's reason for not testing this result's run or check (keys are run-name prefixes or checks), or ""."""
    return next((why for what, why in not_tested.items() if result.run.startswith(what) or result.check == what), "")


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
    """Every step of a small run trains with finite figures: its loss scale (SMALL_LOSS_SCALE) is one this model's
    fp16 gradients do not overflow at, so a skipped step is a defect (the overflow runs test skipping)."""
    trained = [r for r in records if r["skipped_steps"] == 0]
    bad = [r["step"] for r in trained if not (finite(r["loss"]) and finite(r.get("grad_norm")))]
    if precision == "fp16":
        bad += [r["step"] for r in records if not finite(r.get("loss_scale")) or r["loss_scale"] <= 0]
    skipped = [r["step"] for r in records if r["skipped_steps"] > 0]
    details = {"steps_logged": len(records), "steps_trained": len(trained),
               "grad_norm_last": trained[-1].get("grad_norm") if trained else None,
               "loss_scale_last": records[-1].get("loss_scale") if records else None}
    if not trained:
        return Result("finite", "fail", run, {**details, "error": "no step trained"})
    if skipped:
        return Result("finite", "fail", run, {**details, "error": f"steps {skipped[:10]} were skipped (non-finite "
                                                                  f"loss or gradients; in fp16 an overflow at loss "
                                                                  f"scale {SMALL_LOSS_SCALE})"})
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


def judge_mfu(run: str, line: dict | None, min_fast_vs_old: float) -> Result:
    """The bench's JSON line of one shape: every way ran with a positive throughput, MFU and HFU where the GPU's peak
    is known, and the fast path at least `min_fast_vs_old` times the old one (1.0 on a GPU: the fast path must not
    lose; 0 in the rehearsal, whose CPU runs both through the same kernels)."""
    if not line or "ways" not in line:
        return Result("mfu", "fail", run, {"error": "no JSON line from bench/gpu_throughput.py"})
    ways = line["ways"]
    details = {k: line.get(k) for k in ("shape", "layers", "seq", "batch_size", "gpu", "note", "ours_vs_transformers",
                                        "fast_vs_old")}
    details.update({f"{way}_{k}": ways.get(way, {}).get(k) for way in MFU_WAYS
                    for k in ("tokens_per_s_per_gpu", "mfu", "hfu", "peak_memory_gb", "checkpointing")})
    problems = [f"{way}: {ways.get(way, {}).get('error', 'no tokens/s')}" for way in MFU_WAYS
                if not (finite(ways.get(way, {}).get("tokens_per_s_per_gpu"))
                        and ways[way]["tokens_per_s_per_gpu"] > 0)]
    problems += [f"{way}: no MFU or HFU (unknown GPU peak)" for way in MFU_WAYS
                 if way in ways and not (finite(ways[way].get("mfu")) and finite(ways[way].get("hfu")))]
    if not problems and not line["fast_vs_old"] >= min_fast_vs_old:
        problems.append(f"the fast path ran at {line['fast_vs_old']:.2f}x the old one (at least "
                        f"{min_fast_vs_old:g}x expected)")
    if problems:
        return Result("mfu", "fail", run, {**details, "error": "; ".join(problems)})
    return Result("mfu", "pass", run, details)


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

    def __init__(self, logs: Path, env: dict | None = None):
        self.logs, self.env = logs, env or {}

    def start(self, job: Job):
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{job.name}.log", "w", encoding="utf-8")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env, **job.env}
        proc = subprocess.Popen(job.command(), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        return _Started(proc, log, job, time.monotonic())


OUTCOMES = "outcomes.json"  # every job's outcome, for --replay


class ReplayRunner:
    """--replay: answers each job with its recorded outcome (the files it left are still in --out) and runs again
    only the jobs of `rerun` (the reference, whose inputs a test may have changed)."""

    def __init__(self, recorded: dict[str, dict], runner, rerun: tuple[str, ...] = ("reference",)):
        self.recorded, self.runner, self.rerun = recorded, runner, rerun

    def start(self, job: Job):
        if job.name in self.rerun or job.name not in self.recorded:
            return self.runner.start(job)
        return _Answered(Outcome(**self.recorded[job.name]))


class _Answered:
    def __init__(self, outcome: Outcome):
        self.outcome = outcome

    def poll(self) -> Outcome:
        return self.outcome


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
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"start no run that would end after this many seconds (default {DEFAULT_BUDGET_S}; "
                        f"rehearsal: 900)")
    p.add_argument("--rehearse", action="store_true",
                   help="the whole check on CPU under the ZeRO-on-CPU stand-ins (tests/zero_cpu.py), at small sizes")
    p.add_argument("--replay", action="store_true",
                   help="judge the recorded outputs of an earlier --out again, rerunning only the reference step")
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 900 if args.rehearse else DEFAULT_BUDGET_S
    if args.rehearse:  # one process as on the one-GPU device; two runs at a time on a CPU test machine
        args.nproc, args.parallel = args.nproc or 1, args.parallel or 2
    if args.replay and not (args.out / OUTCOMES).is_file():
        p.error(f"--replay: {args.out / OUTCOMES} does not exist (run the check into --out first)")
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


def sized(args, settings: list[str]) -> list[str]:
    """The settings, at the rehearsal's sizes when rehearsing (REHEARSAL_SIZES replaces those keys' values)."""
    if not args.rehearse:
        return list(settings)
    return [f"{k}={REHEARSAL_SIZES[k]}" if k in REHEARSAL_SIZES else f"{k}={v}"
            for k, v in (item.split("=", 1) for item in settings)]


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


def plan_small(args, nproc: int, gemini: bool) -> tuple[list[Job], dict]:
    """Jobs of checks 1-6: the small model and its tokenizer, the straight, resumed and
    overflow runs; gemini's only where its kernels can be built (`gemini`)."""
    model = args.out / "models" / "small"
    tokenizer = model / "tokenizer.model"
    shape = REHEARSAL_MODEL if args.rehearse else SMALL_MODEL
    vocab = REHEARSAL_VOCAB if args.rehearse else VOCAB
    jobs = [Job("model-small", lambda: [args.python, "-m", "llama.tiny", "--corpus", str(REPO / "pretraining_corpora"),
                                        "--output", str(model), "--vocab-size", str(vocab), *shape],
                timeout_s=240, estimate_s=40)]
    info = {"model": model, "tokenizer": tokenizer, "straight": {}, "overflow": {}}
    common = [f"init_model_path={model}", f"pretrain_data_root_dir={REPO / 'pretraining_corpora'}"]
    runs_needed = any(c in args.checks for c in ("step1_loss", "finite", "resume", "packing", "reload"))
    if runs_needed or "overflow" in args.checks:
        jobs.append(Job("scale-small", lambda: device_step(args, "scale-output", str(model), str(OUTPUT_SCALE)),
                        ("model-small",), 120, 15))
    for plugin, precision, packing in SMALL_RUNS if runs_needed else ():
        name = run_name(plugin, precision)
        info["straight"][name] = {"plugin": plugin, "precision": precision, "packing": packing}
        if plugin == "gemini" and not gemini:  # judged as skips the plan stated
            continue
        deps = ("scale-small", "kernels") if plugin == "gemini" else ("scale-small",)
        settings = [*common, *sized(args, SMALL_SETTINGS), f"plugin={plugin}", f"precision={precision}",
                    f"packing={packing}"]
        jobs.append(train_job(args, name, nproc, settings, deps, 300, 45))
        if "resume" in args.checks:
            jobs.append(train_job(args, f"{name}-resumed", nproc, settings, (name,), 300, 45,
                                  resume_of=args.out / "runs" / name))
    for plugin in ("gemini", "zero2") if "overflow" in args.checks else ():
        name = f"{plugin}-fp16-overflow"
        info["overflow"][name] = plugin
        if plugin == "gemini" and not gemini:
            continue
        deps = ("scale-small", "kernels") if plugin == "gemini" else ("scale-small",)
        settings = [*common, *sized(args, OVERFLOW_SETTINGS), f"plugin={plugin}", "precision=fp16"]
        jobs.append(train_job(args, name, nproc, settings, deps, 300, 60))
    return jobs, info


def plan_mfu(args) -> list[Job]:
    """One bench/gpu_throughput.py run per shape, each alone on the GPUs (exclusive: timings)."""
    jobs = []
    for shape in MFU_SHAPES:
        budget = dict((phase, s) for phase, s, _ in PHASES)[f"mfu-{shape}"]
        argv = MFU_REHEARSAL_ARGS if args.rehearse else ["--shapes", shape, *MFU_BENCH_ARGS]
        jobs.append(Job(f"mfu-{shape}", lambda argv=argv: [args.python, str(BENCH), *argv], (), budget + 120, budget,
                        exclusive=True))
    return jobs


def check(args, runner, say: Callable[[str], None], emit: Callable[[Result], None],
          clock: Callable[[], float] = time.monotonic, outcomes: dict | None = None,
          phases: dict | None = None, emit_plan: Callable[[dict], None] = lambda plan: None) -> None:
    """The phases of PHASES in order; `outcomes` collects every job's outcome, `phases` each phase's seconds."""
    outcomes = {} if outcomes is None else outcomes
    phases = {} if phases is None else phases
    start = clock()
    deadline = start + args.budget_s

    def phase(name: str, jobs: list[Job], parallel: int, slack: float = 0.0) -> None:
        t0 = clock()
        outcomes.update(run_jobs(jobs, runner, parallel, deadline + slack, say, clock, earlier=outcomes))
        phases[name] = round(clock() - t0, 1)

    phase("facts", [Job("facts", lambda: device_step(args, "facts"), timeout_s=180, estimate_s=5)], 1)
    facts_run = outcomes["facts"]
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
    # Gemini needs HybridAdam's kernels: where facts found no toolchain to build them, the plan says so first.
    problem = facts.get("toolchain_problem") if "toolchain_problem" in facts else (
        None if facts.get("nvcc") else "no nvcc")
    gemini = not problem
    not_tested = {} if gemini else {
        "gemini": f"{problem}: gemini and HybridAdam not testable on this image",
        "kernels": f"{problem}: HybridAdam's kernels cannot be built on this image"}
    small, info = plan_small(args, nproc, gemini)
    mfu = plan_mfu(args) if "mfu" in args.checks else []
    optional = {name: why for name, why in OPTIONAL.items() if any(job.name == name for job in mfu)}
    plan = {"plan": True, "rehearsal": bool(args.rehearse), "nproc": nproc, "parallel": parallel,
            "budget_s": args.budget_s,
            "phases": [{"phase": p, "budget_s": b, "basis": why} for p, b, why in PHASES],
            "not_tested": not_tested, "optional": optional}
    emit_plan(plan)
    stated = {**not_tested, **optional}

    def emit_judged(result: Result) -> None:
        if result.status == "skip":
            result.planned = stated_skip(stated, result)
        emit(result)

    needs_kernels: set[str] = set()  # gemini's jobs and those after them (its resumed runs)
    for job in small + mfu:
        if any(d == "kernels" or d in needs_kernels for d in job.deps):
            needs_kernels.add(job.name)
    kernels = [Job("kernels", lambda: device_step(args, "build-kernels"), timeout_s=300, estimate_s=60,
                   uses_slot=False)] if needs_kernels else []
    models = [j for j in small if not j.logdir]
    runs = [j for j in small if j.logdir]
    # facts; zero2 and ddp (no kernel), while the kernels build; gemini; the reference; MFU 1B; MFU 7B if time remains
    phase("small", kernels + models + [j for j in runs if j.name not in needs_kernels], parallel)
    phase("gemini", [j for j in runs if j.name in needs_kernels], parallel)
    if "kernels" in outcomes:
        built = outcomes["kernels"]
        emit_judged(Result("kernels", "pass" if built.ok else "fail", "", {
            **(built.json() or {}), "nvcc": facts.get("nvcc"),
            **({} if built.ok else {"error": "gemini is not runnable here: " + built.why()})}))
    elif "kernels" in not_tested:
        emit_judged(Result("kernels", "skip", "", {"reason": not_tested["kernels"]}))
    for job in models:  # a model that could not be written fails here; what needs it is skipped
        if outcomes[job.name].returncode not in (0, None):
            emit(Result("setup", "fail", job.name, {"error": outcomes[job.name].why()}))
    t0 = clock()
    judge_small(args, runner, say, emit_judged, outcomes, info, deadline, clock)
    phases["reference"] = round(clock() - t0, 1)
    for job in mfu:  # the fast path may not lose to the old one, except on the rehearsal's CPU (same kernels)
        phase(job.name, [job], 1)
        emit_judged(judged_run(outcomes, job.name, lambda: judge_mfu(job.name, outcomes[job.name].json(),
                                                                     0.0 if args.rehearse else 1.0), "mfu"))


def judged_run(outcomes: dict[str, Outcome], job: str, judge: Callable[[], Result], check_name: str,
               run: str = "") -> Result:
    """The judgement of a job's output, or why there is none: the job failed (fail) or never started (skip)."""
    outcome = outcomes.get(job)
    if outcome is not None and outcome.returncode is None and outcome.reason.startswith("could not start"):
        return Result(check_name, "fail", run or job, {"error": outcome.reason})  # e.g. no checkpoint to resume
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
        # Judging what ran is worth a little past the deadline (the MFU runs after it then do not start).
        ref_outcome = run_jobs([ref_job], runner, 1, deadline + 20, say, clock)["reference"]
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


def summarize(results: list[Result], seconds: float, phases: dict | None = None) -> dict:
    """Counts, and what was tested and what not: `ok` only when nothing failed and every skip was planned."""
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
    failed = sorted({r.name for r in results if r.status == "fail"})
    unplanned = sorted({r.name for r in results if r.status == "skip" and not r.planned})
    judged = [r for r in results if r.status != "skip"]
    not_tested = {r.name: r.planned or r.details.get("reason", "") for r in results if r.status == "skip"}
    return {"summary": True, **counts, "ok": not failed and not unplanned, "failed": failed,
            "unplanned_skips": unplanned,
            "tested": {"runs": sorted({r.run for r in judged if r.run}), "checks": sorted({r.check for r in judged})},
            "not_tested": not_tested, "phase_seconds": phases or {}, "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None, runner=None, clock: Callable[[], float] = time.monotonic) -> int:
    args = parse_args(argv)
    recorded = None
    if args.replay:
        recorded = json.loads((args.out / OUTCOMES).read_text(encoding="utf-8"))
    else:
        shutil.rmtree(args.out, ignore_errors=True)
        args.out.mkdir(parents=True)
    runner = runner or Runner(args.out / "logs", {"GPU_CHECK_REHEARSE": "1"} if args.rehearse else {})
    if recorded is not None:
        runner = ReplayRunner(recorded, runner)
    start = clock()
    results: list[Result] = []
    outcomes: dict[str, Outcome] = {}
    phases: dict[str, float] = {}
    report = open(args.out / "gpu_check.jsonl", "w", encoding="utf-8")

    def write(line: str) -> None:
        print(line, flush=True)
        report.write(line + "\n")
        report.flush()

    def emit(result: Result) -> None:
        results.append(result)
        write(result.line())

    def say(message: str) -> None:
        print(f"[gpu_check {clock() - start:4.0f} s] {message}", file=sys.stderr, flush=True)

    try:
        check(args, runner, say, emit, clock, outcomes, phases, lambda plan: write(json.dumps(plan)))
    finally:
        summary = summarize(results, clock() - start, phases)
        write(json.dumps(summary))
        report.close()
        if not args.replay:
            (args.out / OUTCOMES).write_text(json.dumps(
                {name: {"returncode": o.returncode, "output_tail": o.output_tail, "seconds": o.seconds,
                        "reason": o.reason} for name, o in outcomes.items()}), encoding="utf-8")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
