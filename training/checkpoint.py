"""Checkpoints: atomic save, "latest" discovery, exact resume, and the final model directory.

Layout of output_dir/ckpt_step-<step>_loss-<loss>/ (written as <name>.tmp/, renamed when complete):
    config.json, tokenizer files (.model or .json),     a loadable model directory: the next stage's init_model_path
    model.safetensors.index.json + model-*.safetensors  (booster.save_model, shard=True, use_safetensors=True)
    optimizer/  or  optimizer.bin                       ColossalAI sharded save under ZeRO; one file on ddp; or
    optimizer.none.json                                 instead, when no optimizer step had succeeded yet (ZeRO)
    master_weights.rank<R>.safetensors                  ZeRO: each rank's fp32 master weight shards (exact resume)
    loss_scaler.json                                    ZeRO fp16: the dynamic loss scale and its counters
    scheduler.json                                      lr scheduler state
    grad_scaler.json                                    ddp + fp16 only: torch GradScaler's scale and growth tracker
    data_state.rank<R>.json                             each rank's DataProcessor position
    rng_state.rank<R>.json                              each rank's torch, CUDA and Python RNG states
    trainer_state.json                                  step, tokens seen, loss, skipped steps, world size, settings;
                                                        written last, so its presence marks a complete checkpoint
Nothing is unpickled on load: JSON, safetensors, and the optimizer through torch.load(weights_only=True).

Another number of processes resumes too: the weights and the ZeRO optimizer states are saved whole and cut by
ColossalAI's loaders for the new world; the fp32 masters are re-cut by parameter name and offset
(zero_state.load_resharded_masters); the scalers and the lr schedule are the same on every rank; the data stream
goes on from all the old ranks' positions (DataProcessor.load_resharded); the RNGs are seeded afresh (reseed_rng).

Saving and loading are collective, and a disk can fill or a file can be damaged on one rank only: then every rank
ends with the same one-line CheckpointError naming the checkpoint, the cause and the last complete checkpoint to
resume from (`_all_ranks_or_none`), and a failed save leaves no partial directory behind.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import struct
import sys
import threading
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from training.zero_state import load_resharded_masters, load_scaler_state, master_layout, scaler_state

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^ckpt_step-(\d+)_loss-(nan|-?[0-9.]+)$")  # not <name>.tmp, not <name>.abandoned-*
TMP_SUFFIX = ".tmp"
TRAINER_STATE = "trainer_state.json"
GRAD_SCALER = "grad_scaler.json"
FINAL_DIR = "final"
NO_OPTIMIZER_STATE = "optimizer.none.json"
MASTER_WEIGHTS = "master_weights.rank{rank}.safetensors"
LOSS_SCALER = "loss_scaler.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run; the message names the path."""


class DamagedCheckpointError(CheckpointError):
    """A file of a checkpoint is missing, cut short or unreadable: an earlier checkpoint may still be whole."""


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
            logger.info("recover_training_from_checkpoint='latest': no checkpoint in %s yet, starting fresh", output_dir)
        return latest
    path = Path(setting)
    if not path.is_dir():
        raise CheckpointError(f"recover_training_from_checkpoint={setting!r}: no such checkpoint directory")
    if path.name.endswith(TMP_SUFFIX) or not (path / TRAINER_STATE).is_file():
        raise CheckpointError(f"recover_training_from_checkpoint={setting!r} is incomplete (a save that did not "
                              f"finish: a .tmp name or no {TRAINER_STATE}); use 'latest' or an earlier checkpoint")
    return path


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


