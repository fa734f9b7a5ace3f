"""Which tokenizer a model dir holds, and loading it: the one place that looks at the tokenizer file's name.

A dir with tokenizer.model is read by SentencePiece (llama.tokenization_llama, the recipe's LLaMA path), even where a
tokenizer.json sits beside it, as in transformers' LLaMA-2 and Mistral dirs; a dir with only tokenizer.json is read
by the `tokenizers` library (llama.tokenizer_json: Llama 3, Qwen2/3, SmolLM2). Both implement llama.tokenizer's
Tokenizer interface.
"""
from __future__ import annotations

from pathlib import Path

from llama.model_files import TOKENIZER_JSON_NAME, TOKENIZER_NAME
from llama.tokenization_llama import SentencePieceTokenizer
from llama.tokenizer import Tokenizer, TokenizerKind
from llama.tokenizer_json import TokenizerJson

TOKENIZER_CLASSES: dict[TokenizerKind, type[Tokenizer]] = {cls.kind: cls for cls in (SentencePieceTokenizer,
                                                                                     TokenizerJson)}


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer file of `path`: a model dir (its tokenizer.model, else its tokenizer.json) or the file itself."""
    path = Path(path)
    if path.is_dir():
        for name in (TOKENIZER_NAME, TOKENIZER_JSON_NAME):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: no tokenizer in this dir: neither {TOKENIZER_NAME} (SentencePiece) nor "
                                f"{TOKENIZER_JSON_NAME} (tokenizers library) is there")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    return path


def load_tokenizer(path: str | Path, eos_token: str = "") -> Tokenizer:
    """The tokenizer of a model dir, a tokenizer.model or a tokenizer.json, of the kind its file needs. eos_token
    (a token of the vocabulary; empty: the tokenizer's own eos) is the end token that encode(eos=True) appends and
    that documents and answers end with."""
    file = tokenizer_file(path)
    return TOKENIZER_CLASSES[tokenizer_kind(file)](file, eos_token)


def tokenizer_kind(path: str | Path) -> TokenizerKind:
    """The kind of tokenizer_file(path), from its name alone (nothing is read: a tokenizer.json may lack the
    tokenizer_config.json a full load needs)."""
    return "tokenizer.json" if tokenizer_file(path).suffix == ".json" else "sentencepiece"
