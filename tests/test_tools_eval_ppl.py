"""tools.eval_ppl: perplexity is exp of the mean token loss computed directly from the logits of a tiny model; bits per
byte and character are that summed loss over the text's own bytes and characters; several models in one table."""
import json
import math
import re

import pytest
import torch

from data_corpus_helpers import joined_split
from llama import Llama, SentencePieceTokenizer, load_tokenizer
from llama.tiny import make_tiny_model
from tools.eval_ppl import main, parse_args, run

TEXTS = [
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"text": "北京是中国的首都，有着悠久的历史。"},
    {"text": "Large language models learn from text in many languages, and more text helps them."},
    {"text": "春天来了，花儿都开了。"},
    {"text": "def add(a, b):\n    return a + b", "lang": "code"},
    {"text": "Question: who wrote the book? Answer: the author did."},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_path):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", tokenizer_path, dim=32, max_seq_len=64, seed=1)


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in TEXTS) + "\n", encoding="utf-8")
    return path


def direct_losses(model_dir, conditional: bool, max_len: int) -> dict[str, list[float]]:
    """Per language, the token losses computed from full logits, text by text."""
    model = Llama.from_pretrained(model_dir)
    tok = SentencePieceTokenizer(model_dir)
    losses: dict[str, list[float]] = {}
    for item in TEXTS:
        ids = [tok.bos_id, *tok.encode(item["text"])][:max_len]
        n = len(ids) - 1
        first = 1 + n // 2 if conditional else 1  # first counted position
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[1][0]  # (L, vocab)
        logp = torch.log_softmax(logits.double(), dim=-1)
        lang = item.get("lang") or ("zh" if any("\u4e00" <= c <= "\u9fff" for c in item["text"]) else "en")
        losses.setdefault(lang, []).extend(-float(logp[t - 1, ids[t]]) for t in range(first, len(ids)))
    return losses


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_equals_exp_of_mean_token_loss(model_dir, data, conditional, batch_size):
    max_len = 20  # cuts the longest texts: the cut applies to both
    argv = ["--model", str(model_dir), "--data", str(data), "--batch-size", str(batch_size), "--device", "cpu",
            "--max-seq-length", str(max_len), "--quiet"] + (["--conditional"] if conditional else [])
    figures = run(parse_args(argv), out=open("/dev/null", "w"))[str(model_dir)]
    expected = direct_losses(model_dir, conditional, max_len)
    every = [x for values in expected.values() for x in values]
    assert figures["all"].tokens == len(every)
    assert figures["all"].ppl == pytest.approx(math.exp(sum(every) / len(every)), rel=1e-5)
    assert set(figures) == {"en", "zh", "code", "all"}
    for lang, values in expected.items():
        assert figures[lang].tokens == len(values)
        assert figures[lang].ppl == pytest.approx(math.exp(sum(values) / len(values)), rel=1e-5)


@pytest.mark.parametrize("which", ["sentencepiece", "smollm2"])
def test_bits_per_byte_and_char_are_the_summed_loss_over_the_texts_own(which, tokenizer_path, bpe_tokenizer_dirs,
                                                                      data, tmp_path):
    """Whole texts (no cut): the bytes and characters are the texts' own (plus SentencePiece's dummy-prefix space
    per text), and bits/byte x bytes x ln 2 is the summed token loss computed from the logits."""
    source = tokenizer_path if which == "sentencepiece" else bpe_tokenizer_dirs[which]
    model_dir = make_tiny_model(tmp_path / which, source, dim=32, max_seq_len=256, seed=2)
    figures = run(parse_args(["--model", str(model_dir), "--data", str(data), "--device", "cpu", "--quiet"]),
                  out=open("/dev/null", "w"))[str(model_dir)]
    model, tok = Llama.from_pretrained(model_dir), load_tokenizer(model_dir)
    summed = 0.0
    for item in TEXTS:
        ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(item["text"])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[1][0].double(), dim=-1)  # (L, vocab)
        summed -= float(sum(logp[t - 1, ids[t]] for t in range(1, len(ids))))
    # without a bos the first token has nothing before it and is not counted
    first = [] if tok.bos_id is not None else [tok.encode(item["text"])[:1] for item in TEXTS]
    dummy = len(TEXTS) if which == "sentencepiece" else 0
    from llama.text_units import TextUnits
    skipped = TextUnits.of(tok).count([i for ids in first for i in ids])
    every = figures["all"]
    assert every.bytes == sum(len(t["text"].encode("utf-8")) for t in TEXTS) + dummy - skipped[0]
    assert every.chars == sum(len(t["text"]) for t in TEXTS) + dummy - skipped[1]
    assert every.bits_per_byte * every.bytes * math.log(2) == pytest.approx(summed, rel=1e-5)
    assert every.bits_per_char * every.chars * math.log(2) == pytest.approx(summed, rel=1e-5)
    assert every.tokens_per_char == every.tokens / every.chars


