"""Stage 2: stage-1 data mixed with task data, each task record wrapped in a random prompt.

    torchrun --standalone --nproc_per_node=8 task_instruct_tuning_main.py [key=value ...]

Samples (bos/eos: the tokenizer's; "masked": out of the loss):
  zh, en       {"text"}                 bos + text + eos, a random prefix of it masked (as stage 1)
  translate    {"en_text", "zh_text"}   bos + source.rstrip() + "\\n" + prompt + "\\n" (masked), target + eos
  other sets   {"input", "output", "type"}: "pre" or "post" drawn at random, then a line of
               prompts/<type>.<pre|post>.prompt if that file exists:
                 pre:       bos + prompt + "\\n" + input.rstrip() + "\\n\\n"   (masked)
                 post:      bos + input.rstrip() + "\\n" + prompt + "\\n"      (masked)
                 no prompt: bos + input + " "                                (masked)
               then output.rstrip() + eos (counted).
Prompt files hold one prompt per line; each line is strip()ped, as the recipe does, and blank lines are left out.
A record with no "type" field, or an empty one, takes the no-prompt form (the recipe's zh-qa-long records have none):
counted as "untyped_records" and logged once per set with its file:line. A type with no prompt file takes it too:
reported once per type, naming the missing file -- at start-up for the types in the checked lines, else when first
met. A record whose text, input or output is empty after stripping is skipped and counted.
Too long for max_seq_length (long_prompt="middle"): a task input loses tokens from its middle, keeping its head and
its tail (where the question is), so that the output fits whole; a translation source is never cut, the target loses
its end (counted in cut_answers). long_prompt="recipe": the end of the whole sample is cut, as in the recipe.
"""
import logging
import random
import sys
from typing import Optional

import task_instruct_tuning_args
from training.corpus import RecordError, draw_translation, load_translate_prompts, read_prompt_lines, text_field
from training.loop import run_stage
from training.record_rules import RecordRules
from training.samples import LM, Cut, Prompted

logger = logging.getLogger(__name__)

LM_SETS = ("zh", "en")


class TaskInstructTuningRecords(RecordRules):
    def prepare(self) -> None:
        if "translate" in self.set_names:
            self.translate_prompts = load_translate_prompts(self.root)
        self.task_prompts: dict[str, dict[str, list[str]]] = {}  # type -> {"pre"/"post": lines}; [] = no file

    def build(self, set_name: str, record: dict, rng: random.Random):
        if set_name in LM_SETS:
            text = text_field(record, "text")
            return LM(text) if text.strip() else None
        if set_name == "translate":
            return self.translation(record, rng)
        return self.task(set_name, record, rng)

    def translation(self, record: dict, rng: random.Random):
        drawn = draw_translation(record, self.translate_prompts, rng)
        if drawn is None:
            return None
        source, prompt, target = drawn
        return Prompted((source.rstrip() + "\n" + prompt + "\n",), target)

    def task(self, set_name: str, record: dict, rng: random.Random):
        task_input, output = text_field(record, "input"), text_field(record, "output")
        task_type = self.task_type(set_name, record)
        position = rng.choice(("pre", "post"))
        prompts = self.prompts_for(task_type, position)
        prompt = rng.choice(prompts) if prompts else None
        if not task_input.strip() or not output.strip():
            return None
        if not task_type:
            self.note(set_name, "untyped_records", "no 'type' (or an empty one): no prompt (input + ' ')")
        if prompt is None:
            return Prompted((Cut(task_input), " "), output.rstrip())
        if position == "pre":
            return Prompted((prompt + "\n", Cut(task_input.rstrip()), "\n\n"), output.rstrip())
        return Prompted((Cut(task_input.rstrip()), "\n" + prompt + "\n"), output.rstrip())

    def task_type(self, set_name: str, record: dict) -> Optional[str]:
        """The record's prompt type, "" for none (no "type" field, or an empty one); None in a set without types."""
        if set_name in LM_SETS or set_name == "translate":
            return None
        return text_field(record, "type") if "type" in record else ""

    def prompts_for(self, task_type: str, position: str) -> list[str]:
        """Lines of prompts/<type>.<position>.prompt; [] when the type is empty or has no such file (reported once
        per type, when the type is first met)."""
        if task_type not in self.task_prompts:
            self.task_prompts[task_type] = self._load_type_prompts(task_type)
        return self.task_prompts[task_type][position]

    def _load_type_prompts(self, task_type: str) -> dict[str, list[str]]:
        if not task_type:
            return {"pre": [], "post": []}
        if "/" in task_type or "\\" in task_type or task_type.startswith("."):
            raise RecordError(f"field 'type' must be a plain name (it names a prompt file), got {task_type!r}")
        paths = {position: self.root / "prompts" / f"{task_type}.{position}.prompt" for position in ("pre", "post")}
        missing = [str(path) for path in paths.values() if not path.exists()]
        if missing:
            logger.warning("task type %r has no prompt file %s: its records take the no-prompt form (input + ' ')%s",
                           task_type, " nor ".join(missing), "" if len(missing) == 2 else
                           " when that position is drawn")
        return {position: read_prompt_lines(path) if path.exists() else [] for position, path in paths.items()}


def main() -> None:
    run_stage(task_instruct_tuning_args, TaskInstructTuningRecords, sys.argv[1:])


if __name__ == "__main__":
    main()
