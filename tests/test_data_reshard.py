"""The data stream on another number of ranks: SetReader.resume_from (claims) and DataStream.load_resharded."""
import json
import random
from collections import Counter

import pytest

import alignment_sft_main
import pretrain_main
from data_corpus_helpers import lm_records, messages_records, settings, stream, write_set
from llama.tokenization_llama import SentencePieceTokenizer
from training.data_stream import DataStream
from training.set_reader import SetReader


def old_positions(readers):
    """What a checkpoint holds of each rank's reader, with the rank and world size load_resharded adds."""
    return [dict(json.loads(json.dumps(r.position())), rank=rank, world_size=len(readers))
            for rank, r in enumerate(readers)]


def test_reader_claims_keep_every_line_to_one_read_per_pass(tmp_path):
    """Random file sizes (fewer and more files than ranks: sharing by file and by line), random world sizes changed
    up to three times, each rank reading a random number of lines in between. Whatever the changes, line L of the set
    is read in passes 0, 1, ..., k-1 and in no other: never twice in a pass (read again after a change), never
    skipped in a pass that a later pass reads (lost in a change)."""
    rng = random.Random(0)
    for trial in range(300):
        root = tmp_path / str(trial)
        sizes = [rng.randint(1, 7) for _ in range(rng.randint(1, 5))]
        files = write_set(root, "s", [{"t": i} for i in range(sum(sizes))], n_files=len(sizes))
        for path, size in zip(files, sizes):  # write_set deals records round-robin: give each file its own size
            path.write_text("".join(json.dumps({"t": f"{path.stem}-{k}"}) + "\n" for k in range(size)))
        worlds = [rng.randint(1, 5) for _ in range(rng.randint(2, 4))]
        reads = {}  # line -> the passes it was read in
        readers = [SetReader("s", files, rank, worlds[0]) for rank in range(worlds[0])]
        try:
            for change, world in enumerate(worlds):
                if change:
                    positions = old_positions(readers)
                    readers = [SetReader("s", files, rank, world) for rank in range(world)]
                    for reader in readers:
                        reader.resume_from(positions)
                for reader in readers:
                    for _ in range(rng.randint(0, 6)):
                        line = json.loads(reader.next_line()[0])["t"]
                        reads.setdefault(line, []).append(reader.passes)
        except Exception as e:
            if "gave this rank no line" in str(e):  # more ranks than lines: the existing error, not a resume issue
                continue
            raise
        for line, passes in reads.items():
            assert sorted(passes) == list(range(len(passes))), (sizes, worlds, line, passes)


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return SentencePieceTokenizer(tokenizer_path)


class Traced(DataStream):
    """Stage 1's stream, batches built in this thread (no prefetch), so that the lines its readers handed out are
    exactly those of the state; every line read is recorded."""

    def __init__(self, config, tokenizer, rank, world_size):
        super().__init__(config.data, tokenizer, rank, world_size, pretrain_main.PretrainRecords)
        self.lines = []
        for reader in self.readers.values():
            reader.next_line = self._recording(reader.next_line)

    def _recording(self, next_line):
        def read():
            raw, where = next_line()
            self.lines.append((where.set_name, where.path.name, where.line))
            return raw, where
        return read

    def take(self, n):
        for _ in range(n):
            _, self._handed = self._produce()


def in_flight(states):
    return Counter(tuple(row[0]) for state in states for entries in
                   [s["pending"] for s in state["sets"].values()] + [state["packing_pool"]] for row in entries)


