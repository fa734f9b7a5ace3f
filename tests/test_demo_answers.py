"""scripts/demo_answers.py: the demo's bar for its two chat answers (Chinese, not a loop; the colours named)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from demo_answers import en_verdict, longest_repeat, main, zh_verdict  # noqa: E402


@pytest.mark.parametrize("text, unit, times", [
    ("说说说说说说说说说", "说", 9),
    ("美国的美国的美国的美国的", "美国的", 4),
    ("英国的美国英国的美国", "英国的美国", 2),
    ("北京是中国的首都", "北", 1),
])
def test_longest_repeat(text, unit, times):
    assert longest_repeat(text)[1] == times
    if times > 1:
        assert longest_repeat(text)[0] == unit


def test_verdicts():
    assert zh_verdict('说法："他是一个独人，他的名字是"').endswith("meets the bar")
    assert "'说' repeats 24 times in a row" in zh_verdict("说" * 24)
    assert "repeats 4 times" in zh_verdict("美国的" * 4) and zh_verdict("美国的" * 3).endswith("meets the bar")
    assert "only 0% of its characters are CJK" in zh_verdict('The Japanese word for "Sakura" is')
    assert "only 50% of its characters are CJK" in zh_verdict("北京 is")  # half is not most
    assert en_verdict("Red, Blue, and Yellow") == "English answer: names red, blue and yellow"
    assert en_verdict("Red and green") == "English answer: misses blue, yellow"


def test_cli_prints_both(capsys):
    assert main(["--zh", "北京是中国的首都。", "--en", "red, blue, yellow"]) == 0
    assert capsys.readouterr().out.splitlines() == ["Chinese answer: 100% CJK, longest repeat 1x: meets the bar",
                                                    "English answer: names red, blue and yellow"]
