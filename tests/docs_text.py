"""Markdown pieces the docs tests compare: fenced code blocks, links, numbers and headings of README*.md and docs/."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6}) (.+)$", re.M)


def doc_files() -> list[Path]:
    return sorted([*REPO.glob("README*.md"), *(REPO / "docs").rglob("*.md"), REPO / "pretraining_corpora" / "README.md"])


def prose(text: str) -> str:
    """The text without its fenced code blocks (a '#' in a code block is not a heading)."""
    return FENCE.sub("", text)


def code_blocks(text: str) -> list[list[str]]:
    """Each fenced block's lines without comments or blank lines: what a reader runs, in any language's words."""
    blocks = []
    for body in FENCE.findall(text):
        lines = [re.sub(r"(^|\s)#.*$", "", line).rstrip() for line in body.splitlines()]
        blocks.append([line for line in lines if line.strip()])
    return blocks


def links(text: str) -> list[str]:
    return LINK.findall(prose(text))


def headings(text: str) -> list[tuple[int, str]]:
    return [(len(level), title.strip()) for level, title in HEADING.findall(prose(text))]


def numbers(text: str) -> set[str]:
    """The figures of a text: digit runs with their separators and decimals (2,600  0.295  3e-5  10001–10016)."""
    return set(re.findall(r"\d+(?:[.,]\d+)*(?:e-?\d+)?", text))


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    title = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", title.lower())
    return re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
