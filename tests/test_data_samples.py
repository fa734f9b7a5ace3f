"""Exact sample formats and loss-mask positions of every sample kind of the three stages.

A set's samples come out of its buffer in random order (training/set_buffer.py), so samples are matched to the
record they came from rather than zipped with the file's records."""
import random
from collections import Counter

import pytest

import alignment_sft_main
import pretrain_main
import task_instruct_tuning_main
from data_corpus_helpers import (joined_split, lm_records, settings, stream, take, task_records,
                                 translate_records, write_set, write_translate_prompts, zh_text)
from llama import load_tokenizer
from training.corpus import DataError
from training.data_stream import READ_AHEAD
from training.samples import masked_prefix_length


@pytest.fixture(scope="module")
def sp_tok(tokenizer_path):
    return load_tokenizer(tokenizer_path)


@pytest.fixture(scope="module", params=["sentencepiece", "qwen2"])
def tok(request, sp_tok, bpe_tokenizer_dirs):
    """The recipe's SentencePiece tokenizer (bos <s>), and a Qwen2-style tokenizer.json that adds no bos."""
    return sp_tok if request.param == "sentencepiece" else load_tokenizer(bpe_tokenizer_dirs[request.param])


def head(tok):
    """What the tokenizer puts before a text: [bos], or nothing (Qwen)."""
    return tok.encode("", bos=True)


def prompted(tok, prefix_text, answer_text):
    """The exact sample bos + prefix (masked), answer + eos (counted): prefix and answer tokenized apart (stage 2)."""
    prefix = tok.encode(prefix_text, bos=True)
    answer = tok.encode(answer_text) + [tok.eos_id]
    return prefix + answer, [0] * len(prefix) + [1] * len(answer)


def chat_prompted(tok, prefix_text, answer_text):
    """The exact stage-3 single turn: bos + prefix (masked), answer + eos (counted), tokenized as one text."""
    prefix, answer = joined_split(tok, prefix_text, answer_text)
    prefix, answer = head(tok) + prefix, answer + [tok.eos_id]
    return prefix + answer, [0] * len(prefix) + [1] * len(answer)


def key(sample):
    ids, mask = sample
    return tuple(ids), tuple(mask)


def match_forms(samples, forms, n_records):
    """forms: {key(sample): (record index, form)}, every possible form of every record. Each sample must be exactly
    one of them; returns the matched forms. The buffer's random draws leave at most READ_AHEAD records of a pass
    pending, so the samples of one pass cover all records but those."""
    matched = []
    for sample in samples:
        assert key(sample) in forms, sample
        matched.append(forms[key(sample)])
    assert len({index for index, _ in matched}) >= n_records - READ_AHEAD
    return matched


def test_masked_prefix_length_range_and_short_texts():
    rng = random.Random(0)
    for n in range(1, 60):
        draws = {masked_prefix_length(n, rng) for _ in range(200)}
        assert min(draws) >= 1 and max(draws) <= max(n - 1, 1)
        if n >= 4:
            assert draws == set(range(int(0.2 * n) + 1, int(0.7 * n) + 1))


def test_stage1_lm_sample_is_bos_text_eos_with_random_prefix_masked(tmp_path, tok):
    records = lm_records(30, "zh")
    write_set(tmp_path, "zh", records, n_files=1)
    processor = stream(pretrain_main, settings(tmp_path, {"zh": 1}, batch_size=1, max_seq_length=512), tok, 0, 1)
    texts = {tuple(tok.encode(record["text"], bos=True, eos=True)): i for i, record in enumerate(records)}
    masked = []
    samples = take(processor, 30)
    assert len({texts[tuple(ids)] for ids, _ in samples}) >= 30 - READ_AHEAD  # each is bos + a record's text + eos
    for ids, mask in samples:
        n, k = len(ids), mask.index(1)
        assert mask == [0] * k + [1] * (n - k)
        assert int(0.2 * n) + 1 <= k <= int(0.7 * n)
        masked.append(k)
    assert len(set(masked)) > 5  # drawn, not fixed


