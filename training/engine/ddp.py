"""plugin="ddp": TorchDDPPlugin, plain data parallel with fp32 parameters on every GPU; fp16 through torch AMP (a
GradScaler), bf16 through autocast. Also the CPU fallback: gloo, fp32, torch.optim.AdamW."""
from __future__ import annotations

import contextlib
import logging

import torch

from training.checkpoint_files import GRAD_SCALER, read_json, write_json
from training.engine.base import Engine, StepOutcome
from training.engine.optimizer import ADAMW, FUSED_ADAMW
from training.launch import rank

logger = logging.getLogger(__name__)


class DDPEngine(Engine):
    name = "ddp"
    compile_blocks = (True, "DistributedDataParallel reduces gradients in hooks outside the blocks")

    @property
    def adam_kind(self) -> str:
        return FUSED_ADAMW if self.choice.device.type == "cuda" else ADAMW

    def _plugin(self, cai):
        mixed = None
        if self.choice.precision == "fp16":
            mixed = cai.FP16TorchMixedPrecision(init_scale=self.settings.optimisation.initial_loss_scale)
        return cai.TorchDDPPlugin(), mixed

    def _after_boost(self) -> None:
        self._amp_scaler = getattr(self.optimizer, "scaler", None)  # torch GradScaler under fp16

    @property
    def grad_scaler(self):
        """torch's GradScaler under fp16 (its state travels with the checkpoint), else None."""
        return self._amp_scaler

    def autocast(self):
        """bf16 autocast on GPU (fp16 autocasts inside ColossalAI's AMP wrapper)."""
        if self.choice.precision == "bf16":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def no_sync(self, last_micro_batch: bool):
        # fp16 AMP wraps the TorchDDPModel once more (`FP16TorchMixedPrecision.configure` returns a TorchAMPModule
        # whose .module it is), and `TorchDDPPlugin.no_sync` asserts a TorchDDPModel: hand it the inner one.
        ddp_model = self.model.module if type(self.model).__name__ == "TorchAMPModule" else self.model
        if last_micro_batch or type(ddp_model).__name__ != "TorchDDPModel":
            return contextlib.nullcontext()
        return self.booster.no_sync(ddp_model, self.optimizer)

    def _step(self, loss_is_finite: bool, empty: bool) -> StepOutcome:
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self._max_grad_norm or float("inf")
        if empty:
            return StepOutcome(True, None, float(self._amp_scaler.get_scale()) if self._amp_scaler else None)
        if self._amp_scaler is not None:
            # GradScaler: unscale, clip, then scaler.step skips by itself on inf/nan and backs the scale off.
            self.optimizer.unscale_grad()
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            self.optimizer.step()
            skipped = not torch.isfinite(norm).item()
            return StepOutcome(skipped, None if skipped else norm.item(), float(self._amp_scaler.get_scale()))
        if not loss_is_finite:
            return StepOutcome(True, None, None)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if not torch.isfinite(norm).item():
            return StepOutcome(True, None, None)
        self.optimizer.step()
        return StepOutcome(False, norm.item(), None)

    @property
    def checkpoint_optimizer(self):
        """Under fp16 AMP the inner wrapper: `TorchAMPOptimizer` (colossalai/booster/mixed_precision/fp16_torch.py)
        wraps the plugin's OptimizerWrapper, so its unwrap() returns that wrapper, not the torch optimizer, and
        `load_states_into_optimizer` then fails on its missing .state (colossalai/checkpoint_io/utils.py). The inner
        wrapper unwraps to the torch optimizer."""
        return self.optimizer.optim if self._amp_scaler is not None else self.optimizer

    @property
    def checkpoint_optimizer_sharded(self) -> bool:
        """Sharded files on GPU; one file on the CPU fallback, whose sharded load fails."""
        return self.choice.device.type == "cuda"

    def _save_own_state(self, directory) -> None:
        if self._amp_scaler is not None and rank() == 0:  # the same on every rank (all-reduced gradients)
            write_json(directory / GRAD_SCALER, self._amp_scaler.state_dict())

    def _load_own_state(self, directory, saved_world_size: int) -> None:
        if self._amp_scaler is None:
            return
        if (directory / GRAD_SCALER).is_file():
            self._amp_scaler.load_state_dict(read_json(directory / GRAD_SCALER))
        else:
            logger.warning("%s holds no %s: the fp16 loss scale restarts from initial_loss_scale", directory,
                           GRAD_SCALER)
