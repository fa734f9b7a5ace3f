"""Convert between this repo's model dirs and transformers' or Meta's LLaMA checkpoints.

    python -m llama.convert from_hf   --input HF_DIR   --output OUR_DIR
    python -m llama.convert to_hf     --input OUR_DIR  --output HF_DIR
    python -m llama.convert from_meta --input META_DIR --output OUR_DIR   (consolidated.*.pth + params.json)
    python -m llama.convert from_gguf --input X.gguf   --output OUR_DIR   (llama.cpp; llama/gguf_reader.py)

transformers dirs of LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM are read; the class
is recorded in config.json (`architecture`), so to_hf writes the same class back. The layouts and the q/k permutation
live in llama/weight_layouts.py; this is the command line. Each direction is one function in DIRECTIONS.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from llama.chat_template import chat_template_for_export
from llama.configuration_llama import LlamaConfig
from llama.gguf_reader import gguf_as_hf_dir
from llama.model_files import (DEFAULT_MAX_SHARD_SIZE, TOKENIZER_JSON_NAME, TOKENIZER_NAME, iter_tensors,
                               read_json_object, save_tensors)
from llama.pretrained import DTYPES
from llama.tokenizer_files import load_tokenizer, tokenizer_file
from llama.weight_layouts import hf_config_dict, hf_to_llama_state_dict, llama_to_hf_state_dict, load_meta_checkpoint

GENERATION_CONFIG_NAME = "generation_config.json"

_DTYPES = {"keep": None, **DTYPES}


def source_tokenizer(candidates: list[Path]):
    """The tokenizer of the first candidate that has one (a dir, a tokenizer.model or a tokenizer.json), loaded by
    llama.load_tokenizer: read before any weight, so a missing or unreadable tokenizer stops the run first."""
    for c in candidates:
        try:
            file = tokenizer_file(c)
        except FileNotFoundError:
            continue
        return load_tokenizer(file)
    raise FileNotFoundError(f"no tokenizer ({TOKENIZER_NAME} or {TOKENIZER_JSON_NAME}) at "
                            f"{[str(c) for c in candidates]} (pass --tokenizer PATH)")


def write_tokenizer(tokenizer, output: Path, chat_template_from: Path | None = None) -> None:
    """The one place convert writes a tokenizer: Tokenizer.save (the tokenizer file, tokenizer_config.json with
    bos/eos and the chat template, special_tokens_map.json). With chat_template_from (to_hf: the model dir), the
    template is the one the model answers in (llama.chat_template.chat_template_for_export)."""
    template = tokenizer.chat_template
    if chat_template_from is not None:
        template = chat_template_for_export(chat_template_from, template)
    tokenizer.save(output, chat_template=template)


def generation_config(config: LlamaConfig, source: Path | None = None) -> dict:
    """generation_config.json: the source's (sampling defaults, Llama 3.1's list of stop ids) when it has one, with
    bos/eos/pad from config.json where it leaves them out."""
    d = {}
    if source is not None and source.is_file():
        d = read_json_object(source)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if d.get(key) is None and getattr(config, key) is not None:
            d[key] = getattr(config, key)
    return d


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def from_hf(args) -> None:
    config = LlamaConfig.from_pretrained(args.input)
    tokenizer = source_tokenizer([args.tokenizer or args.input])
    state = hf_to_llama_state_dict(iter_tensors(args.input, args.dtype), config, source=str(args.input))
    save_tensors(state, args.output, args.max_shard_size)
    config.save_pretrained(args.output)
    if (args.input / GENERATION_CONFIG_NAME).is_file():  # kept for to_hf
        shutil.copyfile(args.input / GENERATION_CONFIG_NAME, args.output / GENERATION_CONFIG_NAME)
    write_tokenizer(tokenizer, args.output)


def to_hf(args) -> None:
    config = LlamaConfig.from_pretrained(args.input)
    tokenizer = source_tokenizer([args.tokenizer or args.input])
    state = llama_to_hf_state_dict(dict(iter_tensors(args.input, args.dtype)), config)
    save_tensors(state, args.output, args.max_shard_size)
    stored = next(iter(state.values())).dtype
    _write_json(args.output / "config.json", hf_config_dict(config, stored))
    _write_json(args.output / GENERATION_CONFIG_NAME,
                generation_config(config, args.input / GENERATION_CONFIG_NAME))
    write_tokenizer(tokenizer, args.output, chat_template_from=args.input)


def from_meta(args) -> None:
    tokenizer = source_tokenizer([args.tokenizer] if args.tokenizer else [args.input, args.input.parent])
    config, state = load_meta_checkpoint(args.input, args.dtype)
    save_tensors(state, args.output, args.max_shard_size)
    config.save_pretrained(args.output)
    write_tokenizer(tokenizer, args.output)


def from_gguf(args) -> None:
    """A llama.cpp GGUF file, dequantized to --dtype (keep: float32) into a transformers dir beside the output
    (llama/gguf_reader.py), then from_hf; the intermediate dir is removed."""
    with gguf_as_hf_dir(args.input, args.dtype or DTYPES["float32"], args.output.parent) as hf_dir:
        from_hf(argparse.Namespace(**{**vars(args), "input": hf_dir, "dtype": None}))


# direction -> function(args); args has input, output, tokenizer (Path or None), dtype (torch dtype or None for
# "keep") and max_shard_size.
DIRECTIONS = {"from_hf": from_hf, "to_hf": to_hf, "from_meta": from_meta, "from_gguf": from_gguf}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llama.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("direction", choices=list(DIRECTIONS))
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--tokenizer", type=Path,
                        help="tokenizer.model, tokenizer.json or a dir holding one (default: the input dir)")
    parser.add_argument("--dtype", choices=list(_DTYPES), default="keep")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE)
    args = parser.parse_args(argv)
    args.dtype = _DTYPES[args.dtype]
    if args.output.resolve() == args.input.resolve():
        parser.error("--output must differ from --input")
    DIRECTIONS[args.direction](args)
    print(f"wrote {args.output} ({args.direction})", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, KeyError) as e:  # bad input: one line, exit code 1
        sys.exit(f"error: {e}")
