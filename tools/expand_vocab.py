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
4. A complete model dir is written: config.json with the new vocab_size, tokenizer.model (with the source's
   tokenizer_config.json and special_tokens_map.json), weights.

A model whose tokenizer is a byte-level BPE tokenizer.json (Llama 3, Qwen, SmolLM2; a dir with no tokenizer.model,
or --tokenizer X.json) is widened by continued BPE training instead (tools/bpe_merge.py):

    python -m tools.expand_vocab --model models/smollm2 --zh-corpus pretraining_corpora/zh --output OUT

1. Up to --zh-vocab-size new merges are learned on --zh-corpus, starting from the tokenizer's own vocabulary and
   merges, until the best pair occurs fewer than --min-frequency times. Each makes one new token, after the highest
   existing id (added tokens included); every old id and every merge keep their place, and text with no CJK
   character (English, code) tokenizes to exactly the ids it had.
2. Each new embedding row starts as the mean of the rows of the old tokens the old tokenizer splits its bytes into.
   A tied model (no output.weight / lm_head.weight; tie_word_embeddings in config.json) grows its one matrix;
   an untied one grows both. Rows past the tokenizer's ids that a model already had (Qwen pads its embedding)
   are taken by new tokens first.
3. The dir is written with the weights in the layout they came in (this repo's or transformers' names),
   config.json with the new vocab_size, the new tokenizer.json and the source's other JSON files
   (tokenizer_config.json, generation_config.json, ...) copied.

The report gives the vocabulary sizes and tokens per character on Chinese and English sample text, before and after
(--sample-zh / --sample-en; default: the bundled pretraining_corpora/zh and /en); for a tokenizer.json also the time
the merges took to learn and whether the English sample's ids are identical. With --eval-data (JSONL as
tools.eval_ppl reads it, e.g. held-out zh and en text the widening corpus does not hold) it also gives bits per
character and per byte per language of the model before and after: the widening's cost on a scale that does not
change with the tokenizer. It is printed, and kept beside the model as expand_vocab.json, where a warm-up of the new
rows alone (new_rows_only=True) reads the first new row.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llama.configuration_llama import CONFIG_NAME, LlamaConfig
from llama.model_files import (BIN_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_INDEX_NAME, TOKENIZER_CONFIG_NAME,
                               TOKENIZER_JSON_NAME, TOKENIZER_NAME, load_tensors, read_json_object, save_tensors)
from llama.pretrained import DTYPES, load_pretrained
from llama.tokenizer_files import load_tokenizer, tokenizer_file, tokenizer_kind
from llama.tiny import corpus_texts
from tools import bpe_merge
from tools.vocab_merge import load_proto, merge_pieces, old_ids_of, piece_splitter
from training.new_rows import NEW_ROWS_REPORT

BUNDLED = Path(__file__).resolve().parents[1] / "pretraining_corpora"
SAMPLE_CHARS = 2_000_000  # characters of sample text measured per language
# Embedding and output matrix names: this repo's layout, then transformers'. A tied model has no output matrix.
EMBEDDING_NAMES = ("tok_embeddings.weight", "model.embed_tokens.weight")
OUTPUT_NAMES = ("output.weight", "lm_head.weight")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.expand_vocab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="model dir to expand (config.json, weights, "
                   "tokenizer.model or tokenizer.json; a transformers dir works too)")
    p.add_argument("--output", required=True, type=Path, help="model dir to write")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--zh-model", type=Path, help="a Chinese SentencePiece .model to merge (tokenizer.model "
                        "only)")
    source.add_argument("--zh-corpus", type=Path, help="Chinese text (folder of JSONL, a JSONL file or a text "
                        "file) to train the Chinese model on, or to learn a tokenizer.json's new merges on")
    p.add_argument("--zh-vocab-size", type=int, default=20000, help="pieces of the trained Chinese model; for a "
                   "tokenizer.json, the most new tokens to learn (default 20000: Chinese-LLaMA's ~20k on LLaMA's 32k)")
    p.add_argument("--min-frequency", type=int, default=2, help="tokenizer.json: stop learning when the most "
                   "frequent pair occurs fewer times than this")
    p.add_argument("--zh-model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--tokenizer", type=Path, help="the model's tokenizer.model or tokenizer.json (default: the "
                   "model dir's; tokenizer.model first)")
    p.add_argument("--sample-zh", type=Path, default=BUNDLED / "zh", help="Chinese text for tokens/char")
    p.add_argument("--sample-en", type=Path, default=BUNDLED / "en", help="English text for tokens/char")
    p.add_argument("--eval-data", type=Path, help="JSONL of held-out texts ({\"text\", \"lang\"}, as tools.eval_ppl "
                   "reads): report bits per character per language before and after")
    p.add_argument("--device", default="cpu", help="where --eval-data is scored")
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


