"""The engine: ColossalAI booster + plugin + optimizer + lr schedule, and the plugin-specific parts of one step.

Plugins (setting `plugin`):
    "gemini"  GeminiPlugin: ZeRO-3 chunks; Adam states in CPU memory (gemini_offload_optim_frac=1.0, as the recipe),
              parameters on the GPUs (gemini_offload_param_frac=0.0, faster) or in CPU memory (1.0, the recipe's "cpu")
    "zero2"   LowLevelZeroPlugin(stage=2), optional CPU offload of optimizer states (zero2_cpu_offload)
    "ddp"     TorchDDPPlugin: plain data parallel; fp16 through torch AMP, bf16 through autocast
On a machine without CUDA the ZeRO plugins and HybridAdam cannot run (they assert a GPU), so the engine falls back to
"ddp" on gloo in fp32 with torch.optim.AdamW, and says so once. Which Adam runs, and its kernels: training/optimizer.py.

What the loop sees: `engine.model(...)` inside `engine.autocast()`, `engine.backward(loss, sync)`, and
`engine.step(loss_is_finite, empty) -> StepOutcome` which clips, steps or skips, and reports grad norm and loss scale.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import types
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from training.lr_schedule import WarmupCosineLR
from training.optimizer import build_optimizer, check_toolchain, parameter_groups
from training import zero_state
from training.settings import SettingsError

logger = logging.getLogger(__name__)

# Defaults ColossalAI's peers read at import time; set before the first import so they keep quiet.
_QUIET_ENV = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # what colossalai.initialize sets for overlapped communication
    "BITSANDBYTES_NOWELCOME": "1",
    "TF_CPP_MIN_LOG_LEVEL": "3",
    # ColossalAI's import pulls in torch._inductor (via peft/bitsandbytes), which starts a pool of compile workers;
    # this loop never calls torch.compile, and shutting the pool down costs seconds at every process exit.
    "TORCHINDUCTOR_COMPILE_THREADS": "1",
}


def import_colossalai():
    """Import the ColossalAI pieces the engine needs, keeping their optional-kernel warnings off the console.

    `import colossalai` warns about apex, TensorNVMe and bitsandbytes kernels that this recipe does not use. Those are
    warnings and log records below ERROR; errors still surface (an ImportError propagates unchanged).
    """
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if "torch._inductor.config" in sys.modules:  # torch read the environment already: set the value itself
        sys.modules["torch._inductor.config"].compile_threads = int(os.environ["TORCHINDUCTOR_COMPILE_THREADS"])
    for name in ("bitsandbytes", "colossalai", "torch.distributed.elastic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        from colossalai.booster import Booster
        from colossalai.booster.mixed_precision import FP16TorchMixedPrecision
        from colossalai.booster.plugin import GeminiPlugin, LowLevelZeroPlugin, TorchDDPPlugin
        from colossalai.nn.lr_scheduler import CosineAnnealingWarmupLR
    # ColossalAI's dist logger attaches its own handlers; route it to ERROR so only failures reach the console.
    from colossalai.logging import get_dist_logger

    get_dist_logger().set_level("ERROR")
    # ColossalAI's warmup scheduler calls its inner scheduler's get_lr() outside step(), which torch warns about
    # on every step; the values are right (checked by the resume test's lr trajectory).
    warnings.filterwarnings("ignore", message="To get the last learning rate computed by the scheduler")
    return types.SimpleNamespace(Booster=Booster, FP16TorchMixedPrecision=FP16TorchMixedPrecision,
                                 GeminiPlugin=GeminiPlugin, LowLevelZeroPlugin=LowLevelZeroPlugin,
                                 TorchDDPPlugin=TorchDDPPlugin, CosineAnnealingWarmupLR=CosineAnnealingWarmupLR)


@dataclass
class EngineChoice:
    """What will actually run, decided before the model is built (the dtype to load the weights in depends on it)."""
    plugin: str  # "gemini", "zero2" or "ddp"
    precision: str  # "fp16", "bf16" or "fp32"
    device: torch.device
    fallback_reason: str = ""  # non-empty when the settings asked for something this machine cannot run

    @property
    def zero(self) -> bool:
        return self.plugin in ("gemini", "zero2")

    @property
    def compile_refusal(self) -> str | None:
        """Why this engine runs the model's blocks eager although compile=True; None where it allows
        torch.compile."""
        if self.device.type != "cuda":
            return "compile=True compiles on CUDA only; running eager"
        if self.plugin == "gemini":
            # GeminiDDP gathers each parameter's chunk through ColoParameter.__torch_function__ and module hooks
            # (colossalai/tensor/colo_parameter.py, zero/gemini/gemini_hook.py), which torch.compile does not trace.
            return "compile=True is not supported under plugin='gemini' (its parameter hooks do not trace); running eager"
        return None

    @property
    def load_dtype(self) -> torch.dtype:
        """ZeRO plugins keep fp32 master weights themselves, so the weights load in half precision (7B: 14 GB per
        process instead of 28); ddp keeps fp32 parameters and casts in autocast."""
        if self.zero and self.precision == "fp16":
            return torch.float16
        if self.zero and self.precision == "bf16":
            return torch.bfloat16
        return torch.float32


def choose_engine(settings) -> EngineChoice:
    if not torch.cuda.is_available():
        reason = ""
        if settings.plugin != "ddp" or settings.precision != "fp32":
            reason = (f"no CUDA device: plugin={settings.plugin!r} precision={settings.precision!r} cannot run here, "
                      f"falling back to plugin='ddp' on gloo, fp32, torch.optim.AdamW")
        return EngineChoice("ddp", "fp32", torch.device("cpu"), reason)
    check_engine_settings(settings)
    if settings.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise SettingsError(f"setting 'precision' = 'bf16': {torch.cuda.get_device_name()} has no bf16; use fp16")
    choice = EngineChoice(settings.plugin, settings.precision, torch.device("cuda", torch.cuda.current_device()))
    check_toolchain(settings, choice)
    return choice


def check_engine_settings(settings) -> None:
    """The plugin/precision pairs ColossalAI cannot run, on any device."""
    if settings.plugin == "gemini" and settings.precision == "fp32":
        raise SettingsError("setting 'precision' = 'fp32' is not supported by plugin 'gemini' (fp16 or bf16; "
                            "or plugin='zero2' / 'ddp' for fp32)")


@dataclass
class StepOutcome:
    skipped: bool  # the optimizer did not update (non-finite loss or gradients, or an empty step)
    grad_norm: float | None  # global L2 norm before clipping, unscaled; None when not computed
    loss_scale: float | None  # fp16 dynamic loss scale after this step; None without one
    lr: float = float("nan")  # the learning rate this step used
    empty: bool = False  # skipped because no rank's micro-batches held a target token


class Engine:
    """Booster-wrapped model, optimizer and scheduler, plus the plugin-specific halves of a training step."""

    def __init__(self, settings, choice: EngineChoice, model: torch.nn.Module):
        cai = import_colossalai()
        self.choice = choice
        self.max_grad_norm = float(settings.max_grad_norm)
        self.accumulation = int(settings.gradient_accumulation_steps)
        plugin, mixed_precision = self._plugin(cai, settings)
        optimizer = build_optimizer(settings, choice, parameter_groups(settings, model))
        scheduler = self._schedule(cai, optimizer, settings)
        self.booster = cai.Booster(plugin=plugin, mixed_precision=mixed_precision)
        # Boosting materializes a lazily built model (GeminiDDP._preprocess_param), replaying its random init; its
        # weights are loaded afterwards, and the RNG streams launch() seeded for dropout are left as they were.
        with torch.random.fork_rng(devices=[choice.device] if choice.device.type == "cuda" else []):
            self.model, self.optimizer, _, _, self.scheduler = self.booster.boost(model, optimizer,
                                                                                 lr_scheduler=scheduler)
        # The fp16 scaler that ZeRO plugins keep inside their optimizer (None for bf16/fp32 and for ddp).
        self._zero_mixin = getattr(self.optimizer, "mix_precision_mixin", None) or getattr(
            self.optimizer, "mixed_precision_mixin", None)
        self._amp_scaler = getattr(self.optimizer, "scaler", None)  # torch GradScaler on ddp + fp16

    @staticmethod
    def _schedule(cai, optimizer, settings):
        return WarmupCosineLR(optimizer, total_steps=settings.max_steps, warmup_steps=settings.warmup_steps,
                              min_lr=settings.min_lr)  # ColossalAI's CosineAnnealingWarmupLR's values, any torch

    def restart_schedule(self, settings, step: int) -> None:
        """The lr schedule of `settings`, advanced to `step`: for a resume whose lr, min_lr, warmup_steps or
        max_steps differ from the checkpoint's, where the saved schedule (say, a cosine that ends at the old
        max_steps) would be wrong. The loaded optimizer state keeps the old lr until the new schedule sets it."""
        optimizer = self.scheduler.optimizer
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = settings.lr
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": deliberate here
            warnings.simplefilter("ignore")
            self.scheduler = self._schedule(import_colossalai(), optimizer, settings)
            for _ in range(step):
                self.scheduler.step()

    def _plugin(self, cai, settings):
        c = self.choice
        if c.plugin == "gemini":
            return cai.GeminiPlugin(
                precision=c.precision, placement_policy=settings.gemini_placement_policy,
                offload_optim_frac=settings.gemini_offload_optim_frac if settings.gemini_placement_policy == "static"
                else 0.0,
                offload_param_frac=settings.gemini_offload_param_frac if settings.gemini_placement_policy == "static"
                else 0.0,
                initial_scale=settings.initial_loss_scale, max_norm=settings.max_grad_norm,
                enable_gradient_accumulation=settings.gradient_accumulation_steps > 1, pin_memory=True,
            ), None
        if c.plugin == "zero2":
            return cai.LowLevelZeroPlugin(stage=2, precision=c.precision, initial_scale=settings.initial_loss_scale,
                                          max_norm=settings.max_grad_norm, cpu_offload=settings.zero2_cpu_offload), None
        mixed = None
        if c.precision == "fp16":
            mixed = cai.FP16TorchMixedPrecision(init_scale=settings.initial_loss_scale)
        return cai.TorchDDPPlugin(), mixed

    @property
    def checkpoint_optimizer(self):
        """The optimizer wrapper to hand the booster's save_optimizer/load_optimizer: under fp16 AMP the inner one.

        `TorchAMPOptimizer` (colossalai/booster/mixed_precision/fp16_torch.py) wraps the plugin's OptimizerWrapper, so
        its unwrap() returns that wrapper, not the torch optimizer, and `load_states_into_optimizer` then fails on its
        missing .state (colossalai/checkpoint_io/utils.py). The inner wrapper unwraps to the torch optimizer."""
        return self.optimizer.optim if self._amp_scaler is not None else self.optimizer

    @property
    def grad_scaler(self):
        """torch's GradScaler on ddp + fp16 (its state travels with the checkpoint), else None."""
        return self._amp_scaler

    @property
    def checkpoint_optimizer_sharded(self) -> bool:
        """ColossalAI's sharded optimizer files under ZeRO and on GPU; one file for ddp on the CPU fallback, whose
        sharded load fails."""
        return self.choice.device.type == "cuda" or self.choice.zero

    def autocast(self):
        """bf16 autocast for ddp on GPU (fp16 ddp autocasts inside ColossalAI's AMP wrapper; ZeRO casts itself)."""
        if self.choice.plugin == "ddp" and self.choice.precision == "bf16":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def inference_ready(self) -> bool:
        """Whether a no-grad forward (held-out evaluation) may run now. Gemini's "auto" placement records memory
        statistics over the first training iteration and GeminiDDP.forward (colossalai/zero/gemini/gemini_ddp.py)
        asserts on a no-grad forward before it; "static" placement, zero2 and ddp are always ready."""
        manager = getattr(self.model, "gemini_manager", None)
        return manager is None or not (manager.need_warmup and manager.is_warmup())

    def no_sync(self, last_micro_batch: bool):
        """Skip ddp's gradient all-reduce on all but the last micro-batch of an accumulation."""
        # fp16 AMP wraps the TorchDDPModel once more (`FP16TorchMixedPrecision.configure` returns a TorchAMPModule
        # whose .module it is), and `TorchDDPPlugin.no_sync` asserts a TorchDDPModel: hand it the inner one.
        ddp_model = self.model.module if type(self.model).__name__ == "TorchAMPModule" else self.model
        if last_micro_batch or type(ddp_model).__name__ != "TorchDDPModel":
            return contextlib.nullcontext()
        return self.booster.no_sync(ddp_model, self.optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        self.booster.backward(loss / self.accumulation, self.optimizer)

    def step(self, loss_is_finite: bool, empty: bool = False) -> StepOutcome:
        """Clip and update; or skip when the loss (agreed across ranks) or the gradients are not finite, or when the
        step is `empty` (no rank counted a target token: an update would only apply Adam's moments and weight
        decay)."""
        lr = self.optimizer.param_groups[0]["lr"]
        if self.choice.zero:
            outcome = self._zero_step(loss_is_finite, empty)
        else:
            outcome = self._ddp_step(loss_is_finite, empty)
        self.optimizer.zero_grad()
        self.scheduler.step()
        outcome.lr, outcome.empty = lr, empty
        return outcome

    def _zero_step(self, loss_is_finite: bool, empty: bool) -> StepOutcome:
        mixin = self._zero_mixin
        fp16 = hasattr(mixin, "found_overflow")  # only FP16MixedPrecisionMixin.should_skip_step checks gradients
        scale = mixin.loss_scale if fp16 else 1.0
        if not fp16:
            loss_is_finite = self._zero_grads_finite() and loss_is_finite
        if empty or (not loss_is_finite and not fp16):
            self._zero_skip()
            return StepOutcome(True, None, scale if fp16 else None)
        self.optimizer.step()  # fp16: skips by itself on inf/NaN gradients and backs the scale off
        self._end_gemini_accumulation()
        skipped = fp16 and bool(mixin.found_overflow.item() > 0)
        norm = self.optimizer.get_grad_norm() if not skipped else None
        grad_norm = float(norm) / scale if norm is not None else None
        return StepOutcome(skipped, grad_norm, mixin.loss_scale if fp16 else None)

    def _zero_skip(self) -> None:
        """ColossalAI's own skip path, taken by making this one step see an overflow: it drops the gradients and
        restores Gemini's reused fp16 chunks (GeminiOptimizer.step). The fp16 scaler is not updated: it is updated
        inside the should_skip_step this replaces."""
        mixin = self._zero_mixin
        if mixin is None:  # zero2 in fp32: step()'s zero_grad drops the gradients
            return
        mixin.should_skip_step = lambda: True
        try:
            self.optimizer.step()
        finally:
            del mixin.should_skip_step
        self._end_gemini_accumulation()

    def _end_gemini_accumulation(self) -> None:
        """GeminiOptimizer.step resets chunk_manager.accumulating_grads on its update path only, not on its skip
        path; left set, the next step's gradients are added onto the skipped ones (GeminiDDP.grad_handle) and under
        fp16 every later step overflows. Reset it after every step."""
        if self.choice.plugin == "gemini":
            self.optimizer.module.chunk_manager.accumulating_grads = False

    def _zero_grads_finite(self) -> bool:
        """Whether every rank's gradient shards are finite, under bf16 or fp32, where ColossalAI checks nothing
        (BF16MixedPrecisionMixin.should_skip_step returns False) and an inf would turn every master into NaN."""
        if self.choice.plugin == "gemini":
            # GeminiDDP.grad_handle adds each reduced chunk's has_inf_or_nan to overflow_counter whatever the dtype;
            # only the fp16 mixin reads and resets it (GeminiFP16MixedPrecisionMixin), so it is reset here.
            counter = self.optimizer.module.chunk_manager.overflow_counter
            local_bad = counter.item() > 0
            counter.zero_()
        else:
            # LowLevelZeroFP16MixedPrecisionMixin.check_local_overflow, for any dtype: this rank's reduced shards.
            from colossalai.zero.low_level._utils import has_inf_or_nan

            optimizer = self.optimizer
            local_bad = any(has_inf_or_nan(grad) for store in optimizer.pg_to_grad_store.values()
                            for group_id in range(optimizer.num_param_groups)
                            for grad in store.get_working_grads_by_group_id(group_id) if grad is not None)
        flag = torch.tensor([float(local_bad)], device=self.choice.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # each rank holds a different shard
        return flag.item() == 0

    def _ddp_step(self, loss_is_finite: bool, empty: bool) -> StepOutcome:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if empty:
            return StepOutcome(True, None, float(self._amp_scaler.get_scale()) if self._amp_scaler else None)
        if self._amp_scaler is not None:
            # GradScaler: unscale, clip, then scaler.step skips by itself on inf/nan and backs the scale off.
            self.optimizer.unscale_grad()
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or float("inf"))
            self.optimizer.step()
            skipped = not torch.isfinite(norm).item()
            return StepOutcome(skipped, None if skipped else norm.item(), float(self._amp_scaler.get_scale()))
        if not loss_is_finite:
            return StepOutcome(True, None, None)
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or float("inf"))
        if not torch.isfinite(norm).item():
            return StepOutcome(True, None, None)
        self.optimizer.step()
        return StepOutcome(False, norm.item(), None)

    # ---- the ZeRO state that ColossalAI's checkpoints leave out (training/zero_state.py)

    def master_weights(self) -> dict[str, torch.Tensor]:
        """This rank's fp32 master weights as live named tensors; {} without ZeRO."""
        return zero_state.master_views(self.model, self.optimizer, self.choice.plugin)

    def masters_from_source(self, tensors) -> int:
        """The fp32 masters written from a source model's (name, tensor) stream where it is more precise than the
        compute dtype; returns the number of parameters written."""
        if not self.choice.zero:
            return 0
        return zero_state.masters_from_source(self.model, self.optimizer, self.choice.plugin, tensors,
                                              self.choice.load_dtype)

    @property
    def loss_scaler(self):
        """The fp16 DynamicGradScaler of the ZeRO plugins (FP16MixedPrecisionMixin.grad_scaler); None otherwise."""
        return getattr(self._zero_mixin, "grad_scaler", None)

    def optimizer_has_state(self) -> bool:
        """Whether any rank's optimizer has per-parameter state. Before the first successful step it has none, and
        LowLevelZeroOptimizer.state_dict_shard then raises KeyError: such a checkpoint is saved without it."""
        if not self.choice.zero:
            return True
        flag = torch.tensor([float(len(self.optimizer.unwrap().state) > 0)], device=self.choice.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0
