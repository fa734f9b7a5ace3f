"""Stage 3 trains on exactly the ids the exported model's apply_chat_template gives: every bundled stage-3 record
and a set of multi-turn conversations, in both chat formats, on a SentencePiece base and on tokenizer.json bases,
with the loss on every answer and its end token (located by transformers' own offsets) and on nothing else, and the
ids before each answer those of the generation prompt."""
import json
import random
from collections import Counter

import pytest

import alignment_sft_args
import alignment_sft_main
from chat_tokenizers import QWEN25
from data_corpus_helpers import messages_records
from llama.chat_template import BILLA_CHAT_TEMPLATE
from training.samples import SampleBuilder, counted_spans
from training_runs import CORPUS

SFT_SETS = sorted(alignment_sft_args.pretrain_data_split)
# Llama-2-chat's layout, shortened: the answer follows "[/INST] " and ends with the eos token's text.
LLAMA2_LIKE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>"
               "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %} {{ m['content'] }}"
               "{{ eos_token }}{% endif %}{% endfor %}")


def bundled_records() -> list[dict]:
    records = [json.loads(line) for name in SFT_SETS for path in sorted((CORPUS / name).glob("*.jsonl"))
               for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(records) >= 100  # the six sets' sample: 114 records
    return records


def test_the_bundled_sets_are_the_stage_3_mix():
    assert SFT_SETS == ["code-alpaca-en", "cot-en", "leet-code-zh", "mwp-en", "mwp-zh", "others"]


@pytest.mark.parametrize("base, chat_format, template", [
    ("sentencepiece", "billa", BILLA_CHAT_TEMPLATE),
    ("llama3", "billa", BILLA_CHAT_TEMPLATE),  # byte-level BPE, bos added
    ("qwen2", "billa", BILLA_CHAT_TEMPLATE),  # byte-level BPE, no bos
    ("qwen2", "template", QWEN25),
    ("sentencepiece", "template", LLAMA2_LIKE),
])
def test_training_ids_are_apply_chat_templates_with_answers_counted(templated_tokenizers, base, chat_format,
                                                                    template):
    tok, hf = templated_tokenizers(base, template)
    rules = alignment_sft_main.AlignmentSftRecords(CORPUS, SFT_SETS)
    chats = [rules.build("others", record, random.Random(0)) for record in bundled_records() + messages_records(12)]
    chats = [chat for chat in chats if chat is not None]
    counters = Counter()
    built = SampleBuilder(tok, 8192, "split", "middle", chat_format).build(chats, random.Random(0), counters)
    assert not any(counters.values()), counters  # nothing cut, dropped or skipped: whole conversations compared
    for chat, (sample,) in zip(chats, built):
        messages = chat.messages()
        assert sample.ids == hf.apply_chat_template(messages, tokenize=True)
        # The counted tokens, from transformers' render and offsets: each holds a character of an answer's turn
        # (from where the generation prompt ends) up to its end token.
        text = hf.apply_chat_template(messages, tokenize=False)
        offsets = hf(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        answers = []
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                start = len(hf.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True))
                assert text[start:].lstrip().startswith(message["content"])
                answers.append((start, text.index(tok.eos_token, start) + len(tok.eos_token)))
        expected = [int(any(begin < stop and end > start for start, stop in answers)) for begin, end in offsets]
        counted = [0] * len(sample.ids)
        for start, stop in counted_spans(sample):
            counted[start:stop] = [1] * (stop - start)
        assert counted == expected, text
        # ... and before each answer, the very ids of the generation prompt a user's apply_chat_template gives
        assistant = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
        for index, (first, _) in zip(assistant, counted_spans(sample)):
            assert sample.ids[:first] == hf.apply_chat_template(messages[:index], add_generation_prompt=True)


def test_answers_keep_their_indentation(templated_tokenizers):
    """A code answer trains as written after its leading line breaks and trailing spaces; questions are stripped."""
    tok, hf = templated_tokenizers("llama3", BILLA_CHAT_TEMPLATE)
    record = {"instruction": "  Write add.\n", "output": "\n    def add(a, b):\n        return a + b\n\n"}
    chat = alignment_sft_main.AlignmentSftRecords(CORPUS, ["x"]).build("x", record, random.Random(0))
    (sample,), = SampleBuilder(tok, 512, "split", "middle").build([chat], random.Random(0), Counter())
    assert chat.turns[0] == (("Write add.",), "    def add(a, b):\n        return a + b")
    assert sample.ids == hf.apply_chat_template(chat.messages(), tokenize=True)
    # the export's template applies the same rule to a user's own unstripped answer
    raw = [{"role": "user", "content": record["instruction"]}, {"role": "assistant", "content": record["output"]}]
    assert hf.apply_chat_template(raw, tokenize=True) == sample.ids
    assert tok.decode(sample.ids).endswith("Assistant:     def add(a, b):\n        return a + b")
