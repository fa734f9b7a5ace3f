"""The data stream (DataStream) through the stages' record rules: batch format, exact mix, determinism, exact
resume, prefetch errors, bad input up front, skip_bad_records."""
import json
import random
import time
import traceback
from collections import Counter

import pytest
import torch

import alignment_sft_main
import pretrain_main
import task_instruct_tuning_main
from data_corpus_helpers import (lm_records, messages_records, settings, sft_records, stage1_corpus, stream,
                                 task_records, translate_records, write_set, write_translate_prompts)
from llama.tokenization_llama import SentencePieceTokenizer
from training.corpus import DataError
from training.settings import SettingsError
from training.data_stream import READ_AHEAD
from training.samples import Sample
from training.set_buffer import SetBuffer

SFT_MIX = {"code-alpaca-en": 1, "cot-en": 2, "leet-code-zh": 1, "mwp-en": 1, "mwp-zh": 1, "others": 6}


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return SentencePieceTokenizer(tokenizer_path)


class RecordingTokenizer:
    """The real tokenizer, remembering what it was asked to encode in batch (and failing on call `fail_on`)."""

    def __init__(self, tok, fail_on=None):
        self.tok, self.fail_on, self.texts, self.calls = tok, fail_on, [], 0
        self.bos_id, self.eos_id, self.pad_id = tok.bos_id, tok.eos_id, tok.pad_id
        self.bos_token, self.eos_token, self.token_to_id = tok.bos_token, tok.eos_token, tok.token_to_id
        self.encode, self.decode, self.token_ends = tok.encode, tok.decode, tok.token_ends

    def encode_batch(self, texts):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("tokenizer exploded")
        self.texts += texts
        return self.tok.encode_batch(texts)


def batches(processor, n):
    return [next(processor) for _ in range(n)]


def same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key


def sft_corpus(root, n=30):
    for name in SFT_MIX:
        write_set(root, name, [dict(r, instruction=f"[{name}] " + r["instruction"]) for r in sft_records(n)])
    return {name: {"weight": w, "file_start": 0} for name, w in SFT_MIX.items()}


def test_batch_format_padding_and_counts(tmp_path, tok):
    split = stage1_corpus(tmp_path)
    with stream(pretrain_main, settings(tmp_path, split, batch_size=6, max_seq_length=512), tok, 0, 1) as dp:
        batch = next(dp)
    assert set(batch) == {"input_ids", "loss_mask", "num_tokens", "num_target_tokens"}
    assert batch["input_ids"].dtype == batch["loss_mask"].dtype == torch.long
    lengths = [int((row != tok.pad_id).sum()) for row in batch["input_ids"]]  # no unk in these texts
    assert batch["input_ids"].shape == (6, max(lengths))
    assert batch["num_tokens"] == sum(lengths)
    assert batch["num_target_tokens"] == int(batch["loss_mask"].sum())
    for row, mask, n in zip(batch["input_ids"], batch["loss_mask"], lengths):
        assert row[0] == tok.bos_id and row[n - 1] == tok.eos_id
        assert (row[n:] == tok.pad_id).all() and (mask[n:] == 0).all() and mask[0] == 0


def classify_stage1(tok, row):
    text = tok.decode(row.tolist())
    if "Translate into Chinese:" in text or "请翻译成英文：" in text:
        return "translate"
    return "zh" if any("\u4e00" <= c <= "\u9fff" for c in text) else "en"


def test_exact_mix_counts_in_every_batch(tmp_path, tok):
    split = stage1_corpus(tmp_path)
    with stream(pretrain_main, settings(tmp_path, split, batch_size=10, max_seq_length=512), tok, 0, 1) as dp:
        for batch in batches(dp, 6):
            assert Counter(classify_stage1(tok, row) for row in batch["input_ids"]) == {"zh": 4, "en": 4,
                                                                                       "translate": 2}
    root = tmp_path / "sft"
    split = sft_corpus(root)
    with stream(alignment_sft_main, settings(root, split, batch_size=5, max_seq_length=512), tok, 0, 1) as dp:
        rows = [tok.decode(row.tolist()) for batch in batches(dp, 12) for row in batch["input_ids"]]
    names = [next(name for name in SFT_MIX if f"[{name}]" in text) for text in rows]
    for start in range(0, len(names) - 12):  # any 12 consecutive samples: the exact weights
        assert Counter(names[start:start + 12]) == SFT_MIX


