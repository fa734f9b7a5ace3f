"""One set's samples waiting for their slots: drawn at random, the chunks of one document kept apart.

Under long_text="split" a long document becomes many chunks. Handed out in read order they would fill the set's
next slots one after another, so one long GitHub file could take a rank's whole `en` share for many batches and
make those batches correlated. Instead each slot draws one of the set's pending documents uniformly at random
(with the data RNG, so the stream stays deterministic) and takes that document's next chunk: a document's chunks
come out in order, spread over later batches among the other documents. A document that already has a sample in
the batch being built is passed over while the set has another one pending; the DataStream reads more records
before that can run out, so two chunks of one document share a batch only when the set has nothing else.

Without an RNG (long_text="truncate": one sample per document, nothing to spread) the oldest document comes first,
so samples keep the files' order, as in the recipe.
"""
from __future__ import annotations

import random
from collections import deque
from typing import Iterable, Optional

from training.samples import Sample


class SetBuffer:
    """Pending samples of one set, grouped by document (Sample.doc), documents in read order."""

    def __init__(self, samples: Iterable[Sample] = ()):
        self._docs: dict[int, deque[Sample]] = {}
        for sample in samples:  # a saved buffer: documents in read order, each one's chunks in order
            self._docs.setdefault(sample.doc, deque()).append(sample)

    def add(self, samples: list[Sample]) -> None:
        """The samples of one newly read document, in order (all with the same doc)."""
        if samples:
            self._docs[samples[0].doc] = deque(samples)

    def documents(self, taken: set[int]) -> int:
        """Pending documents that are not in `taken` (those already in the batch being built)."""
        return sum(doc not in taken for doc in self._docs)

    def draw(self, rng: Optional[random.Random], taken: set[int]) -> Sample:
        """The next chunk of a pending document, one not in `taken` while there is one: drawn at random with rng,
        else the oldest."""
        free = [doc for doc in self._docs if doc not in taken] or list(self._docs)
        doc = rng.choice(free) if rng is not None else free[0]
        chunks = self._docs[doc]
        sample = chunks.popleft()
        if not chunks:
            del self._docs[doc]
        return sample

    def samples(self) -> tuple[Sample, ...]:
        """Every pending sample, in the order __init__ takes them back (for the data state)."""
        return tuple(sample for chunks in self._docs.values() for sample in chunks)
