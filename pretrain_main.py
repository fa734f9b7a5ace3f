"""Stage 1: continued LM pretraining on zh/en text plus translation pairs.

    torchrun --standalone --nproc_per_node=8 pretrain_main.py [key=value ...]

Samples (bos/eos: the tokenizer's; "masked": out of the loss):
  zh, en (and any other set)  {"text"}                bos + text + eos, a random prefix of it masked
  translate                   {"en_text", "zh_text"}  bos + source + "\\n" + prompt (masked), target + eos (counted)
The direction (en->zh or zh->en) and a prompt line of translate/<direction>.prompt are drawn at random. The source
is never cut: a pair too long for max_seq_length loses the end of its target (counted in cut_answers), as in the recipe.
"""
import random
import sys

import pretrain_args
from training.corpus import draw_translation, load_translate_prompts, text_field
from training.loop import run_stage
from training.record_rules import RecordRules
from training.samples import LM, Prompted


class PretrainRecords(RecordRules):
    def prepare(self) -> None:
        if "translate" in self.set_names:
            self.translate_prompts = load_translate_prompts(self.root)

    def build(self, set_name: str, record: dict, rng: random.Random):
        if set_name == "translate":
            return self.translation(record, rng)
        text = text_field(record, "text")
        return LM(text) if text.strip() else None

    def translation(self, record: dict, rng: random.Random):
        drawn = draw_translation(record, self.translate_prompts, rng)
        if drawn is None:
            return None
        source, prompt, target = drawn
        return Prompted((source + "\n" + prompt,), target)


def main() -> None:
    run_stage(pretrain_args, PretrainRecords, sys.argv[1:])


if __name__ == "__main__":
    main()
