"""The text each token id spells, in UTF-8 bytes and characters: the tokenizer-independent scale (bits per byte,
bits per character) on which models with different vocabularies, a base and its widened copy, compare.

    units = TextUnits.of(tokenizer)          # one table per tokenizer, built once
    n_bytes, n_chars = units.count(ids)      # of the text that ids spell
    bits_per_char = summed_nats / math.log(2) / n_chars

What an id spells (token_bytes, the one place that knows the tokenizer kinds):
- SentencePiece (tokenizer.model): the piece with "\u2581" as a space; a byte-fallback piece <0xNN> the one byte;
  control and unknown pieces nothing (a user-defined piece is text SentencePiece matches: its own text).
- tokenizer.json, byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2): the token's characters through GPT-2's byte-unicode
  map reversed; special added tokens nothing; a non-special added token its own text.
- tokenizer.json without a ByteLevel step (a SentencePiece converted to JSON): as SentencePiece.

Characters are counted as the UTF-8 bytes that start a character (b & 0xC0 != 0x80). That count is additive over
tokens and exact where one character spans several tokens (a CJK character split across byte-level tokens, or
byte-fallback pieces): the token holding its first byte counts it.

SentencePiece's dummy prefix. With add_dummy_prefix (LLaMA's setting) encode("Hello") gives "\u2581Hello": the space
in front of the text is a byte the model is asked to predict, exactly as it predicts the space of "\u2581world" later
on, so it counts as part of the text the tokens spell: a text of n bytes spells n + 1 under such a tokenizer, n under
a byte-level one. Counting per token and counting the decoded spans of a text then agree (the dummy space belongs to
the first span), and for every span but the first the count is that span's own text.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass

import numpy as np
from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

BYTE_CHAR = bytes_to_unicode()  # byte -> its character in the byte-level alphabet (GPT-2's table)
CHAR_BYTE = {c: b for b, c in BYTE_CHAR.items()}
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _sentencepiece_style(piece: str) -> bytes:
    match = _BYTE_PIECE.fullmatch(piece)
    return bytes([int(match.group(1), 16)]) if match else piece.replace("\u2581", " ").encode("utf-8")


def has_byte_level(node) -> bool:
    """Whether a tokenizer.json node (pre_tokenizer, decoder) holds a ByteLevel step."""
    if isinstance(node, dict):
        return node.get("type") == "ByteLevel" or any(has_byte_level(v) for v in node.values())
    if isinstance(node, list):
        return any(has_byte_level(v) for v in node)
    return False


def token_bytes(tokenizer) -> list[bytes]:
    """The UTF-8 bytes each id of `tokenizer` (either kind of this repo) spells, index = id (see the module
    docstring). Ids with no token (gaps in a tokenizer.json) spell nothing."""
    sp = getattr(tokenizer, "sp", None)
    if sp is not None:  # SentencePiece
        return [b"" if sp.is_control(i) or sp.is_unknown(i) else _sentencepiece_style(sp.id_to_piece(i))
                for i in range(sp.vocab_size())]
    tk = tokenizer.tk  # tokenizers.Tokenizer
    spec = json.loads(tk.to_str())
    byte_level = has_byte_level(spec.get("pre_tokenizer")) or has_byte_level(spec.get("decoder"))
    table = [b""] * tokenizer.vocab_size
    for token, i in tk.get_vocab(with_added_tokens=False).items():
        table[i] = bytes(CHAR_BYTE[c] for c in token) if byte_level else _sentencepiece_style(token)
    for i, added in tk.get_added_tokens_decoder().items():
        table[i] = b"" if added.special else added.content.encode("utf-8")
    return table


@dataclass(frozen=True)
class TextUnits:
    """Per id: the bytes and the characters (bytes that start one) of the text it spells."""

    bytes_per_id: np.ndarray  # (vocab,) int64
    chars_per_id: np.ndarray  # (vocab,) int64

    @staticmethod
    def of(tokenizer) -> "TextUnits":
        return _units(tokenizer)

    def count(self, ids) -> tuple[int, int]:
        """(bytes, characters) of the text the ids spell."""
        ids = np.asarray(ids, dtype=np.int64)
        return int(self.bytes_per_id[ids].sum()), int(self.chars_per_id[ids].sum())


@functools.lru_cache(maxsize=8)
def _units(tokenizer) -> TextUnits:
    table = token_bytes(tokenizer)
    return TextUnits(np.array([len(b) for b in table], dtype=np.int64),
                     np.array([sum(1 for byte in b if byte & 0xC0 != 0x80) for b in table], dtype=np.int64))