def check_translation(tok, samples, records, fmt, prompts):
    forms = {key(prompted(tok, fmt(record[d[:2] + "_text"], p), record[d[3:] + "_text"])): (i, (d, p))
             for i, record in enumerate(records) for d in ("en-zh", "zh-en") for p in prompts[d]}
    assert len(forms) == len(records) * 4  # every form tells its record and its direction and prompt apart
    seen = Counter(form for _, form in match_forms(samples, forms, len(records)))
    assert len(seen) == 4  # both directions, both prompts of each


def test_stage1_translation_prompt_follows_source_both_directions(tmp_path, tok):
    records = translate_records(40)
    write_set(tmp_path, "translate", records, n_files=1)
    prompts = {"en-zh": ["Translate into Chinese:", "In Chinese, please:"], "zh-en": ["请翻译成英文：", "英文是什么？"]}
    write_translate_prompts(tmp_path, ["  " + prompts["en-zh"][0] + "  ", prompts["en-zh"][1], ""],
                            [prompts["zh-en"][0], "\t" + prompts["zh-en"][1]])  # lines are stripped, blanks dropped
    processor = stream(pretrain_main, settings(tmp_path, {"translate": 1}, batch_size=1, max_seq_length=512),
                       tok, 0, 1)
    check_translation(tok, take(processor, 40), records, lambda source, p: source + "\n" + p, prompts)


def test_stage2_translation_prompt_after_rstripped_source(tmp_path, tok):
    records = [{"en_text": r["en_text"] + "  \n", "zh_text": r["zh_text"] + " "} for r in translate_records(40)]
    write_set(tmp_path, "translate", records, n_files=1)
    prompts = {"en-zh": ["Translate into Chinese:", "In Chinese, please:"], "zh-en": ["请翻译成英文：", "英文是什么？"]}
    write_translate_prompts(tmp_path, prompts["en-zh"], prompts["zh-en"])
    processor = stream(task_instruct_tuning_main,
        settings(tmp_path, {"translate": {"weight": 1, "file_start": 0}}, batch_size=1, max_seq_length=512), tok, 0, 1)
    check_translation(tok, take(processor, 40), records, lambda source, p: source.rstrip() + "\n" + p + "\n", prompts)


def test_stage2_task_prompt_pre_post_and_none(tmp_path, tok):
    n = 60
    records = [dict(r, input=r["input"] + " \n", output=r["output"] + "  ") for r in task_records(n, "qa")]
    records[::3] = [dict(r, type="preonly") for r in records[::3]]
    records[1::6] = [dict(r, type="") for r in records[1::6]]
    write_set(tmp_path, "zh-qa", records, n_files=1)
    (tmp_path / "prompts").mkdir()
    # each line strip()ped as in the recipe, blank lines left out
    (tmp_path / "prompts" / "qa.pre.prompt").write_text("  Read and answer:  \n\n\tAnswer this:\n", encoding="utf-8")
    (tmp_path / "prompts" / "qa.post.prompt").write_text("What is the answer?\n", encoding="utf-8")
    (tmp_path / "prompts" / "preonly.pre.prompt").write_text("Only before:\n", encoding="utf-8")
    processor = stream(task_instruct_tuning_main,
        settings(tmp_path, {"zh-qa": {"weight": 1, "file_start": 0}}, batch_size=1, max_seq_length=512), tok, 0, 1)
    pre = {"qa": ["Read and answer:", "Answer this:"], "preonly": ["Only before:"], "": []}
    post = {"qa": ["What is the answer?"], "preonly": [], "": []}
    forms = {}
    for i, record in enumerate(records):
        x, y, t = record["input"], record["output"].rstrip(), record["type"]
        forms.update({key(prompted(tok, p + "\n" + x.rstrip() + "\n\n", y)): (i, (t, "pre", p)) for p in pre[t]})
        forms.update({key(prompted(tok, x.rstrip() + "\n" + p + "\n", y)): (i, (t, "post", p)) for p in post[t]})
        forms[key(prompted(tok, x + " ", y))] = (i, (t, "none", ""))
    seen = Counter(form for _, form in match_forms(take(processor, n), forms, n))
    assert {key[:2] for key in seen} == {("qa", "pre"), ("qa", "post"), ("preonly", "pre"), ("preonly", "none"),
                                         ("", "none")}
    assert ("qa", "pre", "Answer this:") in seen and ("qa", "pre", "Read and answer:") in seen


