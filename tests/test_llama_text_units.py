"""llama.text_units: the bytes and characters that token ids spell equal the text's own, for SentencePiece (dummy
prefix, byte fallback) and byte-level BPE (a CJK character split across tokens), per token and per decoded span."""
import numpy as np
import pytest

from llama import load_tokenizer
from llama.text_units import TextUnits

TEXTS = ["The quick brown fox jumps over the lazy dog.", "北京是中国的首都，有着悠久的历史。",
         "Rare: 龘靐齉 and 🙂 mixed with 中文 text.", "  two leading spaces\nand a newline"]


@pytest.fixture(params=["sentencepiece", "smollm2", "llama3"])
def tokenizer(request, tokenizer_path, bpe_tokenizer_dirs):
    return load_tokenizer(tokenizer_path if request.param == "sentencepiece" else bpe_tokenizer_dirs[request.param])


def dummy_prefix(tokenizer) -> int:
    """The space SentencePiece puts in front of a text (the module docstring: it counts); 0 for byte-level BPE."""
    return 1 if hasattr(tokenizer, "sp") and tokenizer.sp.id_to_piece(tokenizer.encode("a")[0]).startswith("\u2581") \
        else 0


@pytest.mark.parametrize("text", TEXTS)
def test_counts_equal_the_texts_own(tokenizer, text):
    units = TextUnits.of(tokenizer)
    ids = tokenizer.encode(text)
    extra = dummy_prefix(tokenizer)
    assert units.count(ids) == (len(text.encode("utf-8")) + extra, len(text) + extra)
    # bos / eos spell nothing
    assert units.count(tokenizer.encode(text, bos=True, eos=True)) == units.count(ids)


def test_a_character_split_across_tokens_counts_once(tokenizer):
    """The rare characters are not in the tiny vocabularies: byte pieces (SentencePiece byte fallback) or byte-level
    tokens carry them, several tokens per character."""
    table = tokenizer.token_bytes()
    ids = tokenizer.encode("龘")
    pieces = [table[i] for i in ids]
    assert len([p for p in pieces if p.strip()]) > 1, "the test needs a character split across tokens"
    assert b"".join(pieces).strip() == "龘".encode("utf-8")
    assert TextUnits.of(tokenizer).count(ids)[1] == 1 + dummy_prefix(tokenizer)


@pytest.mark.parametrize("text", TEXTS)
def test_per_token_equals_per_decoded_span(tokenizer, text):
    """Cut the ids after every token whose prefix decodes to a whole prefix of the text (no character left half
    spelt); each span's count is that of the text between the cuts (the first span also holds SentencePiece's dummy
    prefix), and the spans add up to the whole."""
    units = TextUnits.of(tokenizer)
    ids = tokenizer.encode(text)
    ends = tokenizer.token_ends(text, ids)
    cuts = [0] + [k for k in range(1, len(ids) + 1) if tokenizer.decode(ids[:k]) == text[:ends[k - 1]]]
    assert cuts[-1] == len(ids) and len(cuts) > 3, "the test needs spans"
    total = np.zeros(2, dtype=np.int64)
    for a, b in zip(cuts, cuts[1:]):
        span = text[(0 if a == 0 else ends[a - 1]):ends[b - 1]]
        extra = dummy_prefix(tokenizer) if a == 0 else 0
        assert units.count(ids[a:b]) == (len(span.encode("utf-8")) + extra, len(span) + extra), (a, b, span)
        total += units.count(ids[a:b])
    assert tuple(total) == units.count(ids)
