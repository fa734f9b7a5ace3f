"""Widen a LLaMA model's vocabulary with Chinese pieces: the step BiLLa started from ("LLaMA with a widened
Chinese vocabulary"), made reproducible.

    python -m tools.expand_vocab --model models/llama-7b --zh-model zh_sp.model --output models/llama-7b-zh
    python -m tools.expand_vocab --model DIR --zh-corpus corpora/zh --zh-vocab-size 20000 --output OUT

1. The Chinese SentencePiece model is given (--zh-model) or trained here on --zh-corpus (a JSONL folder or file,
   or a text file) with --zh-vocab-size pieces (llama.tiny.train_tokenizer: LLaMA's settings, BPE).
2. Its pieces are appended to the model's tokenizer.model, skipping those already there (tools/vocab_merge.py):
   every old piece keeps its id.
3. tok_embeddings and output grow to the new size: old rows are copied unchanged, and each new row starts as the
   mean of the old rows of the pieces the OLD tokenizer splits the new piece into (so a new piece starts where
   the model's reading of its text already is).
4. A complete model dir is written: config.json with the new vocab_size, tokenizer.model, weights.

The report gives the vocabulary sizes and tokens per character on Chinese and English sample text, before and
after (--sample-zh / --sample-en; default: the bundled pretraining_corpora/zh and /en).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llama.model_files import TOKENIZER_NAME
from llama.pretrained import DTYPES, load_pretrained
from llama.tiny import corpus_texts
from tools.vocab_merge import load_proto, merge_pieces, old_ids_of, piece_splitter, processor

BUNDLED = Path(__file__).resolve().parents[1] / "pretraining_corpora"
SAMPLE_CHARS = 2_000_000  # characters of sample text measured per language


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.expand_vocab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="model dir to expand (config.json, weights, "
                   "tokenizer.model; a transformers LLaMA dir works too)")
    p.add_argument("--output", required=True, type=Path, help="model dir to write")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--zh-model", type=Path, help="a Chinese SentencePiece .model to merge")
    source.add_argument("--zh-corpus", type=Path, help="train the Chinese model on this text (folder of JSONL, "
                        "a JSONL file or a text file)")
    p.add_argument("--zh-vocab-size", type=int, default=20000, help="pieces of the trained Chinese model")
    p.add_argument("--zh-model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--tokenizer", type=Path, help="the model's tokenizer.model (default: the model dir's)")
    p.add_argument("--sample-zh", type=Path, default=BUNDLED / "zh", help="Chinese text for tokens/char")
    p.add_argument("--sample-en", type=Path, default=BUNDLED / "en", help="English text for tokens/char")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype to load and write")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def new_rows(weight: torch.Tensor, splits: list[list[int]]) -> torch.Tensor:
    """(len(splits), dim): row i = mean of weight[splits[i]] (in fp32), cast to weight's dtype. An empty split
    (nothing to go on) takes the mean of all rows."""
    fallback = list(range(weight.shape[0]))
    splits = [ids or fallback for ids in splits]
    flat = torch.tensor([i for ids in splits for i in ids], dtype=torch.long, device=weight.device)
    offsets = torch.tensor([0, *torch.tensor([len(ids) for ids in splits]).cumsum(0)[:-1].tolist()],
                           dtype=torch.long, device=weight.device)
    return F.embedding_bag(flat, weight.float(), offsets, mode="mean").to(weight.dtype)  # (n_new, dim)


def expand_model(model, splits: list[list[int]]):
    """A new Llama whose tok_embeddings and output have len(splits) more rows; the rest shares model's tensors."""
    from llama import Llama

    state = model.state_dict()
    for name in ("tok_embeddings.weight", "output.weight"):
        state[name] = torch.cat([state[name], new_rows(state[name], splits)])  # (old + new, dim)
    config = dataclasses.replace(model.config, vocab_size=model.config.vocab_size + len(splits))
    with torch.device("meta"):
        expanded = Llama(config)
    expanded.load_state_dict(state, strict=True, assign=True)
    return expanded


def tokens_per_char(sp, texts: list[str]) -> float:
    chars = sum(map(len, texts))
    return sum(map(len, sp.encode(texts))) / chars if chars else float("nan")


def run(args: argparse.Namespace, out=None) -> dict:
    from llama.tiny import train_tokenizer

    out = out or sys.stdout
    if args.output.exists() and any(args.output.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{args.output} is not empty; pass --overwrite to write into it")
    model, tokenizer = load_pretrained(args.model, DTYPES[args.dtype], tokenizer_path=args.tokenizer)
    base = load_proto(tokenizer.model_path)

    with tempfile.TemporaryDirectory() as tmp:
        zh_model = args.zh_model
        if zh_model is None:
            texts = corpus_texts(args.zh_corpus)
            print(f"training a {args.zh_model_type} Chinese tokenizer of {args.zh_vocab_size} pieces on "
                  f"{sum(map(len, texts)):,} characters of {args.zh_corpus}", file=out)
            zh_model = train_tokenizer(texts, Path(tmp) / "zh.model", args.zh_vocab_size, args.zh_model_type)
        merge = merge_pieces(base, load_proto(zh_model))
    if not merge.added:
        raise ValueError(f"every piece of the Chinese model is already in {tokenizer.model_path}: nothing to add")

    splitter = piece_splitter(base)
    splits = [old_ids_of(splitter, piece)
              for piece in tqdm(merge.added, desc="split new pieces", disable=args.quiet, file=sys.stderr)]
    expanded = expand_model(model, splits)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / TOKENIZER_NAME).write_bytes(merge.proto.SerializeToString())
    expanded.save_pretrained(args.output, max_shard_size=args.max_shard_size)

    old_sp, new_sp = tokenizer.sp, processor(merge.proto)
    report = {"vocab_before": merge.old_size, "vocab_after": len(merge.proto.pieces), "added": len(merge.added),
              "already_present": merge.skipped_present}
    print(f"vocabulary: {report['vocab_before']:,} -> {report['vocab_after']:,} pieces "
          f"(+{report['added']:,} new; {report['already_present']:,} Chinese pieces were already present)", file=out)
    for lang, path in (("zh", args.sample_zh), ("en", args.sample_en)):
        if path is None or not path.exists():
            continue
        texts = corpus_texts(path, SAMPLE_CHARS)
        before, after = tokens_per_char(old_sp, texts), tokens_per_char(new_sp, texts)
        report[f"tokens_per_char_{lang}"] = (before, after)
        print(f"tokens per character, {lang} ({sum(map(len, texts)):,} chars of {path}): {before:.3f} -> {after:.3f}",
              file=out)
    print(f"wrote {args.output}", file=out)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"expand_vocab: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