def test_stage3_human_assistant_format(tmp_path, tok):
    records = [{"instruction": " Add the numbers. ", "input": "1 2\n", "output": " 3 \n"},
               {"instruction": "Say hi.", "input": "", "output": "hi"},
               {"instruction": "  ", "input": "What is the capital of France?", "output": "Paris."}]
    write_set(tmp_path, "others", records, n_files=1)
    processor = stream(alignment_sft_main,
        settings(tmp_path, {"others": {"weight": 1, "file_start": 0}}, batch_size=1, max_seq_length=512), tok, 0, 1)
    # instruction and input stripped; the answer keeps its leading space (its indentation), not its trailing ones
    expected = [chat_prompted(tok, "Human: Add the numbers.\n1 2\nAssistant:", "  3"),
                chat_prompted(tok, "Human: Say hi.\nAssistant:", " hi"),
                chat_prompted(tok, "Human: What is the capital of France?\nAssistant:", " Paris.")]
    assert {key(sample) for sample in take(processor, 8)} == {key(sample) for sample in expected}


def test_long_lm_text_split_keeps_every_token_once_with_own_masks(tmp_path, tok):
    records = [{"text": " ".join(f"apples {i} oranges" for i in range(40))}]  # one long document
    write_set(tmp_path, "en", records, n_files=1)
    full = tok.encode(records[0]["text"], bos=True, eos=True)
    length = 16
    assert len(full) > 5 * length
    chunks = [tuple(full[start:start + length]) for start in range(0, len(full), length)]
    assert len(set(chunks)) == len(chunks)
    processor = stream(pretrain_main, settings(tmp_path, {"en": 1}, batch_size=1, max_seq_length=length),
                       tok, 0, 1)
    # The first refill reads READ_AHEAD copies of the one-document corpus; their chunks come out interleaved at
    # random, each copy's in order, every token of each copy exactly once, before the document is read again.
    samples = take(processor, READ_AHEAD * len(chunks) + 1)
    drawn = [chunks.index(tuple(ids)) for ids, _ in samples[:-1]]
    assert Counter(drawn) == {index: READ_AHEAD for index in range(len(chunks))}
    for end in range(len(drawn)):  # chunk j of a copy never before chunk j - 1 of it
        counts = Counter(drawn[:end])
        assert all(counts[j] >= counts[j + 1] for j in range(len(chunks) - 1))
    assert drawn[:len(chunks)] != list(range(len(chunks)))  # interleaved, not one copy after the other
    assert tuple(samples[-1][0]) == chunks[0]  # then the document again (wrap-around)
    for ids, mask in samples:
        n, k = len(ids), mask.index(1) if 1 in mask else len(ids)
        assert n <= length and mask == [0] * k + [1] * (n - k)
        if n >= 4:
            assert int(0.2 * n) + 1 <= k <= int(0.7 * n)

    processor = stream(pretrain_main,
        settings(tmp_path, {"en": 1}, batch_size=1, max_seq_length=length, long_text="truncate"), tok, 0, 1)
    with processor:
        batch = next(processor)
        assert batch["input_ids"][0].tolist() == full[:length]
        # counted as read: the refill read READ_AHEAD copies of the one-document corpus
        assert processor.counters["discarded_tokens"] == READ_AHEAD * (len(full) - length)


# ---------------------------------------------------------------- too-long prompted samples (long_prompt)

PASSAGE = " ".join(lm_records(16)[i]["text"] for i in range(16))  # a few hundred tokens
QUESTION = "Question: in what year was it built?"
ROW = 128  # max_seq_length: with the tests' 400-piece tokenizer, half of what is left of it holds the question


