"""The data stream of every stage: one rank's batches, from the stage's record rules (training/record_rules.py).

A stage brings only its RecordRules (record -> LM / Prompted / Chat spec, or None for an empty text; prompt files);
DataStream does the rest: corpus checks at start-up, this rank's share of every set (SetReader), the exact weighted
cycle, batched tokenization, padding or packing, the prefetch thread, and the state. The training loop builds it as
DataStream(settings.data, tokenizer, rank, world_size, TheStageRecords, settings.chat).

Each set's samples wait in a SetBuffer (training/set_buffer.py) from which every slot draws at random, so that
the chunks of a long document spread over later batches.

State (state_dict(), JSON): per set the reader position (file, byte offset, line) and the buffer (samples already
built from read records but not yet handed out, with the record each came from); the cycle cursor; the RNG state;
the skip/discard counters; the packing pool. It is the position right after the last batch handed out: every
produced batch carries a snapshot, and a resumed run seeks to it and continues with the exact next batch, without
re-reading earlier data. Another number of ranks continues from all the old ranks' states (load_resharded): the
files are divided afresh, no line read before is read again, and the samples in flight are dealt out.
"""
from __future__ import annotations

import logging
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional

from llama.tokenizer import Tokenizer
from training.batching import Prefetcher, first_fit, pack_rows, pad_batch
from training.corpus import DataError, Location, RecordError, list_set_files, parse_record, parse_split, weighted_cycle
from training.record_rules import RecordRules, check_first_lines
from training.samples import Sample, SampleBuilder, Spec, sample_from_json, sample_to_json
from training.set_buffer import SetBuffer
from training.set_reader import SetReader, fingerprint_change, restart_file
from training.settings_concerns import ChatSettings, DataSettings

logger = logging.getLogger(__name__)

STATE_VERSION = 2  # 2: pending samples carry the record they came from (the set buffers); long_prompt
LOG_FIRST_SKIPS = 5  # skipped records logged with file:line; later ones only counted
PREFETCH_DEPTH = 4  # batches built ahead of the training loop
READ_AHEAD = 4  # a set that runs short is refilled for this many calls' worth: bigger tokenizer batch calls
COUNTERS = ("records", "samples", "bad_records", "empty_texts", "blank_lines", "too_long", "discarded_tokens",
            "cut_input_tokens", "cut_answers", "untyped_records", "dropped_turns")


