"""Data pipeline throughput of one stage's DataProcessor, against SentencePiece's own batch encode speed.

    python bench/data_throughput.py --stage pretrain --corpus pretraining_corpora --tokenizer tok.model \
        [--batches 200 --batch-size 20 --max-seq-length 1024 --packing --long-text split]

The mix comes from the stage's args file, the files from --corpus; one rank of one. Prints one JSON line:
  batches_per_s, real_tokens_per_s, padded_tokens_per_s  over the timed batches (start-up checks excluded, the
                                                         prefetch thread's start included)
  real_fraction      real tokens / batch slots (1 - padding share)
  discarded_tokens   tokens lost: long_text="truncate" cut-offs, prompt inputs cut to fit, answers that did not fit
  sp_tokens_per_s    SentencePiece's multi-threaded list encode (best of 3), on the very texts the pipeline encoded
  ratio              real_tokens_per_s / sp_tokens_per_s
  cpu_ratio          the same ratio in CPU seconds of this process (all its threads): steadier than `ratio` on a
                     machine whose cores other work shares, where wall-clock figures swing from run to run
Targets: ratio >= 0.6 for task_instruct_tuning with the args file's settings, >= 0.5 otherwise; real_fraction >= 0.97
with --packing; discarded_tokens == 0 with long_text="split" (LM documents; prompted samples longer than a row still
lose input tokens, which SentencePiece's figure counts as encoded). bench/long_input_corpus.py makes a corpus whose
task inputs are longer than a row.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sentencepiece import SentencePieceProcessor  # noqa: E402

from llama.tokenization_llama import Tokenizer  # noqa: E402
from training.settings import load_settings  # noqa: E402

STAGES = ("pretrain", "task_instruct_tuning", "alignment_sft")


class RecordingTokenizer:
    """The real tokenizer, keeping the texts of every batch call (the same texts SentencePiece is timed on)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.texts = tokenizer, []

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self.texts += texts
        return self.tokenizer.encode_batch(texts)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--corpus", required=True, type=Path, help="folder holding the stage's <set>/ folders")
    parser.add_argument("--tokenizer", required=True, type=Path, help="SentencePiece tokenizer.model")
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, help="default: the args file's")
    parser.add_argument("--max-seq-length", type=int, help="default: the args file's")
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--long-text", choices=("split", "truncate"), help="default: the args file's")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    overrides = [f"pretrain_data_root_dir={args.corpus.resolve()}", f"packing={args.packing}"]
    for name, value in (("batch_size", args.batch_size), ("max_seq_length", args.max_seq_length),
                        ("long_text", args.long_text)):
        if value is not None:
            overrides.append(f"{name}={value}")
    settings = load_settings(importlib.import_module(f"{args.stage}_args"), overrides)
    tokenizer = RecordingTokenizer(Tokenizer(args.tokenizer))
    processor = importlib.import_module(f"{args.stage}_main").DataProcessor(settings, tokenizer, 0, 1)

    real = slots = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    with processor:
        for _ in range(args.batches):
            batch = next(processor)
            real += batch["num_tokens"]
            slots += batch["input_ids"].numel()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        counters = processor.counters

    texts = list(tokenizer.texts)  # includes what the prefetch thread read ahead: same kind of text
    sp = SentencePieceProcessor(model_file=str(args.tokenizer))
    sp_elapsed = sp_cpu = float("inf")
    for _ in range(3):  # best of 3: the reference is SentencePiece at its fastest
        sp_start, sp_cpu_start = time.perf_counter(), time.process_time()
        sp_tokens = sum(map(len, sp.encode(texts, num_threads=os.cpu_count() or 1)))
        sp_elapsed = min(sp_elapsed, time.perf_counter() - sp_start)
        sp_cpu = min(sp_cpu, time.process_time() - sp_cpu_start)

    result = {
        "batches_per_s": round(args.batches / elapsed, 2),
        "real_tokens_per_s": round(real / elapsed),
        "padded_tokens_per_s": round(slots / elapsed),
        "real_fraction": round(real / slots, 4),
        "discarded_tokens": counters["discarded_tokens"] + counters["cut_input_tokens"],
        "sp_tokens_per_s": round(sp_tokens / sp_elapsed),
    }
    result["ratio"] = round(result["real_tokens_per_s"] / result["sp_tokens_per_s"], 2)
    result["cpu_ratio"] = round((real / cpu) / (sp_tokens / sp_cpu), 2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
