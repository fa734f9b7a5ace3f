"""The corpus on disk: sets of JSONL files, the mix setting and its weighted cycle, records and their fields,
prompt files. Reading a set's lines, this rank's share of them, is training/set_reader.py.

Layout: <root>/<set>/<NNNNN>.jsonl, one JSON object per line, files read in number order and wrapped around.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

logger = logging.getLogger(__name__)

SPLIT_SETTING = "pretrain_data_split"


class DataError(ValueError):
    """Bad corpus, bad record or bad data setting; the message names the set, file and line (or the setting)."""


class RecordError(ValueError):
    """A record that cannot become a sample (missing or wrongly typed field, ...); the caller adds set/file/line."""


@dataclass(frozen=True)
class Location:
    """Where a record came from, for error messages."""

    set_name: str
    path: Path
    line: int  # 1-based

    def __str__(self) -> str:
        return f"set '{self.set_name}', file {self.path}, line {self.line}"


# ---------------------------------------------------------------- settings: the mix


@dataclass(frozen=True)
class SetSpec:
    weight: int
    file_start: int  # first file number read
    file_stop: Optional[int] = None  # first file number not read; None: no upper end


SPLIT_KEYS = ("weight", "file_start", "file_stop")


def parse_split(split: object) -> dict[str, SetSpec]:
    """`pretrain_data_split` -> {set: SetSpec}; a plain int is a weight (every file). Weight-0 sets are dropped.

    A set reads the files numbered file_start <= n < file_stop, so two stages can read disjoint files of one folder:
    stage 1 {"file_stop": 10017}, stage 2 {"file_start": 10017}.
    """
    if not isinstance(split, dict) or not split:
        raise DataError(f"{SPLIT_SETTING} must be a non-empty dict {{set: weight}} or "
                        f"{{set: {{'weight': int, 'file_start': int, 'file_stop': int}}}}, got {split!r}")
    specs: dict[str, SetSpec] = {}
    for name, value in split.items():
        where = f"{SPLIT_SETTING}[{name!r}]"
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise DataError(f"{where}: a set name must be a plain folder name")
        if isinstance(value, dict):
            unknown = set(value) - set(SPLIT_KEYS)
            if unknown:
                raise DataError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: "
                                f"{', '.join(map(repr, SPLIT_KEYS))}")
            if "weight" not in value:
                raise DataError(f"{where}: missing 'weight'")
            weight, file_start, file_stop = value["weight"], value.get("file_start", 0), value.get("file_stop")
        else:
            weight, file_start, file_stop = value, 0, None
        for key, number in (("weight", weight), ("file_start", file_start), ("file_stop", file_stop)):
            if key == "file_stop" and number is None:
                continue
            if not isinstance(number, int) or isinstance(number, bool) or number < 0:
                raise DataError(f"{where}: {key} must be an integer >= 0, got {number!r}")
        if file_stop is not None and file_stop <= file_start:
            raise DataError(f"{where}: file_stop={file_stop} must be above file_start={file_start}")
        if weight == 0:
            logger.info("%s has weight 0: set not used", where)
            continue
        specs[name] = SetSpec(weight, file_start, file_stop)
    if not specs:
        raise DataError(f"{SPLIT_SETTING}: every weight is 0, nothing to read")
    return specs


def weighted_cycle(weights: dict[str, int]) -> list[str]:
    """One period of the mix: each set appears exactly weight/gcd times, spread out as evenly as possible.

    Smooth weighted round-robin: deterministic, so any window of one period holds the exact proportions
    (4/4/2 -> every 10 consecutive samples hold 4, 4 and 2), and no set comes in long runs.
    """
    divisor = math.gcd(*weights.values())
    reduced = {name: w // divisor for name, w in weights.items()}
    total = sum(reduced.values())
    credit = dict.fromkeys(reduced, 0)
    order = []
    for _ in range(total):
        for name, w in reduced.items():
            credit[name] += w
        pick = max(credit, key=credit.__getitem__)  # ties go to the earlier set in the split
        credit[pick] -= total
        order.append(pick)
    return order


# ---------------------------------------------------------------- files


def list_set_files(root: Path, set_name: str, file_start: int, file_stop: Optional[int] = None) -> list[Path]:
    """The set's <NNNNN>.jsonl files numbered file_start <= n < file_stop (no upper end if None), in number order."""
    folder = root / set_name
    if not folder.is_dir():
        raise DataError(f"set '{set_name}': folder {folder} does not exist ({SPLIT_SETTING} names it)")
    numbered = []
    for path in folder.glob("*.jsonl"):
        if not path.stem.isdigit():
            raise DataError(f"set '{set_name}': file {path} is not named <NNNNN>.jsonl (a number)")
        numbered.append((int(path.stem), path.name, path))
    if not numbered:
        raise DataError(f"set '{set_name}': folder {folder} holds no <NNNNN>.jsonl file")
    numbered.sort()
    kept = [path for number, _, path in numbered if number >= file_start and (file_stop is None or number < file_stop)]
    if not kept:
        window = f"file_start={file_start}" + (f", file_stop={file_stop}" if file_stop is not None else "")
        raise DataError(f"set '{set_name}': {window} leaves no file in {folder} "
                        f"(files are numbered {numbered[0][0]}..{numbered[-1][0]})")
    return kept


