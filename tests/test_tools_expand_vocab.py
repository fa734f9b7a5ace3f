"""tools.expand_vocab: old ids, rows and logits are untouched; new rows start as the mean of their old split."""
import io
import json
from pathlib import Path

import pytest
import torch
from sentencepiece import SentencePieceProcessor

from llama import Llama, SentencePieceTokenizer
from llama.tiny import corpus_texts, make_tiny_model, train_tokenizer
from tools.expand_vocab import main, parse_args, run
from tools.vocab_merge import load_proto, old_ids_of, piece_splitter

CORPUS = Path(__file__).resolve().parents[1] / "pretraining_corpora"
SAME_TEXTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b",
              "There are 12 apples and 7 oranges."]


@pytest.fixture(scope="module")
def expanded(tmp_path_factory, tokenizer_path):
    tmp = tmp_path_factory.mktemp("expand")
    base = make_tiny_model(tmp / "base", tokenizer_path, dim=32, seed=3)
    zh_model = train_tokenizer(corpus_texts(CORPUS / "zh" / "10001.jsonl"), tmp / "zh.model", vocab_size=1500)
    report = run(parse_args(["--model", str(base), "--zh-model", str(zh_model), "--output", str(tmp / "out"),
                             "--quiet"]), out=io.StringIO())
    return base, tmp / "out", report


def test_old_pieces_keep_their_ids_and_rows(expanded):
    base, out, report = expanded
    old, new = SentencePieceTokenizer(base), SentencePieceTokenizer(out)
    assert report["vocab_before"] == old.vocab_size and report["vocab_after"] == new.vocab_size > old.vocab_size
    assert json.loads((out / "expand_vocab.json").read_text())["first_new_row"] == old.vocab_size  # new_rows_only
    for i in range(old.vocab_size):
        assert new.sp.id_to_piece(i) == old.sp.id_to_piece(i)
    a, b = Llama.from_pretrained(base), Llama.from_pretrained(out)
    assert b.config.vocab_size == new.vocab_size
    sa, sb = a.state_dict(), b.state_dict()
    for name, tensor in sa.items():
        if name in ("tok_embeddings.weight", "output.weight"):
            assert torch.equal(sb[name][:old.vocab_size], tensor)
        else:
            assert torch.equal(sb[name], tensor), name


def test_new_rows_are_the_mean_of_the_old_split(expanded):
    base, out, _ = expanded
    old_n = SentencePieceTokenizer(base).vocab_size
    new = SentencePieceTokenizer(out)
    splitter = piece_splitter(load_proto(SentencePieceTokenizer(base).model_path))
    a, b = Llama.from_pretrained(base), Llama.from_pretrained(out)
    checked = 0
    for new_id in range(old_n, new.vocab_size, 97):
        piece = new.sp.id_to_piece(new_id)
        ids = old_ids_of(splitter, piece)
        assert SentencePieceTokenizer(base).decode(ids) == piece.replace("\u2581", " ")  # the split spells the piece
        for name in ("tok_embeddings", "output"):
            expected = getattr(a, name).weight[ids].mean(0)
            assert torch.allclose(getattr(b, name).weight[new_id], expected, atol=1e-7)
        checked += 1
    assert checked >= 3


def test_logits_over_the_old_vocabulary_are_unchanged(expanded):
    base, out, _ = expanded
    old, new = SentencePieceTokenizer(base), SentencePieceTokenizer(out)
    a, b = Llama.from_pretrained(base), Llama.from_pretrained(out)
    for text in SAME_TEXTS:
        ids = [old.bos_id, *old.encode(text)]
        assert [new.bos_id, *new.encode(text)] == ids  # text that tokenizes the same under both
        with torch.no_grad():
            la, lb = a(torch.tensor([ids]))[1], b(torch.tensor([ids]))[1]
        assert lb.shape[-1] == new.vocab_size
        torch.testing.assert_close(lb[..., :old.vocab_size], la, rtol=0, atol=1e-5)


def test_chinese_text_takes_fewer_tokens(expanded):
    _, _, report = expanded
    zh_before, zh_after = report["tokens_per_char_zh"]
    en_before, en_after = report["tokens_per_char_en"]
    assert zh_after < 0.8 * zh_before
    assert en_after <= en_before * 1.05


def test_the_widened_tokenizer_keeps_its_config_and_loads_in_transformers(expanded):
    from transformers import AutoTokenizer

    base, out, report = expanded
    assert (out / "tokenizer_config.json").read_text() == (base / "tokenizer_config.json").read_text()
    ours, hf = SentencePieceTokenizer(out), AutoTokenizer.from_pretrained(out)
    assert ours.vocab_size == len(hf) == report["vocab_after"]
    text = corpus_texts(CORPUS / "zh" / "10001.jsonl")[0][:200] + " " + SAME_TEXTS[0]
    assert hf(text)["input_ids"] == ours.encode(text, bos=True)


def test_cli_trains_the_chinese_model_and_refuses_to_overwrite(tmp_path, tokenizer_path, capsys):
    base = make_tiny_model(tmp_path / "base", tokenizer_path, dim=32)
    argv = ["--model", str(base), "--zh-corpus", str(CORPUS / "zh"), "--zh-vocab-size", "1200",
            "--output", str(tmp_path / "out"), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "vocabulary:" in printed and "tokens per character, zh" in printed
    assert SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model")).vocab_size() == \
        Llama.from_pretrained(tmp_path / "out").config.vocab_size
    assert main(argv) == 1 and "--overwrite" in capsys.readouterr().err


def test_eval_data_reports_bits_per_char_before_and_after(tmp_path, tokenizer_path):
    """--eval-data: the report's bits per character are tools.eval_ppl's on the base and on the widened dir."""
    import json

    from tools import eval_ppl

    base = make_tiny_model(tmp_path / "base", tokenizer_path, dim=32, seed=4)
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in SAME_TEXTS + [
        "北京是中国的首都，有着悠久的历史。", "春天来了，花儿都开了。"]), encoding="utf-8")
    printed = io.StringIO()
    report = run(parse_args(["--model", str(base), "--zh-corpus", str(CORPUS / "zh"), "--zh-vocab-size", "1200",
                             "--output", str(tmp_path / "out"), "--quiet", "--eval-data", str(data)]), out=printed)
    scored = eval_ppl.run(eval_ppl.parse_args(["--model", str(base), "--model", str(tmp_path / "out"), "--data",
                                               str(data), "--quiet", "--device", "cpu"]), out=io.StringIO())
    for lang in ("zh", "en"):
        before, after = report["bits_per_char"][lang]
        assert before == pytest.approx(scored[str(base)][lang].bits_per_char, rel=1e-6)
        assert after == pytest.approx(scored[str(tmp_path / "out")][lang].bits_per_char, rel=1e-6)
        assert f"bits per character, {lang}" in printed.getvalue()
    assert report["bits_per_char"]["zh"][0] != report["bits_per_char"]["zh"][1]