@pytest.mark.parametrize("old_world, new_world, packing", [(2, 1, False), (1, 3, True), (3, 2, True)])
def test_load_resharded_reads_no_line_again_and_deals_out_the_samples_in_flight(tmp_path, tok, caplog, old_world,
                                                                                new_world, packing):
    write_set(tmp_path, "en", lm_records(120, "en", length=40), n_files=4)  # long: chunks of one document pending
    write_set(tmp_path, "zh", lm_records(120, "zh", length=10), n_files=1)  # one file: shared by line on 2+ ranks
    config = settings(tmp_path, {"en": 2, "zh": 1}, max_seq_length=24, batch_size=3, packing=packing)
    old = [Traced(config, tok, rank, old_world) for rank in range(old_world)]
    for dp in old:
        dp.take(4)
    states = [json.loads(json.dumps(dp.state_dict())) for dp in old]
    read_before = {line for dp in old for line in dp.lines}
    assert any(len({row[2] for row in s["pending"]}) < len(s["pending"])
               for state in states for s in state["sets"].values())  # a half-used document is in flight

    with caplog.at_level("INFO"):
        new = [Traced(config, tok, rank, new_world) for rank in range(new_world)]
        reports = [dp.load_resharded(states) for dp in new]
    assert f"the stream of {old_world} ranks continues on {new_world}" in caplog.text
    assert reports[0]["en"]["read_again"] == reports[0]["zh"]["read_again"] == 0
    assert reports[0]["en"]["samples"] + reports[0]["zh"]["samples"] + reports[0]["packing_pool"]["samples"] == sum(
        in_flight(states).values())
    carried = [dp.state_dict() for dp in new]
    assert in_flight(carried) == in_flight(states)  # every sample in flight, on exactly one new rank
    for state in carried:  # the same-size resume of a resharded stream is exact too
        assert all("claims" in s for s in state["sets"].values())
    for dp in new:
        dp.take(6)
    read_after = {line for dp in new for line in dp.lines}
    assert read_after and not read_before & read_after
    assert sum(len(dp.lines) for dp in new) == len(read_after)  # no two new ranks read one line
    for dp in old + new:
        dp.close()


def test_a_rank_starts_at_the_first_pass_its_files_have_unread(tmp_path):
    """Old rank 0 went over its small files 5 times while rank 1 read a few lines of its big ones: the new rank that
    gets a small file starts at pass 5, not at pass 0 with 5 passes to skip (which the data processor would take
    for a set that gives nothing)."""
    files = write_set(tmp_path, "s", [{"t": i} for i in range(40)], n_files=4)
    for path, size in zip(files, (1, 9, 1, 9)):
        path.write_text("".join(json.dumps({"t": f"{path.stem}-{k}"}) + "\n" for k in range(size)))
    old = [SetReader("s", files, rank, 2) for rank in range(2)]
    for _ in range(11):
        old[0].next_line()  # files 0 and 2, one line each: 5 passes and a half
    old[1].next_line()
    positions = old_positions(old)
    new = [SetReader("s", files, rank, 4) for rank in range(4)]
    for reader in new:
        reader.resume_from(positions)
    assert [reader.passes for reader in new] == [5, 0, 5, 0]
    assert json.loads(new[0].next_line()[0])["t"] == "10001-0" and new[0].passes == 6  # read in pass 5: skipped
    assert json.loads(new[2].next_line()[0])["t"] == "10003-0" and new[2].passes == 5
    assert json.loads(new[1].next_line()[0])["t"] == "10002-1"


def test_conversation_samples_keep_their_counted_spans_when_dealt_out(tmp_path, tok):
    """Stage 3's samples in flight carry their answer spans to the new ranks."""
    write_set(tmp_path, "chat", messages_records(60), n_files=3)
    config = settings(tmp_path, {"chat": 1}, max_seq_length=128, batch_size=2, packing=True)
    old = [stream(alignment_sft_main, config, tok, rank, 2) for rank in range(2)]
    for dp in old:
        next(dp)
    states = [json.loads(json.dumps(dp.state_dict())) for dp in old]
    new = stream(alignment_sft_main, config, tok, 0, 1)
    new.load_resharded(states)
    saved = sorted(row for state in states for row in state["sets"]["chat"]["pending"] + state["packing_pool"])
    carried = new.state_dict()
    got = sorted(row for row in carried["sets"]["chat"]["pending"] + carried["packing_pool"])
    assert [row[:2] + row[3:] for row in got] == [row[:2] + row[3:] for row in saved]  # all but the doc numbers
    assert any(len(row) > 3 for row in saved)  # conversations: their spans in the state
    for dp in old + [new]:
        dp.close()


def test_a_copied_file_is_not_a_changed_one(tmp_path):
    """A new modification time alone (a copy to another disk) is reported, not taken for new content; a same-size
    rewrite is."""
    import os

    from training.set_reader import fingerprint, fingerprint_change

    path = tmp_path / "10001.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    saved = fingerprint(path)
    assert fingerprint_change(saved, path) is None
    os.utime(path, ns=(saved["mtime_ns"] + 10**9, saved["mtime_ns"] + 10**9))
    what, content = fingerprint_change(saved, path)
    assert not content and what.startswith("modified ")
    path.write_text('{"text": "b"}\n{"text": "a"}\n')  # shuffled, same size
    what, content = fingerprint_change(saved, path)
    assert content and "first/last 64 KB differ" in what and "size" not in what