def grow_rows(weight: torch.Tensor, first_id: int, splits: list[list[int]]) -> torch.Tensor:
    """weight with the new tokens' rows at first_id.. (each the mean of its split's rows): rows below first_id are
    kept, rows the matrix already had past first_id (unused padding rows) are overwritten, and it grows to fit."""
    rows = max(weight.shape[0], first_id + len(splits))
    grown = torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])  # (rows, dim)
    grown[first_id:first_id + len(splits)] = new_rows(weight[:first_id], splits)
    return grown


def expand_model(model, splits: list[list[int]]):
    """A new Llama whose tok_embeddings and output have len(splits) more rows; the rest shares model's tensors."""
    from llama import Llama

    state = model.state_dict()
    for name in ("tok_embeddings.weight", "output.weight"):
        state[name] = grow_rows(state[name], state[name].shape[0], splits)  # (old + new, dim)
    config = dataclasses.replace(model.config, vocab_size=model.config.vocab_size + len(splits))
    with torch.device("meta"):
        expanded = Llama(config)
    expanded.load_state_dict(state, strict=True, assign=True)
    return expanded


def tokens_per_char(ids: list[list[int]], texts: list[str]) -> float:
    """Tokens per character of texts, given their encodings."""
    chars = sum(map(len, texts))
    return sum(map(len, ids)) / chars if chars else float("nan")


def sample_texts(args: argparse.Namespace) -> list[tuple[str, Path, list[str]]]:
    """(language, path, texts) of the sample texts that exist."""
    return [(lang, path, corpus_texts(path, SAMPLE_CHARS)) for lang, path in (("zh", args.sample_zh),
                                                                              ("en", args.sample_en))
            if path is not None and path.exists()]


