"""A model dir ready to use: the model and its tokenizer, checked against each other (tools, chat, evaluation)."""
from __future__ import annotations

from pathlib import Path

import torch

from llama.llama_model import Llama
from llama.tokenization_llama import Tokenizer, check_tokenizer_matches

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # command-line names


def load_pretrained(directory: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    tokenizer_path: str | Path | None = None) -> tuple[Llama, Tokenizer]:
    """(model, tokenizer) of a model dir; the tokenizer is the dir's tokenizer.model unless tokenizer_path is given.
    Raises FileNotFoundError / ValueError naming the file when either is missing or they do not fit."""
    model = Llama.from_pretrained(directory, dtype=dtype, device=device)
    tokenizer = Tokenizer(tokenizer_path or directory)
    check_tokenizer_matches(model.config, tokenizer)
    return model, tokenizer
