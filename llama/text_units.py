"""The text each token id spells, in UTF-8 bytes and characters: the tokenizer-independent scale (bits per byte,
bits per character) on which models with different vocabularies, a base and its widened copy, compare.

    units = TextUnits.of(tokenizer)          # one table per tokenizer, built once
    n_bytes, n_chars = units.count(ids)      # of the text that ids spell
    bits_per_char = summed_nats / math.log(2) / n_chars

What an id spells is the tokenizer's answer (Tokenizer.token_bytes, llama/tokenizer.py): a SentencePiece piece with
"\u2581" as a space and <0xNN> as that byte, a byte-level BPE token through GPT-2's byte-unicode map reversed, control
and special tokens nothing.

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
from dataclasses import dataclass

import numpy as np

from llama.tokenizer import Tokenizer

@dataclass(frozen=True)
class TextUnits:
    """Per id: the bytes and the characters (bytes that start one) of the text it spells."""

    bytes_per_id: np.ndarray  # (vocab,) int64
    chars_per_id: np.ndarray  # (vocab,) int64

    @staticmethod
    def of(tokenizer: Tokenizer) -> "TextUnits":
        return _units(tokenizer)

    def count(self, ids) -> tuple[int, int]:
        """(bytes, characters) of the text the ids spell."""
        ids = np.asarray(ids, dtype=np.int64)
        return int(self.bytes_per_id[ids].sum()), int(self.chars_per_id[ids].sum())


@functools.lru_cache(maxsize=8)
def _units(tokenizer: Tokenizer) -> TextUnits:
    table = tokenizer.token_bytes()
    return TextUnits(np.array([len(b) for b in table], dtype=np.int64),
                     np.array([sum(1 for byte in b if byte & 0xC0 != 0x80) for b in table], dtype=np.int64))
