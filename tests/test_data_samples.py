"""Exact sample formats and loss-mask positions of every sample kind of the three stages."""
import random
from collections import Counter

import pytest

import alignment_sft_main
import pretrain_main
import task_instruct_tuning_main
from data_corpus_helpers import (lm_records, settings, task_records, translate_records, write_set,
                                 write_translate_prompts)
from llama.tokenization_llama import Tokenizer
from training.data_processor import READ_AHEAD
from training.samples import masked_prefix_length


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return Tokenizer(tokenizer_path)


def take(processor, n):
    """n samples as (ids, loss_mask) lists: batch_size 1, so rows carry no padding."""
    out = []
    with processor:
        for _, batch in zip(range(n), processor):
            assert batch["input_ids"].shape[0] == 1
            out.append((batch["input_ids"][0].tolist(), batch["loss_mask"][0].tolist()))
    return out


def prompted(tok, prefix_text, answer_text):
    """The exact sample bos + prefix (masked), answer + eos (counted)."""
    prefix = [tok.bos_id] + tok.encode(prefix_text)
    answer = tok.encode(answer_text) + [tok.eos_id]
    return prefix + answer, [0] * len(prefix) + [1] * len(answer)


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
    processor = pretrain_main.DataProcessor(settings(tmp_path, {"zh": 1}, batch_size=1, max_seq_length=512), tok, 0, 1)
    masked = []
    for record, (ids, mask) in zip(records, take(processor, 30)):
        assert ids == [tok.bos_id] + tok.encode(record["text"]) + [tok.eos_id]
        n, k = len(ids), mask.index(1)
        assert mask == [0] * k + [1] * (n - k)
        assert int(0.2 * n) + 1 <= k <= int(0.7 * n)
        masked.append(k)
    assert len(set(masked)) > 5  # drawn, not fixed


def check_translation(tok, samples, records, fmt, prompts):
    seen = Counter()
    for record, (ids, mask) in zip(records, samples):
        matches = [(d, p) for d in ("en-zh", "zh-en") for p in prompts[d]
                   if (ids, mask) == prompted(tok, fmt(record[d[:2] + "_text"], p), record[d[3:] + "_text"])]
        assert len(matches) == 1, tok.decode(ids)
        seen[matches[0]] += 1
    assert len(seen) == 4  # both directions, both prompts of each


def test_stage1_translation_prompt_follows_source_both_directions(tmp_path, tok):
    records = translate_records(40)
    write_set(tmp_path, "translate", records, n_files=1)
    prompts = {"en-zh": ["Translate into Chinese:", "In Chinese, please:"], "zh-en": ["请翻译成英文：", "英文是什么？"]}
    write_translate_prompts(tmp_path, ["  " + prompts["en-zh"][0] + "  ", prompts["en-zh"][1], ""],
                            [prompts["zh-en"][0], "\t" + prompts["zh-en"][1]])  # lines are stripped, blanks dropped
    processor = pretrain_main.DataProcessor(settings(tmp_path, {"translate": 1}, batch_size=1, max_seq_length=512),
                                            tok, 0, 1)
    check_translation(tok, take(processor, 40), records, lambda source, p: source + "\n" + p, prompts)


