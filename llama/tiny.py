"""Tiny tokenizers and models for the demo and the tests (no hub, no downloads)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

import sentencepiece as spm


def train_tokenizer(texts: Iterable[str], output_path: str | Path, vocab_size: int = 400,
                    model_type: str = "bpe") -> Path:
    """Train a LLaMA-style SentencePiece model (byte fallback, unk=0, bos=1, eos=2, no pad).

    Normalisation is off and whitespace is kept as is, as in LLaMA's tokenizer, so that
    decode(encode(text)) == text for any text, Chinese included.
    """
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([t for t in texts if t.strip()]),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=0.9995,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False,
        num_threads=2,
        minloglevel=2,
    )
    output_path.write_bytes(model.getvalue())
    return output_path
