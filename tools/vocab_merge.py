"""Merging a Chinese SentencePiece model's pieces into LLaMA's tokenizer.model, and where a new piece's embedding
starts from.

Old pieces keep their ids and scores, so every old token id means what it meant. New pieces are appended in the
Chinese model's own order with scores below every old one: in BPE encoding a higher score merges first, so where
an old merge and a new one compete the old one wins, and text the old vocabulary already covered well keeps its
old tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sentencepiece import SentencePieceProcessor
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

Piece = sp_pb2.ModelProto.SentencePiece
MERGEABLE = (Piece.NORMAL, Piece.USER_DEFINED)  # control, unknown, byte and unused pieces are the base model's


@dataclass
class MergeResult:
    proto: sp_pb2.ModelProto
    old_size: int
    added: list[str]  # new pieces, in id order from old_size
    skipped_present: int  # Chinese pieces the old vocabulary already had


def load_proto(path: str | Path) -> sp_pb2.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SentencePiece model not found: {path}")
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


def merge_pieces(base: sp_pb2.ModelProto, extra: sp_pb2.ModelProto) -> MergeResult:
    merged = sp_pb2.ModelProto()
    merged.CopyFrom(base)
    present = {p.piece for p in base.pieces}
    score = min((p.score for p in base.pieces), default=0.0)
    added, skipped = [], 0
    for piece in extra.pieces:
        if piece.type not in MERGEABLE:
            continue
        if piece.piece in present:
            skipped += 1
            continue
        score -= 1.0
        merged.pieces.append(Piece(piece=piece.piece, score=score, type=Piece.NORMAL))
        present.add(piece.piece)
        added.append(piece.piece)
    merged.trainer_spec.vocab_size = len(merged.pieces)
    return MergeResult(merged, len(base.pieces), added, skipped)


def processor(proto: sp_pb2.ModelProto) -> SentencePieceProcessor:
    return SentencePieceProcessor(model_proto=proto.SerializeToString())


def piece_splitter(base: sp_pb2.ModelProto) -> SentencePieceProcessor:
    """The base tokenizer, set to segment a piece's own text: no dummy "▁" prefix and no whitespace clean-up,
    so that "中国" and "▁中国" split into what they are, not into an extra leading space."""
    proto = sp_pb2.ModelProto()
    proto.CopyFrom(base)
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    return processor(proto)


def old_ids_of(splitter: SentencePieceProcessor, piece: str) -> list[int]:
    """Old-vocabulary ids the base tokenizer splits a new piece's text into."""
    return splitter.encode(piece.replace("\u2581", " "))
