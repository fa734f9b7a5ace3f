"""tools.expand_vocab on a byte-level BPE tokenizer.json: old ids, merges and English ids untouched, new tokens
reachable and learned as a full recount would learn them, new rows the mean of their old split, a tied matrix grown
once, and transformers reading the result as the tokenizers library does."""
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from conftest import TOKENIZER_TEXT
from llama import Llama, LlamaConfig
from llama.model_files import load_tensors
from llama.tiny import corpus_texts
from tools import bpe_merge
from tools.expand_vocab import main, parse_args, run

REPO = Path(__file__).resolve().parents[1]
ENGLISH = [t for t in dict.fromkeys(TOKENIZER_TEXT) if t.isascii()]
CHINESE = [t for t in dict.fromkeys(TOKENIZER_TEXT) if not t.isascii()]
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory) -> Path:
    """A byte-level BPE of a few hundred pieces trained on English only (so Chinese is bytes), with its special
    tokens added above the BPE vocab as Llama 3's are."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(ENGLISH * 20, trainer)
    tokenizer.add_special_tokens(SPECIALS)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def zh_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("zh") / "zh.txt"
    path.write_text("\n".join(CHINESE * 3) + "\n", encoding="utf-8")
    return path


def untied_model_dir(directory: Path, bpe_path: Path, padding_rows: int) -> Path:
    """This repo's layout, untied, with `padding_rows` unused rows past the tokenizer's ids (as Qwen has)."""
    vocab = bpe_merge.load_bpe(bpe_path).next_id() + padding_rows
    torch.manual_seed(0)
    Llama(LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)) \
        .save_pretrained(directory)
    shutil.copyfile(bpe_path, directory / "tokenizer.json")
    return directory


def tied_transformers_dir(directory: Path, bpe_path: Path) -> Path:
    """A transformers Llama dir with tied embeddings (no lm_head in its weights) and a tokenizer_config.json."""
    from transformers import LlamaConfig as HfConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = HfConfig(vocab_size=bpe_merge.load_bpe(bpe_path).next_id(), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory)
    shutil.copyfile(bpe_path, directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[0], "eos_token": SPECIALS[1]}))
    return directory


def expand(source: Path, out: Path, zh_corpus: Path, *extra: str) -> dict:
    return run(parse_args(["--model", str(source), "--zh-corpus", str(zh_corpus), "--sample-zh", str(zh_corpus),
                           "--output", str(out), "--quiet", *extra]), out=io.StringIO())


@pytest.fixture(scope="module")
def untied(tmp_path_factory, bpe_path, zh_corpus):
    tmp = tmp_path_factory.mktemp("untied")
    source = untied_model_dir(tmp / "base", bpe_path, padding_rows=3)
    return source, tmp / "out", expand(source, tmp / "out", zh_corpus)


@pytest.fixture(scope="module")
def tied(tmp_path_factory, bpe_path, zh_corpus):
    tmp = tmp_path_factory.mktemp("tied")
    source = tied_transformers_dir(tmp / "base", bpe_path)
    return source, tmp / "out", expand(source, tmp / "out", zh_corpus)


def new_tokens(base_path: Path, out: Path) -> list[tuple[int, str]]:
    """(id, token) of the tokens the widening added: past every old id (the specials, now in the vocab too, are not)."""
    first = bpe_merge.load_bpe(base_path).next_id()
    return sorted((i, t) for t, i in bpe_merge.load_bpe(out / "tokenizer.json").vocab.items() if i >= first)


def test_old_ids_merges_and_added_tokens_are_unchanged(untied, bpe_path):
    _, out, report = untied
    old, new = json.loads(bpe_path.read_text()), json.loads((out / "tokenizer.json").read_text())
    assert new["added_tokens"] == old["added_tokens"]
    assert {t: new["model"]["vocab"][t] for t in old["model"]["vocab"]} == old["model"]["vocab"]
    n_old = len(old["model"]["merges"])
    assert new["model"]["merges"][:n_old] == old["model"]["merges"]
    added = new_tokens(bpe_path, out)
    first = max(t["id"] for t in old["added_tokens"]) + 1  # the specials sit above the BPE vocab
    assert [i for i, _ in added] == list(range(first, first + report["added"])) and report["added"] > 20
    assert json.loads((out / "expand_vocab.json").read_text())["first_new_row"] == first  # read by new_rows_only
    assert len(new["model"]["merges"]) == n_old + report["added"]


def test_english_tokenizes_to_identical_ids(untied, bpe_path):
    _, out, report = untied
    old, new = Tokenizer.from_file(str(bpe_path)), Tokenizer.from_file(str(out / "tokenizer.json"))
    texts = corpus_texts(REPO / "pretraining_corpora" / "en") + corpus_texts(REPO / "heldout_corpora" / "en")
    assert bpe_merge.encode_ids(new, texts) == bpe_merge.encode_ids(old, texts)
    assert report["ids_identical_en"] and not report["ids_identical_zh"]


def test_chinese_takes_fewer_tokens(untied):
    _, _, report = untied
    zh_before, zh_after = report["tokens_per_char_zh"]
    assert zh_after < 0.7 * zh_before
    assert report["tokens_per_char_en"][0] == report["tokens_per_char_en"][1]


def test_every_new_token_is_reachable(untied, bpe_path):
    _, out, _ = untied
    new = Tokenizer.from_file(str(out / "tokenizer.json"))
    merges = json.loads((out / "tokenizer.json").read_text())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    known = set(bpe_merge.load_bpe(bpe_path).vocab)
    added = new_tokens(bpe_path, out)
    later_parts = Counter()
    for (new_id, token), (a, b) in zip(added, merges[-len(added):]):
        assert a in known and b in known and a + b == token  # built from tokens that exist before it
        known.add(token)
        later_parts.update((a, b))
    for new_id, token in added:
        try:
            text = bpe_merge.token_bytes(token).decode("utf-8")
        except UnicodeDecodeError:  # part of a character: reachable as a step of a later merge
            assert later_parts[token], token
            continue
        assert new.encode(text, add_special_tokens=False).ids == [new_id], text


def test_incremental_counts_learn_what_a_full_recount_learns(bpe_path):
    base = bpe_merge.load_bpe(bpe_path)
    learned = bpe_merge.learn_merges(base, CHINESE, max_new=10_000, min_frequency=2)  # until pairs run out
    words = [(base.segment(w), f) for w, f in base.words(CHINESE).items()]
    vocab, merges = set(base.vocab), []
    while True:
        counts = Counter()
        for symbols, freq in words:
            for pair in zip(symbols, symbols[1:]):
                if pair[0] + pair[1] not in vocab and not bpe_merge.ZH_LEAD_CHARS.isdisjoint(pair[0] + pair[1]):
                    counts[pair] += freq
        if not counts or max(counts.values()) < 2:
            break
        a, b = min(counts, key=lambda p: (-counts[p], p))
        merges.append((a, b))
        vocab.add(a + b)
        words = [(bpe_merge._merge_word(symbols, a, b), freq) for symbols, freq in words]
    assert learned.merges == merges and len(merges) > 30
    # and the segmentation the learning arrived at is the one the expanded tokenizer produces
    expanded = Tokenizer.from_str(json.dumps(bpe_merge.expanded_spec(base, learned)))
    assert [[t.value for t in expanded.model.tokenize(w)] for w in base.words(CHINESE)] == [s for s, _ in words]


def test_new_rows_are_the_mean_of_the_old_split(untied, bpe_path):
    source, out, report = untied
    old_tok = Tokenizer.from_file(str(bpe_path))
    a, b = load_tensors(source), load_tensors(out)
    first = report["vocab_before"]
    padding = a["tok_embeddings.weight"].shape[0] - first
    assert padding == 3
    assert json.loads((out / "config.json").read_text())["vocab_size"] == first + report["added"] \
        == b["tok_embeddings.weight"].shape[0] == b["output.weight"].shape[0] == report["embedding_rows"]
    for name, tensor in a.items():
        if name in ("tok_embeddings.weight", "output.weight"):
            assert torch.equal(b[name][:first], tensor[:first])
        else:
            assert torch.equal(b[name], tensor), name
    checked = 0
    for new_id, token in new_tokens(bpe_path, out):
        try:
            text = bpe_merge.token_bytes(token).decode("utf-8")
        except UnicodeDecodeError:
            continue
        split = old_tok.encode(text, add_special_tokens=False).ids
        assert old_tok.decode(split) == text and len(split) > 1
        for name in ("tok_embeddings.weight", "output.weight"):
            torch.testing.assert_close(b[name][new_id], a[name][split].mean(0), rtol=0, atol=1e-6)
        checked += 1
    assert checked > 20


def test_a_tied_matrix_grows_once(tied, bpe_path):
    from transformers import LlamaForCausalLM

    source, out, report = tied
    weights = load_tensors(out)
    assert report["tied"] and "lm_head.weight" not in weights
    assert weights["model.embed_tokens.weight"].shape[0] == report["vocab_after"]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == report["vocab_after"]
    a, b = LlamaForCausalLM.from_pretrained(source), LlamaForCausalLM.from_pretrained(out)
    assert b.lm_head.weight.data_ptr() == b.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([Tokenizer.from_file(str(bpe_path)).encode(ENGLISH[0]).ids])
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert lb.shape[-1] == report["vocab_after"]
    torch.testing.assert_close(lb[..., :report["vocab_before"]], la, rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_special_tokens_keep_their_ids_once_loaded(which, request):
    """The specials sit above the BPE vocab (Llama 3, Qwen2) and the new tokens above them: loaded by the tokenizers
    library (so by transformers and llama.load_tokenizer too), each special keeps the id the file gives it, instead
    of the first id after the vocab, which is now a new token's."""
    from transformers import AutoTokenizer

    from llama.tokenizer_files import load_tokenizer

    source, out, report = request.getfixturevalue(which)
    old = json.loads((source / "tokenizer.json").read_text())["added_tokens"]
    assert min(t["id"] for t in old) < report["first_new_row"]  # below the new tokens
    loaded, hf = Tokenizer.from_file(str(out / "tokenizer.json")), AutoTokenizer.from_pretrained(out)
    for token in old:
        assert loaded.token_to_id(token["content"]) == hf.convert_tokens_to_ids(token["content"]) == token["id"]
    assert loaded.get_vocab_size() == report["vocab_after"]
    if which == "tied":  # its tokenizer_config.json names the eos
        assert load_tokenizer(out).eos_id == load_tokenizer(source).eos_id == old[1]["id"]


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_transformers_reads_the_expanded_tokenizer(which, request):
    from transformers import AutoTokenizer

    _, out, _ = request.getfixturevalue(which)
    hf = AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    texts = [*CHINESE, *ENGLISH, "混合 mixed 文本 with 12 数字。"]
    assert [hf.encode(t, add_special_tokens=False) for t in texts] == bpe_merge.encode_ids(ours, texts)
    assert len(hf) == json.loads((out / "config.json").read_text())["vocab_size"]


