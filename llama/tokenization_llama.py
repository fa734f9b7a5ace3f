"""SentencePiece tokenizer of a LLaMA model dir (tokenizer.model)."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
from sentencepiece import SentencePieceProcessor

from llama.configuration_llama import LlamaConfig
from llama.model_files import TOKENIZER_NAME


class Tokenizer:
    def __init__(self, model_path: str | Path):
        self.model_path = Path(model_path)
        if self.model_path.is_dir():
            self.model_path = self.model_path / TOKENIZER_NAME
        if not self.model_path.is_file():
            raise FileNotFoundError(f"SentencePiece tokenizer not found: {self.model_path}")
        self.sp = SentencePieceProcessor(model_file=str(self.model_path))
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        # LLaMA's tokenizer has no pad piece (pad_id -1). Padding positions never count in the loss, so any valid
        # id does; unk (0) is what transformers' LLaMA configs use as pad_token_id.
        pad = self.sp.pad_id()
        self.pad_id: int = pad if pad >= 0 else max(self.sp.unk_id(), 0)
        # SentencePiece's own threads for list input; one thread per core, as its default would be.
        self.num_threads = os.cpu_count() or 1

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self.sp.encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """Encode many texts in one SentencePiece call, which runs them on its own thread pool."""
        return self.sp.encode(list(texts), add_bos=bos, add_eos=eos, num_threads=self.num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def token_ends(self, text: str, ids: list[int]) -> np.ndarray:
        """Where each token of ids (== encode(text)) ends in text, as a character offset: SentencePiece's piece
        offsets (a byte piece that does not finish its character ends where that character starts).

        Fast path, no second encode: a tokenizer that spells the text exactly (no normaliser, whitespace kept, as
        LLaMA's and llama.tiny's) has its piece byte lengths add up to the text's bytes plus the space of the dummy
        prefix, so the running sum of a length table gives the ends. Where the sum does not come out (a normalising
        tokenizer, an unk piece) SentencePiece is asked for its offsets instead.
        """
        raw = text.encode("utf-8")
        byte_ends = np.cumsum(self._piece_bytes[np.asarray(ids, dtype=np.int64)]) - self._dummy_prefix_bytes
        if len(ids) and byte_ends[-1] != len(raw):
            return np.array([piece.end for piece in self.sp.encode(text, out_type="immutable_proto").pieces],
                            dtype=np.int64)
        is_start = (np.frombuffer(raw, dtype=np.uint8) & 0xC0) != 0x80  # not a UTF-8 continuation byte
        chars_begun = np.concatenate(([0], np.cumsum(is_start)))  # [k]: characters begun in raw[:k]
        inside_char = np.append(~is_start, False)  # [k]: offset k falls inside a character
        return (chars_begun - inside_char)[np.maximum(byte_ends, 0)]

    @functools.cached_property
    def _piece_bytes(self) -> np.ndarray:
        """UTF-8 length of the text each piece spells ("\u2581" is a space; a byte piece is one byte; control and
        unk pieces none)."""
        sp = self.sp
        return np.array([1 if sp.is_byte(i) else 0 if sp.is_control(i) or sp.is_unknown(i)
                         else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
                         for i in range(self.vocab_size)], dtype=np.int64)

    @functools.cached_property
    def _dummy_prefix_bytes(self) -> int:
        """1 where SentencePiece puts a space in front of the text (add_dummy_prefix, LLaMA's setting), else 0."""
        return int(self._piece_bytes[self.encode("a")].sum()) - 1


def check_tokenizer_matches(config: LlamaConfig, tokenizer: Tokenizer, allow_padded_embedding: bool = False) -> None:
    """Raise ValueError if the tokenizer and the model's embedding disagree.

    Every token id must have an embedding row: tokenizer.vocab_size > config.vocab_size is always an error.
    A larger embedding is an error too unless allow_padded_embedding (some checkpoints pad the vocabulary to a
    multiple of 64); BiLLa's expanded vocabulary is resized to match exactly. bos/eos ids must agree.
    """
    where = getattr(tokenizer, "model_path", "tokenizer")
    if tokenizer.vocab_size > config.vocab_size or (tokenizer.vocab_size != config.vocab_size
                                                    and not allow_padded_embedding):
        raise ValueError(f"tokenizer {where} has {tokenizer.vocab_size} pieces but the model's embedding "
                         f"(config vocab_size) has {config.vocab_size} rows")
    for name, tok_id, cfg_id in (("bos", tokenizer.bos_id, config.bos_token_id),
                                 ("eos", tokenizer.eos_id, config.eos_token_id)):
        if tok_id != cfg_id:
            raise ValueError(f"tokenizer {where} has {name}_id {tok_id} but config {name}_token_id is {cfg_id}")
