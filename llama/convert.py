"""Convert between this repo's model dirs and transformers' or Meta's LLaMA checkpoints.

    python -m llama.convert from_hf   --input HF_DIR   --output OUR_DIR
    python -m llama.convert to_hf     --input OUR_DIR  --output HF_DIR
    python -m llama.convert from_meta --input META_DIR --output OUR_DIR   (consolidated.*.pth + params.json)
    python -m llama.convert from_gguf --input X.gguf   --output OUR_DIR   (llama.cpp; llama/gguf_reader.py)

The layouts and the wq/wk permutation live in llama/weight_layouts.py; this is the command line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from llama.configuration_llama import LlamaConfig
from llama.gguf_reader import gguf_as_hf_dir
from llama.model_files import DEFAULT_MAX_SHARD_SIZE, TOKENIZER_NAME, iter_tensors, save_tensors
from llama.pretrained import DTYPES
from llama.weight_layouts import hf_config_dict, hf_to_llama_state_dict, llama_to_hf_state_dict, load_meta_checkpoint


def _find_tokenizer(candidates: list[Path]) -> Path:
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"{TOKENIZER_NAME} not found; looked at {[str(c) for c in candidates]} "
                            f"(pass --tokenizer PATH)")


_DTYPES = {"keep": None, **DTYPES}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llama.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("direction", choices=["from_hf", "to_hf", "from_meta", "from_gguf"])
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.model (default: next to the input weights)")
    parser.add_argument("--dtype", choices=list(_DTYPES), default="keep")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE)
    args = parser.parse_args(argv)
    dtype = _DTYPES[args.dtype]
    if args.output.resolve() == args.input.resolve():
        parser.error("--output must differ from --input")
    if args.direction == "from_gguf":  # dequantized into a transformers dir (llama/gguf_reader.py), then from_hf
        with gguf_as_hf_dir(args.input, dtype or DTYPES["float32"], args.output.parent) as hf_dir:
            return main(["from_hf", "--input", str(hf_dir), "--output", str(args.output),
                         "--max-shard-size", str(args.max_shard_size)])

    if args.direction == "from_meta":
        config, state = load_meta_checkpoint(args.input, dtype)
        tokenizer = _find_tokenizer([args.tokenizer] if args.tokenizer else
                                    [args.input / TOKENIZER_NAME, args.input.parent / TOKENIZER_NAME])
        save_tensors(state, args.output, args.max_shard_size)
        config.save_pretrained(args.output)
    elif args.direction == "from_hf":
        config = LlamaConfig.from_pretrained(args.input)
        tokenizer = _find_tokenizer([args.tokenizer or args.input / TOKENIZER_NAME])
        state = hf_to_llama_state_dict(iter_tensors(args.input, dtype), config, source=str(args.input))
        save_tensors(state, args.output, args.max_shard_size)
        config.save_pretrained(args.output)
    else:
        config = LlamaConfig.from_pretrained(args.input)
        tokenizer = _find_tokenizer([args.tokenizer or args.input / TOKENIZER_NAME])
        state = llama_to_hf_state_dict(dict(iter_tensors(args.input, dtype)), config)
        save_tensors(state, args.output, args.max_shard_size)
        stored = next(iter(state.values())).dtype
        (args.output / "config.json").write_text(json.dumps(hf_config_dict(config, stored), indent=2) + "\n",
                                                 encoding="utf-8")
    shutil.copyfile(tokenizer, args.output / TOKENIZER_NAME)
    print(f"wrote {args.output} ({args.direction})", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, KeyError) as e:  # bad input: one line, exit code 1
        sys.exit(f"convert: {e}")
