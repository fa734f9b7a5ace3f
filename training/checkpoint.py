"""Checkpoints: atomic save, "latest" discovery, exact resume, and the final model directory. This module orchestrates
the holders of state (the engine, the data, the RNG streams, the loop's TrainerState); file names, integrity checks and
durable writes are training/checkpoint_files.py's, the all-ranks failure agreement training/all_ranks.py's.

Layout of output_dir/ckpt_step-<step>_loss-<loss>/ (written as <name>.tmp/, renamed when complete):
    config.json, tokenizer files (.model or .json),     a loadable model directory: the next stage's init_model_path
    model.safetensors.index.json + model-*.safetensors  (engine.save_weights)
    optimizer/  or  optimizer.bin                       engine.save_state: ColossalAI sharded save (one file on the
                                                        CPU fallback); or
    optimizer.none.json                                 instead, when no optimizer step had succeeded yet (ZeRO)
    master_weights.rank<R>.safetensors                  ZeRO: each rank's fp32 master weight shards (exact resume)
    loss_scaler.json                                    ZeRO fp16: the dynamic loss scale and its counters
    scheduler.json                                      lr scheduler state
    grad_scaler.json                                    ddp + fp16 only: torch GradScaler's scale and growth tracker
    data_state.rank<R>.json                             each rank's DataStream position
    rng_state.rank<R>.json                              each rank's torch, CUDA and Python RNG states
    trainer_state.json                                  step, tokens seen, loss, skipped steps, world size, settings;
                                                        written last, so its presence marks a complete checkpoint
Nothing is unpickled on load: JSON, safetensors, and the optimizer through torch.load(weights_only=True).

Another number of processes resumes too: the weights and the ZeRO optimizer states are saved whole and cut by
ColossalAI's loaders for the new world; the fp32 masters are re-cut by parameter name and offset
(training/engine/masters.py); the scalers and the lr schedule are the same on every rank; the data stream
goes on from all the old ranks' positions (DataStream.load_resharded); the RNGs are seeded afresh (reseed_rng).

Saving and loading are collective, and a disk can fill or a file can be damaged on one rank only: then every rank
ends with the same one-line CheckpointError naming the checkpoint, the cause and the last complete checkpoint to
resume from (`all_ranks_or_none`), and a failed save leaves no partial directory behind.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training.all_ranks import all_ranks_or_none
from training.checkpoint_files import (DATA_STATE, FINAL_DIR, RNG_STATE, TMP_SUFFIX, TRAINER_STATE, CheckpointError,
                                       DamagedCheckpointError, fsync_dir, io_cause, read_json, verify_files,
                                       write_json)
from training.corpus import DataError
from training.launch import barrier, rank, world_size
from training.rng_state import capture_rng_state, reseed_rng, restore_rng_state
from training.settings_concerns import Settings

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^ckpt_step-(\d+)_loss-(nan|-?[0-9.]+)$")  # not <name>.tmp, not <name>.abandoned-*


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # real (non-pad) tokens consumed over all ranks
    loss: float = float("nan")  # mean loss of the last logged window
    skipped_steps: int = 0  # steps skipped for non-finite loss or gradients, in total
    empty_steps: int = 0  # steps skipped because no rank counted a target token, in total
    world_size: int = 1
    settings: dict[str, Any] = field(default_factory=dict)


def checkpoint_name(step: int, loss: float) -> str:
    loss_text = f"{loss:.4f}" if math.isfinite(loss) else "nan"
    return f"ckpt_step-{step}_loss-{loss_text}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints in output_dir, oldest first. `.tmp` directories (a save that never finished) and
    directories without trainer_state.json are not checkpoints."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and not path.name.endswith(TMP_SUFFIX) and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_latest(output_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def resolve_resume(setting: str, output_dir: str | Path) -> Path | None:
    """recover_training_from_checkpoint -> the checkpoint to load, or None for a fresh start.

    "latest" with no checkpoint yet starts fresh (so one command both starts and restarts a job); an explicit path
    must be a complete checkpoint. A fresh start into an output_dir that holds checkpoints is refused: its saves
    would mix with the old run's, and "latest" or keep_checkpoints could then pick or prune the wrong ones.
    """
    if not setting:
        existing = list_checkpoints(output_dir)
        if existing:
            raise CheckpointError(
                f"output_dir={str(output_dir)!r} already holds checkpoints (newest: {existing[-1][1].name}). To "
                f"continue that run set recover_training_from_checkpoint=latest; to start over use another "
                f"output_dir or remove them")
        return None
    if setting == "latest":
        latest = find_latest(output_dir)
        if latest is None:
            logger.warning("recover_training_from_checkpoint='latest': no complete checkpoint in %s, starting FRESH "
                           "from init_model_path (%s)", output_dir, leftovers_line(output_dir))
        return latest
    path = Path(setting)
    if not path.is_dir():
        raise CheckpointError(f"recover_training_from_checkpoint={setting!r}: no such checkpoint directory")
    if path.name.endswith(TMP_SUFFIX) or not (path / TRAINER_STATE).is_file():
        raise CheckpointError(f"recover_training_from_checkpoint={setting!r} is incomplete (a save that did not "
                              f"finish: a .tmp name or no {TRAINER_STATE}); use 'latest' or an earlier checkpoint")
    return path


def leftovers(output_dir: str | Path) -> list[Path]:
    """Directories of saves that never finished (<name>.tmp, final.tmp included): never checkpoints."""
    root = Path(output_dir)
    return sorted(root.glob(f"*{TMP_SUFFIX}")) if root.is_dir() else []


def leftovers_line(output_dir: str | Path) -> str:
    found = leftovers(output_dir)
    return (f"leftovers of unfinished saves, not checkpoints: {', '.join(p.name for p in found)}" if found
            else "no leftovers of unfinished saves")


def remove_leftovers(output_dir: str | Path) -> None:
    """At start (rank 0): name each leftover of a save that did not finish, and remove it or say why it cannot be.
    It holds no trainer_state.json, so it was never counted as a checkpoint; removing it frees its space before the
    run writes new ones."""
    for path in leftovers(output_dir):
        size = _size_of(path)
        marked = (path / TRAINER_STATE).is_file()
        what = (f"{path} ({size / 2**30:.2f} GiB, {'complete but never renamed' if marked else f'no {TRAINER_STATE}'}"
                f"): a save that did not finish, never counted as a checkpoint")
        try:
            shutil.rmtree(path)
        except OSError as e:
            logger.warning("leftover %s; cannot remove it (%s): remove it by hand to free its space", what,
                           e.strerror or e)
        else:
            logger.warning("leftover %s; removed", what)


def _size_of(path: Path) -> int:
    """Bytes in the files under `path` (0 for what vanished meanwhile)."""
    total = 0
    for file in path.rglob("*"):
        with contextlib.suppress(OSError):
            if file.is_file():
                total += file.stat().st_size
    return total


def set_aside_newer(output_dir: str | Path, step: int) -> list[Path]:
    """Resuming from an earlier checkpoint (e.g. to step back over a loss spike): rename the checkpoints after it
    to <name>.abandoned-<time>, so that "latest" and keep_checkpoints follow the resumed run. Nothing is deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for newer_step, path in list_checkpoints(output_dir):
        if newer_step > step:
            target = path.with_name(f"{path.name}.abandoned-{stamp}")
            os.replace(path, target)
            logger.warning("resuming from step %d: set aside the later checkpoint %s as %s", step, path.name,
                           target.name)
            moved.append(target)
    return moved


