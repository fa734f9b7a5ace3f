"""From what a stage's RecordRules say a record is (LM text, or prompt prefix + answer) to token samples.

A sample is (ids, n_masked): bos ... eos with the first n_masked tokens out of the loss, the rest counted (no bos
where the tokenizer adds none: Qwen, SmolLM2). Every sample kind of the recipe has this shape, so a loss mask is
never stored, only rebuilt (arange(n) >= n_masked). A multi-turn conversation (stage 3) counts several answers: it
carries its counted spans instead (`counted`), and only it pays for them. Texts are tokenized many records at a time
with the tokenizer's batch call.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import numpy as np

from llama.tokenizer import Tokenizer
from training.conversation import (BILLA_ANSWER_SPACE, Chat, ChatRenderer, billa_question, first_token_at,
                                   token_spans)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cut:
    """A part of a prompt prefix that may lose tokens from its middle when the sample is too long (an input)."""

    text: str


@dataclass(frozen=True)
class LM:
    """A language-modelling document: bos + text + eos, with a random prefix masked."""

    text: str


@dataclass(frozen=True)
class Prompted:
    """bos + "".join(prefix) masked, then answer + eos counted. Plain-str parts are always kept whole.

    A too-long sample (long_prompt="middle") loses tokens from the middle of its Cut parts, the last part first,
    keeping each part's head and tail, so that the answer survives whole where it fits; an answer that cannot fit
    whole keeps its start after a prefix cut to at most half the row. long_prompt="recipe" cuts the end of the
    whole sample instead, as the original did.
    """

    prefix: tuple[Union[str, Cut], ...]
    answer: str
    # Tokenized as one text with bos and eos, as a chat template's render is (a stage-3 single turn, so that the
    # export's apply_chat_template gives the very ids); False: prefix and answer apart, as the recipe's stage 2.
    joined: bool = False


Spec = Union[LM, Prompted, Chat]


class Sample(NamedTuple):
    ids: list[int]
    n_masked: int  # the first n_masked ids are out of the loss; len(ids) > n_masked unless nothing fits
    doc: int = -1  # the record it came from (the stream's serial), so that chunks of one document can be kept apart
    counted: Optional[tuple[tuple[int, int], ...]] = None  # a conversation's counted [start, stop) spans; None:
    # everything from n_masked on


def counted_spans(sample: Sample) -> tuple[tuple[int, int], ...]:
    """The [start, stop) ranges of ids the loss counts."""
    return sample.counted if sample.counted is not None else ((sample.n_masked, len(sample.ids)),)


def sample_to_json(sample: Sample) -> list:
    """[ids, n_masked, doc] (+ [spans] for a conversation): the data state's form of a pending sample."""
    row = [list(sample.ids), sample.n_masked, sample.doc]
    return row if sample.counted is None else row + [[list(span) for span in sample.counted]]


def sample_from_json(row: list) -> Sample:
    counted = tuple((int(start), int(stop)) for start, stop in row[3]) if len(row) > 3 else None
    return Sample(list(row[0]), int(row[1]), int(row[2]), counted)


def masked_prefix_length(n: int, rng: random.Random) -> int:
    """The recipe's random LM prefix: uniform in [int(0.2 n) + 1, int(0.7 n)], clamped so that short texts work
    (at least one token masked: position 0 is never a target; at least one counted when n >= 2)."""
    low = int(0.2 * n) + 1
    high = max(low, int(0.7 * n))
    return min(rng.randint(low, high), max(n - 1, 1))


def prefix_text(prefix: tuple[Union[str, Cut], ...]) -> str:
    return "".join(part.text if isinstance(part, Cut) else part for part in prefix)