def test_deterministic_per_seed_and_rank(tmp_path, tok):
    split = stage1_corpus(tmp_path, n=60, n_files=4)

    def first(seed, rank, world=2):
        with stream(pretrain_main, settings(tmp_path, split, seed=seed), tok, rank, world) as dp:
            return batches(dp, 5)

    for a, b in zip(first(1, 0), first(1, 0)):
        same(a, b)
    assert not all(torch.equal(a["loss_mask"], b["loss_mask"]) for a, b in zip(first(1, 0), first(2, 0)))
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first(1, 0), first(1, 1)))


@pytest.mark.parametrize("stage", ["pretrain_split", "pretrain_split_packed", "task_packed", "sft_packed",
                                   "messages_packed"])
def test_resume_continues_with_exactly_the_next_batches(tmp_path, tok, stage):
    if stage.startswith("pretrain_split"):  # long documents: split chunks pending in the set buffers across batches
        split = stage1_corpus(tmp_path, n=80)
        write_set(tmp_path, "en", lm_records(80, "en", length=40))  # ~7 chunks per document
        module, kwargs = pretrain_main, dict(max_seq_length=24, batch_size=3, packing=stage.endswith("packed"))
    elif stage == "task_packed":
        split = {"zh": 1, "translate": 1, "qa": 2}
        write_set(tmp_path, "zh", lm_records(50, "zh", length=30))
        write_set(tmp_path, "translate", translate_records(50))
        write_translate_prompts(tmp_path)
        write_set(tmp_path, "qa", task_records(50, "qa"), n_files=3)
        (tmp_path / "prompts").mkdir()
        (tmp_path / "prompts" / "qa.pre.prompt").write_text("Answer:\n", encoding="utf-8")
        module, kwargs = task_instruct_tuning_main, dict(max_seq_length=64, batch_size=3, packing=True)
    elif stage == "messages_packed":  # conversations: several counted spans per sample, in the state too
        write_set(tmp_path, "chat", messages_records(40))
        split = {"chat": 1}
        module, kwargs = alignment_sft_main, dict(max_seq_length=256, batch_size=2, packing=True)
    else:
        split = sft_corpus(tmp_path)
        module, kwargs = alignment_sft_main, dict(max_seq_length=128, batch_size=2, packing=True)
    K, M = 7, 6

    def make(tokenizer=tok, rank=1):
        return stream(module, settings(tmp_path, split, **kwargs), tokenizer, rank, 2)

    with make() as dp:
        reference = batches(dp, K + M)
    with make() as dp:
        batches(dp, K)
        time.sleep(0.3)  # let the prefetch thread run ahead: the state must still be that of batch K
        state = json.loads(json.dumps(dp.state_dict()))
    recorder = RecordingTokenizer(tok)
    with make(recorder) as dp:
        dp.load_state_dict(state)
        assert dp.state_dict() == state
        for expected, got in zip(reference[K:], batches(dp, M)):
            same(expected, got)
    if stage.startswith("pretrain_split"):  # a half-used document was carried
        assert any(len({doc for _, _, doc in s["pending"]}) < len(s["pending"]) for s in state["sets"].values())
    if stage.endswith("packed"):
        assert state["packing_pool"]
    if stage == "messages_packed":
        assert any(len(row) == 4 for row in state["packing_pool"] + state["sets"]["chat"]["pending"])
    with make(rank=0) as other:
        with pytest.raises(DataError, match="rank"):
            other.load_state_dict(state)


def test_set_buffer_draws_documents_at_random_chunks_in_order_and_apart():
    long_doc = [Sample([1, chunk], 1, doc=0) for chunk in range(6)]
    buffer = SetBuffer()
    buffer.add(long_doc)
    for doc in range(1, 10):
        buffer.add([Sample([2, doc], 1, doc=doc)])
    assert SetBuffer(buffer.samples()).samples() == buffer.samples()  # the state round trip
    rng, batches = random.Random(0), []
    while buffer.samples():
        taken, batch = set(), []
        for _ in range(3):
            batch.append(buffer.draw(rng, taken))
            taken.add(batch[-1].doc)
        batches.append(batch)
    long_per_batch = [[s.ids[1] for s in batch if s.doc == 0] for batch in batches]
    assert max(map(len, long_per_batch[:3])) == 1  # apart while the set has other documents pending
    assert sum(long_per_batch, []) == list(range(6))  # its chunks in order
    assert [s.ids[1] for s in sum(batches, []) if s.doc != 0] != list(range(1, 10))  # drawn, not read order

    buffer = SetBuffer(long_doc)  # nothing else pending: its chunks share the batch, in order
    taken = set()
    assert [buffer.draw(rng, taken).ids[1] for _ in range(3)] == [0, 1, 2]

    buffer = SetBuffer(Sample([2, doc], 1, doc=doc) for doc in range(1, 10))  # no RNG: read order
    assert [buffer.draw(None, set()).doc for _ in range(9)] == list(range(1, 10))


