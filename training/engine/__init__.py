"""The engine: one class per ColossalAI plugin behind one interface (base.py), and the only package that imports
colossalai or asks which plugin runs.

    base.py               Engine (the interface and what all share), EngineChoice, StepOutcome
    gemini.py             GeminiEngine: GeminiPlugin, ZeRO-3 chunks
    zero2.py              Zero2Engine: LowLevelZeroPlugin(stage=2)
    ddp.py                DDPEngine: TorchDDPPlugin; also the one engine that runs without CUDA (fp32)
    zero.py               what the two ZeRO engines share: half-precision loads, fp32 masters, the fp16 loss scaler
    masters.py            the fp32 masters and loss scaler that ColossalAI's checkpoints leave out
    optimizer.py          which Adam, HybridAdam's toolchain and kernels, the CPU Adam's threads
    colossalai_import.py  the one import of ColossalAI's training pieces

On a machine without CUDA the ZeRO plugins, HybridAdam and half precision cannot run (they assert a GPU): only
plugin=ddp precision=fp32 runs there (gloo, torch.optim.AdamW), and choose_engine refuses anything else rather than
train something other than what was asked.
"""
from __future__ import annotations

import torch

from training.engine.base import Engine, EngineChoice, StepOutcome
from training.engine.colossalai_import import import_colossalai
from training.engine.ddp import DDPEngine
from training.engine.gemini import GeminiEngine
from training.engine.zero2 import Zero2Engine
from training.settings_concerns import Settings, SettingsError

__all__ = ["ENGINES", "Engine", "EngineChoice", "StepOutcome", "choose_engine", "engine_for", "import_colossalai"]

ENGINES: dict[str, type[Engine]] = {cls.name: cls for cls in (GeminiEngine, Zero2Engine, DDPEngine)}


def engine_for(settings: Settings, choice: EngineChoice) -> Engine:
    """The engine of choice.plugin, its settings checked (the plugin/precision pairs it cannot run on any device)."""
    engine = ENGINES[choice.plugin](settings, choice)
    engine.check_settings()
    return engine


def choose_engine(settings: Settings) -> Engine:
    """The engine that runs here for `settings`, not yet built: on CUDA the settings' plugin and precision, checked
    (bf16 support, HybridAdam's toolchain) before any model exists; without CUDA ddp in fp32, the only pair that
    runs there (any other is a SettingsError)."""
    plugin, precision = settings.engine.plugin, settings.optimisation.precision
    if not torch.cuda.is_available():
        if plugin != DDPEngine.name or precision != "fp32":
            raise SettingsError(f"settings 'plugin' = {plugin!r}, 'precision' = {precision!r} need a CUDA device and "
                                f"this machine has none; on CPU run plugin={DDPEngine.name} precision=fp32 (gloo, "
                                f"torch.optim.AdamW)")
        return DDPEngine(settings, EngineChoice(DDPEngine.name, "fp32", torch.device("cpu")))
    engine = engine_for(settings, EngineChoice(plugin, precision,
                                               torch.device("cuda", torch.cuda.current_device())))
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise SettingsError(f"setting 'precision' = 'bf16': {torch.cuda.get_device_name()} has no bf16; use fp16")
    engine.check_toolchain()
    return engine
