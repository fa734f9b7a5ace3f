"""Training metrics: window-mean loss, lr, grad norm, real tokens/s, TFLOPS and MFU per GPU, loss scale, skipped steps.

Where they go: the rank-0 console (log lines above a tqdm bar), logdir/log.txt.<rank> on every rank, TensorBoard
event files under logdir (with the run's settings as hparams) and logdir/metrics.jsonl (one JSON object per log line,
full precision; rank 0). Every training log line says how far the run is: the elapsed time of this process, the
step time and the ETA (the steps left at this process's mean wall time per step, evaluations and saves included),
and the data counters summed over ranks (DataStream.counters: records skipped, answers and inputs cut, turns dropped;
and per set the passes over its files, the most of any rank), so that a run can be followed from its log file.
metrics.jsonl holds two kinds of record, told apart by their fields (readers select by field presence), each with
"time", the wall clock when written (Unix seconds):
    training window   {"step", "time", "tokens_seen", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s",
                       "eta_s", ..., "data": {<counter>: n, ..., "passes": {<set>: n}}}
    held-out scores   {"step", "time", "tokens_seen", "eval": {"sets": {<set>: {"loss", "ppl", "tokens",
                                                                          "bits_per_byte", "bits_per_char", "bytes",
                                                                          "chars"}},
                                                               "mix": {the same, "weights"}, "seconds"}}
("mix" is absent when no held-out set is in the training mix; see training/evaluation.py.)
Time spent inside `metrics.paused()` (held-out evaluation, checkpoint saves) is left out of tokens/s and MFU.

Model and hardware FLOPs per token, and the peak they are divided by: training/flops.py.
The first WARMUP_STEPS optimizer steps of a process (start-up, torch.compile, the allocator's first sizes) are left out
of the "steady_*" figures, which accumulate every later step of the run: the figures to compare between runs. Each
step's time is broken down into waiting for data, forward + backward and the optimizer step (Metrics.timed), taken
after the GPU finished each part (torch.cuda.synchronize), so that a part's kernels are not billed to the next.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from training.settings_concerns import Settings, SettingsError

logger = logging.getLogger(__name__)

WARMUP_STEPS = 2  # a process's first optimizer steps, left out of the steady figures
STEP_PARTS = ("data", "forward_backward", "optimizer")  # Metrics.timed's parts of a step


def batch_line(settings: Settings, world_size: int) -> str:
    """The batch of one optimizer step, for the log's first lines: per GPU, processes, accumulation, global, tokens
    (rows of max_seq_length: the most a step can train on; padding is counted in, packed rows have none)."""
    accumulation = settings.optimisation.gradient_accumulation_steps
    samples = settings.data.batch_size * world_size * accumulation
    source = (f"global_batch_size={settings.optimisation.global_batch_size}" if settings.optimisation.global_batch_size
              else "gradient_accumulation_steps as set")
    return (f"batch: {settings.data.batch_size} per GPU x {world_size} processes x {accumulation} accumulation = "
            f"{samples} samples per optimizer step ({source}); x {settings.data.max_seq_length} tokens = "
            f"{samples * settings.data.max_seq_length:,} tokens per step at most")


def clock(seconds: float) -> str:
    """H:MM:SS of a duration, for the log line."""
    seconds = int(max(seconds, 0) + 0.5)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def gather_data_counters(counters: dict[str, int], passes: dict[str, int], device: torch.device) -> dict:
    """The data stream's counters summed over ranks, and per set the most passes any rank has made over its share
    of the files (a collective: every rank calls it at the same step)."""
    import torch.distributed as dist

    summed = torch.tensor([float(v) for v in counters.values()], dtype=torch.float64, device=device)
    most = torch.tensor([float(v) for v in passes.values()], dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return {**{name: int(v) for name, v in zip(counters, summed.tolist())},
            "passes": {name: int(v) for name, v in zip(passes, most.tolist())}}


def data_line(data: dict) -> str:
    """The data counters for a log line: what was skipped, cut and dropped, and each set's passes."""
    skipped = data.get("bad_records", 0) + data.get("empty_texts", 0) + data.get("too_long", 0)
    return (f"data: skipped {skipped:,} (bad {data.get('bad_records', 0):,}, empty {data.get('empty_texts', 0):,}, "
            f"too long {data.get('too_long', 0):,}), cut answers {data.get('cut_answers', 0):,}, cut input tokens "
            f"{data.get('cut_input_tokens', 0):,}, dropped turns {data.get('dropped_turns', 0):,}, passes "
            + ", ".join(f"{name} {n}" for name, n in data.get("passes", {}).items()))


