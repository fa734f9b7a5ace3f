"""Whether the demo's two chat answers meet its bar, one line each (scripts/demo_real.sh):

    python scripts/demo_answers.py --zh "北京是中国的首都。" --en "Red, blue and yellow."

The Chinese answer must be Chinese, not a loop: most of its visible characters CJK (tools.text_stats.cjk_share,
as bench/widening.py reports it), and no character or word (any run of
1 to 8 characters) repeated more than three times in a row ("说说说说" fails, as does "美国的美国的美国的美国的"). The
English answer to "Name three primary colors." must name red, blue and yellow.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.text_stats import cjk_share  # noqa: E402

MOST = 0.5  # share of the answer's visible characters that must be CJK
MAX_REPEATS = 3
LONGEST_UNIT = 8
COLORS = ("red", "blue", "yellow")


def longest_repeat(text: str) -> tuple[str, int]:
    """(unit, times): the unit of 1..LONGEST_UNIT characters repeated most times back to back, and how many."""
    best = ("", 1)
    for size in range(1, LONGEST_UNIT + 1):
        for start in range(len(text) - size + 1):
            unit, times = text[start:start + size], 1
            while text[start + times * size:start + (times + 1) * size] == unit:
                times += 1
            if times > best[1] and unit.strip():
                best = (unit, times)
    return best


def zh_verdict(answer: str) -> str:
    share, (unit, times) = cjk_share(answer), longest_repeat(answer)
    problems = []
    if share <= MOST:
        problems.append(f"only {share:.0%} of its characters are CJK")
    if times > MAX_REPEATS:
        problems.append(f"{unit!r} repeats {times} times in a row")
    facts = f"{share:.0%} CJK, longest repeat {times}x"
    return f"Chinese answer: {facts}: " + ("meets the bar" if not problems else "misses it: " + "; ".join(problems))


def en_verdict(answer: str) -> str:
    missing = [c for c in COLORS if c not in answer.lower()]
    return "English answer: " + ("names red, blue and yellow" if not missing else f"misses {', '.join(missing)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zh", required=True, help="the answer to 请用一句话介绍北京。")
    parser.add_argument("--en", required=True, help="the answer to Name three primary colors.")
    args = parser.parse_args(argv)
    print(zh_verdict(args.zh))
    print(en_verdict(args.en))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
