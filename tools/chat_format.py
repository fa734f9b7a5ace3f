"""The conversation tools.chat holds, in the format the model was trained on, and fitting it into the context.

A conversation is read by the SFT stage's own record rules (build(), a {"messages"} record) and rendered by the
stage's ChatRenderer (training/conversation.py) in the chat format stored with the model dir, so the prompt is
exactly what training put before an answer, earlier answers' end tokens included. In the recipe's format:
    bos Human: q1\\nAssistant: a1<eos>Human: q2\\nAssistant:
"""
from __future__ import annotations

import functools
import random

from tools.stage_schema import stage_rules
from training.conversation import BILLA_ANSWER_SPACE, Chat, ChatRenderer, billa_question
from training.samples import prefix_text

STOP_TEXT = "\nHuman:"  # billa: a model that goes on to write the next question itself has finished its answer


class MessageTooLong(ValueError):
    """The new message alone leaves no room in the context."""


@functools.lru_cache(maxsize=1)
def _sft_stage():
    return stage_rules("alignment_sft")(".", ["chat"])


def sft_record_chat(record: dict) -> Chat | None:
    """A stage-3 record ({"messages"} or {"instruction", "input", "output"}) as the stage reads it: a Chat, None
    when its answer is empty; RecordError when it is bad."""
    return _sft_stage().build("chat", record, random.Random(0))


def conversation(history: list[tuple[str, str]], message: str, system: str = "") -> Chat:
    """Past (question, answer) turns and the new question as the stage reads them (texts stripped), the new
    question's answer left open. A past turn whose answer is empty (the model ended at once) is left out: training
    has no such turn to render."""
    messages = [{"role": "system", "content": system}] if system.strip() else []
    for question, answer in [*[(q, a) for q, a in history if a.strip()], (message, "-")]:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    chat = sft_record_chat({"messages": messages})
    return Chat(chat.system, chat.turns[:-1] + ((chat.turns[-1][0], None),))


def turn_prompt(message: str) -> str:
    """The recipe's masked prefix text for one question."""
    return prefix_text(billa_question((message.strip(),)))


def reply_answer(text: str, chat_format: str) -> str:
    """A generated reply as the conversation holds its answer: billa's answers begin with the space after
    "Assistant:" (training.conversation.BILLA_ANSWER_SPACE), which the format writes itself (a byte-level tokenizer
    decodes the generated " Re" with it; SentencePiece drops it at the start of a text)."""
    if chat_format == "billa" and text.startswith(BILLA_ANSWER_SPACE):
        return text[len(BILLA_ANSWER_SPACE):]
    return text


def stop_texts(chat_format: str) -> tuple[str, ...]:
    """Texts that end an answer besides the end token."""
    return (STOP_TEXT,) if chat_format == "billa" else ()


def prompt_budget(max_sequence_length: int, max_new_tokens: int) -> int:
    """Prompt tokens allowed: the context minus room for the answer, but never less than half the context."""
    return max(max_sequence_length - max_new_tokens, max_sequence_length // 2)


def fit_prompt(renderer: ChatRenderer, history: list[tuple[str, str]], message: str, budget: int,
               system: str = "") -> tuple[list[int], int]:
    """(prompt ids, number of oldest turns dropped): the most recent whole turns that fit in `budget` tokens with
    the new message, the system text kept; the same rule as training's (ChatRenderer.fit)."""
    fitted = renderer.fit(conversation(history, message, system), budget)
    if fitted is None:
        ids, _ = renderer.encode(conversation([], message, system))
        raise MessageTooLong(f"the message takes {len(ids)} tokens with its format; the prompt may take {budget} "
                             f"(model context minus room for the answer)")
    ids, _, dropped = fitted
    return ids, dropped
