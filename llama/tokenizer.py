"""The one tokenizer interface, and the check that a tokenizer fits a model.

Two kinds implement it: SentencePiece's tokenizer.model (llama.tokenization_llama.SentencePieceTokenizer, the
recipe's LLaMA path) and a tokenizer.json of the `tokenizers` library (llama.tokenizer_json.TokenizerJson: Llama 3,
Qwen2/3, SmolLM2). llama.tokenizer_files.load_tokenizer picks the kind a model dir needs; everything else is typed
against Tokenizer and never asks which kind it holds, except to choose how to widen the vocabulary (`kind`).
"""
from __future__ import annotations

import abc
import re
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from llama.configuration_llama import LlamaConfig

TokenizerKind = Literal["sentencepiece", "tokenizer.json"]  # the file format, as tools.expand_vocab widens it
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback piece: the byte it stands for


class Tokenizer(abc.ABC):
    """A model dir's tokenizer with the run's end token.

    bos_id is None where the tokenizer adds no bos (Qwen); eos_id is the end token that encode(eos=True) appends and
    that documents and answers end with (the eos_token setting, else the tokenizer's own); own_eos_id is the
    tokenizer's own eos, which the model's config must name.
    """

    kind: ClassVar[TokenizerKind]
    # Whether a model's embedding may have more rows than the tokenizer has ids (see check_tokenizer_matches).
    embedding_may_be_padded: ClassVar[bool]

    model_path: Path  # the tokenizer file
    vocab_size: int  # one more than the highest id
    bos_id: int | None
    eos_id: int
    own_eos_id: int
    pad_id: int  # a valid id for padding positions (they never count in the loss)
    bos_token: str | None
    eos_token: str
    chat_template: str | None  # tokenizer_config.json's, None when it has none

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of a token of the vocabulary (a piece, or an added/special token's text); None when it is none."""

    @abc.abstractmethod
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """The text's ids; bos=True puts bos_id first (where the tokenizer has one), eos=True appends eos_id."""

    @abc.abstractmethod
    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """encode() of each text, in one call on the library's own threads."""

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str:
        """The text of ids; control and special tokens are left out."""

    @abc.abstractmethod
    def token_ends(self, text: str, ids: list[int]) -> np.ndarray:
        """Where each token of ids (== encode(text)) ends in text, as a character offset; a token that stops inside
        a character ends where that character starts."""

    @abc.abstractmethod
    def token_bytes(self) -> list[bytes]:
        """The UTF-8 bytes each id spells, indexed by id (len == vocab_size): what decode() writes for it, before
        the bytes of neighbouring tokens join into characters. Control, special and unknown tokens (and unused ids)
        spell b"". The one difference from decode(): a SentencePiece-style tokenizer's first piece keeps the space
        of the dummy prefix ("\u2581Hello" spells b" Hello"), which decode() drops at the start of a text."""

    @abc.abstractmethod
    def save(self, directory: str | Path, chat_template: str | None = None) -> None:
        """Write the tokenizer file, tokenizer_config.json and special_tokens_map.json into `directory`, so that
        transformers' AutoTokenizer loads it and encodes identically. chat_template replaces the tokenizer's own."""


def check_tokenizer_matches(config: LlamaConfig, tokenizer: Tokenizer,
                            allow_padded_embedding: bool | None = None) -> None:
    """Raise ValueError if the tokenizer and the model's config disagree.

    Every token id must have an embedding row: tokenizer.vocab_size > config.vocab_size is always an error.
    A larger embedding is an error too unless allow_padded_embedding (default: the tokenizer kind's rule: a
    SentencePiece model is resized to match exactly, as BiLLa's expanded vocabulary is; tokenizer.json models pad
    theirs, Qwen2.5's 151,665 tokens to 151,936 rows).
    The bos id must be the config's where the tokenizer adds one (where it adds none, the config's is never fed);
    the tokenizer's own eos must be the config's eos id, or one of them where the config lists several (Llama 3.1).
    """
    where = tokenizer.model_path
    if allow_padded_embedding is None:
        allow_padded_embedding = tokenizer.embedding_may_be_padded
    if tokenizer.vocab_size > config.vocab_size or (tokenizer.vocab_size != config.vocab_size
                                                    and not allow_padded_embedding):
        raise ValueError(f"tokenizer {where} has {tokenizer.vocab_size} pieces but the model's embedding "
                         f"(config vocab_size) has {config.vocab_size} rows")
    if tokenizer.bos_id is not None and tokenizer.bos_id != config.bos_token_id:
        raise ValueError(f"tokenizer {where} has bos_id {tokenizer.bos_id} but config bos_token_id is "
                         f"{config.bos_token_id}")
    eos = tokenizer.own_eos_id
    config_eos = config.eos_token_id
    if config_eos is not None and eos not in (config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]):
        raise ValueError(f"tokenizer {where} has eos_id {eos} but config eos_token_id is {config_eos}")


def piece_bytes(piece: str) -> bytes:
    """The bytes a SentencePiece-style piece spells: "\u2581" is a space, a byte-fallback piece <0xNN> that byte."""
    byte = BYTE_PIECE.fullmatch(piece)
    return bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode("utf-8")
