"""Stage 2: stage-1 data mixed with task data, each task record wrapped in a random prompt.

    torchrun --standalone --nproc_per_node=8 task_instruct_tuning_main.py [key=value ...]

Samples (bos/eos: the tokenizer's; "masked": out of the loss):
  zh, en       {"text"}                 bos + text + eos, a random prefix of it masked (as stage 1)
  translate    {"en_text", "zh_text"}   bos + source.rstrip() + "\\n" + prompt + "\\n" (masked), target + eos
  other sets   {"input", "output", "type"}: "pre" or "post" drawn at random, then a line of
               prompts/<type>.<pre|post>.prompt (right-stripped) if that file exists:
                 pre:       bos + prompt + "\\n" + input.rstrip() + "\\n\\n"   (masked)
                 post:      bos + input.rstrip() + "\\n" + prompt + "\\n"      (masked)
                 no prompt: bos + input + " "                                (masked)
               then output.rstrip() + eos (counted).
A record whose text, input or output is empty after stripping is skipped and counted.
Too long for max_seq_length (long_prompt="middle"): a task input loses tokens from its middle, keeping its head and
its tail (where the question is), so that the output fits whole; a translation source is never cut, the target loses
its end (counted in cut_answers). long_prompt="recipe": the end of the whole sample is cut, as in the recipe.
"""
import random
import sys

import task_instruct_tuning_args
from training.corpus import RecordError, draw_translation, load_translate_prompts, read_prompt_lines, text_field
from training.data_processor import BaseDataProcessor
from training.loop import run_stage
from training.samples import LM, Cut, Prompted

LM_SETS = ("zh", "en")


class DataProcessor(BaseDataProcessor):
    def prepare(self) -> None:
        if "translate" in self.split:
            self.translate_prompts = load_translate_prompts(self.root)
        self.task_prompts: dict[tuple[str, str], list[str]] = {}  # (type, "pre"/"post") -> lines; [] = no file

    def check_record(self, set_name: str, record: dict) -> None:
        super().check_record(set_name, record)
        if set_name not in LM_SETS and set_name != "translate":
            for position in ("pre", "post"):  # both, not just the one the throwaway draw picked
                self.prompts_for(record["type"], position)

    def build(self, set_name: str, record: dict, rng: random.Random):
        if set_name in LM_SETS:
            text = text_field(record, "text")
            return LM(text) if text.strip() else None
        if set_name == "translate":
            return self.translation(record, rng)
        return self.task(record, rng)

    def translation(self, record: dict, rng: random.Random):
        drawn = draw_translation(record, self.translate_prompts, rng)
        if drawn is None:
            return None
        source, prompt, target = drawn
        return Prompted((source.rstrip() + "\n" + prompt + "\n",), target)

    def task(self, record: dict, rng: random.Random):
        task_input, output = text_field(record, "input"), text_field(record, "output")
        position = rng.choice(("pre", "post"))
        prompts = self.prompts_for(text_field(record, "type"), position)
        prompt = rng.choice(prompts) if prompts else None
        if not task_input.strip() or not output.strip():
            return None
        if prompt is None:
            return Prompted((Cut(task_input), " "), output.rstrip())
        if position == "pre":
            return Prompted((prompt + "\n", Cut(task_input.rstrip()), "\n\n"), output.rstrip())
        return Prompted((Cut(task_input.rstrip()), "\n" + prompt + "\n"), output.rstrip())

    def prompts_for(self, task_type: str, position: str) -> list[str]:
        """Lines of prompts/<type>.<position>.prompt, right-stripped; [] when the type is empty or has no file."""
        key = (task_type, position)
        if key not in self.task_prompts:
            if not task_type:
                self.task_prompts[key] = []
            elif "/" in task_type or "\\" in task_type or task_type.startswith("."):
                raise RecordError(f"field 'type' must be a plain name (it names a prompt file), got {task_type!r}")
            else:
                path = self.root / "prompts" / f"{task_type}.{position}.prompt"
                self.task_prompts[key] = read_prompt_lines(path, str.rstrip) if path.exists() else []
        return self.task_prompts[key]


def main() -> None:
    run_stage(task_instruct_tuning_args, DataProcessor, sys.argv[1:])


if __name__ == "__main__":
    main()
