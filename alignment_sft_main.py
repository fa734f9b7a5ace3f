"""Stage 3: instruction SFT in "Human: ... Assistant: ..." form.

    torchrun --standalone --nproc_per_node=2 alignment_sft_main.py [key=value ...]

Every set carries {"instruction", "input", "output"}, each field stripped. The sample is
    bos + "Human: " [+ instruction + "\\n"] [+ input + "\\n"] + "Assistant: "   (masked)
    output + eos                                                            (counted)
where a bracketed part is left out when that field is empty. A record with neither instruction nor input is bad
input; one with an empty output is skipped (counted). A too-long sample (long_prompt="middle") loses tokens from the
middle of its input first, then of its instruction, each keeping its head and tail, so that the answer survives
where it fits; long_prompt="recipe" cuts the end of the whole sample, as in the recipe.
"""
import random
import sys

import alignment_sft_args
from training.corpus import RecordError, text_field
from training.data_processor import BaseDataProcessor
from training.loop import run_stage
from training.samples import Cut, Prompted


class DataProcessor(BaseDataProcessor):
    def build(self, set_name: str, record: dict, rng: random.Random):
        instruction, task_input, output = (text_field(record, name).strip()
                                           for name in ("instruction", "input", "output"))
        if not instruction and not task_input:
            raise RecordError("neither 'instruction' nor 'input' has text")
        if not output:
            return None
        prefix = ["Human: "]
        if instruction:
            prefix += [Cut(instruction), "\n"]
        if task_input:
            prefix += [Cut(task_input), "\n"]
        prefix.append("Assistant: ")
        return Prompted(tuple(prefix), output)


def main() -> None:
    run_stage(alignment_sft_args, DataProcessor, sys.argv[1:])


if __name__ == "__main__":
    main()
