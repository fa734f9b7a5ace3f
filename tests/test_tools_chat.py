"""tools.chat: the SFT stage's exact prompt format (the ids training puts before an answer, end tokens included, in
both chat formats), greedy determinism, streaming that never splits a character, and a history cut at turn
boundaries to fit the context."""
import io
import json
import random
from collections import Counter

import pytest
import torch

import alignment_sft_main
from chat_tokenizers import QWEN25
from llama import Llama, SentencePieceTokenizer, generate
from llama.tiny import make_tiny_model
from tools import chat as chat_tool
from tools.chat import ChatSession, main
from tools.chat_format import STOP_TEXT, MessageTooLong, conversation, fit_prompt, turn_prompt
from tools.stream_decode import StreamDecoder
from training.conversation import ChatRenderer, answer_text
from training.samples import SampleBuilder, counted_spans



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_path):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", tokenizer_path, dim=32, max_seq_len=256, seed=2)


@pytest.fixture(scope="module")
def model(model_dir):
    return Llama.from_pretrained(model_dir)


@pytest.mark.parametrize("message, prompt", [
    ("What is the capital of France?", "Human: What is the capital of France?\nAssistant:"),
    ("  请介绍一下北京。\n", "Human: 请介绍一下北京。\nAssistant:"),
    ("a\nb", "Human: a\nb\nAssistant:"),
])
def test_prompt_is_the_sft_stage_prefix(message, prompt):
    assert turn_prompt(message) == prompt


def test_greedy_reply_is_deterministic_and_is_plain_greedy_generation(model, tokenizer_path):
    tok = SentencePieceTokenizer(tokenizer_path)
    replies = []
    for _ in range(2):
        session = ChatSession(model, tok, max_new_tokens=24, temperature=0.0)
        pieces = []
        replies.append(session.reply("What is the capital of France?", pieces.append))
        assert "".join(pieces) == replies[-1]
    assert replies[0] == replies[1]
    ids = generate(model, [tok.bos_id, *tok.encode(turn_prompt("What is the capital of France?"))], 24,
                   temperature=0.0, eos_id=tok.eos_id)
    assert replies[0] == tok.decode(ids).split(STOP_TEXT)[0]
    # sampling with a seed is repeatable too
    sampled = [ChatSession(model, tok, 16, temperature=1.0, seed=5).reply("hi") for _ in range(2)]
    assert sampled[0] == sampled[1]


def billa_prompt(tok, history, message):
    """The recipe's layout written out: bos, then per past turn "Human: q\nAssistant: " + answer + eos, then the
    new question's prefix; each turn's text up to its eos tokenized whole, as the chat template's render is."""
    ids = [tok.bos_id]
    for q, a in history:
        ids += tok.encode(turn_prompt(q) + " " + a) + [tok.eos_id]
    return ids + tok.encode(turn_prompt(message))


def test_history_longer_than_context_is_cut_at_turn_boundaries(model, tokenizer_path):
    tok = SentencePieceTokenizer(tokenizer_path)
    history = [(f"Question {i}: 北京是中国的首都吗?", f"Answer {i}: yes.") for i in range(12)]
    budget = 250
    ids, dropped = fit_prompt(ChatRenderer(tok), history, "最后一个问题", budget)
    assert 0 < dropped < len(history)
    assert len(ids) <= budget
    assert ids == billa_prompt(tok, history[dropped:], "最后一个问题")  # whole turns, newest kept
    assert tok.decode(ids[1:]).startswith(f"Human: Question {dropped}:")
    assert tok.eos_id in ids  # earlier answers end with the end token, as in training
    longer = billa_prompt(tok, history[dropped - 1:], "最后一个问题")
    assert len(longer) > budget  # one more old turn would not fit: only as many as needed were dropped
    with pytest.raises(MessageTooLong):
        fit_prompt(ChatRenderer(tok), history, "很长的问题" * 100, budget)

    session = ChatSession(model, tok, max_new_tokens=8, temperature=0.0)  # context 256: prompt budget 248
    for q, a in history:
        session.history.append((q, a))
    session.reply("最后一个问题")
    assert session.dropped_turns > 0 and len(session.history) == len(history) + 1