def test_several_models_compare_in_one_table_and_chart(model_dir, tokenizer_path, data, tmp_path, capsys):
    other = make_tiny_model(tmp_path / "other", tokenizer_path, dim=32, max_seq_len=64, seed=3)
    chart, out_json = tmp_path / "bits.png", tmp_path / "bits.json"
    assert main(["--model", str(model_dir), "--model", str(other), "--data", str(data), "--quiet", "--chart",
                 str(chart), "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out.splitlines()
    figures = json.loads(out_json.read_text())
    header = next(i for i, line in enumerate(printed) if "zh bits/char" in line)
    rows = printed[header + 1:header + 3]
    assert [row.split()[0] for row in rows] == [str(model_dir), str(other)]
    langs = re.findall(r"(\S+) bits/char", printed[header])
    zh = 3 * langs.index("zh")
    assert [float(row.split()[1 + zh]) for row in rows] == \
           [round(figures[name]["zh"]["bits_per_char"], 4) for name in (str(model_dir), str(other))]
    assert figures[str(model_dir)]["zh"]["bits_per_char"] != figures[str(other)]["zh"]["bits_per_char"]
    assert chart.stat().st_size > 1000 and chart.read_bytes()[:4] == b"\x89PNG"


def test_cli_prints_table_and_json(model_dir, data, tmp_path, capsys):
    out_json = tmp_path / "ppl.json"
    assert main(["--model", str(model_dir), "--data", str(data), "--quiet", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "all" in printed and "zh" in printed
    figures = json.loads(out_json.read_text())[str(model_dir)]
    assert figures["all"]["texts"] == len(TEXTS) and figures["all"]["ppl"] > 1


def test_bad_line_is_named(model_dir, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"txt": "oops"}\n', encoding="utf-8")
    assert main(["--model", str(model_dir), "--data", str(path), "--quiet"]) == 1
    assert f"{path}:2: missing field 'text'" in capsys.readouterr().err


def test_stage3_records_count_only_answers_and_end_tokens_in_the_stored_format(model_dir, tmp_path):
    """Conversations are scored as stage 3 renders them (billa: the dir has no chat_format.json, or says billa):
    the loss over every answer token and its eos, nothing else."""
    records = [{"messages": [{"role": "system", "content": "ok"}, {"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "yo"}, {"role": "user", "content": "北京"},
                             {"role": "assistant", "content": "首都"}]},
               {"instruction": "Say yes.", "output": "yes", "lang": "en"}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    figures = run(parse_args(["--model", str(model_dir), "--data", str(path), "--device", "cpu", "--quiet"]),
                  out=open("/dev/null", "w"))[str(model_dir)]
    model, tok = Llama.from_pretrained(model_dir), SentencePieceTokenizer(model_dir)
    def turn(question_text, answer):  # one turn's text tokenized whole, the answer with its eos
        question, answer = joined_split(tok, question_text, answer)
        return question, answer + [tok.eos_id]

    samples = [  # (ids, counted positions), the billa layout written out
        ([tok.bos_id], []) + turn("ok\nHuman: hi\nAssistant:", " yo") + turn("Human: 北京\nAssistant:", " 首都"),
        ([tok.bos_id], []) + turn("Human: Say yes.\nAssistant:", " yes"),
    ]
    losses = []
    for pieces in samples:
        ids = [t for piece in pieces for t in piece]
        assert len(ids) <= 64  # the model's context: nothing dropped
        counted = [i for k, piece in enumerate(pieces) if k % 2
                   for i in range(sum(map(len, pieces[:k])), sum(map(len, pieces[:k + 1])))]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[1][0].double(), dim=-1)
        losses += [-float(logp[t - 1, ids[t]]) for t in counted]
    assert figures["all"].tokens == len(losses) and figures["all"].texts == 2
    assert figures["all"].loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)
