"""The training loop shared by the three stages: `run_stage(args_module, Records, argv)`, then `train()`.

Read top to bottom: launch -> model inputs checked -> data built -> model -> engine -> resume -> steps -> final/.
Each stage's *_main.py only brings its RecordRules (how records become samples) and its args file.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from training.checkpoint import (TrainerState, find_latest, last_save_seconds, load_checkpoint, remove_leftovers,
                                 resolve_resume, save_checkpoint, save_final, set_aside_newer, trainer_state_of)
from training.checkpoint_files import CheckpointError
from training.engine import Engine, choose_engine
from training.evaluation import HeldOut, load_held_out
from training.flops import flops_per_token, peak_tflops_per_gpu, recompute_flops_per_token
from training.launch import StopRequest, launch, shutdown
from training.metrics import Metrics, batch_line, gather_data_counters, setup_logging
from training.model_loading import ModelInputError, check_model_inputs, log_host_memory
from training.run_preview import end_token_warning, preview_lines, tokens_line
from training.corpus import DataError
from training.data_stream import DataStream
from training.record_rules import RecordRules
from training.settings import Settings, SettingsError, load_settings, resolve_global_batch

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. max_bad_steps non-finite steps in a row); the message says what to do."""


def run_stage(args_module, rules: type[RecordRules], argv: list[str]) -> None:
    """A stage script's command line: its args file with key=value overrides, then train() on its record rules."""
    with _expected_errors_as_one_line():
        settings = load_settings(args_module, argv)
    train(settings, rules)


def train(settings: Settings, rules: type[RecordRules]) -> None:
    try:
        with _expected_errors_as_one_line():
            _train(settings, rules)
    finally:
        shutdown()


@contextlib.contextmanager
def _expected_errors_as_one_line():
    """Expected failures (bad settings, model inputs, data, checkpoints, a diverging run) end the process with one
    clear line per failing rank and exit code 1, instead of a traceback."""
    try:
        yield
    except (SettingsError, ModelInputError, CheckpointError, TrainingError, DataError) as e:
        if logging.getLogger().handlers:  # set up by setup_logging: rank 0's console, every rank's log file
            logger.error("error: %s: %s", type(e).__name__, e)
        else:
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _train(settings: Settings, rules: type[RecordRules]) -> None:
    # ---- launch: torchrun environment, process group, per-rank seeds, logging
    run = launch(settings.data.seed)
    log_file = setup_logging(settings.output.logdir, run.rank)
    settings = resolve_global_batch(settings, run.world_size)  # gradient_accumulation_steps from global_batch_size
    if run.rank == 0:
        logger.info(settings.format())
    logger.info("rank %d of %d (local rank %d) on %s; log file %s", run.rank, run.world_size, run.local_rank,
                run.device, log_file)
    logger.info(batch_line(settings, run.world_size))
    engine = choose_engine(settings)
    choice = engine.choice

    # ---- model inputs: path, config, tokenizer, lengths -- before any data or model memory
    inputs = check_model_inputs(settings)
    if run.rank == 0:
        logger.info(tokens_line(inputs.tokenizer, settings))
        warning = end_token_warning(inputs.tokenizer, settings)
        if warning:
            logger.warning(warning)

    # ---- data: built and validated before the model, so a bad corpus fails in seconds
    data = DataStream(settings.data, inputs.tokenizer, run.rank, run.world_size, rules, settings.chat)
    try:
        if run.rank == 0 and settings.output.preview_samples:
            for line in preview_lines(data, inputs.tokenizer):
                logger.info(line)
        held_out = load_held_out(settings, data, run.rank, run.world_size)  # None: no evaluation
        # ---- model and engine (booster, plugin, optimizer, lr schedule)
        model = engine.build_model(inputs)
        fpt = flops_per_token(model, inputs.config.num_hidden_layers, inputs.config.hidden_size,
                              settings.data.max_seq_length)
        recompute_fpt = recompute_flops_per_token(model, inputs.config.hidden_size, settings.data.max_seq_length)
        resume_from = _agree_on_resume(settings, run.rank)
        engine.boost(model, initial_weights=inputs if resume_from is None else None)
        logger.info("engine: plugin=%s precision=%s device=%s", choice.plugin, choice.precision, choice.device)

        # ---- resume: model, optimizer, scheduler, this rank's data position and RNG
        state = TrainerState(world_size=run.world_size, settings=settings.to_dict())
        if resume_from is not None:
            state = load_checkpoint(resume_from, engine, data, settings)
            state.settings = settings.to_dict()
            logger.info("resumed from %s at step %d (%s tokens seen)", resume_from, state.step,
                        f"{state.tokens_seen:,}")
        log_host_memory("with the model loaded")

        # ---- the loop
        completed = _run_steps(settings, run, engine, data, inputs, state, fpt, held_out, recompute_fpt, resume_from)
        if completed:
            final = save_final(engine, inputs.config, inputs.tokenizer, settings.output.output_dir,
                               None if settings.chat is None else settings.chat.chat_format)  # stage 3 only
            logger.info("finished %d steps; model saved to %s", state.step, final)
    finally:
        data.close()


