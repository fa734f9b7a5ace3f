"""The GPU figures of training/flops.py and training/metrics.py with the device faked: the peak-TFLOPS lookup by device name, and peak
memory (allocated and reserved) reported per logging window."""

import pytest
import torch

import pretrain_args
from settings_for import settings_for
from training.flops import peak_tflops_per_gpu
from training.metrics import Metrics

GPU = torch.device("cuda", 0)


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0),  # SXM
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H100 PCIe", "fp32", 51.0),
    ("NVIDIA H100 NVL", "fp16", 835.0),
    ("NVIDIA H800 PCIe", "bf16", 756.0),
    ("NVIDIA H800", "bf16", 989.0),
    ("NVIDIA H200", "bf16", 989.0),
    ("NVIDIA A100-SXM4-80GB", "fp16", 312.0),
    ("Some Future GPU", "bf16", None),
])
def test_peak_tflops_by_device_name(name, precision, peak, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops_per_gpu(0.0, GPU, precision) == peak
    assert peak_tflops_per_gpu(500.0, GPU, precision) == 500.0  # the setting wins
    assert peak_tflops_per_gpu(0.0, torch.device("cpu"), precision) is None


class _FakeCudaMemory:
    """torch.cuda's peak counters: the peak since the last reset, which a reset lowers to what is held now."""

    def __init__(self):
        self.held = {"allocated": 0, "reserved": 0}
        self.peak = dict(self.held)

    def use(self, allocated: int, reserved: int) -> None:
        self.held = {"allocated": allocated, "reserved": reserved}
        self.peak = {k: max(self.peak[k], v) for k, v in self.held.items()}

    def reset(self, device=None) -> None:
        self.peak = dict(self.held)


def test_peak_memory_is_per_logging_window(tmp_path, monkeypatch):
    memory = _FakeCudaMemory()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: memory.peak["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: memory.peak["reserved"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", memory.reset)
    settings = settings_for(pretrain_args, {"logging_steps": 1, "max_steps": 3, "warmup_steps": 0,
                                            "logdir": str(tmp_path)})
    metrics = Metrics(settings, rank=1, world_size=1, flops_per_token=1.0, peak_tflops=None, start_step=0)

    memory.use(allocated=9_000_000_000, reserved=12_000_000_000)  # a spike in step 1
    memory.use(allocated=2_000_000_000, reserved=12_000_000_000)
    metrics.record(2.0, False, 1.0, None, 1e-3, 100)
    first = metrics.log(1, tokens_seen=100)
    memory.use(allocated=3_000_000_000, reserved=12_000_000_000)
    metrics.record(2.0, False, 1.0, None, 1e-3, 100)
    second = metrics.log(2, tokens_seen=200)
    assert (first["max_memory_gb"], first["max_memory_reserved_gb"]) == (9.0, 12.0)
    assert (second["max_memory_gb"], second["max_memory_reserved_gb"]) == (3.0, 12.0)  # step 1's spike is gone
    metrics.close()


@pytest.mark.parametrize("mode, recomputed", [("full", 4), ("selective", 2), ("none", 0)])
def test_recompute_flops_are_the_forward_of_the_recomputed_blocks(mode, recomputed):
    from llama import Llama, LlamaConfig
    from training.flops import flops_per_token, recompute_flops_per_token

    model = Llama(LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                              max_sequence_length=64))
    model.set_gradient_checkpointing(mode)
    block = sum(p.numel() for p in model.layers[0].parameters())
    # a block's share of the model FLOPs is 6 * params + 12 * hidden * seq; its forward a third of that
    assert recompute_flops_per_token(model, 32, 64) == recomputed * (6 * block + 12 * 32 * 64) / 3
    assert flops_per_token(model, 4, 32, 64) > recompute_flops_per_token(model, 32, 64)


def test_steady_figures_leave_out_the_warmup_steps_and_steps_break_down_into_their_parts(tmp_path, monkeypatch):
    import training.metrics as metrics_module

    now = [0.0]
    monkeypatch.setattr(metrics_module.time, "perf_counter", lambda: now[0])
    settings = settings_for(pretrain_args, {"logging_steps": 4, "max_steps": 4, "warmup_steps": 0,
                                            "logdir": str(tmp_path)})
    metrics = Metrics(settings, rank=1, world_size=2, flops_per_token=3e12, peak_tflops=100.0, start_step=0,
                      recompute_flops_per_token=1e12)
    for seconds in (30.0, 20.0, 1.0, 1.0):  # compilation in the first two steps
        with metrics.timed("data"):
            now[0] += 0.1 * seconds
        with metrics.timed("forward_backward"):
            now[0] += 0.7 * seconds
        with metrics.timed("optimizer"):
            now[0] += 0.2 * seconds
        metrics.record(2.0, False, 1.0, None, 1e-3, global_tokens=400)
    figures = metrics.log(4, tokens_seen=1600)
    assert metrics_module.WARMUP_STEPS == 2 and figures["steady_steps"] == 2
    assert figures["steady_tokens_per_s_per_gpu"] == pytest.approx(400 / 1.0 / 2)  # 400 tokens a second, 2 GPUs
    assert figures["steady_mfu"] == pytest.approx(200 * 3e12 / 1e12 / 100.0)
    assert figures["steady_hfu"] == pytest.approx(figures["steady_mfu"] * 4 / 3)
    assert figures["tokens_per_s_per_gpu"] == pytest.approx(1600 / 52.0 / 2)  # the window keeps the warm-up
    assert figures["hfu"] == pytest.approx(figures["mfu"] * 4 / 3)
    assert figures["step_s"] == pytest.approx(13.0)
    assert (figures["data_s"], figures["forward_backward_s"], figures["optimizer_s"]) == pytest.approx((1.3, 9.1, 2.6))
    metrics.close()
