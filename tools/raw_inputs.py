"""Raw corpus inputs as JSONL lines with their location: JSONL files as they are, plain text wrapped as {"text"}.

Plain text holds one document per line, or one per file (--text-unit). Files are read streaming, line by line,
except a one-document-per-file text file, which is that one document.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

JSONL_SUFFIXES = (".jsonl", ".json")
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class RawLine:
    where: str  # "file:line" (or "file" for a whole-file document)
    data: Optional[bytes]  # one JSON object, no newline; None when the input itself is unreadable
    error: str = ""  # why data is None


def list_inputs(paths: list[Path]) -> list[Path]:
    """Files as given, folders as every regular, non-hidden file below them, in name order."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*")
                            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    if not files:
        raise FileNotFoundError(f"no input file in {', '.join(map(str, paths))}")
    return files


def input_format(path: Path, requested: str) -> str:
    if requested != "auto":
        return requested
    return "jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "text"


def read_raw_lines(path: Path, fmt: str, text_unit: str, progress=None) -> Iterator[RawLine]:
    """RawLine per record of `path` (fmt: "jsonl" or "text"); blank lines give data=b"" (the caller counts them).
    `progress(n_bytes)` is called with the bytes read."""
    if fmt == "text" and text_unit == "file":
        raw = path.read_bytes()
        if progress:
            progress(len(raw))
        yield _text_record(str(path), raw.removeprefix(BOM))
        return
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if progress:
                progress(len(raw))
            if number == 1:
                raw = raw.removeprefix(BOM)
            line = raw.rstrip(b"\r\n")
            where = f"{path}:{number}"
            if fmt == "jsonl":
                yield RawLine(where, line.strip() and line)
            else:
                yield _text_record(where, line)


def _text_record(where: str, raw: bytes) -> RawLine:
    if not raw.strip():
        return RawLine(where, b"")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RawLine(where, None, f"invalid UTF-8 at byte {e.start}")
    return RawLine(where, json.dumps({"text": text}, ensure_ascii=False).encode("utf-8"))