# ---------------------------------------------------------------------------------------------------- save


@dataclass
class Saved:
    """A checkpoint just written: where, how long the save took (this rank, from the first file to the rename and
    the prune), and its size on disk (rank 0's count; 0 on the others)."""
    path: Path
    seconds: float
    size_bytes: int

    def __str__(self) -> str:
        return f"{self.path} ({self.size_bytes / 2**30:.2f} GiB in {self.seconds:.1f} s)"


def save_checkpoint(engine, data, state: TrainerState, model_config, tokenizer,
                    output_dir: str | Path, keep: int) -> Saved:
    """Collective: every rank calls it. Writes <name>.tmp/, then rank 0 renames it to <name>/ and prunes old ones.
    Logs, and returns, its duration and size; trainer_state.json records the duration up to its own writing (all
    but the rename), so that a resumed run knows how long a save takes before it has timed one."""
    final = Path(output_dir) / checkpoint_name(state.step, state.loss)
    started = time.monotonic()

    def write_trainer_state(tmp: Path) -> None:  # last: marks the directory complete
        state.world_size = world_size()
        write_json(tmp / TRAINER_STATE, {**asdict(state), "save_seconds": round(time.monotonic() - started, 3)})

    with _atomic_directory(final, write_trainer_state) as tmp:
        _save_model_dir(engine, tmp, model_config, tokenizer)
        engine.save_state(tmp, state.step)
        write_json(tmp / DATA_STATE.format(rank=rank()), data.state_dict(), compact=True)
        write_json(tmp / RNG_STATE.format(rank=rank()), capture_rng_state(), compact=True)
    size = 0
    if rank() == 0:
        size = _size_of(final)
        _prune(output_dir, keep, final)
    barrier()
    saved = Saved(final, time.monotonic() - started, size)
    logger.info("saved checkpoint %s", saved)
    return saved