class NoReencode:
    """The tokenizer without encode/decode: a sample may only come from the batch call and piece offsets."""

    def __init__(self, tok):
        self.bos_id, self.eos_id, self.pad_id = tok.bos_id, tok.eos_id, tok.pad_id
        self.bos_token, self.eos_token, self.token_to_id = tok.bos_token, tok.eos_token, tok.token_to_id
        self.encode_batch, self.token_ends = tok.encode_batch, tok.token_ends

    def encode(self, *args, **kwargs):
        raise AssertionError("a sample was re-tokenized")

    decode = encode


def inner_tokens(tok, parts, index):
    """[first, stop): the tokens of the joined parts lying wholly inside parts[index], by SentencePiece's own piece
    offsets or the tokenizers library's (independent of Tokenizer.token_ends)."""
    start = len("".join(parts[:index]))
    end = start + len(parts[index])
    if hasattr(tok, "sp"):
        spans = [(p.begin, p.end) for p in tok.sp.encode("".join(parts), out_type="immutable_proto").pieces]
    else:
        spans = tok.tk.encode("".join(parts), add_special_tokens=False).offsets
    inside = [k for k, (begin, stop) in enumerate(spans) if begin >= start and stop <= end]
    return inside[0], inside[-1] + 1


def middle_cut_sample(tok, parts, cut_order, answer, length, joined=False):
    """The expected (ids, mask) of a too-long sample under long_prompt="middle": the Cut parts (indices into parts,
    the first to lose tokens first) each lose tokens from their middle, keeping head and tail (the tail one more
    where odd), until [bos] + prefix + answer + eos is exactly `length` tokens. joined: prefix and answer tokenized
    as one text (stage 3)."""
    if joined:
        prefix, answer_ids = joined_split(tok, "".join(parts), answer)
        answer_ids = answer_ids + [tok.eos_id]
    else:
        prefix, answer_ids = tok.encode("".join(parts)), tok.encode(answer) + [tok.eos_id]
    excess = len(head(tok)) + len(prefix) + len(answer_ids) - length
    ranges = {index: inner_tokens(tok, parts, index) for index in cut_order}
    for index in cut_order:  # later parts come first, so earlier ranges stay valid
        first, stop = ranges[index]
        drop = min(excess, stop - first)
        keep = stop - first - drop
        prefix = prefix[:first + keep // 2] + prefix[stop - (keep - keep // 2):]
        excess -= drop
    assert excess == 0
    ids = head(tok) + prefix + answer_ids
    return ids, [0] * (len(ids) - len(answer_ids)) + [1] * len(answer_ids)


def stream_samples(module, root, set_name, records, n, tok, **overrides):
    write_set(root, set_name, records, n_files=1)
    values = dict(batch_size=1, max_seq_length=ROW)
    values.update(overrides)
    processor = stream(module, settings(root, {set_name: {"weight": 1, "file_start": 0}}, **values),
                       NoReencode(tok), 0, 1)
    with processor:
        samples = [(b["input_ids"][0].tolist(), b["loss_mask"][0].tolist()) for _, b in zip(range(n), processor)]
        return samples, processor.counters


def test_long_task_input_loses_its_middle_keeping_prompt_head_question_and_answer(tmp_path, tok):
    task_input = PASSAGE + "\n" + QUESTION
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "qa.pre.prompt").write_text("Read and answer:\n", encoding="utf-8")
    (tmp_path / "prompts" / "qa.post.prompt").write_text("What is the answer?\n", encoding="utf-8")
    samples, counters = stream_samples(task_instruct_tuning_main, tmp_path, "qa",
                                       [{"input": task_input, "output": "1996", "type": "qa"}], 8, tok)
    forms = {"pre": ("Read and answer:\n", task_input, "\n\n"), "post": (task_input, "\nWhat is the answer?\n")}
    expected = {name: middle_cut_sample(tok, parts, [parts.index(task_input)], "1996", ROW)
                for name, parts in forms.items()}
    assert {name for sample in samples for name, form in expected.items() if sample == form} == {"pre", "post"}
    assert all(sample in expected.values() for sample in samples)
    for ids, mask in expected.values():
        assert len(ids) == ROW and ids[-3:] == tok.encode("1996")[-2:] + [tok.eos_id]
        text = tok.decode(ids[:mask.index(1)])
        assert QUESTION in text and PASSAGE[:12] in text and " #8 " not in text  # the middle records are gone
    assert tok.decode(expected["pre"][0][:expected["pre"][1].index(1)]).startswith("Read and answer:\n")
    assert tok.decode(expected["post"][0][:expected["post"][1].index(1)]).endswith("\nWhat is the answer?\n")
    dropped = len(tok.encode("".join(forms["pre"]))) + 1 + len(tok.encode("1996")) + 1 - ROW
    assert counters["cut_input_tokens"] >= dropped and counters["cut_answers"] == 0