def hparams(settings) -> dict[str, int | float | str | bool]:
    """The settings as TensorBoard hparams: numbers, text and flags as they are, anything else as its repr."""
    return {name: value if isinstance(value, (int, float, str, bool)) else repr(value)
            for name, value in settings.to_dict().items()}


def read_records(path: str | Path, kind: str) -> list[dict]:
    """The records of a metrics.jsonl that carry the field `kind` ("loss": training windows, "eval": held-out
    scores), one per step in step order. A resumed run appends after the killed one, so the last record of a step
    wins; a last line cut short by a killed process is left out. Any other unreadable line is a ValueError naming
    the file and line."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    by_step: dict[int, dict] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError) as e:
            if number == len(lines) and isinstance(e, json.JSONDecodeError):
                break  # torn by a kill mid-write
            raise ValueError(f"{path}:{number}: not a metrics record ({type(e).__name__}: {e})") from None
        if kind in record:
            by_step[step] = record
    return [by_step[step] for step in sorted(by_step)]


class _TqdmHandler(logging.Handler):
    """Console handler that prints above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # noqa: BLE001 - a logging handler must not raise
            self.handleError(record)


def _not_library_chatter(record: logging.LogRecord) -> bool:
    """Console filter: libraries that log INFO through the root logger (ColossalAI's "The model is going to be
    split to checkpoint shards...") go to the log file only, and so do records logged with extra=FILE_ONLY."""
    if getattr(record, "file_only", False):
        return False
    return record.name != "root" or record.levelno >= logging.WARNING


FILE_ONLY = {"file_only": True}  # logger.info(..., extra=FILE_ONLY): detail for log.txt.<rank>, not the console


def setup_logging(logdir: str | Path, rank: int) -> Path:
    """Root logger: logdir/log.txt.<rank> on every rank (INFO); the console on rank 0 (INFO) and on others only
    errors, so N processes do not print N copies."""
    logdir = Path(logdir)
    path = logdir / f"log.txt.{rank}"
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as e:  # before any work: the checkpoints would go beside the logs (output_dir)
        raise SettingsError(f"setting 'logdir' = {str(logdir)!r} (default: <output_dir>/logs): cannot write "
                            f"{e.filename or path}: {e.strerror or e}") from None
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(file_handler)
    console = _TqdmHandler()
    console.setLevel(logging.INFO if rank == 0 else logging.ERROR)
    console.addFilter(_not_library_chatter)
    console.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(levelname)s %(message)s"))
    root.addHandler(console)
    return path


