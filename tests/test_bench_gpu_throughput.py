"""bench/gpu_throughput.py on CPU at a tiny shape: one JSON line per shape with each way's figures, MFU and HFU from
the PaLM FLOPs of the shape, and the ratios of the ways' throughputs; the 7B shape's layers sized to the GPU."""
import json
import sys
import types

import pytest
import torch

from training_runs import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_throughput  # noqa: E402

from llama import Llama, LlamaConfig  # noqa: E402
from training.flops import flops_per_token  # noqa: E402


def test_the_tiny_shape_gives_every_way_its_figures_and_the_ratios(capsys):
    gpu_throughput.main(["--shapes", "tiny", "--device", "cpu", "--peak-tflops", "2.0", "--seq", "64", "--steps", "1",
                         "--warmup", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert {k: line[k] for k in ("shape", "seq", "batch_size", "device", "peak_tflops", "note")} == \
        {"shape": "tiny", "seq": 64, "batch_size": 2, "device": "cpu", "peak_tflops": 2.0, "note": ""}
    ways = line["ways"]
    assert set(ways) == {"fast", "old", "transformers"}
    dim, layers, heads, kv_heads, vocab, _ = gpu_throughput.SHAPES["tiny"]
    fpt = flops_per_token(Llama(LlamaConfig(vocab_size=vocab, hidden_size=dim, num_hidden_layers=layers,
                                            num_attention_heads=heads, num_key_value_heads=kv_heads)),
                          layers, dim, 64)
    for way in ways.values():
        assert way["tokens_per_s_per_gpu"] > 0 and way["step_s"] > 0
        assert way["mfu"] == pytest.approx(way["tokens_per_s_per_gpu"] * fpt / 1e12 / 2.0)
    # the cheapest checkpointing fits on CPU: no recomputation, HFU = MFU; the old path recomputes every block
    assert ways["fast"]["checkpointing"] == "none" and ways["fast"]["hfu"] == pytest.approx(ways["fast"]["mfu"])
    assert ways["old"]["checkpointing"] == "full" and ways["old"]["attention"] == "dense"
    assert 1.2 < ways["old"]["hfu"] / ways["old"]["mfu"] < 4 / 3
    assert line["ours_vs_transformers"] == pytest.approx(
        ways["fast"]["tokens_per_s_per_gpu"] / ways["transformers"]["tokens_per_s_per_gpu"])
    assert line["fast_vs_old"] == pytest.approx(ways["fast"]["tokens_per_s_per_gpu"] / ways["old"]["tokens_per_s_per_gpu"])
    # the same tokens: all three start from the same weights, so their losses agree closely
    assert ways["fast"]["loss"] == pytest.approx(ways["transformers"]["loss"], rel=1e-2)


@pytest.mark.parametrize("gb, layers", [(80.0, 16), (150.8, 32)])
def test_the_7b_shape_runs_as_many_layers_as_fit_and_says_so(gb, layers, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=gb * 1e9))
    fit, note = gpu_throughput.sized_layers("7b", 4096, 32, 32000, torch.device("cuda", 0))
    assert fit == layers and (f"{layers} of its 32 layers" in note) == (layers < 32) and bool(note) == (layers < 32)
    assert gpu_throughput.sized_layers("1b", 2048, 22, 32000, torch.device("cuda", 0)) == (22, "")


def test_unknown_shapes_are_refused():
    with pytest.raises(SystemExit, match="unknown \\['13b'\\]"):
        gpu_throughput.main(["--shapes", "13b"])