def test_bad_input_is_one_error_line(tmp_path, bpe_path, zh_corpus, capsys):
    source = untied_model_dir(tmp_path / "base", bpe_path, padding_rows=0)
    argv = ["--model", str(source), "--output", str(tmp_path / "out"), "--quiet"]
    assert main([*argv, "--zh-model", str(bpe_path)]) == 1
    assert capsys.readouterr().err.startswith("error: expand_vocab: --zh-model is a SentencePiece model")

    plain = Tokenizer(models.BPE(unk_token="[UNK]"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    plain.train_from_iterator(ENGLISH, trainers.BpeTrainer(vocab_size=100, special_tokens=["[UNK]"],
                                                           show_progress=False))
    plain.save(str(tmp_path / "plain.json"))
    assert main([*argv, "--zh-corpus", str(zh_corpus), "--tokenizer", str(tmp_path / "plain.json")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "plain.json" in err and "ByteLevel" in err

    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] - 1}))
    assert main([*argv, "--zh-corpus", str(zh_corpus)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vocab_size" in err and not (tmp_path / "out").exists()


def test_a_bpe_that_ignores_merges_for_whole_words_keeps_english(tmp_path, bpe_path):
    """Llama 3's BPE sets ignore_merges: a word that is itself a token skips the merges. New tokens all hold a CJK
    byte, so no English word becomes one."""
    spec = json.loads(bpe_path.read_text())
    spec["model"]["ignore_merges"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    base = bpe_merge.load_bpe(tmp_path / "tokenizer.json")
    learned = bpe_merge.learn_merges(base, CHINESE, max_new=10_000)
    new = Tokenizer.from_str(json.dumps(bpe_merge.expanded_spec(base, learned)))
    english = corpus_texts(REPO / "pretraining_corpora" / "en")
    assert bpe_merge.encode_ids(new, english) == bpe_merge.encode_ids(base.tokenizer, english)
    before, after = (sum(map(len, bpe_merge.encode_ids(t, CHINESE))) for t in (base.tokenizer, new))
    assert after < 0.7 * before


def test_merges_written_as_strings_stay_strings(bpe_path):
    """Older tokenizer.json files (and many on the hub) hold merges as "a b" strings, newer ones as [a, b]."""
    spec = json.loads(bpe_path.read_text())
    assert isinstance(spec["model"]["merges"][0], list)
    base = bpe_merge.load_bpe(bpe_path)
    learned = bpe_merge.learn_merges(base, CHINESE, max_new=10_000)
    spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
    base.spec = spec
    as_strings = bpe_merge.expanded_spec(base, learned)
    assert all(isinstance(m, str) for m in as_strings["model"]["merges"])
    texts = [*CHINESE, *ENGLISH]
    assert bpe_merge.encode_ids(Tokenizer.from_str(json.dumps(as_strings)), texts) == \
        bpe_merge.encode_ids(Tokenizer.from_str(json.dumps(bpe_merge.expanded_spec(
            bpe_merge.load_bpe(bpe_path), learned))), texts)