def _run_steps(settings, run, engine: Engine, data, inputs, state: TrainerState, fpt: float,
               held_out: HeldOut | None, recompute_fpt: float, resumed_from: Path | None) -> bool:
    """Train until max_steps (True) or a stop signal (False: after a checkpoint where it fits the grace left).

    A checkpoint is written every saving_steps, every saving_minutes, on SIGUSR1, on a stop that leaves time for it,
    and before a data error ends the run. Each of these is decided from the step's one all-reduce (or, for a data
    error, the one before the step's forward), so that every rank saves, or none."""
    stop = StopRequest(settings.output.stop_grace_seconds, last_save_seconds(resumed_from))
    save_every = settings.output.saving_minutes * 60  # seconds; 0: saving_steps only
    last_saved, last_save_at = resumed_from, time.monotonic()
    metrics = Metrics(settings, run.rank, run.world_size, fpt,
                      peak_tflops_per_gpu(settings.output.peak_tflops_per_gpu, run.device, engine.choice.precision),
                      start_step=state.step, recompute_flops_per_token=recompute_fpt)
    metrics.skipped_total, metrics.empty_total = state.skipped_steps, state.empty_steps
    batches = iter(data)
    engine.model.train()
    accumulation = settings.optimisation.gradient_accumulation_steps
    save_due = False
    try:
        if held_out is not None and state.step == 0:
            _evaluate(held_out, engine, metrics, state)  # the starting model: every curve shows change from it
        while state.step < settings.optimisation.max_steps:
            # ---- forward and backward over the micro-batches of one optimizer step
            loss_sum = torch.zeros((), device=run.device)  # finite micro-batch losses, summed
            bad = torch.zeros((), device=run.device)  # micro-batches whose loss is not finite
            tokens = 0
            counted = 0  # micro-batches with a target token (the others' loss is 0 by definition, not a result)
            step_batches, data_error = _fetch_step(batches, data, accumulation, metrics, run.device)
            if step_batches is None:  # a record failed on some rank: the model and optimizer are at state.step
                _save_before_data_error(settings, engine, data, inputs, state, metrics, last_saved, data_error)
            for micro, batch in enumerate(step_batches):
                doc_ids = batch.get("doc_ids")
                with metrics.timed("forward_backward"), engine.no_sync(last_micro_batch=micro == accumulation - 1):
                    with engine.autocast():
                        loss, _ = engine.model(batch["input_ids"].to(run.device, non_blocking=True),
                                               loss_mask=batch["loss_mask"].to(run.device, non_blocking=True),
                                               doc_ids=None if doc_ids is None else doc_ids.to(run.device))
                    engine.backward(loss)
                finite = torch.isfinite(loss.detach())
                loss_sum += torch.where(finite, loss.detach().float(), torch.zeros_like(loss_sum))
                bad += (~finite).float()
                tokens += int(batch["num_tokens"])
                counted += int(batch["num_target_tokens"] > 0)

            # ---- one all-reduce: the mean loss, whether any rank saw a non-finite loss, tokens, stop requests, the
            # micro-batches that counted a target token, save requests (SIGUSR1), ranks where a stop's save does not
            # fit the grace left, and ranks whose saving_minutes are up
            flags = [tokens, stop.requested, counted, stop.take_save_request(), not stop.save_fits(),
                     save_every > 0 and time.monotonic() - last_save_at >= save_every]
            stats = torch.cat([torch.stack([loss_sum, bad]), torch.tensor([float(f) for f in flags], device=run.device)])
            dist.all_reduce(stats)
            loss_total, bad_total, global_tokens, stops, global_counted, save_now, no_time, time_due = stats.tolist()
            with metrics.timed("optimizer"):
                outcome = engine.step(loss_is_finite=bad_total == 0, empty=global_counted == 0)
            state.step += 1
            state.tokens_seen += int(global_tokens)
            mean_loss = loss_total / max(global_counted, 1)
            metrics.record(mean_loss, outcome.skipped, outcome.grad_norm, outcome.loss_scale, outcome.lr,
                           int(global_tokens), empty=outcome.empty)
            state.skipped_steps, state.empty_steps = metrics.skipped_total, metrics.empty_total

            max_bad_steps = settings.optimisation.max_bad_steps
            if metrics.consecutive_bad >= max_bad_steps:
                latest = find_latest(settings.output.output_dir)
                raise TrainingError(
                    f"{metrics.consecutive_bad} consecutive steps with a non-finite loss or gradients "
                    f"(max_bad_steps={max_bad_steps}), up to step {state.step}; stopping without saving. "
                    f"Last good checkpoint: {latest or 'none'}. Lower lr or check the data, then resume with "
                    f"recover_training_from_checkpoint=latest")
            if state.step % settings.output.logging_steps == 0 or state.step == settings.optimisation.max_steps:
                counters = gather_data_counters(data.counters, data.passes, run.device)
                state.loss = metrics.log(state.step, state.tokens_seen, counters)["loss"]
            if held_out is not None and held_out.due(state.step, settings.optimisation.max_steps):
                _evaluate(held_out, engine, metrics, state)
            stopping = stops > 0
            if stopping and no_time > 0:
                latest = find_latest(settings.output.output_dir)
                logger.warning(
                    "stop requested (%s) at step %d: no checkpoint, since the last save took %s s, more than the "
                    "grace left of stop_grace_seconds=%s on %d rank(s); exiting now. A resume with "
                    "recover_training_from_checkpoint=latest will use %s", stop.signal_name or "on another rank",
                    state.step, f"{stop.last_save_seconds:.1f}" if stop.last_save_seconds is not None else "?",
                    settings.output.stop_grace_seconds, int(no_time),
                    f"{latest} (step {trainer_state_of(latest).step})" if latest else "none: it starts fresh")
                return False
            save_due = save_due or state.step % settings.output.saving_steps == 0 or time_due > 0
            # A save that falls inside a run of skipped steps waits for the next good step, so that
            # keep_checkpoints never prunes the last good checkpoint in favour of one from a bad stretch.
            if (save_due and metrics.consecutive_bad == 0) or stopping or save_now > 0:
                save_due = False
                saved = _save(settings, engine, data, inputs, state, metrics)
                last_saved, last_save_at, stop.last_save_seconds = saved.path, time.monotonic(), saved.seconds
                if save_now > 0 and not stopping:
                    logger.info("save requested (SIGUSR1): checkpoint saved at step %d, training goes on", state.step)
            if stopping:
                logger.info("stop requested (%s): checkpoint saved at step %d, exiting cleanly",
                            stop.signal_name or "on another rank", state.step)
                return False
        return True
    finally:
        metrics.close()
        stop.restore()