def test_chunks_of_a_long_document_spread_over_batches(tmp_path, tok):
    long_text = " ".join(f"apples {i} oranges" for i in range(10))
    records = [{"text": long_text}] + [{"text": f"short {i}"} for i in range(200)]
    write_set(tmp_path, "en", records, n_files=1)
    full = [tok.bos_id] + tok.encode(long_text) + [tok.eos_id]
    chunks = [tuple(full[start:start + 16]) for start in range(0, len(full), 16)]
    assert len(chunks) >= 6 and len(set(chunks)) == len(chunks)
    with stream(pretrain_main, settings(tmp_path, {"en": 1}, batch_size=4, max_seq_length=16), tok, 0, 1) as dp:
        found = []  # per batch: the long document's chunks in it
        for batch in batches(dp, 40):
            rows = [tuple(row[:int((row != tok.pad_id).sum())].tolist()) for row in batch["input_ids"]]
            found.append([chunks.index(row) for row in rows if row in chunks])
        assert dp.counters["records"] <= len(records)  # read once: its chunks are told apart by their tokens
    assert max(map(len, found)) == 1  # never two of its chunks in one batch
    assert sum(found, []) == list(range(len(chunks)))  # every one, in order
    with_chunk = [index for index, chunks_in in enumerate(found) if chunks_in]
    assert with_chunk[-1] - with_chunk[0] + 1 > len(chunks)  # spread among batches without it

    # long_text="truncate" (the recipe's): one sample per document, nothing to spread, the files' order kept
    with stream(pretrain_main, settings(tmp_path, {"en": 1}, batch_size=4, max_seq_length=16,
                                        long_text="truncate"), tok, 0, 1) as dp:
        first = [row[:int((row != tok.pad_id).sum())].tolist() for row in next(dp)["input_ids"]]
    assert first == [full[:16]] + [[tok.bos_id] + tok.encode(f"short {i}") + [tok.eos_id] for i in range(3)]


def test_resume_does_not_reread_or_retokenize(tmp_path, tok):
    write_set(tmp_path, "en", lm_records(200), n_files=1)
    def make(tokenizer):
        return stream(pretrain_main, settings(tmp_path, {"en": 1}, batch_size=4, max_seq_length=512),
                      tokenizer, 0, 1)

    with make(tok) as dp:
        batches(dp, 5)
        state = dp.state_dict()
    read = state["counters"]["records"]  # batches handed out + samples already built ahead (pending)
    assert read >= 20 and state["sets"]["en"]["line"] == read and len(state["sets"]["en"]["pending"]) == read - 20
    recorder = RecordingTokenizer(tok)
    with make(recorder) as dp:
        dp.load_state_dict(state)
        batches(dp, 10)
    assert recorder.texts[0].endswith(f"#{read}")  # the first record after the saved position, nothing before it


def test_worker_error_reaches_caller_fast_with_location(tmp_path, tok):
    records = lm_records(60)
    records[40] = b'{"text": "broken\n'  # line 41 of the single file: past the start-up check
    write_set(tmp_path, "en", records, n_files=1)
    dp = stream(pretrain_main, settings(tmp_path, {"en": 1}, batch_size=2), tok, 0, 1)
    start = time.monotonic()
    with pytest.raises(DataError, match=r"set 'en', file .*10001\.jsonl, line 41: malformed JSON"):
        for _ in range(100):
            next(dp)
    assert time.monotonic() - start < 5
    dp.close()

    write_set(tmp_path, "zh", lm_records(60, "zh"), n_files=1)
    dp = stream(pretrain_main, settings(tmp_path, {"zh": 1}, batch_size=2), RecordingTokenizer(tok, 3), 0, 1)
    start = time.monotonic()
    with pytest.raises(DataError, match=r"data worker failed at records set 'zh', file .*, line \d+ \.\.\. .*line \d+: "
                                        r"RuntimeError: tokenizer exploded") as info:
        for _ in range(10):
            next(dp)
    assert time.monotonic() - start < 5
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "encode_batch" in "".join(traceback.format_exception(info.value))  # the worker's own frames
    dp.close()


def write_stage1(root, bad_line=None, bad_at=2):
    stage1_corpus(root)
    if bad_line is not None:
        path = root / "en" / "10001.jsonl"
        lines = path.read_bytes().splitlines(keepends=True)
        lines[bad_at - 1] = bad_line
        path.write_bytes(b"".join(lines))


