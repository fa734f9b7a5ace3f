"""Stage 3's conversations: {"messages"} records in the billa and template formats, loss on every answer and its
end token and nothing else, whole earliest turns dropped to fit, hopeless ones skipped and counted, bad shapes named."""
import random
from collections import Counter

import pytest

import alignment_sft_args
import alignment_sft_main
from chat_tokenizers import QWEN25, SMOLLM2
from data_corpus_helpers import joined_split, messages_records, settings, stream, take, write_set
from llama.tokenization_llama import SentencePieceTokenizer
from training.batching import pack_rows
from training.conversation import Chat, ChatRenderer, chat_from_messages
from training.corpus import DataError
from training.data_stream import READ_AHEAD
from training.samples import Sample, SampleBuilder


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return SentencePieceTokenizer(tokenizer_path)


def billa_layout(tok, system, turns):
    """The billa layout written out by hand: bos [system "\\n"] "Human: " q "\\n" "Assistant:" (masked), " " + answer + eos
    (counted), the next "Human: " right after eos; each turn's text up to its eos tokenized whole, the answer's ids
    beginning where those of the whole leave those of the question alone."""
    ids, mask = [tok.bos_id], [0]
    masked = f"{system}\n" if system else ""
    for question, answer in turns:
        question_text = f"{masked}Human: {question}\nAssistant:"
        prompt, counted = joined_split(tok, question_text, " " + answer)
        masked = ""
        counted = counted + [tok.eos_id]
        ids += prompt + counted
        mask += [0] * len(prompt) + [1] * len(counted)
    return ids, mask


def record_turns(record):
    messages = record["messages"]
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    pairs = [m["content"] for m in messages if m["role"] != "system"]
    return system, list(zip(pairs[::2], pairs[1::2]))


def counted_runs(ids, mask):
    """The ids of each maximal run of counted positions."""
    runs, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_billa_conversation_counts_every_answer_and_its_eos_and_nothing_else(tmp_path, tok):
    records = messages_records(24)
    write_set(tmp_path, "chat", records)
    forms = {tuple(billa_layout(tok, *record_turns(r))[0]): i for i, r in enumerate(records)}
    samples = take(stream(alignment_sft_main, settings(tmp_path, {"chat": 1}, batch_size=1,
                                                       max_seq_length=512), tok, 0, 1), 24)
    seen = set()
    for ids, mask in samples:
        index = forms[tuple(ids)]
        seen.add(index)
        assert (ids, mask) == billa_layout(tok, *record_turns(records[index]))
        assert len(counted_runs(ids, mask)) == len(record_turns(records[index])[1])
    assert len(seen) >= 24 - READ_AHEAD and any(len(record_turns(records[i])[1]) == 3 for i in seen)


def test_single_turn_message_and_alpaca_without_input_are_the_recipes_sample(tmp_path, tok):
    builder = SampleBuilder(tok, 256, "split", "middle")
    processor = alignment_sft_main.AlignmentSftRecords(tmp_path, ["x"])
    rng = random.Random(0)
    specs = [processor.build("x", record, rng) for record in (
        {"messages": [{"role": "user", "content": " What is 2+2? "}, {"role": "assistant", "content": "4 "}]},
        {"instruction": "What is 2+2?", "output": "4"},
        {"instruction": "What is 2+2?", "input": "", "output": "4"})]
    built = builder.build(specs, rng, Counter())
    expected = billa_layout(tok, "", [("What is 2+2?", "4")])
    for (sample,) in built:
        assert sample.counted is None  # the single-prefix fast path
        assert (sample.ids, [int(i >= sample.n_masked) for i in range(len(sample.ids))]) == expected


def test_template_conversation_is_transformers_render_with_answers_and_end_token_counted(tmp_path,
                                                                                         templated_tokenizers):
    tok, hf = templated_tokenizers("qwen2", QWEN25)
    assert (tok.bos_id, tok.eos_token) == (None, "<|im_end|>")  # Qwen: no bos
    records = messages_records(12)
    write_set(tmp_path, "chat", records, n_files=1)
    samples = take(stream(alignment_sft_main, settings(tmp_path, {"chat": 1}, alignment_sft_args, batch_size=1,
                                                       max_seq_length=512, chat_format="template"), tok, 0, 1), 12)
    forms = {tuple(hf.apply_chat_template(r["messages"], tokenize=True)): r for r in records}
    for ids, mask in samples:
        record = forms[tuple(ids)]  # transformers' own ids of the whole render
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        # transformers' decode keeps special tokens (ours leaves them out)
        assert [hf.decode(run) for run in counted_runs(ids, mask)] == [a + "<|im_end|>" for a in answers]
        assert mask[-1] == 0 and hf.decode(ids[-1:]) == "\n"  # the "\n" after the last <|im_end|>: not counted


