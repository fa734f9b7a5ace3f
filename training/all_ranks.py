"""All ranks or none: a collective block that every rank gets through, or that ends every rank with the same
one-line CheckpointError. Checkpoint saves and loads run inside it (training/checkpoint.py), because a disk can fill
or a file can be damaged on one rank only while the others wait in a collective.
"""
from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import signal
import sys
import threading
import time

import torch.distributed as dist

from training.checkpoint_files import CheckpointError
from training.launch import rank, world_size

logger = logging.getLogger(__name__)

_guards = itertools.count()  # every rank opens the same guards in the same order, so the n-th one shares its keys


@contextlib.contextmanager
def all_ranks_or_none(describe, on_failure=None):
    """Collective block: either every rank gets through it, or every rank ends with the same one-line error.

    A rank whose step fails cannot just raise: the others may wait in a collective it will never join (zero2's
    optimizer save all-gathers each state between the master's shard writes, `LowLevelZeroCheckpointIO.
    save_sharded_optimizer` in colossalai/booster/plugin/low_level_zero_plugin.py; every save ends in a barrier).
    So it posts describe(exc) in the process group's key-value store, where a watcher thread on every rank reads
    it. A rank blocked in a collective cannot be woken, so its watcher logs the line and ends the process (exit
    code 1); a rank at the end of the block waits there for all others, and raises the message. An exception that
    describe() does not recognise (None: a bug, not a disk) keeps its traceback on the rank that raised it.
    """
    if not dist.is_initialized() or world_size() == 1:
        try:
            yield
        except Exception as e:
            message = describe(e)
            if message is None:
                raise
            if on_failure is not None:
                on_failure()
            raise CheckpointError(message) from None
        return
    watch = _FailureWatch(f"checkpoint_guard/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{next(_guards)}/")
    try:
        yield
    except Exception as e:
        message = describe(e)
        known = message is not None
        if not known:
            message = f"rank {rank()} failed with {type(e).__name__}: {e} (its traceback is in that rank's output)"
        watch.fail(message, on_failure)
        if not known:
            raise
        raise CheckpointError(message) from None
    watch.finish()


class _FailureWatch:
    """The store keys of one `all_ranks_or_none` block, <prefix>failed (the message), <prefix>done and
    <prefix>printed (counters), and the thread that polls them.

    No rank leaves before every rank has printed its line: torchrun ends the other workers (SIGTERM, after
    --monitor-interval) as soon as one exits, which would cut off a line not yet printed."""

    POLL_SECONDS = 0.5
    EXIT_TIMEOUT_SECONDS = 30.0  # a rank that died without its line holds the others back this long at most

    def __init__(self, prefix: str):
        self.store = dist.distributed_c10d._get_default_store()
        self.world_size = world_size()
        self.failed_key, self.done_key, self.printed_key = prefix + "failed", prefix + "done", prefix + "printed"
        self._lock = threading.Lock()
        self._settled = False  # this rank has taken its way out: raising, or exiting from the watcher
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="checkpoint-failure-watch", daemon=True)
        self._thread.start()

    def _message(self) -> str | None:
        return self.store.get(self.failed_key).decode() if self.store.check([self.failed_key]) else None

    def _settle(self) -> None:
        """Take this rank's way out, or, where the watcher took it first, wait for it to end the process."""
        with self._lock:
            first, self._settled = not self._settled, True
        if not first:
            threading.Event().wait()
        self._stop.set()

    def _exit_together(self, then=None) -> None:
        """Count this rank's line as printed; wait until every rank's is (so no rank still writes), then `then`."""
        if then is not None:
            # From atexit, in the main thread. The last rank to print exits at once, and torchrun then sends SIGTERM
            # to the others: ignore it before counting this rank's line, or it can cut the cleanup short.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.store.add(self.printed_key, 1)
        deadline = time.monotonic() + self.EXIT_TIMEOUT_SECONDS
        while self.store.add(self.printed_key, 0) < self.world_size and time.monotonic() < deadline:
            time.sleep(self.POLL_SECONDS / 5)
        if then is not None:
            then()

    def _watch(self) -> None:
        while not self._stop.wait(self.POLL_SECONDS):
            message = self._message()
            if message is None:
                continue
            with self._lock:
                if self._settled:
                    return
                self._settled = True
            # The line _expected_errors_as_one_line (training/loop.py) prints for a raised CheckpointError.
            logger.error("error: %s: %s", CheckpointError.__name__, message)
            sys.stdout.flush()
            self._exit_together()
            os._exit(1)

    def fail(self, message: str, cleanup=None) -> None:
        """This rank failed: post the message; leave with the others, after the caller's raise has printed, and
        run `cleanup` once they are out of the block."""
        self._settle()
        self.store.set(self.failed_key, message)
        atexit.register(self._exit_together, cleanup)

    def finish(self) -> None:
        """A barrier in the store that ends as soon as any rank has failed."""
        self.store.add(self.done_key, 1)
        while True:
            message = self._message()
            if message is not None:
                self._settle()
                atexit.register(self._exit_together)
                raise CheckpointError(message)
            if self.store.add(self.done_key, 0) >= self.world_size:
                self._stop.set()
                return
            time.sleep(self.POLL_SECONDS / 5)