def test_stage3_cuts_the_input_first_and_the_instruction_last(tmp_path, tok):
    instruction = "Answer briefly."
    samples, counters = stream_samples(alignment_sft_main, tmp_path, "others",
                                       [{"instruction": instruction, "input": PASSAGE + "\n" + QUESTION,
                                         "output": "In 1996."}], 2, tok)
    parts = ("Human: ", instruction, "\n", PASSAGE + "\n" + QUESTION, "\n", "Assistant:")
    assert samples[0] == middle_cut_sample(tok, parts, [3], " In 1996.", ROW, joined=True)
    text = tok.decode(samples[0][0][:samples[0][1].index(1)])
    assert text.startswith(f"Human: {instruction}\n{PASSAGE[:10]}") and text.endswith(f"{QUESTION}\nAssistant:")
    assert counters["cut_input_tokens"] > 0

    # The input alone cannot make room: it loses every token inside it, then the instruction its middle.
    long_instruction = "Summarise this text: " + PASSAGE
    samples, _ = stream_samples(alignment_sft_main, tmp_path / "b", "others",
                                [{"instruction": long_instruction, "input": PASSAGE, "output": "In 1996."}], 1, tok)
    parts = ("Human: ", long_instruction, "\n", PASSAGE, "\n", "Assistant:")
    assert samples[0] == middle_cut_sample(tok, parts, [3, 1], " In 1996.", ROW, joined=True)
    text = tok.decode(samples[0][0][:samples[0][1].index(1)])
    assert text.startswith("Human: Summarise this text: ") and text.endswith("\nAssistant:")


@pytest.mark.parametrize("module,fmt", [(pretrain_main, lambda source, p: source + "\n" + p),
                                        (task_instruct_tuning_main, lambda source, p: source + "\n" + p + "\n")],
                         ids=["stage1", "stage2"])
def test_long_translation_keeps_its_source_and_cuts_the_target_end(tmp_path, tok, module, fmt):
    write_translate_prompts(tmp_path, ["Translate into Chinese:"], ["请翻译成英文："])
    prompts = {"en-zh": "Translate into Chinese:", "zh-en": "请翻译成英文："}
    # each side about 70 tokens, whatever the tokenizer: a source fits the row, a pair does not
    about_70 = lambda make: next(make(k) for k in range(1, 999) if len(tok.encode(make(k))) >= 70)  # noqa: E731
    record = {"en_text": about_70(lambda k: PASSAGE[:k]), "zh_text": about_70(lambda k: zh_text(0, k))}
    samples, counters = stream_samples(module, tmp_path, "translate", [record], 6, tok)
    forms = {}
    for direction, prompt in prompts.items():
        source, target = record[direction[:2] + "_text"], record[direction[3:] + "_text"]
        ids, mask = prompted(tok, fmt(source, prompt), target)
        assert mask.index(1) < ROW < len(ids)  # the source fits, the pair does not
        forms[direction] = (ids[:ROW], mask[:ROW])
    assert {sample in forms.values() for sample in samples} == {True}
    assert {d for d, form in forms.items() if form in samples} == {"en-zh", "zh-en"}
    assert counters["cut_answers"] >= 6 and counters["cut_input_tokens"] == 0 and counters["too_long"] == 0

    # a source that alone fills the row: nothing to learn, skipped and counted (here every record: an error)
    write_translate_prompts(tmp_path / "b", ["Translate into Chinese:"], ["请翻译成英文："])
    too_long = {"en_text": PASSAGE, "zh_text": zh_text(1, 200)}
    with pytest.raises(DataError, match=f"too long for max_seq_length={ROW}: [1-9]"):
        stream_samples(module, tmp_path / "b", "translate", [too_long], 1, tok)