def test_template_mask_equals_transformers_assistant_mask(templated_tokenizers):
    """A ChatML template with {% generation %} around answer + end token: transformers' return_assistant_tokens_mask
    marks exactly what we count."""
    template = SMOLLM2.replace("{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
                               "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
                               "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
                               "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
                               "{% endif %}")
    assert template != SMOLLM2
    tok, hf = templated_tokenizers("qwen2", template)
    renderer = ChatRenderer(tok, "template")
    for record in messages_records(6):
        out = hf.apply_chat_template(record["messages"], tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        ids, spans = renderer.encode(chat_from_messages(record))
        mask = [0] * len(ids)
        for start, stop in spans:
            mask[start:stop] = [1] * (stop - start)
        assert ids == out["input_ids"] and mask == out["assistant_masks"]


def test_long_conversation_drops_whole_earliest_turns_keeping_system_and_last(tok):
    turns = tuple(((f"question {i}: 北京是中国的首都吗?",), f"answer {i}: yes.") for i in range(8))
    chat = Chat("You are a helpful assistant.", turns)
    pairs = [(q[0], a) for q, a in turns]
    full = billa_layout(tok, chat.system, pairs)[0]
    limit = len(full) - 20
    counters = Counter()
    (sample,), = SampleBuilder(tok, limit, "split", "middle").build([chat], random.Random(0), counters)
    dropped = counters["dropped_turns"]
    assert 0 < dropped < len(turns)
    expected_ids, expected_mask = billa_layout(tok, chat.system, pairs[dropped:])
    assert sample.ids == expected_ids and len(sample.ids) <= limit
    assert [int(any(a <= i < b for a, b in sample.counted)) for i in range(len(sample.ids))] == expected_mask
    assert len(billa_layout(tok, chat.system, pairs[dropped - 1:])[0]) > limit  # no more dropped than needed
    # Through the batch: the same mask in a packed row, after another sample.
    batch = pack_rows([[Sample([5, 6, 7], 1), sample]], 3 + len(sample.ids), tok.pad_id)
    assert batch["loss_mask"][0].tolist() == [0, 1, 1] + expected_mask


def test_conversation_that_cannot_fit_is_skipped_and_counted(tok):
    long_last = Chat("system text", ((("short",), "ok"), (("很长的问题" * 30,), "the answer")))
    fits = Chat("", ((("short",), "ok"),))
    counters = Counter()
    built = SampleBuilder(tok, 48, "split", "middle", "billa").build([long_last, fits, long_last], random.Random(0),
                                                                   counters)
    assert [len(samples) for samples in built] == [0, 1, 0]
    assert counters["too_long"] == 2 and counters["discarded_tokens"] > 2 * 48 and counters["dropped_turns"] == 0


@pytest.mark.parametrize("messages, needle", [
    ([], "field .messages. must be a non-empty list"),
    ([{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}], r"messages\[1\]: role 'bot' is not one of"),
    ([{"role": "user", "content": "q"}, {"role": "user", "content": "a"}],
     r"messages\[1\]: role 'user' where 'assistant' was expected"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}],
     r"messages\[2\]: the last message must be an assistant turn"),
    ([{"role": "system", "content": "s"}], "'messages' holds only a system turn"),
    ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
     r"messages\[1\]: role 'system' where 'assistant'"),
    ([{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}], r"messages\[0\]: the user turn has no"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}], r"messages\[1\]: field 'content' must"),
])
def test_bad_conversation_shapes_name_what_is_wrong_and_where(tmp_path, tok, messages, needle):
    write_set(tmp_path, "chat", messages_records(3) + [{"messages": messages}], n_files=1)
    with pytest.raises(DataError, match=rf"set 'chat', file .*10001\.jsonl, line 4: {needle}"):
        stream(alignment_sft_main, settings(tmp_path, {"chat": 1}), tok, 0, 1)


def test_empty_last_answer_is_skipped_as_empty():
    assert chat_from_messages({"messages": [{"role": "user", "content": "q"},
                                            {"role": "assistant", "content": "  "}]}) is None


def test_template_format_needs_a_template_that_renders_turn_by_turn(tmp_path, tok, templated_tokenizers):
    write_set(tmp_path, "chat", messages_records(3), n_files=1)
    with pytest.raises(DataError, match=r"setting 'chat_format' = 'template': the tokenizer .*tokenizer\.model has "
                                        r"no chat template"):
        stream(alignment_sft_main, settings(tmp_path, {"chat": 1}, alignment_sft_args, chat_format="template"), tok,
               0, 1)
    # Qwen3-like: earlier answers are rewritten once a later turn exists, so turns cannot be cut from one render.
    rewriting = ("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}<old>{% else %}"
                 "<{{ m.role }}>{{ m.content }}<|im_end|>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
    with pytest.raises(DataError, match="does not render turn by turn"):
        stream(alignment_sft_main, settings(tmp_path, {"chat": 1}, alignment_sft_args, chat_format="template"),
               templated_tokenizers("qwen2", rewriting)[0], 0, 1)


def test_chat_format_setting_is_checked_by_name():
    from training.settings import SettingsError, load_settings

    assert load_settings(alignment_sft_args, []).chat.chat_format == "billa"  # the recipe's by default
    assert load_settings(alignment_sft_args, ["chat_format=template"]).chat.chat_format == "template"
    with pytest.raises(SettingsError, match=r"setting 'chat_format' = 'chatml' is invalid: it must be one of "
                                            r"\('billa', 'template'\)"):
        load_settings(alignment_sft_args, ["chat_format=chatml"])