class SampleBuilder:
    """Tokenizes specs in one batch call and turns them into samples of at most max_seq_length tokens.

    A prompted sample's prefix is tokenized whole, as the recipe does, so a sample that fits gets the recipe's ids.
    One that does not fit is cut in ids, never re-tokenized: the tokenizer's piece offsets (token_ends) say which
    tokens lie wholly inside a Cut part; those are the ones that may go (a token that straddles a part boundary
    stays, so fixed text never loses a character), and the kept ones are the very ids of the uncut prefix.

    counters gets "discarded_tokens" (tokens that never reach a sample: LM tokens cut off by long_text="truncate",
    answer tokens that did not fit), "cut_input_tokens" (prompt-input tokens dropped to make a sample fit),
    "cut_answers" (samples whose answer, e.g. a translation's target, lost its end), "too_long" (samples whose
    prefix, cut as far as it may be, still fills max_seq_length: nothing left to learn, skipped; a conversation
    whose system turn and last turn alone do not fit) and "dropped_turns" (earliest turns of conversations dropped
    to fit).

    Chats (stage 3) are rendered in `chat_format` (training/conversation.py). A single-turn billa chat with no
    system turn is the recipe's sample: it becomes a Prompted, with the recipe's ids and its long-input cuts.
    """

    def __init__(self, tokenizer: Tokenizer, max_seq_length: int, long_text: str, long_prompt: str,
                 chat_format: str = "billa"):
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.long_text = long_text
        self.long_prompt = long_prompt
        self.head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]  # bos where the tokenizer adds one
        self.eos = tokenizer.eos_id
        self.chats = ChatRenderer(tokenizer, chat_format)
        self._logged: set[str] = set()  # counters whose first event was logged

    def build(self, specs: list[Spec], rng: random.Random, counters: dict) -> list[list[Sample]]:
        """Samples for each spec, in order (an LM document may give several, a hopeless one none)."""
        specs = [self._recipe_form(spec) if isinstance(spec, Chat) else spec for spec in specs]
        rendered = [self.chats.render(spec) if isinstance(spec, Chat) else None for spec in specs]
        texts, chat_texts = [], []  # plain texts; texts rendered with their bos and end tokens
        for spec, chat in zip(specs, rendered):
            if isinstance(spec, LM):
                texts.append(spec.text)
            elif isinstance(spec, Prompted) and spec.joined:
                chat_texts.append(self.chats.bos_text + prefix_text(spec.prefix) + spec.answer
                                  + self.tokenizer.eos_token)
            elif isinstance(spec, Prompted):
                texts += [prefix_text(spec.prefix), spec.answer]
            else:
                chat_texts.append(chat.text)
        encoded = iter(self.tokenizer.encode_batch(texts) if texts else [])
        chat_encoded = iter(self.chats.tokenize(chat_texts) if chat_texts else [])
        out = []
        for spec, chat in zip(specs, rendered):
            if isinstance(spec, LM):
                out.append(self._lm(next(encoded), rng, counters))
            elif isinstance(spec, Prompted) and spec.joined:
                out.append(self._joined(spec, *next(chat_encoded), counters))
            elif isinstance(spec, Prompted):
                prefix_ids, answer_ids = next(encoded), next(encoded)
                out.append(self._prompted(spec, self.head, prefix_ids, [*answer_ids, self.eos], counters))
            else:
                ids, ends = next(chat_encoded)
                out.append(self._chat(spec, (ids, token_spans(ends, chat.counted)), counters))
        return out

    def _recipe_form(self, chat: Chat) -> Union[Chat, Prompted]:
        """A single-turn billa chat with no system turn as the recipe's Prompted: its question parts may lose their
        middle (Cut) when too long. Other chats stay chats."""
        if self.chats.chat_format != "billa" or chat.system or len(chat.turns) != 1:
            return chat
        parts, answer = chat.turns[0]
        return Prompted(billa_question(tuple(Cut(part) for part in parts)), BILLA_ANSWER_SPACE + answer, joined=True)

    def _joined(self, spec: Prompted, ids: list[int], ends: np.ndarray, counters: dict) -> list[Sample]:
        """A joined Prompted from the ids of its whole text (bos + prefix + answer + eos), split where the offsets
        say the prefix ends: a token that straddles the boundary is the answer's, as in a chat (token_spans)."""
        head_stop = len(self.chats.bos_text)
        prefix_stop = head_stop + len(prefix_text(spec.prefix))
        head, stop = first_token_at(ends, head_stop), first_token_at(ends, prefix_stop)
        return self._prompted(spec, ids[:head], ids[head:stop], ids[stop:], counters, ends[head:stop] - head_stop)

    def _chat(self, chat: Chat, encoded: tuple[list[int], list[tuple[int, int]]], counters: dict) -> list[Sample]:
        fitted = self.chats.fit(chat, self.max_seq_length, encoded)
        if fitted is None:
            counters["too_long"] += 1
            counters["discarded_tokens"] += len(encoded[0])
            self._log_first("too_long", f"a conversation of {len(chat.turns)} turn(s) does not fit max_seq_length="
                                        f"{self.max_seq_length} even with only its system turn and last turn: skipped")
            return []
        ids, spans, dropped = fitted
        if dropped:
            counters["dropped_turns"] += dropped
            self._log_first("dropped_turns", f"a conversation longer than max_seq_length={self.max_seq_length} lost "
                                             f"its {dropped} earliest turn(s) of {len(chat.turns)}")
        if len(spans) == 1 and spans[0][1] == len(ids):  # one answer at the end: the recipe's shape, no spans kept
            return [Sample(ids, spans[0][0])]
        return [Sample(ids, spans[0][0], counted=tuple(spans))]

    def _log_first(self, counter: str, what: str) -> None:
        if counter not in self._logged:
            self._logged.add(counter)
            logger.warning("%s (%s; further ones are only counted)", what, counter)

    def _lm(self, text_ids: list[int], rng: random.Random, counters: dict) -> list[Sample]:
        ids = [*self.head, *text_ids, self.eos]
        length = self.max_seq_length
        if len(ids) > length and self.long_text == "truncate":
            counters["discarded_tokens"] += len(ids) - length
            ids = ids[:length]
        # "split": consecutive chunks, each its own sample with its own prefix mask; every token kept once.
        chunks = [ids[start:start + length] for start in range(0, len(ids), length)]
        return [Sample(chunk, masked_prefix_length(len(chunk), rng)) for chunk in chunks]

    def _prompted(self, spec: Prompted, head: list[int], prefix_ids: list[int], answer: list[int], counters: dict,
                  ends: np.ndarray | None = None) -> list[Sample]:
        """head (bos) + prefix masked, answer (its end token included) counted. ends: where each prefix token ends
        in prefix_text(spec.prefix), where the caller has them."""
        prefix = [*head, *prefix_ids]
        if len(prefix) + len(answer) > self.max_seq_length and self.long_prompt == "middle":
            if ends is None:
                ends = self.tokenizer.token_ends(prefix_text(spec.prefix), prefix_ids)
            shortened = self._cut_inputs(spec, head, prefix_ids, ends, len(answer))
            counters["cut_input_tokens"] += len(prefix) - len(shortened)
            prefix = shortened
        ids = prefix + answer
        if len(prefix) >= self.max_seq_length:
            counters["too_long"] += 1
            counters["discarded_tokens"] += len(ids)
            return []
        if len(ids) > self.max_seq_length:  # the answer does not fit whole: keep its start (the recipe's end cut)
            counters["cut_answers"] += 1
            counters["discarded_tokens"] += len(ids) - self.max_seq_length
            ids = ids[:self.max_seq_length]
        return [Sample(ids, len(prefix))]

    def _cut_inputs(self, spec: Prompted, head: list[int], prefix_ids: list[int], ends: np.ndarray,
                    answer_length: int) -> list[int]:
        """head + prefix ids with tokens dropped from the middle of the Cut parts (the last part first, each keeping
        its head and, one token more where odd, its tail: a question at the end of an input stays) until the prefix
        leaves room for the whole answer, or, if the answer cannot fit even so, until it takes half the row. ends:
        where each prefix token ends in the prefix text."""
        starts = np.concatenate(([0], ends[:-1]))
        inner = []  # per Cut part: the token range [first, stop) lying wholly inside it
        offset = 0
        for part in spec.prefix:
            text = part.text if isinstance(part, Cut) else part
            if isinstance(part, Cut):
                first = int(np.searchsorted(starts, offset, side="left"))
                stop = int(np.searchsorted(ends, offset + len(text), side="right"))
                inner.append((first, max(first, stop)))
            offset += len(text)
        fixed = len(head) + len(prefix_ids) - sum(stop - first for first, stop in inner)  # bos + what stays
        length = self.max_seq_length
        budget = length - answer_length if fixed + answer_length <= length else length // 2
        excess = len(head) + len(prefix_ids) - budget
        drops = []
        for first, stop in reversed(inner):
            drop = min(max(excess, 0), stop - first)
            drops.append(drop)
            excess -= drop
        prefix, position = list(head), 0
        for (first, stop), drop in zip(inner, reversed(drops)):
            keep = stop - first - drop
            prefix += prefix_ids[position:first + keep // 2]  # everything before, then the head
            position = stop - (keep - keep // 2)  # the tail
        return prefix + prefix_ids[position:]