def test_long_prompt_recipe_cuts_the_end_of_the_whole_sample(tmp_path, tok):
    instruction = "Answer briefly."
    long_output = "It was built in 1996. " * 6
    records = [{"instruction": instruction, "input": PASSAGE[:40] + "\n" + QUESTION, "output": long_output}]
    samples, counters = stream_samples(alignment_sft_main, tmp_path, "others", records, 1, tok,
                                       long_prompt="recipe")
    ids, mask = chat_prompted(tok, f"Human: {instruction}\n{PASSAGE[:40]}\n{QUESTION}\nAssistant:",
                              " " + long_output.rstrip())
    assert mask.index(1) < ROW < len(ids)
    assert samples == [(ids[:ROW], mask[:ROW])]  # the answer's end is lost, the input kept whole
    assert counters["cut_answers"] >= 1 and counters["cut_input_tokens"] == 0

    # An input longer than the row leaves the recipe's sample nothing to learn (its answer is past the end): such a
    # sample is skipped and counted, where the recipe trained a row whose every token was masked.
    task = [{"input": PASSAGE + "\n" + QUESTION, "output": "1996", "type": ""},
            {"input": QUESTION, "output": "1996", "type": ""}]
    samples, counters = stream_samples(task_instruct_tuning_main, tmp_path / "b", "qa", task, 3, tok,
                                       long_prompt="recipe")
    assert samples == [prompted(tok, QUESTION + " ", "1996")] * 3
    assert counters["too_long"] >= 1 and counters["cut_input_tokens"] == 0


def test_answer_longer_than_the_row_keeps_its_start_after_half_a_row_of_prefix(tmp_path, tok):
    samples, counters = stream_samples(alignment_sft_main, tmp_path, "others",
                                       [{"instruction": "Summarise:", "input": PASSAGE, "output": PASSAGE}], 1, tok)
    parts = ("Human: ", "Summarise:", "\n", PASSAGE, "\n", "Assistant:")
    prefix, answer = joined_split(tok, "".join(parts), " " + PASSAGE)
    first, stop = inner_tokens(tok, parts, 3)
    keep = ROW // 2 - len(head(tok)) - (len(prefix) - (stop - first))  # the prefix takes half the row, bos included
    prefix = prefix[:first + keep // 2] + prefix[stop - (keep - keep // 2):]
    ids = head(tok) + prefix + answer
    assert samples == [(ids[:ROW], [0] * (ROW // 2) + [1] * (ROW // 2))]
    assert counters["cut_answers"] >= 1 and counters["cut_input_tokens"] > 0


def test_token_ends_are_sentencepieces_piece_offsets(sp_tok):
    tok = sp_tok
    texts = ["", "a", " x", "\nabc", "Human: 北京是中国的首都。\n", "naïve café 龍 😀 x\u00a0y  two", PASSAGE[:200]]
    for text in texts:
        expected = [piece.end for piece in tok.sp.encode(text, out_type="immutable_proto").pieces]
        assert tok.token_ends(text, tok.encode(text)).tolist() == expected  # the byte-length table
        tok.__dict__["_dummy_prefix_bytes"] = 5  # the table's sum no longer comes out: SentencePiece's offsets
        assert tok.token_ends(text, tok.encode(text)).tolist() == expected
        del tok.__dict__["_dummy_prefix_bytes"]
