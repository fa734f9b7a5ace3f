"""The interface every engine implements, and what all three share: the booster, the optimizer and the lr schedule,
the model build, the step's bookkeeping, and the engine's part of a checkpoint.

A run's engine, in order:
    engine = choose_engine(settings)          what runs here (training/engine/__init__.py); nothing built yet
    engine.load_dtype, engine.adam_kind       decided before the model exists
    model = engine.build_model(inputs)        the model to boost: its weights, or under ZeRO only its shapes
    engine.boost(model, inputs or None)       the plugin takes the model; a fresh start's weights are loaded
    engine.model(...) in engine.autocast(), engine.no_sync(...), engine.backward(loss), engine.step(...)
    engine.save_weights(dir) / load_weights(dir)                  the model, as a loadable model directory
    engine.save_state(dir, step) / load_state(dir, saved_world)   optimizer, fp32 masters, loss scalers, schedule

Where coming features fit, without other modules asking which plugin runs:
    regional torch.compile of the transformer blocks: each engine's `compile_blocks` says whether its plugin allows
        it and why (a compile step applies it to the model build_model returns, before boost);
    freezing (training a subset): parameters set to requires_grad=False in build_model, before boost, never reach the
        optimizer (parameter_groups takes the trainable ones only). new_rows_only (training/new_rows.py) freezes all
        but the embedding and output, and their old rows through Llama.frozen_rows.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist

from llama.llama_model import Llama
from training.checkpoint_files import (NO_OPTIMIZER_STATE, OPTIMIZER_DIR, OPTIMIZER_FILE, SCHEDULER, CheckpointError,
                                       read_json, write_json)
from training.engine.colossalai_import import import_colossalai
from training.engine.optimizer import build_optimizer, check_toolchain, parameter_groups
from training.launch import rank
from training.lr_schedule import WarmupCosineLR
from training.new_rows import train_new_rows_only
from training.settings_concerns import EngineSettings, OptimisationSettings, Settings

logger = logging.getLogger(__name__)


@dataclass
class EngineChoice:
    """What runs: the plugin, precision and device, decided before the model is built."""
    plugin: str  # "gemini", "zero2" or "ddp"
    precision: str  # "fp16", "bf16" or "fp32"
    device: torch.device


@dataclass
class StepOutcome:
    skipped: bool  # the optimizer did not update (non-finite loss or gradients, or an empty step)
    grad_norm: float | None  # global L2 norm before clipping, unscaled; None when not computed
    loss_scale: float | None  # fp16 dynamic loss scale after this step; None without one
    lr: float = float("nan")  # the learning rate this step used
    empty: bool = False  # skipped because no rank's micro-batches held a target token


class Engine:
    """One plugin's booster-wrapped model, optimizer and scheduler, and every decision that depends on the plugin."""

    name: ClassVar[str]  # the `plugin` setting that selects it
    # Regional torch.compile of the transformer blocks: (allowed, why), for the compile step to read (see the
    # docstring). Each engine's answer follows from how its plugin hooks the model; the compile step's own tests and
    # device check are what confirm it.
    compile_blocks: ClassVar[tuple[bool, str]]
    # Llama.loss_path to train with, where the plugin needs another than the model's default.
    loss_path: ClassVar[str | None] = None
    # Why this engine's settings need HybridAdam, for the toolchain error (where adam_kind can be HybridAdam).
    why_hybrid_adam: ClassVar[str] = ""

    def __init__(self, settings: Settings, choice: EngineChoice):
        self.settings = settings
        self.choice = choice
        self.booster = self.model = self.optimizer = self.scheduler = None  # set by boost()

    # ---- decided before the model is built

    @property
    def load_dtype(self) -> torch.dtype:
        """The dtype the weights load in; fp32 unless the plugin keeps fp32 masters itself."""
        return torch.float32

    @property
    def adam_kind(self) -> str:
        """Which Adam runs (training/engine/optimizer.py's table)."""
        raise NotImplementedError

    @property
    def optimizer_offloaded(self) -> bool:
        """Adam's states and update live in CPU memory."""
        return False

    def check_settings(self) -> None:
        """The settings this plugin cannot run, on any device: a SettingsError naming them."""

    @classmethod
    def check_engine_settings(cls, settings: EngineSettings, source: str) -> None:
        """The engine settings this plugin takes only together: a SettingsError naming them and `source`. Asked by
        load_settings, when the settings are read, before anything runs."""

    def check_toolchain(self) -> None:
        """Where this engine's Adam is HybridAdam: stop with one line when its kernels cannot be built here."""
        check_toolchain(self.adam_kind, self.why_hybrid_adam)

    # ---- the model

    def build_model(self, inputs) -> torch.nn.Module:
        """The model to boost, with the run's dropout (inputs.config: the stage's settings decide it, not the
        checkpoint) and checkpointing: the weights of init_model_path in load_dtype on CPU (the booster moves them),
        or where the engine loads them after boost, only their shapes."""
        settings = self.settings
        after_boost = self._loads_after_boost()
        if after_boost:
            model = self._model_without_weights(inputs.config)
        else:
            model = self._model_with_weights(inputs)
        model.set_gradient_checkpointing(settings.model.gradient_checkpointing)
        logger.info("gradient checkpointing: %s (%d of %d blocks recomputed in backward)", model.gradient_checkpointing,
                    len(model.checkpointed_layers()), inputs.config.num_hidden_layers)
        if self.loss_path is not None:
            model.loss_path = self.loss_path
        if inputs.new_rows_from:
            train_new_rows_only(model, inputs.new_rows_from)
        self._compile_if_allowed(model)
        n_params = sum(p.numel() for p in model.parameters())
        logger.info("model %s: %.1fM parameters, %d layers, dim %d, vocab %d, %s %s", settings.model.init_model_path,
                    n_params / 1e6, inputs.config.num_hidden_layers, inputs.config.hidden_size,
                    inputs.config.vocab_size, "to be loaded after boost as" if after_boost else "loaded as",
                    str(self.load_dtype).replace("torch.", ""))
        return model

    def _compile_if_allowed(self, model: Llama) -> bool:
        """compile=True: torch.compile each block in place (Llama.compile_blocks) where the device is CUDA and the
        plugin allows it (compile_blocks); otherwise one log line says why the blocks run eager. True when compiled."""
        if not self.settings.model.compile:
            return False
        allowed, why = self.compile_blocks
        if self.choice.device.type != "cuda":
            logger.info("compile=True compiles on CUDA only; running eager")
            return False
        if not allowed:
            logger.info("compile=True is not supported under plugin=%r (%s); running eager", self.name, why)
            return False
        model.compile_blocks()
        logger.info("compile: each of the %d blocks compiled with torch.compile (the first steps compile)",
                    len(model.layers))
        return True

    def _model_with_weights(self, inputs) -> torch.nn.Module:
        return Llama.from_pretrained(self.settings.model.init_model_path, dtype=self.load_dtype, device="cpu",
                                     config=inputs.config)

    def _loads_after_boost(self) -> bool:
        return False

    def _model_without_weights(self, config) -> torch.nn.Module:
        raise NotImplementedError

    def boost(self, model: torch.nn.Module, initial_weights=None) -> None:
        """The plugin takes `model` with the optimizer and the lr schedule. `initial_weights` (the run's ModelInputs)
        for a fresh start: the weights build_model left out are loaded, and the engine's own initial state set;
        None when a checkpoint is loaded next."""
        cai = import_colossalai()
        plugin, mixed_precision = self._plugin(cai)
        optimizer = build_optimizer(self.settings.optimisation, self.adam_kind, self.choice.device,
                                    self.optimizer_offloaded, parameter_groups(self.settings.optimisation, model))
        scheduler = self._schedule(optimizer, self.settings.optimisation)
        self.booster = cai.Booster(plugin=plugin, mixed_precision=mixed_precision)
        # Boosting materializes a lazily built model (GeminiDDP._preprocess_param), replaying its random init; its
        # weights are loaded afterwards, and the RNG streams launch() seeded for dropout are left as they were.
        device = self.choice.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self.model, self.optimizer, _, _, self.scheduler = self.booster.boost(model, optimizer,
                                                                                 lr_scheduler=scheduler)
        self._after_boost()
        if initial_weights is not None:
            self._load_initial_weights(initial_weights)

    def _plugin(self, cai):
        """(ColossalAI plugin, mixed precision or None) for the booster."""
        raise NotImplementedError

    def _after_boost(self) -> None:
        """Find the plugin's own parts (scalers) in the boosted optimizer."""

    def _load_initial_weights(self, inputs) -> None:
        """A fresh start's weights that build_model left out, and the engine's state derived from them."""

    @staticmethod
    def _schedule(optimizer, settings: OptimisationSettings):
        return WarmupCosineLR(optimizer, total_steps=settings.max_steps, warmup_steps=settings.warmup_steps,
                              min_lr=settings.min_lr)  # ColossalAI's CosineAnnealingWarmupLR's values, any torch

    def restart_schedule(self, settings: OptimisationSettings, step: int) -> None:
        """The lr schedule of `settings`, advanced to `step`: for a resume whose lr, min_lr, warmup_steps or
        max_steps differ from the checkpoint's, where the saved schedule (say, a cosine that ends at the old
        max_steps) would be wrong. The loaded optimizer state keeps the old lr until the new schedule sets it."""
        optimizer = self.scheduler.optimizer
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = settings.lr
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": deliberate here
            warnings.simplefilter("ignore")
            self.scheduler = self._schedule(optimizer, settings)
            for _ in range(step):
                self.scheduler.step()

    # ---- one step

    def autocast(self):
        """The context of the forward: the plugin's own casts, or torch autocast where the engine needs it."""
        return contextlib.nullcontext()

    def inference_ready(self) -> bool:
        """Whether a no-grad forward (held-out evaluation) may run now."""
        return True

    def no_sync(self, last_micro_batch: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation, where the plugin can."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.booster.backward(loss / int(self.settings.optimisation.gradient_accumulation_steps), self.optimizer)

    def step(self, loss_is_finite: bool, empty: bool = False) -> StepOutcome:
        """Clip and update; or skip when the loss (agreed across ranks) or the gradients are not finite, or when the
        step is `empty` (no rank counted a target token: an update would only apply Adam's moments and weight
        decay)."""
        lr = self.optimizer.param_groups[0]["lr"]
        outcome = self._step(loss_is_finite, empty)
        self.optimizer.zero_grad()
        self.scheduler.step()
        outcome.lr, outcome.empty = lr, empty
        return outcome

    def _step(self, loss_is_finite: bool, empty: bool) -> StepOutcome:
        raise NotImplementedError

    @property
    def _max_grad_norm(self) -> float:
        return float(self.settings.optimisation.max_grad_norm)

    # ---- the engine's part of a checkpoint

    def save_weights(self, directory) -> None:
        """The model as safetensors shards with their index (booster.save_model gathers every rank's share)."""
        self.booster.save_model(self.model, str(directory), shard=True, use_safetensors=True)

    def load_weights(self, directory) -> None:
        """The weights of a model directory, each rank keeping its share. World-size independent: the model is saved
        whole."""
        self.booster.load_model(self.model, str(directory))

    @property
    def checkpoint_optimizer(self):
        """The optimizer wrapper to hand the booster's save_optimizer/load_optimizer."""
        return self.optimizer

    @property
    def checkpoint_optimizer_sharded(self) -> bool:
        """ColossalAI's sharded optimizer files (a directory), or one file."""
        return True

    def optimizer_has_state(self) -> bool:
        """Whether any rank's optimizer has per-parameter state."""
        return True

    def save_state(self, directory, step: int) -> None:
        """Collective: the optimizer state (or a note that there is none yet), the engine's own state that the
        plugin's save leaves out, and (rank 0) the lr schedule."""
        if not self.optimizer_has_state():
            if rank() == 0:
                write_json(directory / NO_OPTIMIZER_STATE, {
                    "step": step, "reason": "no optimizer step had succeeded when this checkpoint was written, so "
                                            "the optimizer held no state; a resume starts it fresh, as the run did"})
        elif self.checkpoint_optimizer_sharded:
            self.booster.save_optimizer(self.checkpoint_optimizer, str(directory / OPTIMIZER_DIR), shard=True)
        else:
            self.booster.save_optimizer(self.checkpoint_optimizer, str(directory / OPTIMIZER_FILE), shard=False)
        self._save_own_state(directory)
        if rank() == 0:
            write_json(directory / SCHEDULER, self.scheduler.state_dict())

    def _save_own_state(self, directory) -> None:
        """What the plugin's optimizer save leaves out."""

    def load_state(self, directory, saved_world_size: int) -> None:
        """Collective, after load_weights: the optimizer state, then the engine's own state, which replaces what the
        plugin rebuilt from the half-precision weights; then the lr schedule. The ZeRO optimizers' sharded saves
        gather every state whole (GeminiOptimizer.state_shard, LowLevelZeroOptimizer.state_dict_shard), which their
        loaders cut for this world (GeminiOptimizer.load_single_param_states; LowLevelZeroCheckpointIO.
        load_sharded_optimizer pads and splits by the current world size), so another world size loads too."""
        with weights_only_torch_load():
            if (directory / OPTIMIZER_DIR).is_dir():
                self.booster.load_optimizer(self.checkpoint_optimizer, str(directory / OPTIMIZER_DIR))
            elif (directory / OPTIMIZER_FILE).is_file():
                self.booster.load_optimizer(self.checkpoint_optimizer, str(directory / OPTIMIZER_FILE))
            elif (directory / NO_OPTIMIZER_STATE).is_file():
                logger.info("%s holds no optimizer state (%s): the optimizer starts fresh", directory,
                            read_json(directory / NO_OPTIMIZER_STATE)["reason"])
            else:
                raise CheckpointError(f"{directory}: no optimizer state ({OPTIMIZER_DIR}/, {OPTIMIZER_FILE} or "
                                      f"{NO_OPTIMIZER_STATE})")
        fused_steps_to_param_device(self.checkpoint_optimizer)
        self._load_own_state(directory, saved_world_size)
        self.scheduler.load_state_dict(read_json(directory / SCHEDULER))
        # The optimizer's lr is the schedule's last one (set by scheduler.step); a fresh optimizer (no state saved)
        # still holds the initial lr.
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr

    def _load_own_state(self, directory, saved_world_size: int) -> None:
        """What _save_own_state wrote; the scalers are the same on every rank, so they carry over to another world
        size as they are."""

    def _any_rank(self, local: bool) -> bool:
        """Whether `local` holds on any rank."""
        flag = torch.tensor([float(local)], device=self.choice.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0


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
