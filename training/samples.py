"""From what a stage's DataProcessor says a record is (LM text, or prompt prefix + answer) to token samples.

A sample is (ids, n_masked): bos ... eos with the first n_masked tokens out of the loss, the rest counted. Every
sample kind of the recipe has this shape, so a loss mask is never stored, only rebuilt (arange(n) >= n_masked).
Texts are tokenized many records at a time with the tokenizer's batch call.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple, Union


@dataclass(frozen=True)
class Cut:
    """A part of a prompt prefix that may be shortened, from its end, when the sample is too long (the input)."""

    text: str


@dataclass(frozen=True)
class LM:
    """A language-modelling document: bos + text + eos, with a random prefix masked."""

    text: str


@dataclass(frozen=True)
class Prompted:
    """bos + "".join(prefix) masked, then answer + eos counted. Cut parts absorb a too-long sample, the last
    one first, so that the answer survives where it fits; an answer that cannot fit whole keeps its start after
    a prefix cut to at most half the row."""

    prefix: tuple[Union[str, Cut], ...]
    answer: str


Spec = Union[LM, Prompted]


class Sample(NamedTuple):
    ids: list[int]
    n_masked: int  # the first n_masked ids are out of the loss; len(ids) > n_masked unless nothing fits


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

    counters gets "discarded_tokens" (LM tokens cut off by long_text="truncate", answer tokens that did not fit),
    "cut_input_tokens" (prompt-input tokens dropped to make a sample fit) and "too_long" (samples whose fixed
    prompt text alone fills max_seq_length: nothing left to learn, skipped).
    """

    def __init__(self, tokenizer, max_seq_length: int, long_text: str):
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.long_text = long_text
        self.bos, self.eos = tokenizer.bos_id, tokenizer.eos_id

    def build(self, specs: list[Spec], rng: random.Random, counters: dict) -> list[list[Sample]]:
        """Samples for each spec, in order (an LM document may give several, a hopeless one none)."""
        texts = []
        for spec in specs:
            if isinstance(spec, LM):
                texts.append(spec.text)
            else:
                texts += [prefix_text(spec.prefix), spec.answer]
        encoded = iter(self.tokenizer.encode_batch(texts))
        out = []
        for spec in specs:
            if isinstance(spec, LM):
                out.append(self._lm(next(encoded), rng, counters))
            else:
                prefix_ids, answer_ids = next(encoded), next(encoded)
                out.append(self._prompted(spec, prefix_ids, answer_ids, counters))
        return out

    def _lm(self, text_ids: list[int], rng: random.Random, counters: dict) -> list[Sample]:
        ids = [self.bos, *text_ids, self.eos]
        length = self.max_seq_length
        if len(ids) > length and self.long_text == "truncate":
            counters["discarded_tokens"] += len(ids) - length
            ids = ids[:length]
        # "split": consecutive chunks, each its own sample with its own prefix mask; every token kept once.
        chunks = [ids[start:start + length] for start in range(0, len(ids), length)]
        return [Sample(chunk, masked_prefix_length(len(chunk), rng)) for chunk in chunks]

    def _prompted(self, spec: Prompted, prefix_ids: list[int], answer_ids: list[int], counters: dict) -> list[Sample]:
        answer = [*answer_ids, self.eos]
        prefix = [self.bos, *prefix_ids]
        if len(prefix) + len(answer) > self.max_seq_length:
            shortened = self._cut_inputs(spec, self._prefix_budget(spec, len(answer)))
            counters["cut_input_tokens"] += len(prefix) - len(shortened)
            prefix = shortened
        ids = prefix + answer
        if len(prefix) >= self.max_seq_length:
            counters["too_long"] += 1
            counters["discarded_tokens"] += len(ids)
            return []
        if len(ids) > self.max_seq_length:  # the answer does not fit whole: keep its start
            counters["discarded_tokens"] += len(ids) - self.max_seq_length
            ids = ids[:self.max_seq_length]
        return [Sample(ids, len(prefix))]

    def _prefix_budget(self, spec: Prompted, answer_length: int) -> int:
        """Tokens the prefix (bos included) may keep: all that the whole answer leaves, if the answer fits once
        the inputs are gone; otherwise half the row, so that the question keeps context and the answer its start."""
        bare = tuple(Cut("") if isinstance(part, Cut) else part for part in spec.prefix)
        if 1 + len(self.tokenizer.encode(prefix_text(bare))) + answer_length <= self.max_seq_length:
            return self.max_seq_length - answer_length
        return self.max_seq_length // 2

    def _cut_inputs(self, spec: Prompted, budget: int) -> list[int]:
        """bos + prefix ids with the Cut parts shortened from their ends (last part first) until the prefix takes
        at most `budget` tokens, or emptied. Rare, so it re-tokenizes: a prefix is tokenized whole, like an uncut
        one, so the ids are what the text would give."""
        parts = list(spec.prefix)
        prefix = [self.bos, *self.tokenizer.encode(prefix_text(tuple(parts)))]
        for index in reversed([i for i, part in enumerate(parts) if isinstance(part, Cut)]):
            cut_ids = self.tokenizer.encode(parts[index].text)
            while len(prefix) > budget and cut_ids:
                keep = min(len(cut_ids) - 1, max(0, len(cut_ids) - (len(prefix) - budget)))
                cut_ids = cut_ids[:keep]
                parts[index] = Cut(self.tokenizer.decode(cut_ids) if cut_ids else "")
                prefix = [self.bos, *self.tokenizer.encode(prefix_text(tuple(parts)))]
            if len(prefix) <= budget:
                break
        return prefix
