"""docs/settings.md is generated from the args files (tools/settings_doc.py): it must be what they say now."""
import pretrain_args
from tools import settings_doc
from training.settings import args_file_layout


def test_settings_doc_is_up_to_date():
    assert settings_doc.main(["--check"]) == 0, "docs/settings.md is stale: run python -m tools.settings_doc"


def test_settings_doc_holds_every_setting_with_its_comment():
    text = settings_doc.render()
    for heading, items in args_file_layout(pretrain_args):
        assert f"## {heading}\n" in text
        for name, comment in items:
            row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
            assert comment.replace("<", "&lt;").replace("|", "\\|") in row, name
