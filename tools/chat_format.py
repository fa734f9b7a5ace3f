"""The conversation format the SFT stage trains on, and fitting a multi-turn history into the model's context.

One turn's prompt is built by alignment_sft_main.py's own DataProcessor.build() (an instruction, no input), so
the chat prompt is the SFT prefix by construction: "Human: " + message + "\n" + "Assistant: ". The SFT stage
trains single turns; earlier turns go before the new one in the same form, each answer followed by "\n":
    Human: q1\nAssistant: a1\nHuman: q2\nAssistant: 
"""
from __future__ import annotations

import functools
import random

from tools.stage_schema import data_processor_class
from training.samples import prefix_text

STOP_TEXT = "\nHuman:"  # a model that goes on to write the next question itself has finished its answer


class MessageTooLong(ValueError):
    """The new message alone leaves no room in the context."""


@functools.lru_cache(maxsize=1)
def _sft_stage():
    return data_processor_class("alignment_sft").for_checking(".", ["chat"])


def turn_prompt(message: str) -> str:
    """The SFT prefix text for one question (what the stage masks before the answer)."""
    spec = _sft_stage().build("chat", {"instruction": message, "input": "", "output": "-"}, random.Random(0))
    return prefix_text(spec.prefix)


def render(history: list[tuple[str, str]], message: str) -> str:
    """Past (question, answer) turns, then the new question, as one prompt text."""
    return "".join(f"{turn_prompt(q)}{a.strip()}\n" for q, a in history) + turn_prompt(message)


def prompt_budget(max_sequence_length: int, max_new_tokens: int) -> int:
    """Prompt tokens allowed: the context minus room for the answer, but never less than half the context."""
    return max(max_sequence_length - max_new_tokens, max_sequence_length // 2)


def fit_prompt(tokenizer, history: list[tuple[str, str]], message: str, budget: int) -> tuple[list[int], int]:
    """(bos + prompt ids, number of oldest turns dropped): the most recent whole turns that fit in `budget`
    tokens with the new message. Turns are dropped oldest first and never cut in the middle."""
    for dropped in range(len(history) + 1):
        ids = tokenizer.encode(render(history[dropped:], message), bos=True)
        if len(ids) <= budget:
            return ids, dropped
    raise MessageTooLong(f"the message takes {len(ids)} tokens with its format; the prompt may take {budget} "
                         f"(model context minus room for the answer)")
