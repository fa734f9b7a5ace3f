"""A stage's record rules: how one JSONL record of a set becomes a sample spec. Each *_main.py writes its own
(RecordRules.build, and prepare where it needs prompt files); the data stream (training/data_stream.py), held-out
evaluation and the corpus tools all use them, so a record means the same everywhere. Also the start-up check of
each file's first records by those rules.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Callable, Iterable, Optional

from training.corpus import DataError, Location, RecordError, parse_record, read_first_lines
from training.samples import Spec

logger = logging.getLogger(__name__)

CHECK_LINES = 16  # lines checked at start-up at the head of every file

Note = Callable[[str, str, str], None]  # (set, counter, why): see RecordRules.note


class RecordRules:
    """One stage's rules for the sets `set_names` of the corpus at `root` (prompt files are read from there).
    Construction runs prepare(); nothing is read from the sets themselves."""

    def __init__(self, root: str | Path, set_names: Iterable[str], note: Optional[Note] = None):
        self.root = Path(root)
        self.set_names = tuple(set_names)
        self._note = note
        self.prepare()

    def prepare(self) -> None:
        """Load what records will need (prompt files), raising DataError."""

    def build(self, set_name: str, record: dict, rng: random.Random) -> Optional[Spec]:
        """One record -> LM(text), Prompted(prefix, answer) or Chat (stage 3); None for a text empty after stripping.
        Raise RecordError for a bad record (the caller adds set, file and line)."""
        raise NotImplementedError

    def task_type(self, set_name: str, record: dict) -> Optional[str]:
        """The record's prompt type ("" for none: the no-prompt form); None in a set or stage without typed prompts.
        Stage 2 overrides it; tools report the types a corpus uses (tools/stage_schema.py)."""
        return None

    def prompts_for(self, task_type: str, position: str) -> list[str]:
        """The prompt lines of `task_type` at `position` ("pre" or "post"); [] where there are none (no such file,
        or a stage without typed prompts)."""
        return []

    def check_record(self, set_name: str, record: dict) -> None:
        """Start-up check of one record: builds it with a throwaway RNG. Stages extend it (prompt files)."""
        self.build(set_name, record, random.Random(0))

    def note(self, set_name: str, counter: str, why: str) -> None:
        """For build(): this record takes a fallback form (say, no 'type': no prompt). The stream that passed a
        `note` counts it in `counter` and logs the first one of each set; rules built for tools or evaluation, and
        the start-up checks, neither count nor log."""
        if self._note is not None:
            self._note(set_name, counter, why)


def check_first_lines(rules: RecordRules, set_name: str, files: list[Path], skip_bad_records: bool) -> None:
    """The first CHECK_LINES records of every file through the rules: a bad one stops the run now (DataError with
    its file and line) unless skip_bad_records; a set whose files are all empty too."""
    lines = 0
    for path in files:
        file_lines = 0
        for number, raw in read_first_lines(path, CHECK_LINES, set_name):
            file_lines += 1
            if not raw.strip():
                continue
            try:
                rules.check_record(set_name, parse_record(raw))
            except RecordError as e:
                if not skip_bad_records:
                    raise DataError(f"{Location(set_name, path, number)}: {e}") from None
                logger.warning("bad record at %s: %s (skip_bad_records=True: it will be skipped)",
                               Location(set_name, path, number), e)
            except DataError:
                raise
            except Exception as e:  # a stage bug: still say which record triggered it
                raise DataError(f"{Location(set_name, path, number)}: {type(e).__name__}: {e}") from e
        if file_lines == 0:
            logger.warning("set '%s': file %s is empty", set_name, path)
        lines += file_lines
    if lines == 0:
        raise DataError(f"set '{set_name}': every file is empty ({files[0].parent})")
