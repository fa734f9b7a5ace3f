"""The corpus on disk: sets of JSONL files, this rank's share of them, line streaming, weighted cycling.

Layout: <root>/<set>/<NNNNN>.jsonl, one JSON object per line, files read in number order and wrapped around.
Everything here is exact and restartable: a SetReader's position is a handful of ints (file index, byte offset,
line number), so a resumed run seeks straight back to where it was instead of re-reading what came before.
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


# ---------------------------------------------------------------- this rank's lines of one set


class SetReader:
    """This rank's lines of one set, in file order, wrapping around after the last file.

    Files >= ranks: the rank reads files[rank::world_size]. Fewer files than ranks: every rank reads every file
    and keeps lines rank, rank + W, ... of each pass (counted across the set's files).
    The position is plain ints (see position()), restored by seeking to a byte offset.

    Another world size (resume_from): the new ranks divide the files afresh, and what the old ranks had consumed
    comes along as `claims`, each an old reader's position with its rank and world size. A claim is exact: it says
    which lines of which pass over each file that reader had read (all of its files before its position, in its
    order, and the earlier passes). Reading skips every line some claim covers -- by seeking past a claimed prefix
    of a file, or, for a claim of a reader that shared files by line, line by line -- so no line read before the
    change is read again, and none is left out. A claim is dropped once this reader's passes are past it.
    """

    def __init__(self, set_name: str, files: list[Path], rank: int, world_size: int):
        self.set_name = set_name
        self.set_files = files  # every file of the set, in number order: what claims refer to
        self.rank, self.world_size = rank, world_size
        self.by_line = len(files) < world_size
        if not self.by_line:
            self.files = files[rank::world_size]
            self.line_stride, self.line_phase = 1, 0
        else:
            self.files = files
            self.line_stride, self.line_phase = world_size, rank
            logger.info("set '%s' has %d file(s) for %d ranks: sharding it by line (rank %d reads lines %d, %d, ...)",
                        set_name, len(files), world_size, rank, rank, rank + world_size)
        self.file_index = 0
        self.byte_offset = 0
        self.line = 0  # lines read from the current file
        self.pass_line = 0  # lines read in this pass over all files (for sharding by line)
        self.passes = 0  # completed passes over the files
        self.pass_returned = 0  # lines handed out in this pass, or skipped as read by an earlier world
        self.claims: list[dict] = []  # what the ranks of earlier world sizes had read (see the class docstring)
        self._file = None
        self._line_offsets: Optional[list[int]] = None  # lines of the set's files before each (line-shard claims)

    @property
    def path(self) -> Path:
        return self.files[self.file_index]

    def next_line(self) -> tuple[bytes, Location]:
        while True:
            if self._file is None and self._open():
                continue  # the whole file was read by an earlier world
            raw = self._file.readline()
            if not raw:
                self._next_file()
                continue
            self.byte_offset += len(raw)
            self.line += 1
            self.pass_line += 1
            if (self.pass_line - 1) % self.line_stride == self.line_phase:
                self.pass_returned += 1
                if self.claims and self._claimed_line():
                    continue
                return raw, Location(self.set_name, self.path, self.line)

    def _open(self) -> bool:
        """Open the current file at the position; at a file's start, first skip what the claims cover. True when the
        claims cover the whole file (then it is passed over, not opened)."""
        if self.claims and self.byte_offset == 0 and self.line == 0:
            prefix = self._claimed_prefix()
            if prefix == "all":
                self.pass_line += self._file_lines(self.file_index) if self.by_line else 0
                self.pass_returned += 1  # a pass that the claims cover whole is not a pass that gave no line
                self._next_file()
                return True
            if prefix is not None:
                self.byte_offset, self.line = prefix
                self.pass_line += self.line
                self.pass_returned += self.line
        try:
            self._file = open(self.path, "rb")
            self._file.seek(self.byte_offset)
        except OSError as e:
            raise DataError(f"set '{self.set_name}', file {self.path}: cannot read: {e}") from e
        return False

    def _next_file(self) -> None:
        self.close()
        self.file_index += 1
        self.byte_offset = self.line = 0
        if self.file_index == len(self.files):
            if self.pass_returned == 0:
                raise DataError(f"set '{self.set_name}': a whole pass over its {len(self.files)} file(s) "
                                f"({self.files[0]} ...) gave this rank no line")
            self.file_index = self.pass_line = self.pass_returned = 0
            self.passes += 1
            self.claims = [claim for claim in self.claims if claim["passes"] >= self.passes]

    def position(self) -> dict:
        position = {"file": self.path.name, "file_index": self.file_index, "byte_offset": self.byte_offset,
                    "line": self.line, "pass_line": self.pass_line, "passes": self.passes,
                    "pass_returned": self.pass_returned}
        if self.claims:
            position["claims"] = self.claims
        return position

    def seek(self, position: dict) -> None:
        index = position["file_index"]
        if not 0 <= index < len(self.files) or self.files[index].name != position["file"]:
            raise DataError(f"set '{self.set_name}': the saved data state is at file {position['file']} "
                            f"(index {index}), which is not this rank's file list any more "
                            f"({[p.name for p in self.files[:5]]} ...)")
        self.close()
        self.file_index = index
        for key in ("byte_offset", "line", "pass_line", "passes", "pass_returned"):
            setattr(self, key, int(position[key]))
        self.claims = [self._checked_claim(claim) for claim in position.get("claims", [])]

    def resume_from(self, positions: list[dict]) -> None:
        """Start this rank's share afresh after a world-size change: `positions` are the old ranks' position()s,
        each with its "rank" and "world_size" added. Their own claims (from a change before) carry on too."""
        self.close()
        claims = []
        for position in positions:
            for claim in [*position.get("claims", []), {k: v for k, v in position.items() if k != "claims"}]:
                claim = self._checked_claim(claim)
                if claim not in claims:
                    claims.append(claim)
        self.claims = claims
        # The first pass in which the claims may leave a line of this rank's files unread: every line of the passes
        # before it was read. (Old ranks can be passes apart: starting from the lowest could mean passes that give
        # nothing, which the data processor takes for an unusable set.)
        self.passes = min(self._first_open_pass(self._set_index(index)) for index in range(len(self.files)))
        self.file_index = self.byte_offset = self.line = self.pass_line = self.pass_returned = 0

    def _first_open_pass(self, j: int) -> int:
        """A pass before which the claims cover every line of set file j: that of a file-sharing claim on it (one
        more if it had gone past the file), or the lowest of a by-line world whose every rank has a claim."""
        first, by_line = 0, {}
        for claim in self.claims:
            world = claim["world_size"]
            if len(self.set_files) < world:
                by_line.setdefault(world, []).append(claim["passes"])
            elif j % world == claim["rank"]:
                first = max(first, claim["passes"] + (j // world < claim["file_index"]))
        return max([first] + [min(passes) for world, passes in by_line.items() if len(passes) == world])

    def _checked_claim(self, claim: dict) -> dict:
        keys = ("rank", "world_size", "file", "file_index", "byte_offset", "line", "pass_line", "passes")
        if any(key not in claim for key in keys):
            raise DataError(f"set '{self.set_name}': a saved reader position lacks one of {keys}: {claim}")
        claim = {key: claim[key] for key in keys}
        world, rank, index = claim["world_size"], claim["rank"], claim["file_index"]
        old_files = self.set_files[rank::world] if len(self.set_files) >= world else self.set_files
        if not 0 <= index < len(old_files) or old_files[index].name != claim["file"]:
            raise DataError(f"set '{self.set_name}': rank {rank} of {world} saved its position at file "
                            f"{claim['file']} (index {index}), which is not its share of this set's files any more "
                            f"({len(self.set_files)} files: {self.set_files[0].name} ...)")
        return claim

    def _set_index(self, file_index: int) -> int:
        return file_index if self.by_line else self.rank + file_index * self.world_size

    def _claimed_prefix(self):
        """What the claims of file-sharding readers cover of the current file in this pass: "all", (byte offset,
        lines) of a prefix, or None. (Readers that shared files by line claim lines, checked one by one.)"""
        j = self._set_index(self.file_index)
        best = None
        for claim in self.claims:
            world = claim["world_size"]
            if len(self.set_files) < world or j % world != claim["rank"]:
                continue
            if self.passes < claim["passes"] or (self.passes == claim["passes"] and j // world < claim["file_index"]):
                return "all"
            if self.passes == claim["passes"] and j // world == claim["file_index"] and claim["line"] > 0:
                if best is None or claim["line"] > best[1]:
                    best = (claim["byte_offset"], claim["line"])
        return best

    def _claimed_line(self) -> bool:
        """Whether a claim of a reader that shared files by line covers the line just read."""
        index = (self.pass_line - 1 if self.by_line
                 else self._line_offset(self._set_index(self.file_index)) + self.line - 1)  # in the pass, 0-based
        for claim in self.claims:
            world = claim["world_size"]
            if len(self.set_files) >= world or index % world != claim["rank"]:
                continue
            if self.passes < claim["passes"] or (self.passes == claim["passes"] and index < claim["pass_line"]):
                return True
        return False

    def _file_lines(self, file_index: int) -> int:
        j = self._set_index(file_index)
        return self._line_offset(j + 1) - self._line_offset(j)

    def _line_offset(self, set_index: int) -> int:
        """Lines in the set's files before set_index: the index in a pass over all files of a file's first line.
        Counted once, only where a claim shares files by line or this reader does (a set with few files)."""
        if self._line_offsets is None:
            offsets = [0]
            for path in self.set_files:
                try:
                    with open(path, "rb") as f:
                        offsets.append(offsets[-1] + sum(1 for _ in f))
                except OSError as e:
                    raise DataError(f"set '{self.set_name}', file {path}: cannot read: {e}") from e
            self._line_offsets = offsets
        return self._line_offsets[set_index]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
