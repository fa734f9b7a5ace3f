"""SentencePiece tokenizer of a LLaMA model dir (tokenizer.model): llama.tokenizer's interface over
sentencepiece."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
from sentencepiece import SentencePieceProcessor

from llama.model_files import TOKENIZER_NAME
from llama.text_units import TextUnits
from llama.tokenizer import Tokenizer, piece_bytes
from llama.tokenizer_config import copy_tokenizer_file, end_token_id, read_tokenizer_config, write_tokenizer_config


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece's tokenizer.model. tokenizer_config.json beside it, where present, may name another eos piece
    and holds the chat template; eos_token (a piece) overrides the eos."""

    kind = "sentencepiece"
    # The recipe resizes the embedding to the tokenizer exactly: a larger one means the wrong tokenizer.
    embedding_may_be_padded = False

    def __init__(self, model_path: str | Path, eos_token: str = ""):
        if Path(model_path).is_dir():
            model_path = Path(model_path) / TOKENIZER_NAME
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"SentencePiece tokenizer not found: {self.model_path}")
        try:
            self.sp = SentencePieceProcessor(model_file=str(self.model_path))
        except (RuntimeError, OSError) as e:  # SentencePiece's "Internal: could not parse ModelProto from ..."
            raise ValueError(f"{self.model_path}: not a SentencePiece model ({str(e).strip().splitlines()[0]}); "
                             f"copy it again") from None
        self.config = read_tokenizer_config(self.model_path.parent)
        self.vocab_size: int = self.sp.vocab_size()
        bos = self.sp.bos_id()
        self.bos_id: int | None = bos if bos >= 0 and self.config.get("add_bos_token", True) else None
        default_eos = self.sp.id_to_piece(self.sp.eos_id()) if self.sp.eos_id() >= 0 else None
        self.own_eos_id, self.eos_id = end_token_id(self.model_path, eos_token, self.config, self.token_to_id,
                                                    default_eos)
        self.bos_token: str | None = self.sp.id_to_piece(bos) if bos >= 0 else None
        self.eos_token: str = self.sp.id_to_piece(self.eos_id)
        self.chat_template: str | None = self.config.get("chat_template")
        # LLaMA's tokenizer has no pad piece (pad_id -1). Padding positions never count in the loss, so any valid
        # id does; unk (0) is what transformers' LLaMA configs use as pad_token_id.
        pad = self.sp.pad_id()
        self.pad_id: int = pad if pad >= 0 else max(self.sp.unk_id(), 0)
        # SentencePiece's own threads for list input; one thread per core, as its default would be.
        self.num_threads = os.cpu_count() or 1
        # SentencePiece adds its own bos/eos in C++; another end token is appended in Python.
        self._own_ends = self.eos_id == self.sp.eos_id()

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None  # an unknown piece maps to unk

    def _ends(self, bos: bool, eos: bool) -> dict:
        return {"add_bos": bos and self.bos_id is not None, "add_eos": eos and self._own_ends}

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text, **self._ends(bos, eos))
        return ids + [self.eos_id] if eos and not self._own_ends else ids

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """Encode many texts in one SentencePiece call, which runs them on its own thread pool."""
        batch = self.sp.encode(list(texts), num_threads=self.num_threads, **self._ends(bos, eos))
        return [ids + [self.eos_id] for ids in batch] if eos and not self._own_ends else batch

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

    def token_bytes(self) -> list[bytes]:
        """Each piece's text with "\u2581" as a space, a byte-fallback piece <0xNN> as that byte; control and unk
        pieces spell nothing."""
        return list(self._token_bytes)

    @functools.cached_property
    def _token_bytes(self) -> tuple[bytes, ...]:
        sp = self.sp
        return tuple(b"" if sp.is_control(i) or sp.is_unknown(i) else piece_bytes(sp.id_to_piece(i))
                     for i in range(self.vocab_size))

    @functools.cached_property
    def _piece_bytes(self) -> np.ndarray:
        """UTF-8 length of the text each piece spells (TextUnits' table; kept here, token_ends runs per record)."""
        return TextUnits.of(self).bytes_per_id

    @functools.cached_property
    def _dummy_prefix_bytes(self) -> int:
        """1 where SentencePiece puts a space in front of the text (add_dummy_prefix, LLaMA's setting), else 0."""
        return int(self._piece_bytes[self.encode("a")].sum()) - 1

    def save(self, directory: str | Path, chat_template: str | None = None) -> None:
        """Write tokenizer.model, tokenizer_config.json and special_tokens_map.json into `directory`, so that
        transformers' AutoTokenizer loads it (as LlamaTokenizerFast). chat_template replaces the tokenizer's own."""
        directory = Path(directory)
        copy_tokenizer_file(self.model_path, directory / TOKENIZER_NAME)
        unk = self.sp.unk_id()
        config = {"tokenizer_class": "LlamaTokenizer", "add_eos_token": False, "legacy": True, **self.config,
                  "add_bos_token": self.bos_id is not None}
        write_tokenizer_config(directory, config, {
            "bos_token": self.bos_token, "eos_token": self.eos_token,
            "unk_token": self.sp.id_to_piece(unk) if unk >= 0 else None},
            chat_template if chat_template is not None else self.chat_template)
