"""Data pipeline throughput of one stage's data stream (its RecordRules in a DataStream), against its tokenizer
library's own batch encode speed.

    python bench/data_throughput.py --stage pretrain --corpus pretraining_corpora --tokenizer tok.model \
        [--batches 200 --batch-size 20 --max-seq-length 1024 --packing --long-text split]

--tokenizer is a SentencePiece tokenizer.model or a tokenizer.json (then the reference is the `tokenizers` library).

The mix comes from the stage's args file, the files from --corpus; one rank of one. Prints one JSON line:
  batches_per_s, real_tokens_per_s, padded_tokens_per_s  over the timed batches (start-up checks excluded, the
                                                         prefetch thread's start included)
  real_fraction      real tokens / batch slots (1 - padding share)
  discarded_tokens   tokens lost: long_text="truncate" cut-offs, prompt inputs cut to fit, answers that did not fit
  sp_tokens_per_s    SentencePiece's multi-threaded list encode (best of 3), on the very texts the pipeline encoded;
                     for a tokenizer.json instead
  tokenizers_tokens_per_s  the `tokenizers` library's batch encode of those texts (its own thread pool; the faster of
                     encode_batch and encode_batch_fast, best of 3 each)
  ratio              real_tokens_per_s / that reference
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

from llama.tokenizer_files import load_tokenizer, tokenizer_file  # noqa: E402
from tools.stage_schema import stage_rules  # noqa: E402
from training.data_stream import DataStream  # noqa: E402
from training.settings import load_settings  # noqa: E402

STAGES = ("pretrain", "task_instruct_tuning", "alignment_sft")


class RecordingTokenizer:
    """The real tokenizer, keeping the texts of every batch call (the same texts SentencePiece is timed on)."""

    def __init__(self, tokenizer):
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
    parser.add_argument("--tokenizer", required=True, type=Path, help="tokenizer.model, tokenizer.json or a model dir")
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
    tokenizer = RecordingTokenizer(load_tokenizer(args.tokenizer))
    processor = DataStream(settings.data, tokenizer, 0, 1, stage_rules(args.stage), settings.chat)

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
    reference, encoders = _raw_encoders(tokenizer_file(args.tokenizer))
    ref_elapsed = ref_cpu = float("inf")
    for encode in encoders:
        for _ in range(3):  # best of 3: the reference is the library at its fastest
            ref_start, ref_cpu_start = time.perf_counter(), time.process_time()
            ref_tokens = sum(map(len, encode(texts)))
            ref_elapsed = min(ref_elapsed, time.perf_counter() - ref_start)
            ref_cpu = min(ref_cpu, time.process_time() - ref_cpu_start)

    result = {
        "batches_per_s": round(args.batches / elapsed, 2),
        "real_tokens_per_s": round(real / elapsed),
        "padded_tokens_per_s": round(slots / elapsed),
        "real_fraction": round(real / slots, 4),
        "discarded_tokens": counters["discarded_tokens"] + counters["cut_input_tokens"],
        f"{reference}_tokens_per_s": round(ref_tokens / ref_elapsed),
    }
    result["ratio"] = round(result["real_tokens_per_s"] / result[f"{reference}_tokens_per_s"], 2)
    result["cpu_ratio"] = round((real / cpu) / (ref_tokens / ref_cpu), 2)
    print(json.dumps(result))
    return result


def _raw_encoders(path: Path):
    """(name, [batch encode functions]) of the library that reads `path`, used raw: no bos/eos, ids only."""
    if path.suffix == ".json":
        from tokenizers import Tokenizer as RawTokenizer

        raw = RawTokenizer.from_file(str(path))
        return "tokenizers", [lambda texts: [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)],
                              lambda texts: [e.ids for e in raw.encode_batch_fast(texts, add_special_tokens=False)]]
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(path))
    return "sp", [lambda texts: sp.encode(texts, num_threads=os.cpu_count() or 1)]


if __name__ == "__main__":
    main()
