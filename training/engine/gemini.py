"""plugin="gemini": GeminiPlugin, ZeRO-3 chunks. Adam states in CPU memory (gemini_offload_optim_frac=1.0, as the
recipe); parameters on the GPUs (gemini_offload_param_frac=0.0, faster) or in CPU memory (1.0, the recipe's "cpu")."""
from __future__ import annotations

import torch

from llama.llama_model import Llama
from training.engine.masters import Layout
from training.engine.optimizer import HYBRID_ADAM
from training.engine.zero import ZeroEngine
from training.settings_concerns import EngineSettings, SettingsError


class GeminiEngine(ZeroEngine):
    name = "gemini"
    compile_blocks = (False, "Gemini gathers each parameter's chunk through hooks on the ops that use it "
                             "(ColoParameter.__torch_function__), which a compiled graph would not call")
    # Gemini gathers sharded parameters through hooks on ordinary ops (ColoParameter.__torch_function__); the fused
    # loss reads output.weight inside a custom autograd function, which those hooks do not see.
    loss_path = "checkpointed"
    why_hybrid_adam = "plugin='gemini' needs ColossalAI's HybridAdam (GeminiOptimizer accepts no other Adam)"

    @property
    def adam_kind(self) -> str:
        """HybridAdam on any device (on CPU only the tests' ZeRO-on-CPU harness builds this engine; the product falls
        back to ddp)."""
        return HYBRID_ADAM

    @property
    def optimizer_offloaded(self) -> bool:
        """"auto" placement may move Adam's states to CPU memory at any time."""
        s = self.settings.engine
        return self.choice.device.type == "cuda" and (s.gemini_placement_policy == "auto"
                                                      or s.gemini_offload_optim_frac > 0)

    def check_settings(self) -> None:
        if self.choice.precision == "fp32":
            raise SettingsError("setting 'precision' = 'fp32' is not supported by plugin 'gemini' (fp16 or bf16; "
                                "or plugin='zero2' / 'ddp' for fp32)")

    @classmethod
    def check_engine_settings(cls, settings: EngineSettings, source: str) -> None:
        s = settings
        if s.gemini_placement_policy == "static" and s.gemini_offload_param_frac > 0.0 \
                and s.gemini_offload_optim_frac != 1.0:
            # StaticPlacementPolicy.__init__ (colossalai/zero/gemini/placement_policy.py) would drop it with a warning
            raise SettingsError(f"setting 'gemini_offload_param_frac' = {s.gemini_offload_param_frac!r} needs "
                                f"'gemini_offload_optim_frac' = 1.0 (ColossalAI ignores it otherwise), got "
                                f"{s.gemini_offload_optim_frac!r} ({source})")

    def _plugin(self, cai):
        s, o = self.settings.engine, self.settings.optimisation
        static = s.gemini_placement_policy == "static"
        return cai.GeminiPlugin(
            precision=self.choice.precision, placement_policy=s.gemini_placement_policy,
            offload_optim_frac=s.gemini_offload_optim_frac if static else 0.0,
            offload_param_frac=s.gemini_offload_param_frac if static else 0.0,
            initial_scale=o.initial_loss_scale, max_norm=o.max_grad_norm,
            enable_gradient_accumulation=o.gradient_accumulation_steps > 1, pin_memory=True,
        ), None

    def _model_without_weights(self, config) -> torch.nn.Module:
        """ColossalAI's LazyInitContext: GeminiDDP._preprocess_param materializes one parameter at a time on the
        device and moves it into this process's chunks."""
        from colossalai.accelerator import get_accelerator
        from colossalai.lazy import LazyInitContext

        with LazyInitContext(default_device=get_accelerator().get_current_device()):
            return Llama(config)

    def inference_ready(self) -> bool:
        """Gemini's "auto" placement records memory statistics over the first training iteration and GeminiDDP.forward
        (colossalai/zero/gemini/gemini_ddp.py) asserts on a no-grad forward before it; "static" placement is always
        ready."""
        manager = self.model.gemini_manager
        return not (manager.need_warmup and manager.is_warmup())

    def _end_accumulation(self) -> None:
        """GeminiOptimizer.step resets chunk_manager.accumulating_grads on its update path only, not on its skip
        path; left set, the next step's gradients are added onto the skipped ones (GeminiDDP.grad_handle) and under
        fp16 every later step overflows. Reset it after every step."""
        self.optimizer.module.chunk_manager.accumulating_grads = False

    def _local_grads_finite(self) -> bool:
        # GeminiDDP.grad_handle adds each reduced chunk's has_inf_or_nan to overflow_counter whatever the dtype; only
        # the fp16 mixin reads and resets it (GeminiFP16MixedPrecisionMixin), so it is reset here.
        counter = self.optimizer.module.chunk_manager.overflow_counter
        local_bad = counter.item() > 0
        counter.zero_()
        return not local_bad

    def master_views(self) -> dict[str, torch.Tensor]:
        return gemini_master_views(self.model)

    def master_layout(self) -> Layout:
        return gemini_master_layout(self.model)


def gemini_master_views(model) -> dict[str, torch.Tensor]:
    """"chunk.<i>": the local part of the i-th fp32 chunk (Chunk.payload: its shard, or all of it when the chunk is
    kept gathered), in the order of GeminiDDP.fp32_params."""
    chunks = model.chunk_manager.get_chunks(model.fp32_params)
    return {f"chunk.{i}": chunk.payload for i, chunk in enumerate(chunks)}


def gemini_master_layout(model) -> Layout:
    """A parameter occupies [offset, end) of its fp32 chunk "chunk.<i>", and this rank holds [shard_begin, shard_end)
    of the chunk (all of it when kept gathered)."""
    layout: Layout = {}
    chunks = model.chunk_manager.get_chunks(model.fp32_params)
    index = {id(chunk): i for i, chunk in enumerate(chunks)}
    for p, fp32_p in zip(model.fp16_params, model.fp32_params):
        chunk = model.chunk_manager.get_chunk(fp32_p)
        info = chunk.tensors_info[fp32_p]
        first, last = (0, chunk.chunk_size) if chunk.is_gathered else (chunk.shard_begin, chunk.shard_end)
        begin, end = max(info.offset, first), min(info.end, last)
        if begin < end:
            layout[model.param2name[p]] = [f"chunk.{index[id(chunk)]}", begin - first, begin - info.offset,
                                           end - begin]
    return layout