def test_streaming_never_splits_a_character_and_stops_at_the_next_question(tokenizer_path):
    tok = SentencePieceTokenizer(tokenizer_path)
    text = "北京鑫龘 is 首都。"  # 鑫 and 龘 are not in the tiny vocabulary: 3 byte tokens each
    ids = tok.encode(text)
    assert len(ids) > len(text) // 2 and tok.decode(ids) == text
    decoder = StreamDecoder(tok, (STOP_TEXT,))
    pieces = [decoder.feed(i) for i in ids]
    pieces.append(decoder.finish())
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 3  # it did stream

    decoder = StreamDecoder(tok, (STOP_TEXT,))
    out = []
    for i in tok.encode("Paris.\nHuman: and Rome?"):
        out.append(decoder.feed(i))
        if decoder.stopped:
            break
    out.append(decoder.finish())
    assert "".join(out) == "Paris." and decoder.stopped


def test_cli_prompt_and_interactive(model_dir, monkeypatch):
    out = io.StringIO()
    assert main(["--model", str(model_dir), "--prompt", "hello", "--temperature", "0", "--max-new-tokens", "6",
                 "--device", "cpu"], out=out) == 0
    once = out.getvalue()
    assert once.startswith("Assistant: ")
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nhello\n"))
    out = io.StringIO()
    assert main(["--model", str(model_dir), "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu"],
                out=out) == 0
    printed = out.getvalue()
    assert printed.count(once) == 2 and "[conversation forgotten]" in printed  # reset: same answer again


def test_cli_missing_model_is_one_line(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "none"), "--prompt", "hi"]) == 1
    assert capsys.readouterr().err == f"chat: LLaMA config not found: {tmp_path / 'none' / 'config.json'}\n"


@pytest.mark.parametrize("chat_format", ["billa", "template"])
def test_chat_prompt_is_what_training_puts_before_the_answer(model, tokenizer_path, templated_tokenizers,
                                                             chat_format, monkeypatch):
    """The ids tools.chat generates from == the stage-3 sample of the same conversation up to its last answer."""
    bpe_tok, bpe_hf = templated_tokenizers("qwen2", QWEN25)
    tok = SentencePieceTokenizer(tokenizer_path) if chat_format == "billa" else bpe_tok
    system = "You answer in one sentence."
    turns = [("北京是哪里？", "中国的首都。"), ("And Paris? ", " The capital of France.\n"),
             ("最后一个问题", "好的。")]
    record = {"messages": [{"role": "system", "content": system}] + [
        {"role": role, "content": text} for q, a in turns for role, text in (("user", q), ("assistant", a))]}
    spec = alignment_sft_main.AlignmentSftRecords(".", ["x"]).build("x", record, random.Random(0))
    (sample,), = SampleBuilder(tok, 512, "split", "middle", chat_format).build([spec], random.Random(0), Counter())
    last_answer = counted_spans(sample)[-1][0]

    prompts = []

    def fake_stream(model, prompt_ids, *args, **kwargs):
        prompts.append(list(prompt_ids))
        yield from tok.encode("ok")

    monkeypatch.setattr(chat_tool, "stream", fake_stream)
    session = ChatSession(model, tok, max_new_tokens=8, temperature=0.0, chat_format=chat_format, system=system)
    session.history = [(q, a) for q, a in turns[:-1]]
    session.reply(turns[-1][0])
    assert prompts == [sample.ids[:last_answer]]
    stripped = [{"role": m["role"], "content": answer_text(m["content"]) if m["role"] == "assistant" else
                 m["content"].strip()} for m in record["messages"][:-1]]
    if chat_format == "template":  # and it is the template's own prompt, as transformers renders and encodes it
        assert prompts[0] == bpe_hf.apply_chat_template(stripped, add_generation_prompt=True)
        assert session.renderer.text(conversation(session.history[:-1], turns[-1][0], system)) == \
            bpe_hf.apply_chat_template(stripped, tokenize=False, add_generation_prompt=True)
    else:  # written out: the system line, then each answer followed by eos and the next "Human: " right after it
        (q1, a1), (q2, a2), (q3, _) = [(q.strip(), answer_text(a)) for q, a in turns]
        assert prompts[0] == ([tok.bos_id] + tok.encode(f"{system}\nHuman: {q1}\nAssistant: {a1}") + [tok.eos_id] +
                              tok.encode(f"Human: {q2}\nAssistant: {a2}") + [tok.eos_id] +
                              tok.encode(f"Human: {q3}\nAssistant:"))


def test_cli_follows_the_chat_format_stored_with_the_model(model_dir, tmp_path, capsys):
    import shutil

    moved = shutil.copytree(model_dir, tmp_path / "m")
    (moved / "chat_format.json").write_text(json.dumps({"chat_format": "template"}))
    assert main(["--model", str(moved), "--prompt", "hi", "--device", "cpu"]) == 1
    assert "chat_format' = 'template': the tokenizer" in capsys.readouterr().err  # the SentencePiece dir has none
