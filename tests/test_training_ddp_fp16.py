"""plugin=ddp precision=fp16, the GPU wrapper stack built on CPU: TorchAMPModule(TorchDDPModel(Llama)) and
TorchAMPOptimizer(OptimizerWrapper(AdamW)). Its checkpoint round trip keeps the optimizer state and the GradScaler's
scale and growth tracker, and no_sync reaches the DDP module under the AMP wrapper."""
import torch

import pretrain_args
from llama.configuration_llama import LlamaConfig
from llama.llama_model import Llama
from llama.tokenizer_files import load_tokenizer
from training.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from training.checkpoint_files import GRAD_SCALER
from training.engine import EngineChoice, engine_for
from training.engine.ddp import DDPEngine
from training.settings import load_settings
from training_runs import one_process_group, tiny_model  # noqa: F401


class _DataPosition:
    """What a checkpoint asks of the data side, nothing more (this test is about the engine's state)."""

    def __init__(self):
        self.loaded = None

    def state_dict(self):
        return {"position": 7}

    def load_state_dict(self, state):
        self.loaded = state


def _settings(model_dir, out, initial_loss_scale: float):
    return load_settings(pretrain_args, [f"init_model_path={model_dir}", "plugin=ddp", "precision=fp16",
                                         f"initial_loss_scale={initial_loss_scale}", f"output_dir={out}",
                                         "warmup_steps=1", "max_steps=4"])


def _engine(settings) -> DDPEngine:
    engine = engine_for(settings, EngineChoice("ddp", "fp16", torch.device("cpu")))
    engine.boost(Llama.from_pretrained(settings.model.init_model_path))
    return engine


def test_ddp_fp16_checkpoint_keeps_optimizer_and_scaler_and_no_sync_applies(tiny_model, tmp_path, monkeypatch,
                                                                            one_process_group):
    from colossalai.accelerator.cpu_accelerator import CpuAccelerator

    # CPU stand-ins for what the GPU has: TorchAMPOptimizer builds torch.cuda.amp.GradScaler, which is disabled
    # without CUDA (its state_dict is then empty); the sharded optimizer load calls the accelerator's synchronize
    # (`load_states_into_optimizer` in colossalai/checkpoint_io/utils.py), which ColossalAI's CPU accelerator refuses.
    monkeypatch.setattr(torch.cuda.amp, "GradScaler", lambda **kwargs: torch.amp.GradScaler("cpu", **kwargs))
    monkeypatch.setattr(CpuAccelerator, "synchronize", lambda self, device=None: None)
    monkeypatch.setattr(DDPEngine, "checkpoint_optimizer_sharded", property(lambda self: True))  # the GPU layout

    out = tmp_path / "out"
    engine = _engine(_settings(tiny_model, out, initial_loss_scale=1024))
    assert type(engine.model).__name__ == "TorchAMPModule" and engine.grad_scaler is not None
    ddp = engine.model.module.module  # TorchAMPModule -> TorchDDPModel -> torch DDP
    with engine.no_sync(last_micro_batch=False):
        assert ddp.require_backward_grad_sync is False
    with engine.no_sync(last_micro_batch=True):
        assert ddp.require_backward_grad_sync is True

    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        # The forward skips TorchAMPModule's autocast, which ColossalAI's CPU accelerator does not provide.
        loss, _ = engine.model.module(ids, loss_mask=torch.ones_like(ids))
        engine.backward(loss)
        assert not engine.step(loss_is_finite=True).skipped
    saved_scaler = engine.grad_scaler.state_dict()
    assert saved_scaler["scale"] == 1024 and saved_scaler["_growth_tracker"] == 2

    path = save_checkpoint(engine, _DataPosition(), TrainerState(step=2, loss=1.0), LlamaConfig.from_pretrained(
        tiny_model), load_tokenizer(tiny_model), out, keep=2).path
    assert (path / "optimizer").is_dir() and (path / GRAD_SCALER).is_file()

    fresh_settings = _settings(tiny_model, out, initial_loss_scale=8)
    fresh = _engine(fresh_settings)
    assert fresh.grad_scaler.get_scale() == 8
    data = _DataPosition()
    load_checkpoint(path, fresh, data, fresh_settings)
    assert data.loaded == {"position": 7}
    assert fresh.grad_scaler.state_dict() == saved_scaler
    before, after = engine.checkpoint_optimizer.unwrap(), fresh.checkpoint_optimizer.unwrap()
    assert after.param_groups[0]["lr"] == before.param_groups[0]["lr"]
    for p_before, p_after in zip(before.param_groups[0]["params"], after.param_groups[0]["params"]):
        state_before, state_after = before.state[p_before], after.state[p_after]
        assert float(state_after["step"]) == float(state_before["step"]) == 2
        assert torch.equal(state_after["exp_avg"], state_before["exp_avg"])
        assert torch.equal(state_after["exp_avg_sq"], state_before["exp_avg_sq"])