def save_checkpoint(engine, data_processor, state: TrainerState, model_config, tokenizer,
                    output_dir: str | Path, keep: int) -> Path:
    """Collective: every rank calls it. Writes <name>.tmp/, then rank 0 renames it to <name>/ and prunes old ones."""
    rank, world_size = _rank(), _world_size()
    final = Path(output_dir) / checkpoint_name(state.step, state.loss)

    def write_trainer_state(tmp: Path) -> None:  # last: marks the directory complete
        state.world_size = world_size
        _write_json(tmp / TRAINER_STATE, asdict(state))

    with _atomic_directory(final, write_trainer_state) as tmp:
        _save_model_dir(engine, tmp, model_config, tokenizer)
        _save_optimizer(engine, tmp, state.step)
        _write_json(tmp / f"data_state.rank{rank}.json", data_processor.state_dict(), compact=True)
        _write_json(tmp / f"rng_state.rank{rank}.json", capture_rng_state(), compact=True)
        if rank == 0:
            _write_json(tmp / "scheduler.json", engine.scheduler.state_dict())
    if rank == 0:
        _prune(output_dir, keep, final)
    _barrier()
    return final


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
    which "latest" ignores and the next save's prune removes."""
    tmp = final.with_name(final.name + TMP_SUFFIX)

    def describe(exc: BaseException) -> str | None:
        cause = _io_cause(exc, final.parent)
        if cause is None:
            return None
        latest = find_latest(final.parent)
        return (f"saving {final} failed on rank {_rank()}: {cause}. Its partial {tmp.name} is removed; the last "
                f"complete checkpoint is {latest or 'none yet'}" +
                (": resume from it with recover_training_from_checkpoint=latest" if latest else ""))

    with _all_ranks_or_none(describe, on_failure=lambda: shutil.rmtree(tmp, ignore_errors=True)):
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        yield tmp
        _barrier()
        if _rank() == 0:
            if finish is not None:
                finish(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(final.parent)


def _save_model_dir(engine, directory: Path, model_config, tokenizer) -> None:
    """config.json + the tokenizer's files (Tokenizer.save) + safetensors shards with their index: what
    Llama.from_pretrained and llama.load_tokenizer read."""
    engine.booster.save_model(engine.model, str(directory), shard=True, use_safetensors=True)
    if _rank() == 0:
        model_config.save_pretrained(directory)
        tokenizer.save(directory)


def _save_optimizer(engine, directory: Path, step: int) -> None:
    """Optimizer state, and under ZeRO what ColossalAI's save leaves out: this rank's fp32 master weights and the fp16
    loss scaler (training/zero_state.py)."""
    rank = _rank()
    if not engine.optimizer_has_state():
        if rank == 0:
            _write_json(directory / NO_OPTIMIZER_STATE, {
                "step": step, "reason": "no optimizer step had succeeded when this checkpoint was written, so the "
                                        "optimizer held no state; a resume starts it fresh, as the run did"})
    elif engine.checkpoint_optimizer_sharded:
        engine.booster.save_optimizer(engine.checkpoint_optimizer, str(directory / "optimizer"), shard=True)
    else:
        engine.booster.save_optimizer(engine.checkpoint_optimizer, str(directory / "optimizer.bin"), shard=False)
    masters = engine.master_weights()
    if masters:  # with their layout by parameter name, for a resume on another number of processes
        layout = master_layout(engine.model, engine.optimizer, engine.choice.plugin)
        save_file({name: t.detach().to("cpu").contiguous() for name, t in masters.items()},
                  str(directory / MASTER_WEIGHTS.format(rank=rank)), metadata={"layout": json.dumps(layout)})
    if engine.loss_scaler is not None and rank == 0:  # the same on every rank: overflows are agreed
        _write_json(directory / LOSS_SCALER, scaler_state(engine.loss_scaler))
    if engine.grad_scaler is not None and rank == 0:  # ddp + fp16: the same on every rank (all-reduced gradients)
        _write_json(directory / GRAD_SCALER, engine.grad_scaler.state_dict())


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


def load_checkpoint(path: Path, engine, data_processor, settings) -> TrainerState:
    """Collective: restore model, optimizer, scheduler, this rank's data position and RNG; return the loop state.
    A damaged or unreadable file ends every rank with one line that names the checkpoint to resume from instead."""

    def describe(exc: BaseException) -> str | None:
        if isinstance(exc, CheckpointError) and not isinstance(exc, DamagedCheckpointError):
            return str(exc)  # e.g. masters that do not fit this model: an earlier checkpoint would not help
        cause = str(exc) if isinstance(exc, DamagedCheckpointError) else _io_cause(exc, path)
        if cause is None:
            return None
        earlier = [p for step, p in list_checkpoints(path.parent) if p != path and step <= _step_of(path)]
        advice = (f"the last complete checkpoint before it is {earlier[-1]}: resume from it with "
                  f"recover_training_from_checkpoint={earlier[-1]}" if earlier else "there is no earlier checkpoint")
        return f"cannot resume from {path} (rank {_rank()}): {cause}; {advice}"

    with _all_ranks_or_none(describe):
        return _load_checkpoint(path, engine, data_processor, settings)


def _load_checkpoint(path: Path, engine, data_processor, settings) -> TrainerState:
    rank, world_size = _rank(), _world_size()
    state = TrainerState(**read_trainer_state(path))
    old_world = state.world_size
    if old_world != world_size:
        logger.warning("%s was written by %d processes, this run has %d: weights and optimizer states are re-sharded, "
                       "the data stream goes on from every old rank's position, the RNGs are seeded afresh; the run "
                       "will not match one that kept %d processes", path, old_world, world_size, old_world)
    verify_files(path)
    # Both are world-size independent: the model is saved whole, and the ZeRO optimizers' sharded saves gather
    # every state whole (GeminiOptimizer.state_shard, LowLevelZeroOptimizer.state_dict_shard), which their loaders
    # cut for this world (GeminiOptimizer.load_single_param_states; LowLevelZeroCheckpointIO.load_sharded_optimizer
    # pads and splits by the current world size).
    engine.booster.load_model(engine.model, str(path))
    _load_optimizer(engine, path, old_world)
    changed = {k: (v, getattr(settings, k)) for k, v in state.settings.items()
               if k in settings and getattr(settings, k) != v and k in _SETTINGS_THAT_CHANGE_THE_RUN}
    for name, (old, new) in changed.items():
        logger.warning("resuming with %s=%r (the checkpoint ran with %r): the run will not match an uninterrupted one",
                       name, new, old)
    # Accumulation is derived from global_batch_size and the world size, so it may change on another GPU count while
    # the samples per optimizer step (what the recipe fixes) stay the same: compare those.
    old_samples = state.settings.get("batch_size", 0) * old_world * state.settings.get("gradient_accumulation_steps", 1)
    new_samples = settings.batch_size * world_size * settings.gradient_accumulation_steps
    if old_samples != new_samples:
        logger.warning("resuming with %d samples per optimizer step (the checkpoint ran with %d): set global_batch_size "
                       "to keep the recipe's batch on another GPU count", new_samples, old_samples)
    if changed.keys() & _SCHEDULE_SETTINGS:
        engine.restart_schedule(settings, state.step)
        logger.warning("lr schedule rebuilt from this run's lr/min_lr/warmup_steps/max_steps at step %d", state.step)
    else:
        engine.scheduler.load_state_dict(_read_json(path / "scheduler.json"))
        # The optimizer's lr is the schedule's last one (set by scheduler.step); a fresh optimizer (no state saved)
        # still holds the initial lr.
        for group, lr in zip(engine.optimizer.param_groups, engine.scheduler.get_last_lr()):
            group["lr"] = lr
    if old_world == world_size:
        data_processor.load_state_dict(_read_json(path / f"data_state.rank{rank}.json"))
        restore_rng_state(_read_json(path / f"rng_state.rank{rank}.json"))
    else:
        data_processor.load_resharded([_read_json(path / f"data_state.rank{r}.json") for r in range(old_world)])
        reseed_rng(settings.seed, state.step, rank, world_size)
    state.world_size = world_size
    return state


def _load_optimizer(engine, path: Path, old_world: int) -> None:
    """After the booster's model load: the optimizer state, then the fp32 master weights and the loss scaler, which
    replace what the booster rebuilt from the half-precision weights (training/zero_state.py). The scalers are the
    same on every rank, so they carry over to another world size as they are."""
    with weights_only_torch_load():
        if (path / "optimizer").is_dir():
            engine.booster.load_optimizer(engine.checkpoint_optimizer, str(path / "optimizer"))
        elif (path / "optimizer.bin").is_file():
            engine.booster.load_optimizer(engine.checkpoint_optimizer, str(path / "optimizer.bin"))
        elif (path / NO_OPTIMIZER_STATE).is_file():
            logger.info("%s holds no optimizer state (%s): the optimizer starts fresh", path,
                        _read_json(path / NO_OPTIMIZER_STATE)["reason"])
        else:
            raise CheckpointError(f"{path}: no optimizer state (optimizer/, optimizer.bin or {NO_OPTIMIZER_STATE})")
    fused_steps_to_param_device(engine.checkpoint_optimizer)
    masters = engine.master_weights()
    if masters and old_world != _world_size():
        _load_resharded_masters(engine, path, old_world)
    elif masters:
        masters_file = path / MASTER_WEIGHTS.format(rank=_rank())
        if masters_file.is_file():
            saved = load_file(str(masters_file))
            if saved.keys() != masters.keys() or any(saved[k].shape != masters[k].shape for k in masters):
                raise CheckpointError(f"{masters_file}: the fp32 master weights do not fit this run (written with "
                                      f"another plugin, model or number of processes)")
            with torch.no_grad():
                for name, master in masters.items():
                    master.copy_(saved[name])
        else:
            logger.warning("%s has no %s: the fp32 master weights are rebuilt from the half-precision weights, so "
                           "the run will not match an uninterrupted one", path, masters_file.name)
    if engine.loss_scaler is not None:
        if (path / LOSS_SCALER).is_file():
            load_scaler_state(engine.loss_scaler, _read_json(path / LOSS_SCALER))
        else:
            logger.warning("%s has no %s: the fp16 loss scale restarts at initial_loss_scale", path, LOSS_SCALER)
    if engine.grad_scaler is not None:
        if (path / GRAD_SCALER).is_file():
            engine.grad_scaler.load_state_dict(_read_json(path / GRAD_SCALER))
        else:
            logger.warning("%s holds no %s: the fp16 loss scale restarts from initial_loss_scale", path, GRAD_SCALER)


def fused_steps_to_param_device(optimizer) -> None:
    """torch's fused AdamW keeps each parameter's `step` on that parameter's device and refuses a CPU one
    (`_fused_adamw_`: "state_steps is on cpu, different from other tensors on cuda:0"; found by the device check's
    zero2 and ddp resumes). torch's own Optimizer.load_state_dict moves it there for fused groups
    (Optimizer._process_value_according_to_param_policy), but ColossalAI's loaders copy the state in themselves and
    leave every `step` where it was loaded, on the CPU (checkpoint_io/utils.py load_states_into_optimizer, used by
    GeneralCheckpointIO and LowLevelZeroCheckpointIO.load_sharded_optimizer). `optimizer` may be wrapped (ColossalAI's
    OptimizerWrapper and LowLevelZeroOptimizer hold the torch optimizer as .optim)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optim"):
        optimizer = optimizer.optim
    for group in getattr(optimizer, "param_groups", ()):
        if not (group.get("fused") or group.get("capturable")):
            continue
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            step = state.get("step")
            if torch.is_tensor(step) and step.device != param.device:
                state["step"] = step.to(device=param.device, dtype=torch.float32)


def _load_resharded_masters(engine, path: Path, old_world: int) -> None:
    """The fp32 masters of another world size, re-cut by parameter name and offset (zero_state.master_layout)."""
    files = [path / MASTER_WEIGHTS.format(rank=r) for r in range(old_world)]
    if not all(f.is_file() for f in files):
        logger.warning("%s lacks the fp32 master weights of some of its %d ranks: they are rebuilt from the "
                       "half-precision weights", path, old_world)
        return
    with contextlib.ExitStack() as stack:
        saved = []
        for f in files:
            handle = stack.enter_context(safe_open(str(f), framework="pt"))
            layout = (handle.metadata() or {}).get("layout")
            if layout is None:
                logger.warning("%s has no layout (written before resumes on another world size were possible): the "
                               "fp32 master weights are rebuilt from the half-precision weights", f.name)
                return
            saved.append((json.loads(layout), handle))
        missing = load_resharded_masters(engine.model, engine.optimizer, engine.choice.plugin, saved)
    if missing:
        raise CheckpointError(f"{path}: the fp32 master weights of its {old_world} ranks do not cover "
                              f"{missing[:3]} of this model (written with another plugin or model)")


# Settings whose change makes a resumed run differ from the run that wrote the checkpoint.
_SETTINGS_THAT_CHANGE_THE_RUN = ("pretrain_data_split", "max_seq_length", "batch_size", "packing", "long_text",
                                 "long_prompt", "seed",
                                 "lr", "min_lr", "warmup_steps", "max_steps", "weight_decay", "weight_decay_skip",
                                 "precision", "plugin", "dropout_prob")
_SCHEDULE_SETTINGS = {"lr", "min_lr", "warmup_steps", "max_steps"}


def read_trainer_state(path: Path) -> dict[str, Any]:
    return _read_json(Path(path) / TRAINER_STATE)


@contextlib.contextmanager
def weights_only_torch_load():
    """ColossalAI's optimizer loader calls torch.load without weights_only; force it on for that call."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    previous = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


# ---------------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG streams as JSON: torch CPU, every CUDA device, Python's `random`."""
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state().tolist(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def reseed_rng(seed: int, step: int, rank: int, world_size: int) -> None:
    """After a world-size change: an old rank's RNG streams cannot be a new rank's (there are more or fewer of them,
    and two ranks sharing one would draw the same dropout masks), so torch (CPU and every CUDA device) and Python's
    `random` are seeded with seed + rank + world_size * step: distinct across the new ranks, reproducible for a
    resume at this step, and never a seed of the fresh start (seed + rank, rank < world_size)."""
    value = seed + rank + world_size * step
    random.seed(value)
    torch.manual_seed(value)


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---------------------------------------------------------------------------------------------------- failures


def verify_files(path: Path) -> None:
    """Check that every safetensors and torch file of checkpoint `path` is whole before loading any, so that a
    damaged one is named (safetensors' own error does not say which file). Cheap: headers and zip directories only."""
    for file in sorted(path.rglob("*.safetensors")):
        problem = _safetensors_problem(file)
        if problem:
            raise DamagedCheckpointError(f"{file.relative_to(path)} is damaged: {problem}")
    for file in sorted(path.rglob("*.bin")):
        try:
            with zipfile.ZipFile(file):  # torch.save's format; a truncated file has lost its zip directory
                pass
        except (zipfile.BadZipFile, OSError) as e:
            problem = f"not a whole torch file ({e})"
            raise DamagedCheckpointError(f"{file.relative_to(path)} is damaged: {problem}") from None


def _safetensors_problem(file: Path) -> str | None:
    """safetensors layout: an 8-byte little-endian header length, a JSON header whose data_offsets end where the
    file ends. A truncated file ends early."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        (header_length,) = struct.unpack("<Q", head)
        if 8 + header_length > size:
            return f"{size} bytes, shorter than its own header ({header_length} bytes)"
        try:
            header = json.loads(f.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "its header is not valid JSON"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    expected = 8 + header_length + max(ends, default=0)
    if size != expected:
        return f"{size} bytes where its header promises {expected} (truncated or overwritten)"
    return None


def _io_cause(exc: BaseException, directory: Path) -> str | None:
    """The disk or file problem behind `exc`, in words, or None when `exc` is not one (a bug keeps its traceback)."""
    chain, seen = [], exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = " | ".join(f"{type(e).__name__}: {e}" for e in chain)
    free = _free_space(directory)
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain) or re.search(
            r"No space left|StorageFull|os error 28|Disk quota", text):
        return f"no space left on the device ({free})"
    for e in chain:
        if isinstance(e, OSError):
            return f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''} ({free})"
    # torch's zip writer and reader and safetensors report disk errors without an errno.
    if re.search(r"PytorchStream(Writer|Reader) failed|file write failed|SafetensorError|central directory", text):
        first = next(str(e).strip().splitlines()[0] for e in reversed(chain) if str(e).strip())
        return f"{first} ({free})"
    return None


def _free_space(directory: Path) -> str:
    existing = next((p for p in [directory, *directory.parents] if p.exists()), None)
    if existing is None:
        return "free space unknown"
    free = shutil.disk_usage(existing).free
    return f"{free / 2**30:.2f} GiB free on the disk of {existing}"


def _step_of(path: Path) -> float:
    match = CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else math.inf


_guards = itertools.count()  # every rank opens the same guards in the same order, so the n-th one shares its keys


@contextlib.contextmanager
def _all_ranks_or_none(describe, on_failure=None):
    """Collective block: either every rank gets through it, or every rank ends with the same one-line error.

    A rank whose step fails cannot just raise: the others may wait in a collective it will never join (zero2's
    optimizer save all-gathers each state between the master's shard writes, `LowLevelZeroCheckpointIO.
    save_sharded_optimizer` in colossalai/booster/plugin/low_level_zero_plugin.py; every save ends in a barrier).
    So it posts describe(exc) in the process group's key-value store, where a watcher thread on every rank reads
    it. A rank blocked in a collective cannot be woken, so its watcher logs the line and ends the process (exit
    code 1); a rank at the end of the block waits there for all others, and raises the message. An exception that
    describe() does not recognise (None: a bug, not a disk) keeps its traceback on the rank that raised it.
    """
    if not dist.is_initialized() or _world_size() == 1:
        try:
            yield
        except Exception as e:
            message = describe(e)
            if message is None:
                raise
            if on_failure is not None:
                on_failure()
            raise CheckpointError(message) from None
        return
    watch = _FailureWatch(f"checkpoint_guard/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{next(_guards)}/")
    try:
        yield
    except Exception as e:
        message = describe(e)
        known = message is not None
        if not known:
            message = f"rank {_rank()} failed with {type(e).__name__}: {e} (its traceback is in that rank's output)"
        watch.fail(message, on_failure)
        if not known:
            raise
        raise CheckpointError(message) from None
    watch.finish()


class _FailureWatch:
    """The store keys of one `_all_ranks_or_none` block, <prefix>failed (the message), <prefix>done and
    <prefix>printed (counters), and the thread that polls them.

    No rank leaves before every rank has printed its line: torchrun ends the other workers (SIGTERM, after
    --monitor-interval) as soon as one exits, which would cut off a line not yet printed."""

    POLL_SECONDS = 0.5
    EXIT_TIMEOUT_SECONDS = 30.0  # a rank that died without its line holds the others back this long at most

    def __init__(self, prefix: str):
        self.store = dist.distributed_c10d._get_default_store()
        self.world_size = _world_size()
        self.failed_key, self.done_key, self.printed_key = prefix + "failed", prefix + "done", prefix + "printed"
        self._lock = threading.Lock()
        self._settled = False  # this rank has taken its way out: raising, or exiting from the watcher
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="checkpoint-failure-watch", daemon=True)
        self._thread.start()

    def _message(self) -> str | None:
        return self.store.get(self.failed_key).decode() if self.store.check([self.failed_key]) else None

    def _settle(self) -> None:
        """Take this rank's way out, or, where the watcher took it first, wait for it to end the process."""
        with self._lock:
            first, self._settled = not self._settled, True
        if not first:
            threading.Event().wait()
        self._stop.set()

    def _exit_together(self, then=None) -> None:
        """Count this rank's line as printed; wait until every rank's is (so no rank still writes), then `then`."""
        if then is not None:
            # From atexit, in the main thread. The last rank to print exits at once, and torchrun then sends SIGTERM
            # to the others: ignore it before counting this rank's line, or it can cut the cleanup short.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.store.add(self.printed_key, 1)
        deadline = time.monotonic() + self.EXIT_TIMEOUT_SECONDS
        while self.store.add(self.printed_key, 0) < self.world_size and time.monotonic() < deadline:
            time.sleep(self.POLL_SECONDS / 5)
        if then is not None:
            then()

    def _watch(self) -> None:
        while not self._stop.wait(self.POLL_SECONDS):
            message = self._message()
            if message is None:
                continue
            with self._lock:
                if self._settled:
                    return
                self._settled = True
            # The line _expected_errors_as_one_line (training/loop.py) prints for a raised CheckpointError.
            logger.error("error: %s: %s", CheckpointError.__name__, message)
            sys.stdout.flush()
            self._exit_together()
            os._exit(1)

    def fail(self, message: str, cleanup=None) -> None:
        """This rank failed: post the message; leave with the others, after the caller's raise has printed, and
        run `cleanup` once they are out of the block."""
        self._settle()
        self.store.set(self.failed_key, message)
        atexit.register(self._exit_together, cleanup)

    def finish(self) -> None:
        """A barrier in the store that ends as soon as any rank has failed."""
        self.store.add(self.done_key, 1)
        while True:
            message = self._message()
            if message is not None:
                self._settle()
                atexit.register(self._exit_together)
                raise CheckpointError(message)
            if self.store.add(self.done_key, 0) >= self.world_size:
                self._stop.set()
                return
            time.sleep(self.POLL_SECONDS / 5)


# ---------------------------------------------------------------------------------------------------- helpers


def _write_json(path: Path, obj: Any, compact: bool = False) -> None:
    """compact: one line, no spaces (the data and RNG states: long lists of ints, read by programs only)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, **({"separators": (",", ":")} if compact else {"indent": 1}))
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DamagedCheckpointError(f"checkpoint file missing: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedCheckpointError(f"{path.name} is damaged (not valid JSON: {e})") from None


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
