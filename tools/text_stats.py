"""What a record holds as text, and cheap figures about text: script (CJK share), a token estimate from characters.

Shared by the tools that count or group texts (prepare_corpus, inspect_corpus, eval_ppl, expand_vocab).
"""
from __future__ import annotations

# Fields that name things rather than hold text the model reads (a stage-2 task's prompt type).
NON_TEXT_FIELDS = ("type",)

# Characters per token when no tokenizer is given: LLaMA's tokenizer spends about one token per CJK character
# (more for rare ones, byte fallback) and about one per four characters of English or code.
CJK_TOKENS_PER_CHAR = 1.0
OTHER_CHARS_PER_TOKEN = 4.0


def text_fields(record: dict) -> list[str]:
    """The record's string values that the model reads (every string field but NON_TEXT_FIELDS, and the contents
    of a stage-3 conversation's messages)."""
    texts = [value for key, value in record.items() if isinstance(value, str) and key not in NON_TEXT_FIELDS]
    messages = record.get("messages")
    if isinstance(messages, list):
        texts += [m["content"] for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return texts


def is_cjk(ch: str) -> bool:
    code = ord(ch)
    return (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2A6DF
            or 0xF900 <= code <= 0xFAFF or 0x3000 <= code <= 0x303F or 0xFF00 <= code <= 0xFFEF)


def cjk_count(text: str) -> int:
    return sum(1 for ch in text if is_cjk(ch))


def cjk_share(text: str) -> float:
    """CJK characters (ideographs and full-width punctuation) over non-space characters; 0.0 for blank text."""
    visible = [ch for ch in text if not ch.isspace()]
    return sum(1 for ch in visible if is_cjk(ch)) / len(visible) if visible else 0.0


def detect_language(text: str, threshold: float = 0.2) -> str:
    """"zh" when at least `threshold` of the visible characters are CJK, else "en" (the recipe's two languages)."""
    return "zh" if cjk_share(text) >= threshold else "en"


def estimate_tokens(text: str) -> float:
    """Token estimate without a tokenizer (see CJK_TOKENS_PER_CHAR / OTHER_CHARS_PER_TOKEN)."""
    cjk = cjk_count(text)
    return cjk * CJK_TOKENS_PER_CHAR + (len(text) - cjk) / OTHER_CHARS_PER_TOKEN
