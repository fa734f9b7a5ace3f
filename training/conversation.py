"""Stage 3's conversations: one record shape for single- and multi-turn data, rendered in the run's chat format
into token ids and the spans the loss counts. The SFT stream and tools.chat both go through ChatRenderer, so a chat
prompt is exactly what training saw before an answer, end tokens included.

Formats (setting chat_format):
  "billa"     the recipe's. Each turn's question is one masked piece, each answer one counted piece followed by the
              end token (tokenizer.eos_id), and the next question follows the end token directly:
                  bos [system "\\n"] "Human: " q1 "\\n" "Assistant: " | a1 eos |
                  "Human: " q2 "\\n" "Assistant: " | a2 eos
              (| separates pieces; no "\\n" after an end token). Pieces are tokenized one by one, as the recipe
              tokenizes its prefix and answer apart, so a single-turn conversation gets the recipe's very ids. A
              system turn is its text and one "\\n", in the first piece.
  "template"  the tokenizer's chat template, rendered as transformers' apply_chat_template renders it
              (llama/chat_template.py). Turn boundaries come from rendering the growing conversation: the render of
              the messages before an answer with add_generation_prompt=True ends where the answer starts, the render
              that includes the answer ends after it. Both must be string prefixes of the whole render (a template
              that rewrites earlier turns, as Qwen3's strips earlier thinking, cannot be trained turn by turn: a
              DataError). The counted piece is the answer up to and including the tokenizer's eos_token text where
              the template writes one (Qwen's "<|im_end|>"); what follows it up to the next turn ("\\n") is masked.
              A render that starts with the bos_token text gets bos_id instead (a SentencePiece tokenizer does not
              read "<s>" as text). Pieces are tokenized one by one here too; for byte-level BPE templates (Llama 3,
              Qwen, SmolLM2) the piece boundaries fall between pre-tokens, so the ids are those of the whole render
              (tests/test_data_messages.py checks them against transformers' own).
Loss falls on every answer and its end token, and on nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import jinja2

from llama.chat_template import CHAT_FORMATS, render_chat
from llama.tokenizer import Tokenizer
from training.corpus import DataError, RecordError, text_field

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Chat:
    """A conversation spec: an optional system text, then (question parts, answer) turns. A question's parts are
    non-empty stripped texts (the recipe's instruction and input; one part for a message), joined by "\\n" where a
    template needs one text. The last answer is None in a prompt to generate from."""

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
            texts.append((index, role, text_field(message, "content").strip()))
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


class Piece(NamedTuple):
    text: str
    counted: bool  # an answer: in the loss
    end: bool = False  # the end token id follows the text's ids (billa)


class Rendered(NamedTuple):
    bos: bool  # bos_id goes first
    pieces: list[Piece]


def billa_question(parts: tuple) -> tuple:
    """The recipe's masked prefix of one question: "Human: " + each part and "\\n" + "Assistant: ". Parts may be
    training.samples.Cut (stage 3's long-input cut) or str."""
    prefix = ["Human: "]
    for part in parts:
        prefix += [part, "\n"]
    prefix.append("Assistant: ")
    return tuple(prefix)


class ChatRenderer:
    """Chats -> (ids, counted spans) in one chat format, for a tokenizer."""

    def __init__(self, tokenizer: Tokenizer, chat_format: str = "billa"):
        if chat_format not in CHAT_FORMATS:
            raise DataError(f"setting 'chat_format' must be one of {CHAT_FORMATS}, got {chat_format!r}")
        self.tokenizer, self.chat_format = tokenizer, chat_format
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
        """The chat as pieces (a last answer None: ending with the prompt for the next answer)."""
        if self.chat_format == "billa":
            return self._billa(chat)
        return self._template(chat)

    def _billa(self, chat: Chat) -> Rendered:
        pieces = []
        masked = f"{chat.system}\n" if chat.system else ""
        for parts, answer in chat.turns:
            pieces.append(Piece(masked + "".join(billa_question(parts)), False))  # str parts: plain text
            masked = ""
            if answer is not None:
                pieces.append(Piece(answer, True, True))
        return Rendered(self.tokenizer.bos_id is not None, pieces)

    def text(self, chat: Chat) -> str:
        """The rendered conversation as one string, end tokens written as their text (billa: what
        BILLA_CHAT_TEMPLATE renders; template: what apply_chat_template renders)."""
        bos, pieces = self.render(chat)
        eos = self.tokenizer.eos_token or ""
        return ((self.tokenizer.bos_token or "") if bos else "") + "".join(
            piece.text + (eos if piece.end else "") for piece in pieces)

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
        pieces, position = [], 0
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
            pieces += [Piece(whole[position:len(before)], False), Piece(whole[len(before):end], True)]
            position = end
        if position < len(whole):
            pieces.append(Piece(whole[position:], False))
        bos_text = self.tokenizer.bos_token
        bos = bool(bos_text) and self.tokenizer.bos_id is not None and whole.startswith(bos_text)
        if bos:
            pieces[0] = pieces[0]._replace(text=pieces[0].text[len(bos_text):])
        return Rendered(bos, pieces)

    # ---------------------------------------------------------------- ids

    def assemble(self, rendered: Rendered, encoded: list[list[int]]) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, counted spans [start, stop)) from the pieces and their ids (one encode_batch result each)."""
        ids = [self.tokenizer.bos_id] if rendered.bos else []
        spans = []
        for piece, piece_ids in zip(rendered.pieces, encoded):
            start = len(ids)
            ids += piece_ids
            if piece.end:
                ids.append(self.tokenizer.eos_id)
            if piece.counted:
                spans.append((start, len(ids)))
        return ids, spans

    def encode(self, chat: Chat) -> tuple[list[int], list[tuple[int, int]]]:
        rendered = self.render(chat)
        return self.assemble(rendered, self.tokenizer.encode_batch([piece.text for piece in rendered.pieces]))

    def fit(self, chat: Chat, max_length: int, rendered: Rendered | None = None, encoded: list | None = None
            ) -> Optional[tuple[list[int], list[tuple[int, int]], int]]:
        """(ids, spans, turns dropped) of the chat in at most max_length tokens: the earliest whole turns (question
        and answer) dropped until it fits, the system turn and the last turn always kept; None when even those do
        not fit. `rendered`/`encoded`: the whole chat's, when the caller already has them (one batch call)."""
        if rendered is None:
            rendered = self.render(chat)
            encoded = self.tokenizer.encode_batch([piece.text for piece in rendered.pieces])
        ids, spans = self.assemble(rendered, encoded)
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

