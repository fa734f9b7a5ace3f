"""Stage 3: instruction SFT in "Human: ... Assistant: ..." form (or the tokenizer's chat template).

    torchrun --standalone --nproc_per_node=2 alignment_sft_main.py [key=value ...]

A record takes one of two shapes:
  {"instruction", "input", "output"}: the recipe's single turn, instruction and input stripped, the output's
      indentation kept (training/conversation.py answer_text); a missing "input" is empty;
  {"messages": [{"role": "system" | "user" | "assistant", "content"}, ...]}: an optional system turn first, then
      user and assistant turns alternating, ending with an assistant turn.
In the recipe's format (chat_format="billa") a single turn is the sample
    bos + "Human: " [+ instruction + "\\n"] [+ input + "\\n"] + "Assistant: "   (masked)
    output + eos                                                            (counted)
where a bracketed part is left out when that field is empty. A conversation repeats the turn form, each answer
followed by eos and the next "Human: " right after it (training/conversation.py has the exact layout, and the
"template" format). Loss falls on every answer and its end token, and on nothing else.

A record with neither instruction nor input is bad input, as is a badly shaped conversation; one with an empty
(last) answer is skipped (counted). A too-long single turn (long_prompt="middle") loses tokens from the middle of its
input first, then of its instruction, each keeping its head and tail, so that the answer survives where it fits;
long_prompt="recipe" cuts the end of the whole sample, as in the recipe. A too-long conversation loses its earliest
whole turns, keeping the system turn and the last turn; one that does not fit even so is skipped (counted).
"""
import random
import sys

import alignment_sft_args
from training.conversation import Chat, answer_text, chat_from_messages
from training.corpus import RecordError, text_field
from training.loop import run_stage
from training.record_rules import RecordRules


class AlignmentSftRecords(RecordRules):
    def build(self, set_name: str, record: dict, rng: random.Random):
        if "messages" in record:
            return chat_from_messages(record)
        instruction, output = text_field(record, "instruction").strip(), answer_text(text_field(record, "output"))
        task_input = text_field(record, "input").strip() if "input" in record else ""  # many public sets omit it
        if not instruction and not task_input:
            raise RecordError("neither 'instruction' nor 'input' has text")
        if not output:
            return None
        return Chat("", (((tuple(part for part in (instruction, task_input) if part)), output),))


def main() -> None:
    run_stage(alignment_sft_args, AlignmentSftRecords, sys.argv[1:])


if __name__ == "__main__":
    main()
