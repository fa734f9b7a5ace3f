"""Test-only stand-ins that let ColossalAI's ZeRO engines (GeminiPlugin, LowLevelZeroPlugin) run on CPU over gloo.

ColossalAI's ZeRO code is device-agnostic except for its plumbing: it asks its accelerator for the device, streams and
synchronisation, and gemini's HybridAdam loads a compiled CPU Adam kernel. Four stand-ins replace exactly those:
    1. the accelerator: a CpuAccelerator whose name is "cuda" (LowLevelZeroOptimizer._sanity_checks and the plugins'
       device checks compare that name), with no-op synchronize/set_device/empty_cache, device 0 of 1;
    2. streams: current_stream()/default_stream()/Stream() return a stream that does nothing; autocast() is CUDA's
       on the CPU device;
    3. torch.Tensor.record_stream: a no-op (LowLevelZeroOptimizer._run_reduction calls it on CPU tensors);
    4. CPUAdamLoader().load(): a torch implementation of the kernel's CPUAdamOptimizer.step, so that HybridAdam stays
       the real class (GeminiOptimizer accepts exact optimizer types only).
Everything else -- chunking, sharding, the mixed-precision mixins and loss scaler, clipping, sharded checkpoint I/O,
the engine's skip/resume logic -- is ColossalAI's and this repo's real code.

What this does not cover: the CUDA Adam kernel, flash attention, NCCL, device memory and speed; and Gemini's sharded
chunks. A test model is far below GeminiPlugin's min_chunk_size_m (32 Mi elements), so search_chunk_configuration
puts it in one chunk that every rank keeps whole, as Gemini does for any small model; sharded chunks cannot run here,
because a chunk whose device type is "cpu" keeps no device shard (Chunk.close_chunk, Chunk.shard_move). zero2 does
shard its masters and gradients here as on GPUs.

`install()` also points training.loop.choose_engine at `choose_zero_on_cpu`, which honours plugin= and precision=
from the settings on the CPU device, where the product would fall back to ddp/fp32.
"""
from __future__ import annotations

import contextlib
import math
import types

import torch


class NullStream:
    """A CUDA stream that does nothing: on CPU every op is already ordered."""

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None):
        return event

    def query(self) -> bool:
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


class TorchCPUAdam:
    """Adam_Optimizer::Step_1 of colossalai/kernel/extensions/csrc/kernel/x86/cpu_adam.cpp, in torch: the kernel
    HybridAdam calls for parameters on CPU, with the same constructor and step() signature."""

    def __init__(self, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, adamw_mode: bool):
        self.adamw_mode = adamw_mode

    @torch.no_grad()
    def step(self, step, lr, beta1, beta2, eps, weight_decay, bias_correction, param, grad, exp_avg, exp_avg_sq,
             div_scale) -> None:
        grad = grad.float()
        if div_scale > 0:  # the kernel's loss_scale: gradients arrive scaled
            grad = grad / div_scale
        if weight_decay > 0 and not self.adamw_mode:
            grad = grad + param * weight_decay
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1 = 1 - beta1 ** step if bias_correction else 1.0
        bias2 = 1 - beta2 ** step if bias_correction else 1.0
        update = exp_avg / (exp_avg_sq.sqrt() / math.sqrt(bias2) + eps)
        if weight_decay > 0 and self.adamw_mode:
            param.mul_(1 - lr * weight_decay)
        param.add_(update, alpha=-lr / bias1)


def cuda_named_cpu_accelerator():
    from colossalai.accelerator.cpu_accelerator import CpuAccelerator

    class CudaNamedCpuAccelerator(CpuAccelerator):
        def __init__(self):
            super().__init__()
            self._name = "cuda"

        def synchronize(self, device=None) -> None:
            pass

        def set_device(self, device=None) -> None:
            pass

        def empty_cache(self) -> None:
            pass

        def current_device(self) -> int:
            return 0

        def device_count(self) -> int:
            return 1

        def Stream(self, device=None, priority=0, **kwargs):  # noqa: N802 - ColossalAI's name
            return NullStream()

        def current_stream(self, device=None):
            return NullStream()

        def default_stream(self, device=None):
            return NullStream()

        def stream(self, stream_):
            return contextlib.nullcontext()

        def autocast(self, enabled=True, dtype=torch.float16, cache_enabled=True):
            # CudaAccelerator.autocast on the CPU device (CpuAccelerator's returns the nullcontext class itself, which
            # FP16TorchMixedPrecision's `with` cannot enter: ddp + fp16)
            return torch.amp.autocast("cpu", enabled=enabled, dtype=dtype, cache_enabled=cache_enabled)

    return CudaNamedCpuAccelerator()


def choose_zero_on_cpu(settings):
    """training.engine.choose_engine as on a GPU machine, but on the CPU device."""
    from training.engine import EngineChoice, engine_for

    return engine_for(settings, EngineChoice(settings.engine.plugin, settings.optimisation.precision,
                                             torch.device("cpu")))


def install() -> None:
    from training.engine import import_colossalai

    import_colossalai()
    from colossalai.accelerator import api
    from colossalai.kernel.kernel_loader import CPUAdamLoader

    import training.loop

    api.set_accelerator(cuda_named_cpu_accelerator())
    torch.Tensor.record_stream = lambda self, stream: None
    CPUAdamLoader.load = lambda self, ext_name=None: types.SimpleNamespace(CPUAdamOptimizer=TorchCPUAdam)
    training.loop.choose_engine = choose_zero_on_cpu
