"""Plain texts from a path, for training or measuring a tokenizer: a folder of JSONL (llama.tiny.corpus_texts:
every string field, recursively), one JSONL file (its string fields), or a text file (its non-blank lines)."""
from __future__ import annotations

from pathlib import Path

from llama.tiny import corpus_texts
from tools.text_stats import text_fields
from training.corpus import RecordError, parse_record


def read_texts(path: str | Path, max_chars: int = 20_000_000) -> list[str]:
    path = Path(path)
    if path.is_dir():
        return corpus_texts(path, max_chars)
    if not path.is_file():
        raise FileNotFoundError(f"text source not found: {path}")
    texts: list[str] = []
    total = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            if path.suffix.lower() in (".jsonl", ".json"):
                try:
                    values = text_fields(parse_record(raw))
                except RecordError as e:
                    raise ValueError(f"{path}:{number}: {e}") from None
            else:
                values = [raw.decode("utf-8", errors="replace").rstrip("\r\n")]
            for value in values:
                texts.append(value)
                total += len(value)
                if total >= max_chars:
                    return texts
    if not texts:
        raise ValueError(f"{path}: no text")
    return texts