def last_save_seconds(path: Path | None) -> float | None:
    """How long the save of checkpoint `path` took, as its trainer_state.json records it (None: not recorded, a
    checkpoint of an older version, or no checkpoint)."""
    if path is None:
        return None
    seconds = read_trainer_state(path).get("save_seconds")
    return None if seconds is None else float(seconds)


def save_final(engine, model_config, tokenizer, output_dir: str | Path,
               chat_format: str | None = None) -> Path:
    """The finished stage's model directory, output_dir/final/ (atomic too: final.tmp/ then rename). Stage 3 passes
    its chat_format: written as chat_format.json, which tools.chat and tools.eval_ppl follow."""
    from llama.chat_template import write_chat_format

    final = Path(output_dir) / FINAL_DIR
    finish = None if chat_format is None else (lambda tmp: write_chat_format(tmp, chat_format))
    with _atomic_directory(final, finish) as tmp:
        _save_model_dir(engine, tmp, model_config, tokenizer)
    return final


@contextlib.contextmanager
def _atomic_directory(final: Path, finish=None):
    """Collective: every rank writes into <final>.tmp/ inside the block; once all are done, rank 0 runs
    finish(tmp) and swaps the directory in for <final>/ (a re-save of the same step after a resume replaces it).
    A failed write (a full disk) removes the .tmp on every rank's way out; a killed process leaves only the .tmp,
    which "latest" ignores and the next start names and removes (remove_leftovers)."""
    tmp = final.with_name(final.name + TMP_SUFFIX)

    def describe(exc: BaseException) -> str | None:
        cause = io_cause(exc, final.parent)
        if cause is None:
            return None
        latest = find_latest(final.parent)
        return (f"saving {final} failed on rank {rank()}: {cause}. Its partial {tmp.name} is removed; the last "
                f"complete checkpoint is {latest or 'none yet'}" +
                (": resume from it with recover_training_from_checkpoint=latest" if latest else ""))

    with all_ranks_or_none(describe, on_failure=lambda: shutil.rmtree(tmp, ignore_errors=True)):
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        yield tmp
        barrier()
        if rank() == 0:
            if finish is not None:
                finish(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(final.parent)


def _save_model_dir(engine, directory: Path, model_config, tokenizer) -> None:
    """config.json + the tokenizer's files (Tokenizer.save) + safetensors shards with their index: what
    Llama.from_pretrained and llama.load_tokenizer read."""
    engine.save_weights(directory)
    if rank() == 0:
        model_config.save_pretrained(directory)
        tokenizer.save(directory)


def _prune(output_dir: str | Path, keep: int, just_saved: Path) -> None:
    """Keep the newest `keep` complete checkpoints, the one just saved always among them; also drop `.tmp`
    leftovers of saves that crashed."""
    others = [path for _, path in list_checkpoints(output_dir) if path != just_saved]
    for path in others[:max(0, len(others) - (keep - 1))]:
        shutil.rmtree(path, ignore_errors=True)
        logger.info("removed old checkpoint %s (keep_checkpoints=%d)", path, keep)
    for path in Path(output_dir).glob(f"ckpt_step-*{TMP_SUFFIX}"):
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- load


def load_checkpoint(path: Path, engine, data, settings: Settings) -> TrainerState:
    """Collective: restore model, optimizer, scheduler, this rank's data position and RNG; return the loop state.
    A damaged or unreadable file ends every rank with one line that names the checkpoint to resume from instead."""

    def describe(exc: BaseException) -> str | None:
        if isinstance(exc, DataError):  # e.g. a corpus file changed since the checkpoint: named on every rank
            return str(exc)
        if isinstance(exc, CheckpointError) and not isinstance(exc, DamagedCheckpointError):
            return str(exc)  # e.g. masters that do not fit this model: an earlier checkpoint would not help
        cause = str(exc) if isinstance(exc, DamagedCheckpointError) else io_cause(exc, path)
        if cause is None:
            return None
        earlier = [p for step, p in list_checkpoints(path.parent) if p != path and step <= _step_of(path)]
        advice = (f"the last complete checkpoint before it is {earlier[-1]}: resume from it with "
                  f"recover_training_from_checkpoint={earlier[-1]}" if earlier else "there is no earlier checkpoint")
        return f"cannot resume from {path} (rank {rank()}): {cause}; {advice}"

    with all_ranks_or_none(describe):
        return _load_checkpoint(path, engine, data, settings)


def _load_checkpoint(path: Path, engine, data, settings: Settings) -> TrainerState:
    state = trainer_state_of(path)
    old_world, new_world = state.world_size, world_size()
    if old_world != new_world:
        logger.warning("%s was written by %d processes, this run has %d: weights and optimizer states are re-sharded, "
                       "the data stream goes on from every old rank's position, the RNGs are seeded afresh; the run "
                       "will not match one that kept %d processes", path, old_world, new_world, old_world)
    was_new_rows_only = state.settings.get("new_rows_only", False)
    if was_new_rows_only != settings.optimisation.new_rows_only:  # its optimizer state holds other parameters
        raise CheckpointError(f"{path} was written with new_rows_only={was_new_rows_only}: resume it with the same; "
                              f"to train with new_rows_only={settings.optimisation.new_rows_only}, start a new run from "
                              f"its weights (init_model_path={path})")
    verify_files(path)
    engine.load_weights(path)
    engine.load_state(path, old_world)
    current = settings.to_dict()
    changed = {k: (v, current[k]) for k, v in state.settings.items()
               if k in current and current[k] != v and k in _SETTINGS_THAT_CHANGE_THE_RUN}
    for name, (old, new) in changed.items():
        logger.warning("resuming with %s=%r (the checkpoint ran with %r): the run will not match an uninterrupted one",
                       name, new, old)
    # Accumulation is derived from global_batch_size and the world size, so it may change on another GPU count while
    # the samples per optimizer step (what the recipe fixes) stay the same: compare those.
    old_samples = state.settings.get("batch_size", 0) * old_world * state.settings.get("gradient_accumulation_steps", 1)
    new_samples = settings.data.batch_size * new_world * settings.optimisation.gradient_accumulation_steps
    if old_samples != new_samples:
        logger.warning("resuming with %d samples per optimizer step (the checkpoint ran with %d): set global_batch_size "
                       "to keep the recipe's batch on another GPU count", new_samples, old_samples)
    if changed.keys() & _SCHEDULE_SETTINGS:  # replaces the schedule engine.load_state loaded
        engine.restart_schedule(settings.optimisation, state.step)
        logger.warning("lr schedule rebuilt from this run's lr/min_lr/warmup_steps/max_steps at step %d", state.step)
    if old_world == new_world:
        data.load_state_dict(read_json(path / DATA_STATE.format(rank=rank())))
        restore_rng_state(read_json(path / RNG_STATE.format(rank=rank())))
    else:
        data.load_resharded([read_json(path / DATA_STATE.format(rank=r)) for r in range(old_world)])
        reseed_rng(settings.data.seed, state.step, rank(), new_world)
    state.world_size = new_world
    return state


# Settings whose change makes a resumed run differ from the run that wrote the checkpoint.
_SETTINGS_THAT_CHANGE_THE_RUN = ("pretrain_data_split", "max_seq_length", "batch_size", "packing", "long_text",
                                 "long_prompt", "seed",
                                 "lr", "min_lr", "warmup_steps", "max_steps", "weight_decay", "weight_decay_skip",
                                 "precision", "plugin", "dropout_prob")
_SCHEDULE_SETTINGS = {"lr", "min_lr", "warmup_steps", "max_steps"}


def read_trainer_state(path: Path) -> dict[str, Any]:
    return read_json(Path(path) / TRAINER_STATE)


def trainer_state_of(path: Path) -> TrainerState:
    """The TrainerState of checkpoint `path`; what describes the save itself (save_seconds) is left out."""
    known = TrainerState.__dataclass_fields__
    return TrainerState(**{k: v for k, v in read_trainer_state(path).items() if k in known})


def _step_of(path: Path) -> float:
    match = CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else math.inf
