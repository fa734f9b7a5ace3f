"""Helpers for the training tests: a tiny model dir, torchrun launches of tests/training_harness.py, metrics."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from training.metrics import read_records

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / "tests" / "training_harness.py"
CORPUS = REPO / "pretraining_corpora"
HELDOUT = REPO / "heldout_corpora"

# Small and fast on 2 CPU cores; every run uses these unless a test overrides them. global_batch_size=0: batch_size
# and gradient_accumulation_steps as given (the args files' recipe batch of 160 would be 40 micro-batches a step).
TINY_RUN = ["global_batch_size=0", "max_seq_length=64", "batch_size=2", "warmup_steps=2", "lr=2e-3", "min_lr=2e-4",
            "logging_steps=1", "dropout_prob=0.05", f"pretrain_data_root_dir={CORPUS}"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer_path) -> Path:
    """A random LLaMA dir (dim 32, 2 layers) with the session's tiny tokenizer."""
    from llama.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tokenizer_path, dim=32, n_layers=2, n_heads=4,
                           max_seq_len=128)


@pytest.fixture(scope="session")
def tied_tiny_model(tmp_path_factory, tokenizer_path) -> Path:
    """A random Llama-3.2-style dir (dim 32, 2 layers): tied embeddings, llama3 RoPE scaling, grouped-query
    attention, with the session's tiny tokenizer."""
    import torch

    from llama.configuration_llama import LlamaConfig
    from llama.llama_model import Llama
    from llama.tokenization_llama import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(tokenizer_path)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_sequence_length=128, tie_word_embeddings=True,
                         rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 32},
                         bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    torch.manual_seed(0)
    model_dir = Llama(config).save_pretrained(tmp_path_factory.mktemp("tied") / "model")
    tokenizer.save(model_dir)
    return model_dir


@pytest.fixture
def one_process_group(monkeypatch):
    """A gloo process group of this test process alone (rank 0 of 1), for engine and evaluation code that calls
    collectives; on a TCP store at a free port, destroyed after the test."""
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_each(settings: list[str]) -> list[str]:
    """Each key once, its last value kept: a test's own value replaces TINY_RUN's (the stage scripts refuse a key
    given twice)."""
    return list({item.partition("=")[0]: item for item in settings}.values())


def on_cpu(settings: list[str]) -> list[str]:
    """one_each(settings) with plugin=ddp and precision=fp32, the pair that runs without CUDA (the args files'
    gemini/fp16 is an error there), wherever they do not name their own."""
    named = {item.partition("=")[0] for item in settings}
    return one_each([*settings, *(f"{key}={value}" for key, value in (("plugin", "ddp"), ("precision", "fp32"))
                                  if key not in named)])


def torchrun(settings: list[str], stage: str = "pretrain", nproc: int = 2, env: dict | None = None,
             timeout: float = 240, script: Path = HARNESS, launcher: list[str] | None = None,
             wait: bool = True):
    """Launch `script` under torchrun (standalone unless `launcher` gives other flags) from the repo root; on ddp in
    fp32 unless the settings name a plugin or precision, or HARNESS_ZERO_ON_CPU runs them as on a GPU."""
    full_env = dict(os.environ, HARNESS_STAGE=stage, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    settings = one_each(settings) if full_env.get("HARNESS_ZERO_ON_CPU") else on_cpu(settings)
    launcher = launcher or ["--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, str(script), *settings]
    if not wait:
        # Its own process group, so a test can send a terminal's Ctrl-C to the launcher and its workers.
        return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def read_metrics(logdir: Path, kind: str = "loss") -> dict[int, dict]:
    """step -> the last metrics.jsonl record of that step (a resumed run appends after the killed one), among the
    records that have the field `kind`: "loss" for training windows, "eval" for held-out evaluations."""
    return {record["step"]: record for record in read_records(Path(logdir) / "metrics.jsonl", kind)}


def read_batches(logdir: Path, rank: int) -> list[str]:
    path = Path(logdir) / f"batches.rank{rank}.jsonl"
    return [json.loads(line)["sha1"] for line in path.read_text().splitlines()]


def explain(result) -> str:
    return f"exit {result.returncode}\n--- output ---\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
