"""Samples -> batch tensors (padded or packed), and the background thread that builds batches ahead.

Batch dict (the training loop's contract):
  input_ids  LongTensor (bs, L)
  loss_mask  LongTensor (bs, L), 0/1, aligned with input_ids (token t counts iff loss_mask[:, t] == 1), 0 on padding
  doc_ids    LongTensor (bs, L), packed batches only: contiguous runs of one id are documents; padding is a run too
  num_tokens int, real (non-pad) tokens;  num_target_tokens int, loss_mask.sum()
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Generic, Sequence, TypeVar

import numpy as np
import torch

from training.samples import Sample, counted_spans

logger = logging.getLogger(__name__)


def pad_batch(samples: Sequence[Sample], pad_id: int) -> dict:
    """One sample per row, padded to the longest (the recipe's batches)."""
    width = max(len(s.ids) for s in samples)
    input_ids = np.full((len(samples), width), pad_id, dtype=np.int64)
    loss_mask = np.zeros((len(samples), width), dtype=np.int64)
    for row, sample in enumerate(samples):
        input_ids[row, :len(sample.ids)] = sample.ids
        for start, stop in counted_spans(sample):
            loss_mask[row, start:stop] = 1
    return _batch(input_ids, loss_mask, num_tokens=sum(len(s.ids) for s in samples))


def pack_rows(rows: Sequence[Sequence[Sample]], width: int, pad_id: int) -> dict:
    """Several samples per row, each its own document (doc_ids 0, 1, ...; the padding tail gets the next id)."""
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    loss_mask = np.zeros((len(rows), width), dtype=np.int64)
    doc_ids = np.zeros((len(rows), width), dtype=np.int64)
    num_tokens = 0
    for row, samples in enumerate(rows):
        start = 0
        for doc, sample in enumerate(samples):
            end = start + len(sample.ids)
            input_ids[row, start:end] = sample.ids
            for first, stop in counted_spans(sample):
                loss_mask[row, start + first:start + stop] = 1
            doc_ids[row, start:end] = doc
            start = end
        doc_ids[row, start:] = len(samples)
        num_tokens += start
    batch = _batch(input_ids, loss_mask, num_tokens)
    batch["doc_ids"] = torch.from_numpy(doc_ids)
    return batch


def _batch(input_ids: np.ndarray, loss_mask: np.ndarray, num_tokens: int) -> dict:
    return {"input_ids": torch.from_numpy(input_ids), "loss_mask": torch.from_numpy(loss_mask),
            "num_tokens": int(num_tokens), "num_target_tokens": int(loss_mask.sum())}


def first_fit(pool: Sequence[Sample], n_rows: int, width: int) -> tuple[list[list[Sample]], list[Sample]]:
    """Place samples, oldest first, each into the first row with room. Returns (rows, samples left over).

    The oldest sample always finds an empty row or waits at most one batch (it is first in the next call),
    so no sample starves, and small late samples fill the holes left by large early ones.
    """
    rows: list[list[Sample]] = [[] for _ in range(n_rows)]
    free = [width] * n_rows
    left = []
    for sample in pool:
        size = len(sample.ids)
        for row in range(n_rows):
            if free[row] >= size:
                rows[row].append(sample)
                free[row] -= size
                break
        else:
            left.append(sample)
    return rows, left


T = TypeVar("T")


class Prefetcher(Generic[T]):
    """Calls produce() over and over in a daemon thread, `depth` results ahead, behind a bounded queue.

    An exception in the thread reaches the consumer at its next get(), ahead of any batch still queued, as the
    original exception object (its traceback shows the worker's frames). Waits are short polls, never a timeout
    error: a slow producer is waited for, a dead one is reported.
    """

    _POLL_S = 0.05

    def __init__(self, produce: Callable[[], T], depth: int = 4, name: str = "data-prefetch"):
        self._produce = produce
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._produce()
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=self._POLL_S)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer, never swallowed
            self._error = e

    def get(self) -> T:
        while True:
            if self._error is not None:
                error, self._error = self._error, None
                self._stop.set()
                raise error
            try:
                return self._queue.get(timeout=self._POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._error is None and self._queue.empty():
                    raise RuntimeError("the data prefetch thread stopped without a batch or an error "
                                       "(it was closed, or an earlier error was already raised)")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            logger.warning("data prefetch thread still busy after close(); it is a daemon and will not block exit")
