"""README.zh.md keeps step with README.md, and the Chinese docs in docs/zh/ with the English ones: the same commands,
figures and link targets, so that neither language can fall behind the other."""
import pytest

from docs_text import REPO, code_blocks, headings, links, numbers

EN, ZH = REPO / "README.md", REPO / "README.zh.md"
ENGLISH_DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "pretraining_corpora" / "README.md"]
ZH_DOCS = sorted((REPO / "docs" / "zh").glob("*.md"))


def _text(path):
    return path.read_text(encoding="utf-8")


def _own_links(text, *, skip):
    """Link targets, less the language switch and the links to the Chinese docs (which only the Chinese side has)."""
    return {t for t in links(text) if t not in skip and not t.startswith("docs/zh/")}


def test_readmes_have_the_same_commands():
    assert code_blocks(_text(ZH)) == code_blocks(_text(EN))


def test_readmes_have_the_same_sections():
    assert [level for level, _ in headings(_text(ZH))] == [level for level, _ in headings(_text(EN))]
    # numbered steps keep their numbers
    assert [t.split(".")[0] for lvl, t in headings(_text(ZH)) if lvl == 3] == \
        [t.split(".")[0] for lvl, t in headings(_text(EN)) if lvl == 3]


def test_readmes_have_the_same_link_targets():
    assert _own_links(_text(ZH), skip={"README.md"}) == _own_links(_text(EN), skip={"README.zh.md"})


def test_readmes_have_the_same_figures():
    en, zh = numbers(_text(EN)), numbers(_text(ZH))
    assert not zh - en, f"figures only in README.zh.md: {sorted(zh - en)}"
    assert not en - zh, f"figures only in README.md: {sorted(en - zh)}"


@pytest.mark.parametrize("doc", ZH_DOCS, ids=lambda p: p.name)
def test_chinese_docs_say_nothing_the_english_do_not(doc):
    """A Chinese doc is a guide to part of the English ones: each command, figure and link of it is in them."""
    english = "\n".join(_text(p) for p in ENGLISH_DOCS)
    english_blocks = [line for block in code_blocks(english) for line in block]
    for block in code_blocks(_text(doc)):
        for line in block:
            assert line in english_blocks, f"{doc.name}: a command the English docs do not have: {line}"
    extra = numbers(_text(doc)) - numbers(english)
    assert not extra, f"{doc.name}: figures the English docs do not have: {sorted(extra)}"
    for target in links(_text(doc)):
        if not target.startswith(("http", "#")) and not target.endswith(".png"):
            assert target.startswith("../") or target in {p.name for p in ZH_DOCS}, target


def test_there_are_chinese_guides_for_a_real_job():
    assert {p.name for p in ZH_DOCS} >= {"data-formats.md", "training-runs.md"}
