"""The one import of ColossalAI's training pieces, with its optional-kernel chatter kept off the console."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import types
import warnings

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
