"""tools.chat: the SFT stage's exact prompt format, greedy determinism, streaming that never splits a character,
and a history cut at turn boundaries to fit the context."""
import io

import pytest
import torch

from llama import Llama, Tokenizer, generate
from llama.tiny import make_tiny_model
from tools.chat import ChatSession, main
from tools.chat_format import STOP_TEXT, MessageTooLong, fit_prompt, render, turn_prompt
from tools.stream_decode import StreamDecoder



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_path):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", tokenizer_path, dim=32, max_seq_len=256, seed=2)


@pytest.fixture(scope="module")
def model(model_dir):
    return Llama.from_pretrained(model_dir)


@pytest.mark.parametrize("message, prompt", [
    ("What is the capital of France?", "Human: What is the capital of France?\nAssistant: "),
    ("  请介绍一下北京。\n", "Human: 请介绍一下北京。\nAssistant: "),
    ("a\nb", "Human: a\nb\nAssistant: "),
])
def test_prompt_is_the_sft_stage_prefix(message, prompt):
    assert turn_prompt(message) == prompt


def test_greedy_reply_is_deterministic_and_is_plain_greedy_generation(model, tokenizer_path):
    tok = Tokenizer(tokenizer_path)
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


def test_history_longer_than_context_is_cut_at_turn_boundaries(model, tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    history = [(f"Question {i}: 北京是中国的首都吗?", f"Answer {i}: yes.") for i in range(12)]
    budget = 250
    ids, dropped = fit_prompt(tok, history, "最后一个问题", budget)
    assert 0 < dropped < len(history)
    assert len(ids) <= budget
    assert ids == [tok.bos_id, *tok.encode(render(history[dropped:], "最后一个问题"))]  # whole turns, newest kept
    assert tok.decode(ids[1:]).startswith(f"Human: Question {dropped}:")
    longer = [tok.bos_id, *tok.encode(render(history[dropped - 1:], "最后一个问题"))]
    assert len(longer) > budget  # one more old turn would not fit: only as many as needed were dropped
    with pytest.raises(MessageTooLong):
        fit_prompt(tok, history, "很长的问题" * 100, budget)

    session = ChatSession(model, tok, max_new_tokens=8, temperature=0.0)  # context 256: prompt budget 248
    for q, a in history:
        session.history.append((q, a))
    session.reply("最后一个问题")
    assert session.dropped_turns > 0 and len(session.history) == len(history) + 1


def test_streaming_never_splits_a_character_and_stops_at_the_next_question(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
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