def _save(settings, engine: Engine, data, inputs, state: TrainerState, metrics: Metrics):
    state.loss = metrics.recent_loss()
    with metrics.paused():
        return save_checkpoint(engine, data, state, inputs.config, inputs.tokenizer, settings.output.output_dir,
                               settings.output.keep_checkpoints)


def _fetch_step(batches, data, accumulation: int, metrics: Metrics, device):
    """(the micro-batches of one step, fetched before its forward, None), or (None, this rank's DataError or None)
    when a record failed on any rank. Every rank learns it from one all-reduce before any rank starts the step's
    collectives; the stream's position is then set back to the step's start (the batches fetched before the error
    are not trained on, so they must not count as handed out)."""
    mark = data.position_mark()
    fetched, error = [], None
    with metrics.timed("data"):
        try:
            for _ in range(accumulation):
                fetched.append(next(batches))
        except DataError as e:  # raised by the prefetch thread, at the get() that would hand out the bad batch
            error = e
    failed = torch.tensor([float(error is not None)], device=device)
    dist.all_reduce(failed)
    if failed.item() == 0:
        return fetched, None
    data.rewind_to(mark)
    return None, error


def _save_before_data_error(settings, engine: Engine, data, inputs, state: TrainerState, metrics: Metrics,
                            last_saved: Path | None, error: DataError | None) -> None:
    """A record failed mid-run (bad JSON, a missing field) on some rank: every rank saves the last completed step,
    whose model, optimizer and data position agree, then ends with one line: the record's on the rank that read it,
    a pointer to it on the others."""
    if state.step == 0:
        where = "no step had completed, so there is nothing to save"
    elif last_saved is not None and trainer_state_of(last_saved).step == state.step:
        where = f"the checkpoint of step {state.step}, the last completed step, is {last_saved}"
    else:
        saved = _save(settings, engine, data, inputs, state, metrics)
        where = f"saved a checkpoint of step {state.step}, the last completed step: {saved.path}"
    then = ("; resume with recover_training_from_checkpoint=latest and skip_bad_records=True to skip such records, "
            "or mend the file and resume with accept_changed_files=True too (a changed file is read again from its "
            "start)" if state.step else "")
    if error is not None:
        raise DataError(f"{error}; {where}{then}")
    raise TrainingError(f"a record failed on another rank (its log file has the line); {where}{then}")


def _evaluate(held_out: HeldOut, engine: Engine, metrics: Metrics, state: TrainerState) -> None:
    """Held-out loss per set, outside the throughput window; before a checkpoint of the same step, so that a
    resumed run never misses an evaluation."""
    with metrics.paused():
        scores = held_out.evaluate(engine)
    if scores is not None:
        metrics.log_eval(state.step, state.tokens_seen, scores)


def _agree_on_resume(settings: Settings, rank: int):
    """Rank 0 resolves recover_training_from_checkpoint ("latest" or a path) and every rank uses its answer."""
    chosen = [None, None]
    if rank == 0:
        try:
            path = resolve_resume(settings.output.recover_training_from_checkpoint, settings.output.output_dir)
            remove_leftovers(settings.output.output_dir)
            if path is not None and Path(settings.output.output_dir).resolve() == path.parent.resolve():
                set_aside_newer(settings.output.output_dir, trainer_state_of(path).step)
            chosen = [str(path) if path else None, None]
        except CheckpointError as e:
            chosen = [None, str(e)]
    dist.broadcast_object_list(chosen, src=0)
    if chosen[1]:
        raise CheckpointError(chosen[1])
    return Path(chosen[0]) if chosen[0] else None