class DataStream:
    """Infinite, deterministic, resumable stream of batches for one rank. See the module docstring."""

    # ---------------------------------------------------------------- construction

    def __init__(self, settings: DataSettings, tokenizer: Tokenizer, rank: int, world_size: int,
                 rules: type[RecordRules], chat: ChatSettings | None = None):
        """`settings` were validated by load_settings; `chat`: the stage's chat settings, None where its records hold
        no conversations (stages 1 and 2)."""
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise DataError(f"rank {rank!r} / world size {world_size!r}: need 0 <= rank < world_size")
        self.tokenizer, self.rank, self.world_size = tokenizer, rank, world_size
        self.root = Path(settings.pretrain_data_root_dir)
        self.split = parse_split(settings.pretrain_data_split)
        self.max_seq_length = settings.max_seq_length
        self.batch_size = settings.batch_size
        self.long_text = settings.long_text
        self.long_prompt = settings.long_prompt
        self.packing = settings.packing
        self.skip_bad_records = settings.skip_bad_records
        self.accept_changed_files = settings.accept_changed_files
        self.seed = seed = settings.seed
        # Before the corpus is read: a chat format the tokenizer cannot render stops the run first.
        self.builder = SampleBuilder(tokenizer, self.max_seq_length, self.long_text, self.long_prompt,
                                     (chat or ChatSettings()).chat_format)
        if not self.root.is_dir():
            raise DataError(f"setting 'pretrain_data_root_dir': folder {self.root.resolve()} does not exist")

        files = {name: list_set_files(self.root, name, spec.file_start, spec.file_stop)
                 for name, spec in self.split.items()}
        self._streaming = False  # the start-up checks build records too: they neither count nor log notes
        self.rules = rules(self.root, self.split, note=self._note)
        for name, set_files in files.items():
            check_first_lines(self.rules, name, set_files, self.skip_bad_records)
        self.readers = {name: SetReader(name, set_files, rank, world_size) for name, set_files in files.items()}
        self.cycle = weighted_cycle(self._mix)
        logger.info("data: %s", ", ".join(f"{name} x{spec.weight} ({len(self.readers[name].files)} of "
                                           f"{len(files[name])} files)" for name, spec in self.split.items()))

        # The stream's mutable state: touched only by the producer thread once iteration starts.
        self._pending = {name: SetBuffer() for name in self.split}
        self._cursor = 0
        self._rng = random.Random(f"data seed={seed} rank={rank}")  # each rank its own stream
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._last_sample_pass = dict.fromkeys(self.split, -1)
        self._pool: list[Sample] = []
        self._where = "start"
        self._noted: set[tuple[str, str]] = set()  # (set, counter) already logged by note()
        self._streaming = True
        self._prefetcher: Optional[Prefetcher] = None
        self._handed = self._snapshot()

    # ---------------------------------------------------------------- public API

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self._prefetcher is None:
            self._prefetcher = Prefetcher(self._produce, PREFETCH_DEPTH, name=f"data-prefetch-rank{self.rank}")
        batch, self._handed = self._prefetcher.get()
        return batch

    @property
    def counters(self) -> dict:
        """Records, samples, skips and discarded tokens up to the last batch handed out."""
        return dict(self._handed["counters"])

    def position_mark(self):
        """The position after the last batch handed out, for rewind_to."""
        return self._handed

    def rewind_to(self, mark) -> None:
        """Make state_dict() and counters those of `mark` again: the batches handed out since are given back. For a
        stream that ends here (a record failed while fetching a step's batches, and the step is not trained): the
        prefetch thread has read on, so iterating further is not exact."""
        self._handed = mark

    @property
    def passes(self) -> dict[str, int]:
        """Per set, the completed passes over this rank's files up to the last batch handed out."""
        return {name: position["passes"] for name, position in self._handed["readers"].items()}

    @property
    def _mix(self) -> dict[str, int]:
        return {name: spec.weight for name, spec in self.split.items()}

    def state_dict(self) -> dict:
        snap = self._handed
        return {
            "version": STATE_VERSION,
            "stage": Path(sys.modules[type(self.rules).__module__].__file__).stem,  # e.g. "pretrain_main"
            "rank": self.rank,
            "world_size": self.world_size,
            "max_seq_length": self.max_seq_length,
            "long_text": self.long_text,
            "long_prompt": self.long_prompt,
            "packing": self.packing,
            "mix": self._mix,
            "sets": {name: {**snap["readers"][name],
                            "fingerprints": self.readers[name].fingerprints,
                            "last_sample_pass": snap["last_sample_pass"][name],
                            "pending": [sample_to_json(s) for s in snap["pending"][name]]}
                     for name in self.split},
            "cycle_cursor": snap["cursor"],
            "rng": [snap["rng"][0], list(snap["rng"][1]), snap["rng"][2]],
            "counters": dict(snap["counters"]),
            "packing_pool": [sample_to_json(s) for s in snap["pool"]],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict(): same corpus, ranks, mix, max_seq_length, long_text, long_prompt, packing."""
        self._check_saved(state, self.rank, self.world_size, "")
        self._stop_prefetch()
        for name, reader in self.readers.items():
            saved = dict(state["sets"][name])
            self._check_files(name, [saved])
            reader.seek(saved)
            self._last_sample_pass[name] = int(saved["last_sample_pass"])
            self._pending[name] = SetBuffer(sample_from_json(row) for row in saved["pending"])
        self._cursor = int(state["cycle_cursor"])
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._counters = {key: int(state["counters"].get(key, 0)) for key in COUNTERS}
        self._pool = [sample_from_json(row) for row in state["packing_pool"]]
        self._handed = self._snapshot()

    def load_resharded(self, states: list[dict]) -> dict[str, dict[str, int]]:
        """Continue the stream of another number of ranks: `states` are the state_dict()s of all its ranks, in rank
        order. Returns, per set, what was in flight and how it is handled (also logged, once per rank).

        - Every set's files are divided afresh among this world's ranks; each old rank's reader position becomes a
          claim on the lines it had read (SetReader.resume_from), so no line read before is read again, and none
          is left out.
        - The samples in flight -- built from lines already read but not yet in a handed-out batch: the set buffers
          and the packing pool -- are dealt out to the new ranks, a whole document to one rank, instead of being
          read again. A batch handed out is trained on before a checkpoint is written, and batches built ahead
          (prefetch) are not in the state, so nothing else is in flight: no line is read a second time.
        - What cannot carry over: the order in which those samples and the lines still to read come out (another
          division of the files, another data RNG: random.Random(f"data seed=... rank=... world=... resharded from
          N at sample S")), so the batches differ from those of an uninterrupted run from here on.
        - The skip/discard counters: old rank r's go to new rank r % world_size, so their sum is kept.
        """
        old_world = len(states)
        for rank, state in enumerate(states):
            self._check_saved(state, rank, old_world, f" of {old_world} ranks (rank {rank}'s state)")
        self._stop_prefetch()
        for name, reader in self.readers.items():
            positions = [{**state["sets"][name], "rank": rank, "world_size": old_world}
                         for rank, state in enumerate(states)]
            self._check_files(name, positions)
            reader.resume_from(positions)
            self._last_sample_pass[name] = reader.passes

        # The documents in flight, dealt out whole: the n-th (pool first, then each set's buffer, old ranks in order)
        # to rank n % world_size, renumbered -2, -3, ... (fresh documents count up from the record counter; -1 is
        # Sample's "no document").
        new_doc: dict[tuple[int, int], int] = {}

        def mine(old_rank: int, doc: int) -> bool:
            if (old_rank, doc) not in new_doc:
                new_doc[old_rank, doc] = -2 - len(new_doc)
            return (-2 - new_doc[old_rank, doc]) % self.world_size == self.rank

        def carried(old_rank: int, entries) -> list[Sample]:
            return [s._replace(doc=new_doc[old_rank, s.doc]) for s in map(sample_from_json, entries)
                    if mine(old_rank, s.doc)]

        self._pool = [s for rank, state in enumerate(states) for s in carried(rank, state["packing_pool"])]
        in_flight = {}
        for name in self.split:
            self._pending[name] = SetBuffer(s for rank, state in enumerate(states)
                                            for s in carried(rank, state["sets"][name]["pending"]))
            in_flight[name] = {"samples": sum(len(state["sets"][name]["pending"]) for state in states),
                               "documents": len({(rank, row[2]) for rank, state in enumerate(states)
                                                 for row in state["sets"][name]["pending"]}),
                               "read_again": 0}
        in_flight["packing_pool"] = {"samples": sum(len(state["packing_pool"]) for state in states), "read_again": 0}
        self._cursor = 0  # the cycle restarts: every window of one period still holds the exact mix
        samples = sum(int(state["counters"].get("samples", 0)) for state in states)
        self._rng = random.Random(f"data seed={self.seed} rank={self.rank} world={self.world_size} "
                                  f"resharded from {old_world} at sample {samples}")
        self._counters = {key: sum(int(state["counters"].get(key, 0)) for rank, state in enumerate(states)
                                   if rank % self.world_size == self.rank) for key in COUNTERS}
        self._handed = self._snapshot()
        logger.info("data: the stream of %d ranks continues on %d; the files are divided afresh and no line read "
                    "before is read again (0 lines per set); in flight at the checkpoint, dealt out to the new ranks: "
                    "%s", old_world, self.world_size,
                    ", ".join(f"{name} {v['samples']} samples" + (f" of {v['documents']} records" if "documents" in v
                                                                   else "") for name, v in in_flight.items()))
        return in_flight

    def _check_files(self, set_name: str, positions: list[dict]) -> None:
        """The corpus files the saved `positions` (one per old rank) were read from, against their fingerprints: a
        changed file stops the resume with one line naming it and what changed, before any step, since its saved
        byte offsets would now land in other data. With accept_changed_files=True each saved position inside such
        a file goes back to its start instead (in place), and the log says how many lines may be read again.
        A state without fingerprints (a checkpoint from before they were recorded) is taken as it is."""
        saved = {}
        for position in positions:
            saved.update(position.pop("fingerprints", None) or {})
        if not saved:
            logger.info("set '%s': the checkpoint records no corpus fingerprints (an older checkpoint): the files are "
                        "taken as unchanged", set_name)
            return
        folder = self.readers[set_name].set_files[0].parent
        changed = {}
        for file_name, fingerprint in sorted(saved.items()):
            change = fingerprint_change(fingerprint, folder / file_name)
            if change is None:
                continue
            what, content = change
            if not content:
                logger.warning("set '%s', file %s: %s, with the same size and first/last 64 KB: taken as the same "
                               "file (a copy)", set_name, folder / file_name, what)
                continue
            if not self.accept_changed_files:
                raise DataError(f"set '{set_name}', file {folder / file_name} changed since the checkpoint ({what}): "
                                f"its saved reading position would land in other data. Restore the file, or set "
                                f"accept_changed_files=True to read it again from its start")
            changed[file_name] = what
        if changed:
            lines = sum(restart_file(position, set(changed)) for position in positions)
            logger.warning("set '%s': accept_changed_files=True: %s changed since the checkpoint (%s) and %s read "
                           "again from its start; this may re-read up to %d line(s) read before the checkpoint",
                           set_name, ", ".join(changed), "; ".join(changed.values()),
                           "is" if len(changed) == 1 else "are", lines)

    def _check_saved(self, state: dict, rank: int, world_size: int, whose: str) -> None:
        """A saved state continues this stream only with the same version, mix, lengths and modes (and the rank
        and world size it says)."""
        expected = {"version": STATE_VERSION, "rank": rank, "world_size": world_size,
                    "max_seq_length": self.max_seq_length, "long_text": self.long_text,
                    "long_prompt": self.long_prompt, "packing": self.packing, "mix": self._mix}
        for key, value in expected.items():
            if state.get(key) != value:
                raise DataError(f"cannot resume the data stream{whose}: the saved state has {key}="
                                f"{state.get(key)!r}, this run has {value!r}")

    def close(self) -> None:
        self._stop_prefetch()
        for reader in self.readers.values():
            reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _stop_prefetch(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    # ---------------------------------------------------------------- the stream (producer thread)

    def _snapshot(self) -> dict:
        """The stream's position, cheaply: small dicts, tuples of (immutable-by-use) samples, the RNG tuple."""
        return {"readers": {name: reader.position() for name, reader in self.readers.items()},
                "pending": {name: buffer.samples() for name, buffer in self._pending.items()},
                "cursor": self._cursor, "rng": self._rng.getstate(), "counters": dict(self._counters),
                "last_sample_pass": dict(self._last_sample_pass), "pool": tuple(self._pool)}

    def _produce(self) -> tuple[dict, dict]:
        try:
            batch = self._packed_batch() if self.packing else pad_batch(self._next_samples(self.batch_size),
                                                                         self.tokenizer.pad_id)
        except DataError:
            raise
        except Exception as e:  # a bug or a tokenizer failure: say which records were being processed
            raise DataError(f"data worker failed at {self._where}: {type(e).__name__}: {e}") from e
        return batch, self._snapshot()

    def _packed_batch(self) -> dict:
        # Keep a pool of a few rows' worth beyond the batch so that late small samples can fill holes.
        target = (self.batch_size + max(2, self.batch_size // 2)) * self.max_seq_length
        pool_tokens = sum(len(s.ids) for s in self._pool)
        while pool_tokens < target:
            more = self._next_samples(max(self.batch_size, len(self.cycle)))
            self._pool += more
            pool_tokens += sum(len(s.ids) for s in more)
        rows, self._pool = first_fit(self._pool, self.batch_size, self.max_seq_length)
        return pack_rows(rows, self.max_seq_length, self.tokenizer.pad_id)

    def _next_samples(self, count: int) -> list[Sample]:
        """The next `count` samples in cycle order (exact mix), each drawn from its set's buffer from a document not
        yet in this call nor in the packing pool: the documents of one call, or of one packed batch, differ."""
        slots = [self.cycle[(self._cursor + i) % len(self.cycle)] for i in range(count * READ_AHEAD)]
        taken = {sample.doc for sample in self._pool}
        if any(self._pending[name].documents(taken) < n for name, n in Counter(slots[:count]).items()):
            self._fill(Counter(slots), taken)
        self._cursor = (self._cursor + count) % len(self.cycle)
        self._counters["samples"] += count
        rng = self._rng if self.long_text == "split" else None  # only split documents have chunks to spread
        samples = []
        for name in slots[:count]:
            samples.append(self._pending[name].draw(rng, taken))
            taken.add(samples[-1].doc)
        return samples

    def _fill(self, need: Counter, taken: set[int]) -> None:
        """Read and tokenize (one batch call per round) until every set has `need` documents pending outside
        `taken`. Documents, not samples: a long document's many chunks must not stand in for other documents."""
        while True:
            short = {name: need[name] - self._pending[name].documents(taken) for name in self.split
                     if need[name] > self._pending[name].documents(taken)}
            if not short:
                return
            for name in short:
                if self.readers[name].passes - self._last_sample_pass[name] >= 2:
                    raise DataError(f"set '{name}': no record gave a sample over a whole pass of this rank's files "
                                    f"(too long for max_seq_length={self.max_seq_length}: "
                                    f"{self._counters['too_long']} so far)")
            read = [(name, *self._read_spec(name)) for name in short for _ in range(short[name])]
            self._where = (f"records {read[0][2]} ... {read[-1][2]}" if len(read) > 1 else str(read[0][2]))
            built = self.builder.build([spec for _, spec, _, _, _ in read], self._rng, self._counters)
            for (name, _, _, pass_number, doc), samples in zip(read, built):
                self._pending[name].add([s._replace(doc=doc) for s in samples])
                if samples:
                    self._last_sample_pass[name] = pass_number

    def _read_spec(self, set_name: str) -> tuple[Spec, Location, int, int]:
        """The set's next usable record as a spec, with where it came from, its pass over the files and its serial
        number in the stream (its samples' doc)."""
        reader = self.readers[set_name]
        first_pass = reader.passes
        while True:
            if reader.passes - first_pass >= 2:
                raise DataError(f"set '{set_name}': a whole pass over this rank's {len(reader.files)} file(s) gave "
                                f"no usable record (skipped so far: {self._counters['bad_records']} bad, "
                                f"{self._counters['empty_texts']} empty)")
            raw, where = reader.next_line()
            self._where = str(where)
            if not raw.strip():
                self._counters["blank_lines"] += 1
                continue
            try:
                spec = self.rules.build(set_name, parse_record(raw), self._rng)
            except RecordError as e:
                if not self.skip_bad_records:
                    raise DataError(f"{where}: {e} (skip_bad_records=True skips such records)") from None
                self._skip("bad_records", where, str(e))
                continue
            except DataError as e:  # e.g. a prompt file first needed by this record
                raise DataError(f"{where}: {e}") from None
            if spec is None:
                self._skip("empty_texts", where, "text empty after stripping")
                continue
            self._counters["records"] += 1
            return spec, where, reader.passes, self._counters["records"]

    def _note(self, set_name: str, counter: str, why: str) -> None:
        """RecordRules.note while streaming: count, and log the first of each set and counter with its file:line."""
        if not self._streaming:
            return
        self._counters[counter] += 1
        if (set_name, counter) not in self._noted:
            self._noted.add((set_name, counter))
            logger.warning("%s: %s (%s; further ones in this set are only counted)", self._where, why, counter)

    def _skip(self, counter: str, where: Location, why: str) -> None:
        self._counters[counter] += 1
        if self._counters[counter] <= LOG_FIRST_SKIPS:
            logger.warning("skipped record (%s) at %s: %s%s", counter, where, why,
                           "; further ones are only counted" if self._counters[counter] == LOG_FIRST_SKIPS else "")
