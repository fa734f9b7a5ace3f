"""A tokenizer.json model dir's tokenizer (Llama 3, Qwen2/3, Mistral-Nemo, SmolLM2), through the `tokenizers`
library, behind llama.tokenizer's interface.

It encodes as transformers' AutoTokenizer does: ids are the tokenizer's own; bos is added exactly where the tokenizer
adds one itself (its post-processor's template: Llama 3's <|begin_of_text|>; Qwen and SmolLM2 add none), or, for a
LlamaTokenizerFast, where tokenizer_config.json's add_bos_token says (transformers rebuilds that template on load).
The end token is tokenizer_config.json's eos_token unless eos_token names another.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as _Tokenizer
from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

from llama.model_files import TOKENIZER_CONFIG_NAME, TOKENIZER_JSON_NAME
from llama.tokenizer import Tokenizer, piece_bytes
from llama.tokenizer_config import (copy_tokenizer_file, end_token_id, read_tokenizer_config, token_text,
                                    write_tokenizer_config)

BYTE_CHAR = bytes_to_unicode()  # byte -> its character in the byte-level alphabet (GPT-2's table)
CHAR_BYTE = {c: b for b, c in BYTE_CHAR.items()}

# transformers classes whose __init__ rebuilds the post-processor from add_bos_token (default True)
_LLAMA_FAST_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast")


class TokenizerJson(Tokenizer):
    kind = "tokenizer.json"
    # Checkpoints pad their embedding past the tokenizer (Qwen2.5: 151,665 tokens, 151,936 rows).
    embedding_may_be_padded = True

    def __init__(self, path: str | Path, eos_token: str = ""):
        path = Path(path)
        self.model_path = path / TOKENIZER_JSON_NAME if path.is_dir() else path
        if not self.model_path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {self.model_path}")
        try:
            self.tk = _Tokenizer.from_file(str(self.model_path))
        except Exception as e:  # the Rust side raises a bare Exception for any unreadable file
            raise ValueError(f"{self.model_path}: not a tokenizers-library tokenizer.json ({e})") from None
        self.config = read_tokenizer_config(self.model_path.parent)
        self.vocab_size: int = max(self.tk.get_vocab(with_added_tokens=True).values()) + 1  # ids may have gaps
        self.bos_token: str | None = token_text(self.config.get("bos_token"))
        self.bos_id: int | None = self._added_bos()
        self.own_eos_id, self.eos_id = end_token_id(self.model_path, eos_token, self.config, self.tk.token_to_id,
                                                    None)
        self.eos_token: str = self.tk.id_to_token(self.eos_id)
        pad = token_text(self.config.get("pad_token"))
        # Padding positions never count in the loss, so any valid id does where the tokenizer names no pad token.
        self.pad_id: int = self.tk.token_to_id(pad) if pad and self.tk.token_to_id(pad) is not None else self.eos_id
        self.chat_template: str | None = self.config.get("chat_template")
        # Without special tokens the post-processor changes no id, only offsets: a ByteLevel one trims the spaces off
        # them (trim_offsets), which would leave gaps between tokens. token_ends wants them untrimmed.
        self.tk.post_processor = None

    def _added_bos(self) -> int | None:
        """The token id the tokenizer itself puts before a text, or None."""
        if self.config.get("tokenizer_class") in _LLAMA_FAST_CLASSES:
            if not self.config.get("add_bos_token", True):
                return None
            return self._token_id(self.bos_token, "bos_token")
        processor = self.tk.post_processor
        return _template_head(json.loads(processor.__getstate__())) if processor is not None else None

    def _token_id(self, token: str | None, key: str) -> int:
        token_id = self.tk.token_to_id(token) if token else None
        if token_id is None:
            raise ValueError(f"{self.model_path.parent / TOKENIZER_CONFIG_NAME}: {key} {token!r} is not in the "
                             f"vocabulary of {self.model_path}")
        return token_id

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self._wrap(self.tk.encode(text, add_special_tokens=False).ids, bos, eos)

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """Encode many texts in one call, on the library's own thread pool. encode_batch_fast skips the offsets
        (about a quarter faster): the few texts that need them (token_ends) are encoded again, one by one."""
        return [self._wrap(e.ids, bos, eos) for e in self.tk.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        # Special tokens are left out, as SentencePiece leaves out its control pieces.
        return self.tk.decode(list(ids), skip_special_tokens=True)

    def token_ends(self, text: str, ids: list[int]) -> np.ndarray:
        """Where each token of ids (== encode(text)) ends in text, as a character offset, from the tokenizer's own
        offsets: a byte-level token that does not finish its character ends where that character starts (the
        library gives each part the whole character), as SentencePiece's byte pieces do."""
        offsets = np.asarray(self.tk.encode(text, add_special_tokens=False).offsets, dtype=np.int64).reshape(-1, 2)
        if len(offsets) != len(ids):
            raise ValueError(f"token_ends: {len(ids)} ids are not the {len(offsets)} tokens of the text")
        ends = offsets[:, 1].copy()
        ends[:-1] = np.minimum(ends[:-1], offsets[1:, 0])
        return ends

    def token_bytes(self) -> list[bytes]:
        """Byte level (a ByteLevel decoder: GPT-2's byte-to-character table, reversed), as the library's decoder
        reads a token: a token with a character outside the table (an added token's text) is its own UTF-8.
        Otherwise (a Metaspace/ByteFallback tokenizer.json, as LLaMA-2's) as SentencePiece's pieces: "\u2581" a
        space, <0xNN> that byte. Special tokens spell nothing, as decode() leaves them out."""
        return list(self._token_bytes)

    @functools.cached_property
    def _token_bytes(self) -> tuple[bytes, ...]:
        special = {i for i, token in self.tk.get_added_tokens_decoder().items() if token.special}
        if has_byte_level(json.loads(self.tk.to_str()).get("decoder")):
            def spelled(token: str) -> bytes:
                if all(c in CHAR_BYTE for c in token):
                    return bytes(CHAR_BYTE[c] for c in token)
                return token.encode("utf-8")
        else:
            spelled = piece_bytes
        table = [b""] * self.vocab_size
        for token, i in self.tk.get_vocab(with_added_tokens=True).items():
            if i not in special:
                table[i] = spelled(token)
        return tuple(table)

    def save(self, directory: str | Path, chat_template: str | None = None) -> None:
        """Write tokenizer.json, tokenizer_config.json (the source's, with this tokenizer's bos/eos tokens and chat
        template) and special_tokens_map.json into `directory`, so that transformers' AutoTokenizer loads it and
        encodes identically. chat_template replaces the tokenizer's own."""
        directory = Path(directory)
        copy_tokenizer_file(self.model_path, directory / TOKENIZER_JSON_NAME)  # the post-processor as the source's
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.config}
        tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        if "pad_token" in self.config:
            tokens["pad_token"] = token_text(self.config["pad_token"])
        write_tokenizer_config(directory, config, tokens,
                               chat_template if chat_template is not None else self.chat_template)


def _template_head(processor: dict) -> int | None:
    """The id of the special token a post-processor puts first in a single text's template, or None: a
    TemplateProcessing (Llama 3), alone or in a Sequence beside a ByteLevel one; BERT/RoBERTa's cls."""
    kind = processor.get("type")
    if kind == "Sequence":
        heads = [_template_head(p) for p in processor.get("processors", [])]
        return next((h for h in heads if h is not None), None)
    if kind == "TemplateProcessing":
        first = (processor.get("single") or [{}])[0]
        if "SpecialToken" in first:
            return processor["special_tokens"][first["SpecialToken"]["id"]]["ids"][0]
        return None
    if kind in ("BertProcessing", "RobertaProcessing"):
        return processor["cls"][1]
    return None


def has_byte_level(node) -> bool:
    """Whether a tokenizer.json node (pre_tokenizer, decoder) holds a ByteLevel step, alone or in a Sequence."""
    if isinstance(node, dict):
        return node.get("type") == "ByteLevel" or any(has_byte_level(v) for v in node.values())
    if isinstance(node, list):
        return any(has_byte_level(v) for v in node)
    return False
