"""The stages' record schemas, as the stages themselves check them: the one place tools reach into *_main.py.

The schema of a record (which fields, which types, what counts as empty, which prompt files a task type needs)
lives only in each stage script's RecordRules (build() / check_record()); training/ holds the shared field
readers (parse_record, text_field) but not the per-stage rules. So the tools load the stage's RecordRules
class through importlib, by stage name, here and nowhere else, and run its own checks on a record -- a record
prepare_corpus accepts is one the stage accepts.

A RecordChecker holds the stage's record rules and prompt files, without a data stream. It never reads set files or
builds batches.
"""
from __future__ import annotations

import importlib
import random
import types
from pathlib import Path
from typing import Optional

from training.corpus import DataError, RecordError
from training.record_rules import RecordRules

# stage -> the RecordRules class of <stage>_main.py, the one its main() hands to run_stage
STAGE_RULES = {"pretrain": "PretrainRecords", "task_instruct_tuning": "TaskInstructTuningRecords",
               "alignment_sft": "AlignmentSftRecords"}
STAGES = tuple(STAGE_RULES)

# --kind -> (stage whose RecordRules define that schema, a set name that stage reads with it). The stage, not
# this table, decides what a set name means; the names below are ones every stage reads the way the kind says.
KINDS = {
    "lm": ("pretrain", "zh"),  # {"text"}
    "translate": ("pretrain", "translate"),  # {"en_text", "zh_text"} + translate/<direction>.prompt
    "task": ("task_instruct_tuning", "task"),  # {"input", "output", "type"} + prompts/<type>.<pre|post>.prompt
    "sft": ("alignment_sft", "sft"),  # {"instruction", "input", "output"} or {"messages"}
}


def args_module(stage: str) -> types.ModuleType:
    """<stage>_args.py (recipe constants)."""
    _check_stage(stage)
    return importlib.import_module(f"{stage}_args")


def stage_rules(stage: str) -> type[RecordRules]:
    """The RecordRules class of <stage>_main.py."""
    _check_stage(stage)
    return getattr(importlib.import_module(f"{stage}_main"), STAGE_RULES[stage])


def stage_for_set(set_name: str) -> Optional[str]:
    """The first stage (in recipe order) whose args file mixes `set_name`, or None."""
    for stage in STAGES:
        split = getattr(args_module(stage), "pretrain_data_split", {})
        if set_name in split:
            return stage
    return None


class RecordChecker:
    """Check records of one set the way `stage`'s data stream checks them at start-up.

    check_record(record) -> "ok" | "empty" (the stage would skip it: a text empty after stripping) and raises
    RecordError (bad record: the stage stops, or skips it with skip_bad_records). Prompt files come from `root`
    (the corpus root dir); a stage that needs one that is missing raises DataError at construction.
    """

    def __init__(self, stage: str, set_name: str, root: str | Path):
        self.stage, self.set_name = stage, set_name
        self.rules = stage_rules(stage)(root, [set_name])
        self._rng = random.Random(0)

    def check_record(self, record: dict) -> str:
        self.rules.check_record(self.set_name, record)
        return "empty" if self.rules.build(self.set_name, record, self._rng) is None else "ok"

    def task_type(self, record: dict) -> Optional[str]:
        """A stage-2 task record's prompt type ("" for none: the no-prompt form); None for sets and stages without
        typed prompts, and for a bad type (check_record reports that)."""
        try:
            return self.rules.task_type(self.set_name, record)
        except RecordError:
            return None

    def prompt_types_missing(self, task_type: str) -> list[str]:
        """For a stage-2 task record's type (one task_type() gave; it gives None where a stage or set has no typed
        prompts): the positions ("pre", "post") whose prompt file does not exist."""
        if not isinstance(task_type, str):
            return []
        try:
            return [position for position in ("pre", "post") if not self.rules.prompts_for(task_type, position)]
        except (RecordError, DataError):
            return []  # a bad type name is reported by check_record() itself


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