def run(args: argparse.Namespace, out=None) -> dict:
    out = out or sys.stdout
    if args.output.exists() and any(args.output.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{args.output} is not empty; pass --overwrite to write into it")
    # --tokenizer, else the model dir's: tokenizer.model (the recipe's kind) first, as load_tokenizer picks
    tokenizer_path = tokenizer_file(args.tokenizer or args.model)
    if args.eval_data is not None and not args.eval_data.is_file():
        raise FileNotFoundError(f"--eval-data {args.eval_data}: no such file")
    if tokenizer_kind(tokenizer_path) == "tokenizer.json":
        report = run_bpe(args, tokenizer_path, out)
    else:
        report = run_sentencepiece(args, out)
    if args.eval_data is not None:
        report["bits_per_char"] = report_bits(args, out)
    # Beside the model, for a warm-up of the new rows alone (pretrain_main.py new_rows_only=True reads first_new_row)
    (args.output / NEW_ROWS_REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def report_bits(args: argparse.Namespace, out) -> dict:
    """{language: (bits/char before, after)} of --eval-data, printed with bits per byte (tools.eval_ppl)."""
    from llama.text_units import TextUnits
    from tools.eval_ppl import evaluate, prepare_texts, read_texts

    items = read_texts(args.eval_data)
    figures = []
    for directory in (args.model, args.output):
        model, tokenizer = load_pretrained(directory, DTYPES[args.dtype], args.device,
                                           args.tokenizer if directory == args.model else None)
        texts, _ = prepare_texts(tokenizer, items, model.config.max_sequence_length, False)
        figures.append(evaluate(model, texts, 8, tokenizer.pad_id, args.device, TextUnits.of(tokenizer)))
        del model
    before, after = figures
    for lang in before:
        print(f"bits per character, {lang} ({args.eval_data}): {before[lang].bits_per_char:.4f} -> "
              f"{after[lang].bits_per_char:.4f} ({after[lang].bits_per_char / before[lang].bits_per_char - 1:+.1%}); "
              f"bits per byte {before[lang].bits_per_byte:.4f} -> {after[lang].bits_per_byte:.4f}", file=out)
    return {lang: (before[lang].bits_per_char, after[lang].bits_per_char) for lang in before}


def run_sentencepiece(args: argparse.Namespace, out) -> dict:
    from llama.tiny import train_tokenizer

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
    # The source's tokenizer_config.json (bos/eos, chat template) and special_tokens_map.json stay valid (old ids
    # keep their meaning): written by the tokenizer's save, then the widened tokenizer.model replaces the old.
    tokenizer.save(args.output)
    (args.output / TOKENIZER_NAME).write_bytes(merge.proto.SerializeToString())
    expanded.save_pretrained(args.output, max_shard_size=args.max_shard_size)

    widened = load_tokenizer(args.output)
    report = {"vocab_before": merge.old_size, "vocab_after": len(merge.proto.pieces), "added": len(merge.added),
              "first_new_row": model.config.vocab_size, "already_present": merge.skipped_present}
    print(f"vocabulary: {report['vocab_before']:,} -> {report['vocab_after']:,} pieces "
          f"(+{report['added']:,} new; {report['already_present']:,} Chinese pieces were already present)", file=out)
    for lang, path, texts in sample_texts(args):
        before = tokens_per_char(tokenizer.encode_batch(texts), texts)
        after = tokens_per_char(widened.encode_batch(texts), texts)
        report[f"tokens_per_char_{lang}"] = (before, after)
        print(f"tokens per character, {lang} ({sum(map(len, texts)):,} chars of {path}): {before:.3f} -> {after:.3f}",
              file=out)
    print(f"wrote {args.output}", file=out)
    return report


def read_model_config(directory: Path) -> tuple[LlamaConfig, dict]:
    """(the model's LlamaConfig, config.json as a dict): the config is checked (a supported architecture, its
    vocab_size and tie_word_embeddings) before any weight is read; the dict is written back with only vocab_size
    changed, in the layout it came in (this repo's keys or transformers')."""
    return LlamaConfig.from_pretrained(directory), read_json_object(directory / CONFIG_NAME)


def matrix_names(directory: Path, state: dict, tied: bool) -> list[str]:
    """The weights that have one row per token: the embedding, and the output matrix unless it is tied."""
    embedding = [n for n in EMBEDDING_NAMES if n in state]
    output = [n for n in OUTPUT_NAMES if n in state]
    if len(embedding) != 1:
        raise KeyError(f"{directory}: expected one embedding matrix ({' or '.join(EMBEDDING_NAMES)}), found "
                       f"{embedding or 'none'}")
    if tied and output:
        raise ValueError(f"{directory}: config.json sets tie_word_embeddings but the weights hold {output[0]}")
    if not tied and not output:
        raise ValueError(f"{directory}: the weights hold no output matrix ({' or '.join(OUTPUT_NAMES)}) and "
                         f"config.json does not set tie_word_embeddings")
    return embedding + output


def copy_sidecars(args: argparse.Namespace, tokenizer_path: Path) -> None:
    """The source's other JSON files (tokenizer_config.json, special_tokens_map.json, generation_config.json, ...):
    old ids keep their meaning, so they stay valid. Without a tokenizer_config.json a minimal one is written, so
    transformers' AutoTokenizer loads the dir."""
    skip = {CONFIG_NAME, TOKENIZER_JSON_NAME, SAFE_WEIGHTS_INDEX_NAME, BIN_WEIGHTS_INDEX_NAME}
    for folder in dict.fromkeys((args.model, tokenizer_path.parent)):
        for f in sorted(folder.glob("*.json")):
            if f.name not in skip and f.resolve() != (args.output / f.name).resolve():
                shutil.copyfile(f, args.output / f.name)
    if not (args.output / TOKENIZER_CONFIG_NAME).is_file():
        (args.output / TOKENIZER_CONFIG_NAME).write_text(
            json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n", encoding="utf-8")


def run_bpe(args: argparse.Namespace, tokenizer_path: Path, out) -> dict:
    if args.zh_model is not None:
        raise ValueError(f"--zh-model is a SentencePiece model, and {tokenizer_path} is a tokenizer.json: give "
                         f"--zh-corpus to learn its new merges on")
    if args.zh_vocab_size <= 0 or args.min_frequency < 1:
        raise ValueError("--zh-vocab-size and --min-frequency must be positive")
    base = bpe_merge.load_bpe(tokenizer_path)
    model_config, config = read_model_config(args.model)
    first_id = base.next_id()
    if first_id > model_config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer_path} has ids up to {first_id - 1} but {args.model / CONFIG_NAME} "
                         f"has vocab_size {model_config.vocab_size}")
    texts = corpus_texts(args.zh_corpus)
    print(f"learning up to {args.zh_vocab_size:,} new merges on {sum(map(len, texts)):,} characters of "
          f"{args.zh_corpus}", file=out)
    start = time.perf_counter()
    learned = bpe_merge.learn_merges(base, texts, args.zh_vocab_size, args.min_frequency)
    learn_seconds = time.perf_counter() - start
    if not learned.merges:
        raise ValueError(f"{args.zh_corpus}: no pair of tokens with a CJK character occurs {args.min_frequency} "
                         f"times under {tokenizer_path}: nothing to add")
    splits = [bpe_merge.old_ids_of(base, token) for token in learned.new_tokens]

    state = load_tensors(args.model, DTYPES[args.dtype])
    names = matrix_names(args.model, state, model_config.tie_word_embeddings)
    for name in names:
        if state[name].shape[0] != model_config.vocab_size:
            raise ValueError(f"{args.model}: {name} has {state[name].shape[0]} rows but config.json has vocab_size "
                             f"{model_config.vocab_size}")
        state[name] = grow_rows(state[name], first_id, splits)  # (rows, dim)
    config["vocab_size"] = state[names[0]].shape[0]
    args.output.mkdir(parents=True, exist_ok=True)
    save_tensors(state, args.output, args.max_shard_size)
    (args.output / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    copy_sidecars(args, tokenizer_path)
    new_tokenizer = bpe_merge.write_tokenizer(bpe_merge.expanded_spec(base, learned), args.output / TOKENIZER_JSON_NAME)

    report = {"vocab_before": first_id, "vocab_after": first_id + len(learned.new_tokens),
              "added": len(learned.new_tokens), "first_new_row": first_id, "embedding_rows": config["vocab_size"],
              "tied": len(names) == 1, "learn_seconds": learn_seconds, "learned_from_words": learned.words,
              "last_pair_count": learned.last_count}
    print(f"vocabulary: {report['vocab_before']:,} -> {report['vocab_after']:,} tokens (+{report['added']:,} new "
          f"merges, learned in {learn_seconds:.1f} s from {learned.words:,} distinct words; the last pair occurred "
          f"{learned.last_count} times); {'tied embedding' if report['tied'] else 'embedding and output'} "
          f"now {config['vocab_size']:,} rows", file=out)

    for lang, path, texts in sample_texts(args):
        old_ids, new_ids = bpe_merge.encode_ids(base.tokenizer, texts), bpe_merge.encode_ids(new_tokenizer, texts)
        before, after = tokens_per_char(old_ids, texts), tokens_per_char(new_ids, texts)
        report[f"tokens_per_char_{lang}"] = (before, after)
        report[f"ids_identical_{lang}"] = old_ids == new_ids
        print(f"tokens per character, {lang} ({sum(map(len, texts)):,} chars of {path}): {before:.3f} -> "
              f"{after:.3f}{' (ids identical)' if old_ids == new_ids else ''}", file=out)
    print(f"wrote {args.output}", file=out)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"error: expand_vocab: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