BAD_RECORDS = [
    (b'{"text": "unclosed\n', "malformed JSON"),
    (b'{"txt": "x"}\n', "missing field 'text'"),
    (b'{"text": 5}\n', "field 'text' must be a string"),
    (b'{"text": "caf\xe9"}\n', "invalid UTF-8"),
    (b'["text"]\n', "expected a JSON object"),
]


@pytest.mark.parametrize("line,message", BAD_RECORDS)
def test_bad_record_in_first_lines_fails_at_construction_naming_set_file_line(tmp_path, tok, line, message):
    write_stage1(tmp_path, line, bad_at=3)
    with pytest.raises(DataError, match=rf"set 'en', file .*en/10001\.jsonl, line 3: {message}"):
        stream(pretrain_main, settings(tmp_path, {"zh": 4, "en": 4, "translate": 2}), tok, 0, 1)


def corrupt(root, case):
    """Break the stage-1 corpus at root one way; returns (split, needle)."""
    split = {"zh": 4, "en": 4, "translate": 2}
    if case == "missing set folder":
        return dict(split, code=1), r"set 'code': folder .*code does not exist"
    if case == "empty set folder":
        (root / "code").mkdir()
        return dict(split, code=1), r"set 'code': folder .*code holds no <NNNNN>\.jsonl"
    if case == "file_start past every file":
        return dict(split, en={"weight": 4, "file_start": 20000}), r"set 'en': file_start=20000 leaves no file"
    if case == "every file empty":
        for path in (root / "en").glob("*.jsonl"):
            path.write_bytes(b"")
        return split, r"set 'en': every file is empty"
    if case == "missing translation prompt":
        (root / "translate" / "zh-en.prompt").unlink()
        return split, r"prompt file .*translate/zh-en\.prompt does not exist"
    if case == "empty translation prompt":
        (root / "translate" / "en-zh.prompt").write_text("\n  \n")
        return split, r"prompt file .*en-zh\.prompt holds no prompt"
    if case == "missing translation field":
        path = root / "translate" / "10002.jsonl"
        lines = path.read_bytes().splitlines(keepends=True)
        path.write_bytes(b"".join(lines[:1] + [b'{"en_text": "hello"}\n'] + lines[2:]))
        return split, r"set 'translate', file .*10002\.jsonl, line 2: missing field 'zh_text'"
    if case == "missing root":
        return split, "pretrain_data_root_dir"
    raise AssertionError(case)


CORPUS_CASES = ["missing set folder", "empty set folder", "file_start past every file", "every file empty",
                "missing translation prompt", "empty translation prompt", "missing translation field", "missing root"]


@pytest.mark.parametrize("case", CORPUS_CASES)
@pytest.mark.parametrize("module", [pretrain_main, task_instruct_tuning_main], ids=["stage1", "stage2"])
def test_bad_corpus_fails_at_construction(tmp_path, tok, case, module):
    write_stage1(tmp_path)
    split, needle = corrupt(tmp_path, case)
    root = tmp_path / "nowhere" if case == "missing root" else tmp_path
    with pytest.raises(DataError, match=needle):
        stream(module, settings(root, split), tok, 0, 1)


def test_stage2_task_record_and_prompt_file_errors(tmp_path, tok):
    write_set(tmp_path, "qa", task_records(10, "qa"), n_files=1)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "qa.post.prompt").write_bytes(b"fine\n\xff\xfe broken\n")
    split = {"qa": {"weight": 1, "file_start": 0}}
    with pytest.raises(DataError, match=r"prompt file .*qa\.post\.prompt, line 2: invalid UTF-8"):
        stream(task_instruct_tuning_main, settings(tmp_path, split), tok, 0, 1)
    (tmp_path / "prompts" / "qa.post.prompt").write_text("fine\n")
    write_set(tmp_path, "qa", [{"input": "x", "output": "y", "type": 3}] + task_records(5, "qa"), n_files=1)
    with pytest.raises(DataError, match=r"set 'qa', file .*10001\.jsonl, line 1: field 'type' must be a string"):
        stream(task_instruct_tuning_main, settings(tmp_path, split), tok, 0, 1)


