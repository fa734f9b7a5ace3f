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


# Byte-level BPE families as their tokenizer.json / tokenizer_config.json are laid out on the hub, in miniature: the
# same pre-tokenizer, post-processor, special tokens and config keys, a vocabulary of a few hundred tokens.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
                    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
_CHATML_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                    "{{ '<|im_start|>system\n{system}<|im_end|>\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + "
                    "'\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
                    "{{ '<|im_start|>assistant\n' }}{% endif %}")
BPE_FAMILIES = {
    # Llama-3(.1) base: <|begin_of_text|> added before every text; documents end with <|end_of_text|>.
    "llama3": {"specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>"], "specials_first": False, "split": _LLAMA3_SPLIT, "digits": False,
               "bos": "<|begin_of_text|>", "add_bos": True, "eos": "<|end_of_text|>", "pad": None,
               "config": {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": True,
                          "model_input_names": ["input_ids", "attention_mask"]}, "template": None},
    # Llama-3 Instruct: the same tokenizer, eos <|eot_id|> (turn end) and its chat template.
    "llama3-instruct": {"base": "llama3", "eos": "<|eot_id|>", "template": _LLAMA3_TEMPLATE},
    # Qwen2/2.5/3 Instruct: no bos at all, NFC-normalised text, ChatML.
    "qwen2": {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "specials_first": False,
              "split": _QWEN2_SPLIT, "digits": False, "nfc": True, "bos": None, "add_bos": False,
              "eos": "<|im_end|>", "pad": "<|endoftext|>",
              "config": {"tokenizer_class": "Qwen2Tokenizer", "add_prefix_space": False, "errors": "replace",
                         "split_special_tokens": False, "unk_token": None, "clean_up_tokenization_spaces": False},
              "template": _CHATML_TEMPLATE.replace("{system}", "You are a helpful assistant.")},
    # SmolLM2 Instruct: GPT-2's byte level with single digits, specials at ids 0-2; a bos token is named
    # (<|im_start|>) but the tokenizer never adds it.
    "smollm2": {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "specials_first": True,
                "split": None, "digits": True, "bos": "<|im_start|>", "add_bos": False, "eos": "<|im_end|>",
                "pad": "<|im_end|>",
                "config": {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
                           "unk_token": "<|endoftext|>", "clean_up_tokenization_spaces": False},
                "template": _CHATML_TEMPLATE.replace("{system}", "You are a helpful AI assistant named SmolLM")},
}


def train_bpe_tokenizer(texts: Iterable[str], output_dir: str | Path, family: str = "llama3",
                        vocab_size: int = 600) -> Path:
    """Train a byte-level BPE tokenizer laid out as `family`'s (a key of BPE_FAMILIES) and write it into
    output_dir as a model dir's tokenizer files: tokenizer.json, tokenizer_config.json, special_tokens_map.json.
    Returns the path of tokenizer.json. vocab_size counts the 256 byte tokens and the specials: 600 is a few hundred
    merges."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from llama.tokenizer_config import write_tokenizer_config

    if family not in BPE_FAMILIES:
        raise ValueError(f"unknown tokenizer family {family!r}; one of {sorted(BPE_FAMILIES)}")
    spec = BPE_FAMILIES[family]
    spec = {**BPE_FAMILIES[spec["base"]], **spec} if "base" in spec else spec
    tokenizer = Tokenizer(models.BPE(ignore_merges=spec["split"] == _LLAMA3_SPLIT))
    if spec.get("nfc"):
        tokenizer.normalizer = normalizers.NFC()
    if spec["split"]:  # the family's own split, then bytes to printable characters
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(spec["split"]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    else:  # GPT-2's split inside ByteLevel
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=spec["digits"]),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=spec["specials"] if spec["specials_first"] else [],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([t for t in texts if t.strip()], trainer)
    tokenizer.add_special_tokens(spec["specials"])  # after the vocabulary (Llama 3, Qwen), or already first
    byte_level = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    if spec["add_bos"]:
        bos = spec["bos"]
        tokenizer.post_processor = processors.Sequence([byte_level, processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, tokenizer.token_to_id(bos))])])
    else:
        tokenizer.post_processor = byte_level
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "tokenizer.json"
    tokenizer.save(str(path))
    added = {str(tokenizer.token_to_id(t)): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                                             "single_word": False, "special": True} for t in spec["specials"]}
    tokens = {"bos_token": spec["bos"], "eos_token": spec["eos"], **({"pad_token": spec["pad"]} if spec["pad"] else {})}
    write_tokenizer_config(output_dir, {"added_tokens_decoder": added, **spec["config"], "model_max_length": 131072},
                           tokens, spec["template"])
    return path


def make_tiny_model(output_dir: str | Path, tokenizer_path: str | Path, dim: int = 64, n_layers: int = 2,
                    n_heads: int = 4, n_kv_heads: int | None = None, max_seq_len: int = 512, seed: int = 0,
                    device: str = "cpu", dtype: str = "float32") -> Path:
    """Write a complete, randomly initialised model dir (config.json, model.safetensors, the tokenizer's files):
    tokenizer_path is a tokenizer.model, a tokenizer.json or a dir holding one.

    device="cuda" initialises on the GPU (seconds instead of minutes for a 7B shape); dtype is the stored one.
    """
    import torch

    from llama.configuration_llama import LlamaConfig
    from llama.llama_model import Llama
    from llama.tokenizer_files import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=dim, num_hidden_layers=n_layers,
                         num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                         max_sequence_length=max_seq_len, bos_token_id=tokenizer.bos_id,
                         eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Llama(config)
    model.to(getattr(torch, dtype)).save_pretrained(output_dir)
    tokenizer.save(output_dir)
    return Path(output_dir)


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
    parser.add_argument("--bpe-family", choices=sorted(BPE_FAMILIES),
                        help="train a byte-level BPE tokenizer.json laid out as this family's instead of a "
                             "SentencePiece tokenizer.model")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="use this tokenizer.model or tokenizer.json instead of training one (then --corpus, "
                             "--vocab-size and --model-type are not used)")
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
        if args.bpe_family:
            tokenizer = train_bpe_tokenizer(corpus_texts(args.corpus), args.output, args.bpe_family, args.vocab_size)
        else:
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
