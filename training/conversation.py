"""Stage 3's conversations: one record shape for single- and multi-turn data, rendered in the run's chat format
into token ids and the spans the loss counts. The SFT stream and tools.chat both go through ChatRenderer, so a chat
prompt is exactly what training saw before an answer, end tokens included.

Formats (setting chat_format):
  "billa"     the recipe's, as BILLA_CHAT_TEMPLATE writes it (llama/chat_template.py). Each turn's question is
              masked, each answer counted with the end token (tokenizer.eos_id) that follows it, and the next
              question follows the end token directly:
                  bos [system "\\n"] "Human: " q1 "\\n" "Assistant:" | " " a1 eos |
                  "Human: " q2 "\\n" "Assistant:" | " " a2 eos |
              (| around what is counted; no "\\n" after an end token). The space after "Assistant:" is counted
              with its answer, so that the generation prompt ("...Assistant:") ends where the masked part does (see
              billa_question). A system turn is its text and one "\\n".
  "template"  the tokenizer's chat template, rendered as transformers' apply_chat_template renders it
              (llama/chat_template.py). Turn boundaries come from rendering the growing conversation: the render of
              the messages before an answer with add_generation_prompt=True ends where the answer starts, the render
              that includes the answer ends after it. Both must be string prefixes of the whole render (a template
              that rewrites earlier turns, as Qwen3's strips earlier thinking, cannot be trained turn by turn: a
              DataError). The counted span is the answer up to and including the tokenizer's eos_token text where
              the template writes one (Qwen's "<|im_end|>"); what follows it up to the next turn ("\\n") is masked.
In both, the conversation is rendered to ONE text and tokenized as the exported model's apply_chat_template
tokenizes it (ChatRenderer.tokenize: the bos and end tokens' texts become their ids, each stretch between them is
encoded whole), and the counted token spans come from the tokenizer's offsets (token_ends): a token that straddles
the start of an answer (byte-level BPE's " Re" of "Assistant: Reading") is counted. So the ids training uses are
the ids a user's apply_chat_template gives (tests/test_chat_fidelity.py, over every bundled stage-3 record).
Loss falls on every answer and its end token, and on nothing else.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple, Optional

import jinja2
import numpy as np

from llama.chat_template import CHAT_FORMATS, render_chat
from llama.tokenizer import Tokenizer
from training.corpus import DataError, RecordError, text_field

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Chat:
    """A conversation spec: an optional system text, then (question parts, answer) turns. A question's parts are
    non-empty stripped texts (the recipe's instruction and input; one part for a message), joined by "\\n" where a
    template needs one text; an answer is answer_text()'s (its indentation kept). The last answer is None in a
    prompt to generate from."""

    system: str
    turns: tuple[tuple[tuple[str, ...], Optional[str]], ...]

    def messages(self) -> list[dict]:
        """The transformers form: [{"role", "content"}, ...]."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for parts, answer in self.turns:
            out.append({"role": "user", "content": "\n".join(parts)})
            if answer is not None:
                out.append({"role": "assistant", "content": answer})
        return out

    def without_first_turns(self, count: int) -> "Chat":
        return Chat(self.system, self.turns[count:])


def chat_from_messages(record: dict) -> Optional[Chat]:
    """A {"messages": [...]} record -> Chat; None when the last answer is empty after stripping (skipped and
    counted, as the recipe's empty output). RecordError says what is wrong with the shape."""
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise RecordError("field 'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    texts = []  # (index in messages, role, stripped content)
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RecordError(f"messages[{index}] must be an object {{\"role\", \"content\"}}, "
                              f"got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise RecordError(f"messages[{index}]: role {role!r} is not one of {ROLES}")
        try:
            content = text_field(message, "content")
            texts.append((index, role, answer_text(content) if role == "assistant" else content.strip()))
        except RecordError as e:
            raise RecordError(f"messages[{index}]: {e}") from None
    system = texts.pop(0)[2] if texts[0][1] == "system" else ""
    if not texts:
        raise RecordError("'messages' holds only a system turn: no user and assistant turn")
    for position, (index, role, _) in enumerate(texts):
        expected = "user" if position % 2 == 0 else "assistant"
        if role != expected:
            raise RecordError(f"messages[{index}]: role {role!r} where {expected!r} was expected (a system turn "
                              f"only first, then user and assistant turns alternating)")
    if texts[-1][1] != "assistant":
        raise RecordError(f"messages[{texts[-1][0]}]: the last message must be an assistant turn (the answer to "
                          f"learn), got {texts[-1][1]!r}")
    turns = []
    for (q_index, _, question), (a_index, _, answer) in zip(texts[::2], texts[1::2]):
        if not question:
            raise RecordError(f"messages[{q_index}]: the user turn has no text")
        if not answer and a_index != texts[-1][0]:
            raise RecordError(f"messages[{a_index}]: the assistant turn has no text (only the last one may be "
                              f"empty: such a record is skipped as empty)")
        turns.append(((question,), answer))
    if not turns[-1][1]:
        return None
    return Chat(system, tuple(turns))


class Rendered(NamedTuple):
    text: str  # the whole conversation as its chat template renders it, bos and end tokens written as their text
    counted: list[tuple[int, int]]  # character spans [start, stop) of each answer with its end token


def answer_text(text: str) -> str:
    """An answer as both chat formats hold it: trailing whitespace removed (the end token follows the text), and
    leading line breaks (nothing may come between "Assistant: " and the answer's first line); the first line's
    indentation is kept, so code answers train as written. BILLA_CHAT_TEMPLATE writes the same expression."""
    return text.rstrip().lstrip("\r\n")


BILLA_ANSWER_SPACE = " "  # between "Assistant:" and an answer: the answer's, counted with it (see billa_question)


def billa_question(parts: tuple) -> tuple:
    """The recipe's masked prefix of one question: "Human: " + each part and "\\n" + "Assistant:". Parts may be
    training.samples.Cut (stage 3's long-input cut) or str. The recipe's "Assistant: " space goes with the answer
    (BILLA_ANSWER_SPACE + answer): tokenizers join a space to the word after it (" Re", "\u2581Paris"), so a prompt
    that ended with the space would end with a token training never put there; "Assistant:" is where both the
    masked part and the generation prompt end."""
    prefix = ["Human: "]
    for part in parts:
        prefix += [part, "\n"]
    prefix.append("Assistant:")
    return tuple(prefix)


class ChatRenderer:
    """Chats -> (ids, counted spans) in one chat format, for a tokenizer."""

    def __init__(self, tokenizer: Tokenizer, chat_format: str = "billa"):
        if chat_format not in CHAT_FORMATS:
            raise DataError(f"setting 'chat_format' must be one of {CHAT_FORMATS}, got {chat_format!r}")
        self.tokenizer, self.chat_format = tokenizer, chat_format
        # The special tokens a render writes as text, and their ids: transformers splits them out of a text before
        # it tokenizes the rest (a tokenizer's bos/eos are special tokens of every exported tokenizer).
        special = {text: tokenizer.token_to_id(text) for text in (tokenizer.bos_token, tokenizer.eos_token) if text}
        self._special = {text: token for text, token in special.items() if token is not None}
        self._special_pattern = re.compile("|".join(map(re.escape, sorted(self._special, key=len, reverse=True))))
        # BILLA_CHAT_TEMPLATE starts with {{ bos_token }}: whatever bos the tokenizer names, added by it or not.
        self.bos_text = tokenizer.bos_token if tokenizer.bos_token in self._special else ""
        self.template = None
        if chat_format == "template":
            self.template = tokenizer.chat_template
            if not self.template:
                raise DataError(f"setting 'chat_format' = 'template': the tokenizer {tokenizer.model_path} has no chat "
                                f"template ('chat_template' in its tokenizer_config.json); use chat_format='billa' or "
                                f"a tokenizer that has one")
            try:
                self.render(Chat("s", ((("u1",), "a1"), (("u2",), "a2"))))  # a template that cannot work: now
            except DataError as e:
                raise DataError(f"setting 'chat_format' = 'template', tokenizer {tokenizer.model_path}: {e}") from None

    # ---------------------------------------------------------------- text

    def render(self, chat: Chat) -> Rendered:
        """The chat as one text with its counted spans (a last answer None: ending with the prompt for the next
        answer)."""
        if self.chat_format == "billa":
            return self._billa(chat)
        return self._template(chat)

    def _billa(self, chat: Chat) -> Rendered:
        text = self.bos_text + (f"{chat.system}\n" if chat.system else "")
        counted = []
        for parts, answer in chat.turns:
            text += "".join(billa_question(parts))  # str parts: plain text
            if answer is not None:
                start = len(text)
                text += BILLA_ANSWER_SPACE + answer + self.tokenizer.eos_token
                counted.append((start, len(text)))
        return Rendered(text, counted)

    def text(self, chat: Chat) -> str:
        """The rendered conversation as one string, end tokens written as their text (billa: what
        BILLA_CHAT_TEMPLATE renders; template: what apply_chat_template renders)."""
        return self.render(chat).text

    def _render_template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        tok = self.tokenizer
        try:
            return render_chat(self.template, messages, tok.bos_token, tok.eos_token, add_generation_prompt)
        except jinja2.TemplateError as e:
            raise DataError(f"the chat template failed: {type(e).__name__}: {e}") from None

    def _template(self, chat: Chat) -> Rendered:
        messages = chat.messages()
        whole = self._render_template(messages, add_generation_prompt=chat.turns[-1][1] is None)
        eos_text = self.tokenizer.eos_token
        counted = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render_template(messages[:index], add_generation_prompt=True)
            after = self._render_template(messages[:index + 1], add_generation_prompt=False)
            if not (whole.startswith(before) and whole.startswith(after) and len(after) > len(before)):
                raise DataError(
                    f"the chat template does not render turn by turn: the conversation up to message {index} "
                    f"({'with' if whole.startswith(before) else 'WITHOUT'} its generation prompt as a prefix of the "
                    f"whole render) does not lead into the answer's text; such a template (one that rewrites earlier "
                    f"turns) cannot be trained on with chat_format='template'")
            end = len(after)
            if eos_text:
                found = whole.rfind(eos_text, len(before), len(after))
                if found >= 0:
                    end = found + len(eos_text)
            counted.append((len(before), end))
        return Rendered(whole, counted)

    # ---------------------------------------------------------------- ids

    def tokenize(self, texts: list[str]) -> list[tuple[list[int], np.ndarray]]:
        """(ids, where each token ends in the text as a character offset) of each rendered text, as
        apply_chat_template(tokenize=True) encodes the render: bos and end tokens written as text become their ids,
        and each stretch of text between them is encoded whole (all stretches of all texts in one batch call)."""
        split = [self._stretches(text) for text in texts]
        plain = [stretch for stretches in split for _, stretch, token in stretches if token is None]
        encoded = iter(self.tokenizer.encode_batch(plain) if plain else [])
        out = []
        for stretches in split:
            ids, ends = [], []
            for start, stretch, token in stretches:
                if token is not None:
                    ids.append(token)
                    ends.append(np.array([start + len(stretch)], dtype=np.int64))
                else:
                    stretch_ids = next(encoded)
                    ids += stretch_ids
                    ends.append(start + self.tokenizer.token_ends(stretch, stretch_ids))
            out.append((ids, np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)))
        return out

    def _stretches(self, text: str) -> list[tuple[int, str, Optional[int]]]:
        """(start, text, special token id or None) for each special token and each non-empty stretch between."""
        out, position = [], 0
        for match in (self._special_pattern.finditer(text) if self._special else ()):
            if match.start() > position:
                out.append((position, text[position:match.start()], None))
            out.append((match.start(), match.group(), self._special[match.group()]))
            position = match.end()
        if position < len(text):
            out.append((position, text[position:], None))
        return out

    def encode(self, chat: Chat) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, counted token spans [start, stop)) of the chat."""
        rendered = self.render(chat)
        (ids, ends), = self.tokenize([rendered.text])
        return ids, token_spans(ends, rendered.counted)

    def fit(self, chat: Chat, max_length: int, encoded: tuple[list[int], list[tuple[int, int]]] | None = None
            ) -> Optional[tuple[list[int], list[tuple[int, int]], int]]:
        """(ids, spans, turns dropped) of the chat in at most max_length tokens: the earliest whole turns (question
        and answer) dropped until it fits, the system turn and the last turn always kept; None when even those do
        not fit. `encoded`: the whole chat's encode(), when the caller already has it (one batch call)."""
        ids, spans = encoded if encoded is not None else self.encode(chat)
        if len(ids) <= max_length:
            return ids, spans, 0
        # Fewest turns whose dropping could be enough (what follows answer k-1 must fit): a lower bound, as the
        # kept part also holds bos and the system text. Then render with the turns gone until it fits.
        dropped = next((k for k in range(1, len(chat.turns)) if len(ids) - spans[k - 1][1] <= max_length),
                       len(chat.turns))
        while dropped < len(chat.turns):
            ids, spans = self.encode(chat.without_first_turns(dropped))
            if len(ids) <= max_length:
                return ids, spans, dropped
            dropped += 1
        return None


def first_token_at(ends: np.ndarray, position: int) -> int:
    """The index of the first token holding a character at or after `position`, from the tokens' ends (token_ends):
    one that ends after it (a token that begins before, as " Re" after "Assistant:", holds the answer's "R"), or a
    byte token of the character there (token_ends puts its end where its character starts: it spans nothing)."""
    first = int(np.searchsorted(ends, position, side="right"))
    while first > 0 and ends[first - 1] == position and (ends[first - 2] if first > 1 else 0) == position:
        first -= 1
    return first


def token_spans(ends: np.ndarray, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Character spans [start, stop) -> the token spans [first, last) of every token holding a character inside."""
    starts = np.concatenate(([0], ends[:-1]))
    return [(first_token_at(ends, start), int(np.searchsorted(starts, stop, side="left"))) for start, stop in spans]
