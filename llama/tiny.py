"""Tiny tokenizers and models for the demo and the tests (no hub, no downloads)."""
from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Iterable

import sentencepiece as spm


def train_tokenizer(texts: Iterable[str], output_path: str | Path, vocab_size: int = 400,
                    model_type: str = "bpe") -> Path:
    """Train a LLaMA-style SentencePiece model (byte fallback, unk=0, bos=1, eos=2, no pad).

    Normalisation is off and whitespace is kept as is, as in LLaMA's tokenizer, so that
    decode(encode(text)) == text for any text, Chinese included.

    SentencePiece refuses a vocab_size below what it must hold (3 specials + 256 byte pieces + the covered
    characters), so vocab_size is raised to that floor for small, character-rich (Chinese) corpora.
    """
    texts = [t for t in texts if t.strip()]
    vocab_size = max(vocab_size, 3 + 256 + len(set("".join(texts))))
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=0.9995,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False,
        max_sentence_length=1 << 16,  # the default, 4,192 bytes, silently drops long documents
        num_threads=2,
        minloglevel=2,
    )
    output_path.write_bytes(model.getvalue())
    return output_path


def make_tiny_model(output_dir: str | Path, tokenizer_path: str | Path, dim: int = 64, n_layers: int = 2,
                    n_heads: int = 4, n_kv_heads: int | None = None, max_seq_len: int = 512, seed: int = 0,
                    device: str = "cpu", dtype: str = "float32") -> Path:
    """Write a complete, randomly initialised model dir (config.json, model.safetensors, tokenizer.model).

    device="cuda" initialises on the GPU (seconds instead of minutes for a 7B shape); dtype is the stored one.
    """
    import torch

    from llama.configuration_llama import LlamaConfig
    from llama.llama_model import Llama
    from llama.tokenization_llama import Tokenizer

    tokenizer = Tokenizer(tokenizer_path)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=dim, num_hidden_layers=n_layers,
                         num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                         max_sequence_length=max_seq_len, bos_token_id=tokenizer.bos_id,
                         eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Llama(config)
    return model.to(getattr(torch, dtype)).save_pretrained(output_dir, tokenizer_path=tokenizer.model_path)


def corpus_texts(path: str | Path, max_chars: int = 20_000_000) -> list[str]:
    """Texts to train or measure a tokenizer on, from a file or a folder (searched recursively), up to max_chars in
    total: every string field of every JSON line of *.jsonl (except "type", which names a prompt file), and every
    non-blank line of *.prompt and *.txt."""
    path = Path(path)
    if path.is_dir():
        files = [f for f in sorted(path.rglob("*")) if f.suffix in (".jsonl", ".prompt", ".txt") and f.is_file()]
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"text source not found: {path}")
    texts: list[str] = []
    total = 0
    for file in files:
        for text in _file_texts(file):
            texts.append(text)
            total += len(text)
            if total >= max_chars:
                return texts
    if not texts:
        raise ValueError(f"{path}: no text found in *.jsonl / *.prompt / *.txt files")
    return texts


def _file_texts(path: Path):
    import json

    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                yield line.rstrip("\r\n")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if isinstance(record, dict):
                yield from (v for k, v in record.items() if isinstance(v, str) and k != "type")


def main(argv: list[str] | None = None) -> None:
    import argparse

    from llama.model_files import TOKENIZER_NAME

    parser = argparse.ArgumentParser(
        prog="python -m llama.tiny", description="Train a tokenizer on a corpus folder and write a tiny random model dir.")
    parser.add_argument("--corpus", type=Path,
                        help="folder (searched recursively) or file of *.jsonl / *.prompt / *.txt text")
    parser.add_argument("--output", required=True, type=Path, help="model dir to write")
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="use this tokenizer.model instead of training one (then --corpus, --vocab-size and "
                             "--model-type are not used)")
    parser.add_argument("--device", default="cpu", help="where to initialise the weights (cuda: fast for big shapes)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype of the stored weights")
    args = parser.parse_args(argv)
    if args.tokenizer is not None:
        if not args.tokenizer.is_file():
            raise FileNotFoundError(f"--tokenizer {args.tokenizer}: no such file")
        tokenizer = args.tokenizer
    else:
        if args.corpus is None:
            raise ValueError("give --corpus (to train a tokenizer) or --tokenizer")
        tokenizer = train_tokenizer(corpus_texts(args.corpus), args.output / TOKENIZER_NAME, args.vocab_size,
                                    args.model_type)
    make_tiny_model(args.output, tokenizer, args.dim, args.layers, args.heads, args.kv_heads, args.max_seq_len,
                    args.seed, args.device, args.dtype)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, KeyError) as e:  # bad input: one line, exit code 1
        sys.exit(f"tiny: {e}")