class Metrics:
    """Accumulates per-step figures over a logging window and reports their means every `logging_steps`."""

    def __init__(self, settings: Settings, rank: int, world_size: int, flops_per_token: float,
                 peak_tflops: float | None, start_step: int, recompute_flops_per_token: float = 0.0):
        self.rank, self.world_size = rank, world_size
        self.logging_steps = settings.output.logging_steps
        self.max_steps = settings.optimisation.max_steps
        self.flops_per_token = flops_per_token
        self.hardware_flops_per_token = flops_per_token + recompute_flops_per_token
        self._steps_recorded = 0
        self._start_step = start_step
        self._started = time.perf_counter()  # the ETA's clock: this process's steps, pauses included
        self._last_record = time.perf_counter()
        self._paused_since_record = 0.0
        self._steady_seconds = 0.0
        self._steady_tokens = 0
        self._steady_steps = 0
        self._sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        self.peak_tflops = peak_tflops
        self._per = "GPU" if torch.cuda.is_available() else "process"  # the unit of the per-device figures
        self.skipped_total = 0
        self.empty_total = 0  # steps skipped for having no target token: neither an update nor a failure
        self.consecutive_bad = 0
        self._last_window_loss = float("nan")
        self._reset_window(time.perf_counter())
        self._writer = None
        self._bar = None
        self._jsonl = None
        if rank == 0:
            self._jsonl = open(Path(settings.output.logdir) / "metrics.jsonl", "a", encoding="utf-8")
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm

            self._writer = SummaryWriter(log_dir=str(settings.output.logdir))
            self._write_hparams(settings)
            # disable=None: a bar in a terminal, nothing when output goes to a file (CI, tests).
            self._bar = tqdm(total=self.max_steps, initial=start_step, desc="train", unit="step", disable=None,
                             dynamic_ncols=True, leave=False)

    def _write_hparams(self, settings) -> None:
        """The run's settings in TensorBoard's HPARAMS tab, in this run's own event file (SummaryWriter.add_hparams
        would start another run in a subfolder: torch/utils/tensorboard/writer.py), keyed to the training loss."""
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        writer = self._writer._get_file_writer()
        for summary in hparams_summaries(hparams(settings), {"train/loss": 0.0}):
            writer.add_summary(summary)

    def _reset_window(self, now: float) -> None:
        self._t0 = now
        self._losses: list[float] = []
        self._norms: list[float] = []
        self._tokens = 0
        self._skipped = 0
        self._empty = 0
        self._loss_scale = None
        self._lr = float("nan")
        self._steps = 0
        self._parts = dict.fromkeys(STEP_PARTS, 0.0)

    def record(self, loss: float, skipped: bool, grad_norm: float | None, loss_scale: float | None, lr: float,
               global_tokens: int, empty: bool = False) -> None:
        """One optimizer step. `loss` is the mean over ranks; `global_tokens` the real tokens of all ranks; an
        `empty` step (no target token anywhere) is counted apart and its loss and grad norm are not figures."""
        if empty:
            self._empty += 1
            self.empty_total += 1
        elif skipped:
            self._skipped += 1
            self.skipped_total += 1
            self.consecutive_bad += 1
        else:
            self.consecutive_bad = 0
            self._losses.append(loss)
            if grad_norm is not None and math.isfinite(grad_norm):
                self._norms.append(grad_norm)
        self._tokens += global_tokens
        self._steps += 1
        now = time.perf_counter()
        step_seconds = now - self._last_record - self._paused_since_record
        self._last_record, self._paused_since_record = now, 0.0
        self._steps_recorded += 1
        if self._steps_recorded > WARMUP_STEPS:
            self._steady_seconds += step_seconds
            self._steady_tokens += global_tokens
            self._steady_steps += 1
        self._loss_scale = loss_scale
        self._lr = lr
        if self._bar is not None:
            self._bar.update(1)

    def window_loss(self) -> float:
        return sum(self._losses) / len(self._losses) if self._losses else float("nan")

    def recent_loss(self) -> float:
        """The current window's mean loss, or the last logged one if nothing is recorded since (checkpoint names)."""
        return self.window_loss() if self._losses else self._last_window_loss

    @contextlib.contextmanager
    def paused(self):
        """Leave the time spent inside out of the current window's tokens/s (held-out evaluation, checkpoints)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self._t0 += spent
            self._paused_since_record += spent

    @contextlib.contextmanager
    def timed(self, part: str):
        """Add the time spent inside, up to the GPU's finishing it, to `part` (one of STEP_PARTS) of this window."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self._parts[part] += time.perf_counter() - start

    def _utilisation(self, tokens_per_s_per_gpu: float) -> dict[str, float]:
        """TFLOPS per GPU, and MFU and HFU where the peak is known, at this throughput."""
        tflops = tokens_per_s_per_gpu * self.flops_per_token / 1e12
        figures = {"tflops_per_gpu": tflops}
        if self.peak_tflops:
            figures["mfu"] = tflops / self.peak_tflops
            figures["hfu"] = tokens_per_s_per_gpu * self.hardware_flops_per_token / 1e12 / self.peak_tflops
        return figures

    def log(self, step: int, tokens_seen: int, data: dict | None = None) -> dict[str, float]:
        """Report the window ending at `step` (called every logging_steps and at the end), then start a new one.
        tokens_seen: real tokens of all ranks up to `step`, from the run's start (resumes included); data: the data
        counters (gather_data_counters)."""
        now = time.perf_counter()
        run_seconds = now - self._started
        eta = (self.max_steps - step) * run_seconds / max(step - self._start_step, 1)
        elapsed = max(now - self._t0, 1e-9)
        tokens_per_s = self._tokens / elapsed
        per_gpu = tokens_per_s / self.world_size
        utilisation = self._utilisation(per_gpu)
        tflops, mfu = utilisation["tflops_per_gpu"], utilisation.get("mfu")
        grad_norm = sum(self._norms) / len(self._norms) if self._norms else float("nan")
        figures = {"loss": self.window_loss(), "lr": self._lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                   "tokens_per_s_per_gpu": per_gpu, **utilisation, "skipped_steps": self._skipped,
                   "skipped_steps_total": self.skipped_total, "empty_steps": self._empty,
                   "empty_steps_total": self.empty_total}
        steps = max(self._steps, 1)
        figures["elapsed_s"], figures["eta_s"] = run_seconds, eta
        figures["step_s"] = elapsed / steps
        figures.update({f"{part}_s": seconds / steps for part, seconds in self._parts.items()})
        if self._steady_steps:
            steady = self._steady_tokens / max(self._steady_seconds, 1e-9) / self.world_size
            figures.update({"steady_steps": self._steady_steps, "steady_tokens_per_s_per_gpu": steady,
                            **{f"steady_{k}": v for k, v in self._utilisation(steady).items()}})
        if self._loss_scale is not None:
            figures["loss_scale"] = self._loss_scale
        if torch.cuda.is_available():
            # Peaks of this window: the counters are reset below, so a spike shows in the window it happened in.
            figures["max_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
            figures["max_memory_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
            torch.cuda.reset_peak_memory_stats()
        logger.info(
            "step %d/%d | elapsed %s | ETA %s | loss %.4f | lr %.3e | grad_norm %.3f | tokens/s %s (%s/%s) | "
            "TFLOPS/%s %.3f | MFU %s%s%s | step %.3f s: data %.3f, fwd+bwd %.3f, optimizer %.3f | skipped %d "
            "(total %d)%s%s",
            step, self.max_steps, clock(run_seconds), clock(eta), figures["loss"], self._lr, grad_norm,
            f"{tokens_per_s:,.0f}", f"{per_gpu:,.0f}",
            self._per, self._per, tflops, (f"{mfu:.1%} (HFU {figures['hfu']:.1%}" + (
                f", steady after {WARMUP_STEPS} steps: MFU {figures['steady_mfu']:.1%} HFU {figures['steady_hfu']:.1%}"
                if "steady_mfu" in figures else "") + ")") if mfu is not None else "n/a",
            f" | loss_scale {self._loss_scale:g}" if self._loss_scale is not None else "",
            f" | GPU mem {figures['max_memory_gb']:.1f} GB (reserved {figures['max_memory_reserved_gb']:.1f})"
            if "max_memory_gb" in figures else "", figures["step_s"], figures["data_s"],
            figures["forward_backward_s"], figures["optimizer_s"], self._skipped,
            self.skipped_total, f" | empty {self._empty} (total {self.empty_total})" if self.empty_total else "",
            f" | {data_line(data)}" if data is not None else "")
        if self._writer is not None:
            for name, value in figures.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(f"train/{name}", value, step)
            for name, value in (data or {}).items():
                for tag, n in (value.items() if isinstance(value, dict) else [("", value)]):
                    self._writer.add_scalar(f"data/{name}/{tag}" if tag else f"data/{name}", n, step)
            self._writer.flush()
        if self._jsonl is not None:
            record = {"step": step, "time": round(time.time(), 3), "tokens_seen": tokens_seen, **figures}
            self._jsonl.write(json.dumps({**record, "data": data} if data is not None else record) + "\n")
            self._jsonl.flush()
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{figures['loss']:.4f}", lr=f"{self._lr:.2e}")
        self._last_window_loss = figures["loss"]
        self._reset_window(now)
        return figures

    def log_eval(self, step: int, tokens_seen: int, scores) -> None:
        """One held-out evaluation (training/evaluation.py Scores): per-set losses on the console, loss, perplexity
        and tokens per set in the log file, eval/<set>/{loss,ppl,tokens} in TensorBoard, an "eval" record in
        metrics.jsonl."""
        mix = scores.mix
        logger.info("eval step %d | %s%s | %.1f s", step,
                    " | ".join(f"{name} {score.loss:.4f} ({score.bits_per_char:.3f} bits/char)"
                               for name, score in scores.sets.items()),
                    f" | mix {mix.loss:.4f} (ppl {mix.ppl:.4g})" if mix is not None else "", scores.seconds)
        logger.info("eval step %d (%s tokens seen): %s", step, f"{tokens_seen:,}",
                    "; ".join(f"{name} loss {s.loss:.4f} ppl {s.ppl:.4g} tokens {s.tokens:,} bits/byte "
                              f"{s.bits_per_byte:.4f} bits/char {s.bits_per_char:.4f}"
                              + ("" if name in scores.weights else " (not in the mix)")
                              for name, s in scores.sets.items()), extra=FILE_ONLY)
        rows = {name: s.row() for name, s in scores.sets.items()}
        record = {"sets": rows, "seconds": scores.seconds}
        if mix is not None:
            record["mix"] = {**mix.row(), "weights": scores.weights}
        if self._writer is not None:
            tagged = {f"eval/{name}": row for name, row in rows.items()}
            if mix is not None:
                tagged["eval/mix-weighted"] = {"loss": mix.loss, "ppl": mix.ppl, "bits_per_char": mix.bits_per_char}
            for prefix, row in tagged.items():
                for key, value in row.items():
                    if math.isfinite(value):
                        self._writer.add_scalar(f"{prefix}/{key}", value, step)
            self._writer.flush()
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), "tokens_seen": tokens_seen,
                                          "eval": record}) + "\n")
            self._jsonl.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
