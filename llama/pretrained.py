"""A model dir ready to use: the model and its tokenizer, checked against each other (tools, chat, evaluation)."""
from __future__ import annotations

from pathlib import Path

import torch

from llama.configuration_llama import CONFIG_NAME, LlamaConfig
from llama.llama_model import Llama
from llama.tokenizer import Tokenizer, check_tokenizer_matches
from llama.tokenizer_files import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # command-line names


def load_pretrained(directory: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    tokenizer_path: str | Path | None = None) -> tuple[Llama, Tokenizer]:
    """(model, tokenizer) of a model dir; the tokenizer is the dir's (tokenizer.model, else tokenizer.json) unless
    tokenizer_path is given.
    Raises FileNotFoundError / ValueError naming the file when either is missing or they do not fit, before the
    weights are read."""
    config = LlamaConfig.from_pretrained(Path(directory) / CONFIG_NAME)
    tokenizer = load_tokenizer(tokenizer_path or directory)
    check_tokenizer_matches(config, tokenizer)
    return Llama.from_pretrained(directory, dtype=dtype, device=device), tokenizer
