"""plugin="zero2": LowLevelZeroPlugin(stage=2), masters and gradients sharded, the working copy whole on every GPU;
optional CPU offload of the optimizer states (zero2_cpu_offload)."""
from __future__ import annotations

import torch

from llama.llama_model import Llama
from training.engine.masters import Layout
from training.engine.optimizer import ADAMW, FUSED_ADAMW, HYBRID_ADAM
from training.engine.zero import ZeroEngine


class Zero2Engine(ZeroEngine):
    name = "zero2"
    compile_blocks = (True, "LowLevelZeroPlugin keeps whole working parameters and reduces gradients in backward "
                            "hooks outside the blocks")
    why_hybrid_adam = "zero2_cpu_offload=True needs ColossalAI's HybridAdam (its CPU kernel updates the offloaded states)"

    @property
    def adam_kind(self) -> str:
        if self.optimizer_offloaded:
            return HYBRID_ADAM
        return FUSED_ADAMW if self.choice.device.type == "cuda" else ADAMW

    @property
    def optimizer_offloaded(self) -> bool:
        return self.choice.device.type == "cuda" and bool(self.settings.engine.zero2_cpu_offload)

    def _plugin(self, cai):
        s = self.settings.optimisation
        return cai.LowLevelZeroPlugin(stage=2, precision=self.choice.precision, initial_scale=s.initial_loss_scale,
                                      max_norm=s.max_grad_norm,
                                      cpu_offload=self.settings.engine.zero2_cpu_offload), None

    def _model_without_weights(self, config) -> torch.nn.Module:
        """zero2 clones every parameter into its master shard (LowLevelZeroOptimizer._create_master_param_current_rank),
        which a LazyTensor cannot do; its working copy is whole on every GPU anyway, so it is allocated there,
        uninitialised, in the compute dtype."""
        from colossalai.accelerator import get_accelerator

        with torch.device("meta"):
            model = Llama(config)
        return model.to(self.load_dtype).to_empty(device=get_accelerator().get_current_device())

    def _local_grads_finite(self) -> bool:
        # LowLevelZeroFP16MixedPrecisionMixin.check_local_overflow, for any dtype: this rank's reduced shards.
        from colossalai.zero.low_level._utils import has_inf_or_nan

        optimizer = self.optimizer
        return not any(has_inf_or_nan(grad) for store in optimizer.pg_to_grad_store.values()
                       for group_id in range(optimizer.num_param_groups)
                       for grad in store.get_working_grads_by_group_id(group_id) if grad is not None)

    def master_views(self) -> dict[str, torch.Tensor]:
        return zero2_master_views(self.model, self.optimizer)

    def master_layout(self) -> Layout:
        return zero2_master_layout(self.model, self.optimizer)


def zero2_master_views(model, optimizer) -> dict[str, torch.Tensor]:
    """"<parameter name>": LowLevelZeroOptimizer.working_to_master_param, this rank's padded 1/world slice."""
    masters = optimizer.working_to_master_param
    return {name: masters[id(p)] for name, p in model.unwrap().named_parameters() if id(p) in masters}


def zero2_master_layout(model, optimizer) -> Layout:
    """The flattened parameter, padded to a multiple of the world size, is split evenly; this rank's master is slice
    `rank` (LowLevelZeroOptimizer._create_master_param_current_rank), the last slices holding the padding."""
    layout: Layout = {}
    masters = optimizer.working_to_master_param
    for name, p in model.unwrap().named_parameters():
        if id(p) not in masters:
            continue
        size = masters[id(p)].numel()
        start = torch.distributed.get_rank(optimizer.param_to_pg[p]) * size
        valid = min(size, p.numel() - start)
        if valid > 0:
            layout[name] = [name, 0, start, valid]
    return layout