def test_prompt_file_first_needed_mid_stream_names_record_and_file(tmp_path, tok):
    records = task_records(40, "qa")
    records[30] = dict(records[30], type="late")  # past the start-up check of the first lines
    write_set(tmp_path, "qa", records, n_files=1)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "late.pre.prompt").write_bytes(b"\xff\n")
    (tmp_path / "prompts" / "late.post.prompt").write_bytes(b"\xff\n")
    dp = stream(task_instruct_tuning_main, settings(tmp_path, {"qa": 1}, batch_size=4), tok, 0, 1)
    with pytest.raises(DataError, match=r"set 'qa', file .*10001\.jsonl, line 31: prompt file .*late\.p.*\.prompt, "
                                        r"line 1: invalid UTF-8"):
        batches(dp, 20)
    dp.close()


def test_stage3_record_without_instruction_or_input_is_bad(tmp_path, tok):
    write_set(tmp_path, "others", sft_records(3) + [{"instruction": " ", "input": "", "output": "x"}], n_files=1)
    with pytest.raises(DataError, match=r"set 'others', file .*10001\.jsonl, line 4: neither 'instruction' nor"):
        stream(alignment_sft_main, settings(tmp_path, {"others": 1}), tok, 0, 1)


@pytest.mark.parametrize("override,needle", [(dict(long_text="cut"), "setting 'long_text' = 'cut' is invalid"),
                                             (dict(long_prompt="end"), "setting 'long_prompt' = 'end' is invalid"),
                                             (dict(max_seq_length=1), "setting 'max_seq_length' = 1 is invalid"),
                                             (dict(batch_size=0), "setting 'batch_size' = 0 is invalid")])
def test_bad_data_settings_stop_at_parsing_and_name_the_setting(tmp_path, override, needle):
    """The parser checks the data settings once; the stream takes them as given."""
    with pytest.raises(SettingsError, match=needle):
        settings(tmp_path, {"zh": 1}, **override)


def test_a_bad_mix_weight_names_the_setting(tmp_path, tok):
    split = stage1_corpus(tmp_path)
    with pytest.raises(DataError, match="pretrain_data_split"):
        stream(pretrain_main, settings(tmp_path, {**split, "zh": -2}), tok, 0, 1)


def test_skip_bad_records_counts_logs_and_carries_skips(tmp_path, tok, caplog):
    records = lm_records(30)
    records[1] = b'{"text": \n'
    records[4] = {"text": "   "}
    records[6] = b"\n"
    records[19] = {"text": 3}
    records[24] = b'{"text": "\xff"}\n'
    write_set(tmp_path, "en", records, n_files=1)
    make = lambda: stream(pretrain_main,  # noqa: E731
        settings(tmp_path, {"en": 1}, batch_size=25, max_seq_length=512, skip_bad_records=True), tok, 0, 1)
    with pytest.raises(DataError, match="line 2: malformed JSON"):
        stream(pretrain_main, settings(tmp_path, {"en": 1}), tok, 0, 1)
    with caplog.at_level("WARNING"):
        dp = make()
        next(dp)  # 25 usable records = one pass; the refill reads READ_AHEAD passes
        state = dp.state_dict()
        dp.close()
    passes = READ_AHEAD
    assert state["counters"] == dict(state["counters"], bad_records=3 * passes, empty_texts=passes,
                                     blank_lines=passes, records=25 * passes)
    assert "10001.jsonl, line 20" in caplog.text and "line 25" in caplog.text and "line 2:" in caplog.text
    with make() as dp:
        dp.load_state_dict(state)
        assert dp.counters["bad_records"] == 3 * passes
        batches(dp, READ_AHEAD)  # the last of these refills: as many passes again
        assert dp.counters["bad_records"] == 6 * passes


def test_set_with_no_usable_record_raises_instead_of_spinning(tmp_path, tok):
    write_set(tmp_path, "en", lm_records(4), n_files=1)
    write_set(tmp_path, "zh", [{"text": " "}] * 3 + [b"{bad\n"] * 20, n_files=1)
    dp = stream(pretrain_main, settings(tmp_path, {"en": 1, "zh": 1}, skip_bad_records=True), tok, 0, 1)
    start = time.monotonic()
    with pytest.raises(DataError, match="set 'zh': a whole pass .* gave no usable record"):
        next(dp)
    assert time.monotonic() - start < 5
    dp.close()


def test_memory_stays_flat_on_a_large_file(tmp_path, tok):
    import tracemalloc

    path = tmp_path / "en" / "10001.jsonl"
    path.parent.mkdir()
    line = json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 4}).encode() + b"\n"
    path.write_bytes(line * 100_000)  # ~18 MB
    tracemalloc.start()
    try:
        with stream(pretrain_main, settings(tmp_path, {"en": 1}, batch_size=8), tok, 0, 1) as dp:
            batches(dp, 5)
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert path.stat().st_size > 15e6 and peak < 3e6  # streamed: never near the file's size
