"""SentencePiece tokenizer of a LLaMA model dir (tokenizer.model)."""
from __future__ import annotations

import os
from pathlib import Path

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
