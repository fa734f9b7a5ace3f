"""What the two ZeRO engines (gemini, zero2) share: weights loaded in half precision with fp32 masters kept by the
plugin, a model loaded after boost, the fp16 loss scaler inside the optimizer, the skip path, and the fp32 masters and
loss scaler that ColossalAI's checkpoints leave out (training/engine/masters.py)."""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llama.configuration_llama import CONFIG_NAME
from llama.model_files import is_transformers_dir
from llama.weight_layouts import llama_tensors
from training.checkpoint_files import LOSS_SCALER, MASTER_WEIGHTS, CheckpointError, read_json, write_json
from training.engine.base import Engine, StepOutcome
from training.engine.masters import (Layout, load_resharded_masters, load_scaler_state, master_windows,
                                     masters_from_source, scaler_state)
from training.launch import rank, world_size
from training.settings_concerns import SettingsError

logger = logging.getLogger(__name__)


class ZeroEngine(Engine):
    """A ZeRO plugin: GeminiPlugin or LowLevelZeroPlugin(stage=2)."""

    @property
    def load_dtype(self) -> torch.dtype:
        """The plugins keep fp32 master weights themselves, so the weights load in half precision (7B: 14 GB per
        process instead of 28)."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.choice.precision, torch.float32)

    # ---- the model

    def _loads_after_boost(self) -> bool:
        """From a dir booster.load_model can read (this repo's weight names), only the shapes are built: the weights
        are read after boost, so that no process ever holds the whole model in host memory. A transformers dir is
        converted on load, whole, in every process."""
        config_path = Path(self.settings.model.init_model_path) / CONFIG_NAME
        return not is_transformers_dir(json.loads(config_path.read_text("utf-8")))

    def _model_with_weights(self, inputs) -> torch.nn.Module:
        logger.warning("init_model_path=%s is a transformers dir: every process converts it whole in host memory; "
                       "convert it once (python -m llama.convert from_hf) to load only each process's share",
                       self.settings.model.init_model_path)
        return super()._model_with_weights(inputs)

    def _after_boost(self) -> None:
        # The fp16 scaler that the ZeRO plugins keep inside their optimizer (None for bf16/fp32).
        self._mixin = getattr(self.optimizer, "mix_precision_mixin", None) or getattr(
            self.optimizer, "mixed_precision_mixin", None)

    def _load_initial_weights(self, inputs) -> None:
        """Where build_model left the model empty, booster.load_model reads init_model_path file by file and each
        process keeps its share (Gemini's chunks; zero2's whole working copy on the GPU). Then, where the source is
        stored more precisely than the compute dtype, the fp32 master weights are written from it: the plugins cloned
        them from the rounded copy (training/engine/masters.py)."""
        init = Path(self.settings.model.init_model_path)
        if self._loads_after_boost():
            self.load_weights(init)
        tensors = llama_tensors(init, inputs.config)
        name, first = next(tensors)
        if inputs.new_rows_from and first.dtype != self.load_dtype:
            # Frozen parameters get no fp32 master (GeminiDDP._init_chunks ignores them, LowLevelZeroModel casts the
            # module): they are held, and saved, in the compute dtype.
            held, stored = (str(t).replace("torch.", "") for t in (self.load_dtype, first.dtype))
            raise SettingsError(f"new_rows_only=True under plugin={self.name} precision={self.choice.precision} holds "
                                f"the frozen weights in {held}, but {init} stores {stored}: they would be saved "
                                f"rounded. Widen in {held} (python -m tools.expand_vocab ... --dtype {held}), or run "
                                f"plugin=ddp")
        if first.dtype != self.load_dtype:  # a model dir holds one dtype: the first tensor tells
            written = masters_from_source(self._master_windows(), itertools.chain([(name, first)], tensors),
                                          self.load_dtype)
            logger.info("fp32 master weights of %d parameters set from %s's %s weights", written, init,
                        str(first.dtype).replace("torch.", ""))

    # ---- one step

    @property
    def loss_scaler(self):
        """The fp16 DynamicGradScaler (FP16MixedPrecisionMixin.grad_scaler); None under bf16 and fp32."""
        return getattr(self._mixin, "grad_scaler", None)

    def _step(self, loss_is_finite: bool, empty: bool) -> StepOutcome:
        mixin = self._mixin
        fp16 = hasattr(mixin, "found_overflow")  # only FP16MixedPrecisionMixin.should_skip_step checks gradients
        scale = mixin.loss_scale if fp16 else 1.0
        if not fp16:
            loss_is_finite = self._grads_finite() and loss_is_finite
        if empty or (not loss_is_finite and not fp16):
            self._skip()
            return StepOutcome(True, None, scale if fp16 else None)
        self.optimizer.step()  # fp16: skips by itself on inf/NaN gradients and backs the scale off
        self._end_accumulation()
        skipped = fp16 and bool(mixin.found_overflow.item() > 0)
        norm = self.optimizer.get_grad_norm() if not skipped else None
        grad_norm = float(norm) / scale if norm is not None else None
        return StepOutcome(skipped, grad_norm, mixin.loss_scale if fp16 else None)

    def _skip(self) -> None:
        """ColossalAI's own skip path, taken by making this one step see an overflow: it drops the gradients and
        restores Gemini's reused fp16 chunks (GeminiOptimizer.step). The fp16 scaler is not updated: it is updated
        inside the should_skip_step this replaces."""
        mixin = self._mixin
        if mixin is None:  # zero2 in fp32: step()'s zero_grad drops the gradients
            return
        mixin.should_skip_step = lambda: True
        try:
            self.optimizer.step()
        finally:
            del mixin.should_skip_step
        self._end_accumulation()

    def _end_accumulation(self) -> None:
        """After every optimizer step, update or skip: the plugin's gradient accumulation state reset."""

    def _local_grads_finite(self) -> bool:
        """Whether this rank's gradient shards are finite (the plugin checks them only under fp16)."""
        raise NotImplementedError

    def _grads_finite(self) -> bool:
        """Whether every rank's gradient shards are finite, under bf16 or fp32, where ColossalAI checks nothing
        (BF16MixedPrecisionMixin.should_skip_step returns False) and an inf would turn every master into NaN."""
        return not self._any_rank(not self._local_grads_finite())  # each rank holds a different shard

    # ---- the fp32 masters and the loss scaler (training/engine/masters.py)

    def master_views(self) -> dict[str, torch.Tensor]:
        """This rank's fp32 master weights, as live tensors (writing into them changes the masters)."""
        raise NotImplementedError

    def master_layout(self) -> Layout:
        """Where each parameter's elements lie in master_views() (masters.py's Layout)."""
        raise NotImplementedError

    def _master_windows(self):
        return master_windows(self.master_views(), self.master_layout())

    def optimizer_has_state(self) -> bool:
        """Before the first successful step the optimizer has no per-parameter state, and LowLevelZeroOptimizer.
        state_dict_shard then raises KeyError: such a checkpoint is saved without it."""
        return self._any_rank(len(self.optimizer.unwrap().state) > 0)

    def _save_own_state(self, directory) -> None:
        """This rank's fp32 master weights, with their layout by parameter name (for a resume on another number of
        processes), and the fp16 loss scaler: the same on every rank, as overflows are agreed."""
        masters = self.master_views()
        if masters:
            save_file({name: t.detach().to("cpu").contiguous() for name, t in masters.items()},
                      str(directory / MASTER_WEIGHTS.format(rank=rank())),
                      metadata={"layout": json.dumps(self.master_layout())})
        if self.loss_scaler is not None and rank() == 0:
            write_json(directory / LOSS_SCALER, scaler_state(self.loss_scaler))

    def _load_own_state(self, directory: Path, saved_world_size: int) -> None:
        masters = self.master_views()
        if masters and saved_world_size != world_size():
            self._load_resharded_masters(directory, saved_world_size)
        elif masters:
            masters_file = directory / MASTER_WEIGHTS.format(rank=rank())
            if masters_file.is_file():
                saved = load_file(str(masters_file))
                if saved.keys() != masters.keys() or any(saved[k].shape != masters[k].shape for k in masters):
                    raise CheckpointError(f"{masters_file}: the fp32 master weights do not fit this run (written "
                                          f"with another plugin, model or number of processes)")
                with torch.no_grad():
                    for name, master in masters.items():
                        master.copy_(saved[name])
            else:
                logger.warning("%s has no %s: the fp32 master weights are rebuilt from the half-precision weights, "
                               "so the run will not match an uninterrupted one", directory, masters_file.name)
        if self.loss_scaler is not None:
            if (directory / LOSS_SCALER).is_file():
                load_scaler_state(self.loss_scaler, read_json(directory / LOSS_SCALER))
            else:
                logger.warning("%s has no %s: the fp16 loss scale restarts at initial_loss_scale", directory,
                               LOSS_SCALER)

    def _load_resharded_masters(self, path: Path, old_world: int) -> None:
        """The fp32 masters of another world size, re-cut by parameter name and offset (masters.py)."""
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
                    logger.warning("%s has no layout (written before resumes on another world size were possible): "
                                   "the fp32 master weights are rebuilt from the half-precision weights", f.name)
                    return
                saved.append((json.loads(layout), handle))
            missing = load_resharded_masters(self._master_windows(), saved)
        if missing:
            raise CheckpointError(f"{path}: the fp32 master weights of its {old_world} ranks do not cover "
                                  f"{missing[:3]} of this model (written with another plugin or model)")