def test_stage2_translation_prompt_after_rstripped_source(tmp_path, tok):
    records = [{"en_text": r["en_text"] + "  \n", "zh_text": r["zh_text"] + " "} for r in translate_records(40)]
    write_set(tmp_path, "translate", records, n_files=1)
    prompts = {"en-zh": ["Translate into Chinese:", "In Chinese, please:"], "zh-en": ["请翻译成英文：", "英文是什么？"]}
    write_translate_prompts(tmp_path, prompts["en-zh"], prompts["zh-en"])
    processor = task_instruct_tuning_main.DataProcessor(
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
    processor = task_instruct_tuning_main.DataProcessor(
        settings(tmp_path, {"zh-qa": {"weight": 1, "file_start": 0}}, batch_size=1, max_seq_length=512), tok, 0, 1)
    pre = {"qa": ["Read and answer:", "Answer this:"], "preonly": ["Only before:"], "": []}
    post = {"qa": ["What is the answer?"], "preonly": [], "": []}
    seen = Counter()
    for record, (ids, mask) in zip(records, take(processor, n)):
        x, y, t = record["input"], record["output"].rstrip(), record["type"]
        forms = ([("pre", p, prompted(tok, p + "\n" + x.rstrip() + "\n\n", y)) for p in pre[t]]
                 + [("post", p, prompted(tok, x.rstrip() + "\n" + p + "\n", y)) for p in post[t]]
                 + [("none", "", prompted(tok, x + " ", y))])
        matches = [(kind, p) for kind, p, sample in forms if sample == (ids, mask)]
        assert len(matches) == 1, tok.decode(ids)
        seen[(t, *matches[0])] += 1
    assert {key[:2] for key in seen} == {("qa", "pre"), ("qa", "post"), ("preonly", "pre"), ("preonly", "none"),
                                         ("", "none")}
    assert ("qa", "pre", "Answer this:") in seen and ("qa", "pre", "Read and answer:") in seen


def test_stage3_human_assistant_format(tmp_path, tok):
    records = [{"instruction": " Add the numbers. ", "input": "1 2\n", "output": " 3 \n"},
               {"instruction": "Say hi.", "input": "", "output": "hi"},
               {"instruction": "  ", "input": "What is the capital of France?", "output": "Paris."}]
    write_set(tmp_path, "others", records, n_files=1)
    processor = alignment_sft_main.DataProcessor(
        settings(tmp_path, {"others": {"weight": 1, "file_start": 0}}, batch_size=1, max_seq_length=512), tok, 0, 1)
    expected = [prompted(tok, "Human: Add the numbers.\n1 2\nAssistant: ", "3"),
                prompted(tok, "Human: Say hi.\nAssistant: ", "hi"),
                prompted(tok, "Human: What is the capital of France?\nAssistant: ", "Paris.")]
    assert take(processor, 3) == expected


def test_long_lm_text_split_keeps_every_token_once_with_own_masks(tmp_path, tok):
    records = [{"text": " ".join(lm_records(12)[i]["text"] for i in range(12))}]  # one long document
    write_set(tmp_path, "en", records, n_files=1)
    full = [tok.bos_id] + tok.encode(records[0]["text"]) + [tok.eos_id]
    length = 16
    assert len(full) > 5 * length
    n_chunks = -(-len(full) // length)
    processor = pretrain_main.DataProcessor(settings(tmp_path, {"en": 1}, batch_size=1, max_seq_length=length),
                                            tok, 0, 1)
    samples = take(processor, n_chunks + 1)
    chunks = samples[:n_chunks]
    assert sum((ids for ids, _ in chunks), []) == full  # every token exactly once, in order
    assert samples[n_chunks][0][:length] == full[:length]  # then the document again (wrap-around)
    for ids, mask in chunks:
        n, k = len(ids), mask.index(1) if 1 in mask else len(ids)
        assert n <= length and mask == [0] * k + [1] * (n - k)
        if n >= 4:
            assert int(0.2 * n) + 1 <= k <= int(0.7 * n)

    processor = pretrain_main.DataProcessor(
        settings(tmp_path, {"en": 1}, batch_size=1, max_seq_length=length, long_text="truncate"), tok, 0, 1)
    with processor:
        batch = next(processor)
        assert batch["input_ids"][0].tolist() == full[:length]
        # counted as read: the refill read READ_AHEAD copies of the one-document corpus
        assert processor.counters["discarded_tokens"] == READ_AHEAD * (len(full) - length)


def test_too_long_prompted_sample_is_cut_on_the_input_side(tmp_path, tok):
    long_input = " ".join(lm_records(10)[i]["text"] for i in range(10))
    records = [{"instruction": "Summarise:", "input": long_input, "output": "the fox"},
               {"instruction": "Summarise:", "input": "short", "output": long_input}]
    write_set(tmp_path, "others", records, n_files=1)
    length = 96
    processor = alignment_sft_main.DataProcessor(
        settings(tmp_path, {"others": {"weight": 1, "file_start": 0}}, batch_size=1, max_seq_length=length), tok, 0, 1)
    with processor:
        (ids, mask), (ids2, mask2) = [(b["input_ids"][0].tolist(), b["loss_mask"][0].tolist())
                                      for _, b in zip(range(2), processor)]
        counters = processor.counters
    answer = tok.encode("the fox") + [tok.eos_id]
    assert len(ids) <= length and ids[-len(answer):] == answer  # the answer survives whole
    assert mask == [0] * (len(ids) - len(answer)) + [1] * len(answer)
    text = tok.decode(ids[1:len(ids) - len(answer)])
    assert text.startswith("Human: Summarise:\n" + long_input[:7]) and text.endswith("\nAssistant: ")
    assert len(ids) >= length - 2  # cut no more than needed
    assert counters["cut_input_tokens"] > 0
    # the answer cannot fit whole: the prefix keeps at most half the row, the answer its start
    prefix = [tok.bos_id] + tok.encode("Human: Summarise:\nshort\nAssistant: ")
    assert len(prefix) <= length // 2
    assert ids2 == (prefix + tok.encode(long_input))[:length]
    assert mask2 == [0] * len(prefix) + [1] * (length - len(prefix))
    assert counters["discarded_tokens"] > 0
