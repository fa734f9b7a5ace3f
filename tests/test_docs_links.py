"""Every relative link of README*.md and docs/ leads to a file that exists, and every #anchor to a heading there."""
import re

import pytest

from docs_text import REPO, doc_files, headings, links, slug


def _cases():
    for doc in doc_files():
        for target in links(doc.read_text(encoding="utf-8")):
            if not re.match(r"[a-z]+:", target):
                yield pytest.param(doc, target, id=f"{doc.relative_to(REPO)}->{target}")


@pytest.mark.parametrize("doc, target", list(_cases()))
def test_link_resolves(doc, target):
    path, _, anchor = target.partition("#")
    file = (doc.parent / path).resolve() if path else doc
    assert file.exists(), f"{doc.relative_to(REPO)}: {target}: no such file"
    if anchor:
        assert file.suffix == ".md", f"{doc.relative_to(REPO)}: {target}: an anchor into a non-markdown file"
        anchors = {slug(title) for _, title in headings(file.read_text(encoding="utf-8"))}
        assert anchor in anchors, f"{doc.relative_to(REPO)}: {target}: no heading #{anchor} in {file.name}"


def test_slug_follows_github():
    assert slug("Checkpoint sizes for 7B (computed, not measured)") == "checkpoint-sizes-for-7b-computed-not-measured"
    assert slug("A stage's command line") == "a-stages-command-line"
    assert slug("Too long for `max_seq_length`") == "too-long-for-max_seq_length"