def read_first_lines(path: Path, count: int, set_name: str) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) for the first `count` lines of a file, streamed."""
    try:
        with open(path, "rb") as f:
            for number in range(1, count + 1):
                raw = f.readline()
                if not raw:
                    return
                yield number, raw
    except OSError as e:
        raise DataError(f"set '{set_name}', file {path}: cannot read: {e}") from e


def parse_record(raw: bytes) -> dict:
    """One JSONL line -> dict; RecordError says what is wrong (the caller knows where)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"invalid UTF-8 at byte {e.start}: {raw[max(0, e.start - 10):e.start + 10]!r}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    return record


def text_field(record: dict, name: str) -> str:
    """record[name], which must be a string (empty is allowed; callers decide what empty means)."""
    if name not in record:
        raise RecordError(f"missing field '{name}' (fields: {sorted(record)})")
    value = record[name]
    if not isinstance(value, str):
        raise RecordError(f"field '{name}' must be a string, got {type(value).__name__}")
    return value


def read_prompt_lines(path: Path) -> list[str]:
    """A prompt file's prompts: every line str.strip()ped, as the recipe reads both translation and task prompts
    (`line.strip()`), and blank lines left out (the recipe would draw "" from one: a sample with no prompt text). The
    file must exist and hold at least one prompt. Prompt files are small, so they are read whole."""
    try:
        raw_lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        raise DataError(f"prompt file {path} does not exist") from None
    except OSError as e:
        raise DataError(f"prompt file {path}: cannot read: {e}") from e
    prompts = []
    for number, raw in enumerate(raw_lines, 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise DataError(f"prompt file {path}, line {number}: invalid UTF-8 at byte {e.start}") from None
        if line:
            prompts.append(line)
    if not prompts:
        raise DataError(f"prompt file {path} holds no prompt (every line is empty)")
    return prompts


def load_translate_prompts(root: Path) -> dict[str, list[str]]:
    """{"en-zh": [...], "zh-en": [...]} from <root>/translate/<direction>.prompt, lines stripped."""
    return {direction: read_prompt_lines(root / "translate" / f"{direction}.prompt")
            for direction in ("en-zh", "zh-en")}


def draw_translation(record: dict, prompts: dict[str, list[str]], rng) -> Optional[tuple[str, str, str]]:
    """(source, prompt, target) of a {"en_text", "zh_text"} record: a direction drawn at random, then one of its
    prompt lines. None when either side is empty after stripping (the record is skipped and counted). The stages
    put the source in the fixed prefix text, never cut: a pair too long for a row loses its target's end."""
    texts = {"en": text_field(record, "en_text"), "zh": text_field(record, "zh_text")}
    direction = rng.choice(("en-zh", "zh-en"))
    source, target = (texts[lang] for lang in direction.split("-"))
    prompt = rng.choice(prompts[direction])
    if not source.strip() or not target.strip():
        return None
    return source, prompt, target
