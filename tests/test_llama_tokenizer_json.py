"""The tokenizer.json kind (llama.tokenizer_json) beside SentencePiece: which kind a model dir gets, parity with
transformers' AutoTokenizer for each family, bos only where the tokenizer adds one, the end token, offsets, saving,
and the checks against a model's config."""
import json
import random
import shutil
from collections import Counter

import numpy as np
import pytest
from transformers import AutoTokenizer

from llama import (LlamaConfig, SentencePieceTokenizer, Tokenizer, TokenizerJson, check_tokenizer_matches,
                   load_tokenizer)
from llama.tiny import make_tiny_model
from training.samples import LM, Cut, Prompted, SampleBuilder

TEXTS = ["The quick brown fox jumps over the lazy dog.", "北京是中国的首都，有着悠久的历史。", "",
         "  leading spaces, 12345 digits\n\n\ttabs  and   runs ", "naïve café 龍 😀 x\u00a0y", "a",
         "Human: 你好\nAssistant: Hello!"]
WITH_SPECIALS = "<|im_start|>user\nhi<|im_end|><|endoftext|> <|begin_of_text|>x<|eot_id|>"


@pytest.fixture(scope="module")
def hf_tokenizers(bpe_tokenizer_dirs):
    return {family: AutoTokenizer.from_pretrained(path) for family, path in bpe_tokenizer_dirs.items()}


def byte_level_ends(tok: TokenizerJson, text: str, ids: list[int]) -> list[int]:
    """Where each token ends in text, in characters, from the bytes each token spells (GPT-2's byte-to-character
    table, inverted): independent of the library's offsets. A token that stops inside a character ends where that
    character starts. Only for text the tokenizer does not normalise."""
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    byte_ends = np.cumsum([len(tok.tk.id_to_token(i)) for i in ids]) if ids else []
    assert all(c in to_byte for i in ids for c in tok.tk.id_to_token(i))
    starts = [k for k in range(len(text.encode())) if (text.encode()[k] & 0xC0) != 0x80] + [len(text.encode())]
    return [sum(1 for s in starts[:-1] if s < end) - (end not in starts) for end in byte_ends]


# ---- which kind -------------------------------------------------------------------------------------------------

def test_the_model_dir_decides_the_kind(tmp_path, tokenizer_path, bpe_tokenizer_dirs):
    json_dir = bpe_tokenizer_dirs["llama3"]
    assert isinstance(load_tokenizer(json_dir), TokenizerJson) and isinstance(load_tokenizer(json_dir), Tokenizer)
    assert isinstance(load_tokenizer(json_dir / "tokenizer.json"), TokenizerJson)
    assert isinstance(load_tokenizer(tokenizer_path), SentencePieceTokenizer)
    both = tmp_path / "both"  # transformers' LLaMA-2 and Mistral dirs hold both: the recipe's SentencePiece path
    both.mkdir()
    shutil.copyfile(json_dir / "tokenizer.json", both / "tokenizer.json")
    shutil.copyfile(tokenizer_path, both / "tokenizer.model")
    assert isinstance(load_tokenizer(both), SentencePieceTokenizer)
    shutil.copyfile(json_dir / "tokenizer_config.json", both / "tokenizer_config.json")  # a config of another model
    with pytest.raises(ValueError, match="tokenizer_config.json: eos_token '<|end_of_text|>' is not in the vocab"):
        load_tokenizer(both)
    (tmp_path / "neither").mkdir()
    with pytest.raises(FileNotFoundError, match=r"neither: .*neither tokenizer\.model .* nor tokenizer\.json"):
        load_tokenizer(tmp_path / "neither")
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ValueError, match="broken.json: not a tokenizers-library tokenizer.json"):
        load_tokenizer(tmp_path / "broken.json")


# ---- parity with transformers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family, bos", [("llama3", "<|begin_of_text|>"), ("qwen2", None), ("smollm2", None)])
def test_encode_equals_transformers_autotokenizer(bpe_tokenizer_dirs, hf_tokenizers, family, bos):
    tok, hf = load_tokenizer(bpe_tokenizer_dirs[family]), hf_tokenizers[family]
    assert tok.bos_id == (hf.convert_tokens_to_ids(bos) if bos else None)
    assert tok.eos_id == hf.eos_token_id and tok.eos_token == hf.eos_token
    assert tok.vocab_size == len(hf) and tok.chat_template == hf.chat_template
    for text in TEXTS + [WITH_SPECIALS]:
        assert tok.encode(text, bos=True) == hf(text)["input_ids"], text
        assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text
    assert tok.encode_batch(TEXTS, bos=True, eos=True) == [hf(t)["input_ids"] + [tok.eos_id] for t in TEXTS]
    for text in TEXTS:
        assert tok.decode(tok.encode(text, bos=True, eos=True)) == text  # specials left out, as SentencePiece does


def test_llama_class_tokenizer_json_follows_add_bos_token(tmp_path, bpe_tokenizer_dirs):
    """A LlamaTokenizerFast dir (Llama-2/Mistral converted, tokenizer.json only): transformers rebuilds the template
    from add_bos_token, whatever tokenizer.json holds."""
    for add_bos in (True, False):
        d = tmp_path / str(add_bos)
        shutil.copytree(bpe_tokenizer_dirs["qwen2"], d)
        config = json.loads((d / "tokenizer_config.json").read_text())
        config.update(tokenizer_class="LlamaTokenizerFast", bos_token="<|im_start|>", add_bos_token=add_bos)
        del config["add_prefix_space"]  # a LlamaTokenizerFast given it rebuilds itself from a tokenizer.model
        (d / "tokenizer_config.json").write_text(json.dumps(config))
        tok, hf = load_tokenizer(d), AutoTokenizer.from_pretrained(d)
        assert tok.bos_id == (hf.convert_tokens_to_ids("<|im_start|>") if add_bos else None)
        assert [tok.encode(t, bos=True) for t in TEXTS] == [hf(t)["input_ids"] for t in TEXTS]


# ---- the end token ----------------------------------------------------------------------------------------------

def test_eos_token_names_the_end_token(bpe_tokenizer_dirs, tokenizer_path):
    instruct = load_tokenizer(bpe_tokenizer_dirs["llama3-instruct"])
    assert instruct.eos_token == "<|eot_id|>"
    pretraining = load_tokenizer(bpe_tokenizer_dirs["llama3-instruct"], eos_token="<|end_of_text|>")
    end = pretraining.tk.token_to_id("<|end_of_text|>")
    assert pretraining.eos_id == end and pretraining.eos_token == "<|end_of_text|>"
    assert pretraining.own_eos_id == instruct.eos_id  # what the config is checked against
    assert pretraining.encode("hi", bos=True, eos=True)[-1] == end
    assert pretraining.encode_batch(["hi", ""], eos=True) == [instruct.encode("hi") + [end], [end]]
    with pytest.raises(ValueError, match=r"setting eos_token='<\|im_end\|>' is not a token of .*tokenizer.json"):
        load_tokenizer(bpe_tokenizer_dirs["llama3"], eos_token="<|im_end|>")

    sp = load_tokenizer(tokenizer_path, eos_token="<unk>")  # SentencePiece: the same setting, a piece
    assert sp.eos_id == 0 and sp.own_eos_id == 2
    assert sp.encode("a", bos=True, eos=True) == [1, *sp.encode("a"), 0]
    assert sp.encode_batch(["a", "b"], eos=True) == [sp.encode("a") + [0], sp.encode("b") + [0]]
    with pytest.raises(ValueError, match="setting eos_token='<nope>'"):
        load_tokenizer(tokenizer_path, eos_token="<nope>")


# ---- offsets ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama3", "qwen2", "smollm2"])
def test_token_ends_come_from_the_tokenizers_offsets(bpe_tokenizer_dirs, family):
    tok = load_tokenizer(bpe_tokenizer_dirs[family])
    for text in TEXTS + ["😀😀 龍龍 ééé", "x" * 50 + "\n\n\n"]:
        ids = tok.encode(text)
        assert tok.token_ends(text, ids).tolist() == byte_level_ends(tok, text, ids), text


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_middle_cut_with_a_tokenizer_json_keeps_fixed_text_and_the_answer(bpe_tokenizer_dirs, family):
    """A too-long prompted sample loses tokens from its Cut part's middle only, by the tokenizer's own offsets, with
    no text encoded but the batch call and one offsets call."""
    tok = load_tokenizer(bpe_tokenizer_dirs[family])
    passage = " ".join(f"北京是中国的首都 number {i}, 龍😀 café." for i in range(40))
    spec = Prompted(("Human: Summarise\n", Cut(passage), "\nAssistant: "), "It is Beijing.")
    builder = SampleBuilder(tok, 64, "split", "middle")
    counters = Counter()
    [[sample]] = builder.build([spec], random.Random(0), counters)
    answer = tok.encode("It is Beijing.") + [tok.eos_id]
    assert len(sample.ids) == 64 and sample.ids[sample.n_masked:] == answer
    head = [] if tok.bos_id is None else [tok.bos_id]
    assert sample.ids[:len(head)] == head
    prefix = tok.encode("Human: Summarise\n" + passage + "\nAssistant: ")
    ends = byte_level_ends(tok, "Human: Summarise\n" + passage + "\nAssistant: ", prefix)
    starts = [0] + ends[:-1]
    start, stop = len("Human: Summarise\n"), len("Human: Summarise\n") + len(passage)
    inner = [k for k in range(len(prefix)) if starts[k] >= start and ends[k] <= stop]
    keep = 64 - len(answer) - len(head) - (len(prefix) - len(inner))
    kept = set(inner[:keep // 2] + inner[len(inner) - (keep - keep // 2):])
    assert sample.ids[len(head):sample.n_masked] == [t for k, t in enumerate(prefix) if k not in inner or k in kept]
    assert counters["cut_input_tokens"] == len(inner) - keep and counters["cut_answers"] == 0


def test_samples_have_bos_only_where_the_tokenizer_adds_one(bpe_tokenizer_dirs):
    for family, has_bos in (("llama3", True), ("qwen2", False), ("smollm2", False)):
        tok = load_tokenizer(bpe_tokenizer_dirs[family])
        [[lm]], [[prompted]] = (SampleBuilder(tok, 512, "split", "middle").build([spec], random.Random(0), Counter())
                                for spec in (LM("天气非常好 today."), Prompted(("Human: hi\n",), "Hello")))
        assert lm.ids == tok.encode("天气非常好 today.", bos=True, eos=True)
        assert prompted.ids == tok.encode("Human: hi\n", bos=True) + tok.encode("Hello", eos=True)
        assert (tok.bos_id in lm.ids[:1]) == has_bos


def test_eval_and_chat_prompts_follow_the_tokenizers_bos(bpe_tokenizer_dirs, hf_tokenizers):
    from tools.chat_format import fit_prompt, turn_prompt
    from tools.eval_ppl import prepare_texts
    from training.conversation import ChatRenderer

    for family in ("llama3", "qwen2"):
        tok = load_tokenizer(bpe_tokenizer_dirs[family])
        ids, dropped = fit_prompt(ChatRenderer(tok, "billa"), [("q", "a")], "你好", 100)
        assert ids[:len(tok.encode("", bos=True))] == tok.encode("", bos=True) and dropped == 0
        assert ids[-len(tok.encode(turn_prompt("你好"))):] == tok.encode(turn_prompt("你好"))
        assert (tok.bos_id is None) == (family == "qwen2") and (tok.bos_id in ids) == (family == "llama3")
        [text], _ = prepare_texts(tok, [("北京是中国的首都。", "zh")], 64, conditional=False)
        assert text.ids == tok.encode("北京是中国的首都。", bos=True) == hf_tokenizers[family]("北京是中国的首都。").input_ids


# ---- each token's bytes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sentencepiece", "llama3", "qwen2", "smollm2"])
def test_token_bytes_spell_what_decode_writes(tokenizer_path, bpe_tokenizer_dirs, family):
    """The bytes of a text's tokens, joined, are decode()'s text, byte for byte: byte-fallback pieces and byte-level
    tokens that split a character join back into it, specials spell nothing. SentencePiece's first piece keeps the
    dummy prefix's space, which decode() drops."""
    tok = load_tokenizer(tokenizer_path if family == "sentencepiece" else bpe_tokenizer_dirs[family])
    table = tok.token_bytes()
    assert len(table) == tok.vocab_size and table[tok.eos_id] == b""
    for text in TEXTS + [WITH_SPECIALS, "龘🦙"]:
        ids = tok.encode(text, bos=True, eos=True)
        spelled = b"".join(table[i] for i in ids)
        decoded = tok.decode(ids).encode("utf-8")
        assert spelled == (b" " + decoded if family == "sentencepiece" and len(ids) > 2 else decoded), text
    # characters the vocabulary lacks come out as single bytes, which only together spell the character
    ids = tok.encode("🦙")
    assert len(ids) > 1 and any(len(table[i]) == 1 and table[i][0] >= 0x80 for i in ids)
    assert all(table[i].decode("utf-8", errors="replace") != table[i].decode("utf-8", errors="ignore")
               for i in ids if len(table[i]) == 1 and table[i][0] >= 0x80)


# ---- saving -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama3", "llama3-instruct", "qwen2", "smollm2", "sentencepiece"])
def test_saved_tokenizer_loads_in_transformers_and_encodes_identically(tmp_path, bpe_tokenizer_dirs, tokenizer_path,
                                                                      family):
    source = tokenizer_path if family == "sentencepiece" else bpe_tokenizer_dirs[family]
    eos = {"llama3-instruct": "<|end_of_text|>"}.get(family, "")
    tok = load_tokenizer(source, eos_token=eos)
    tok.save(tmp_path / "out")
    hf = AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in TEXTS:
        assert tok.encode(text, bos=True) == hf(text)["input_ids"], text
    assert hf.eos_token == tok.eos_token and hf.eos_token_id == tok.eos_id  # the run's end token travels
    again = load_tokenizer(tmp_path / "out")
    assert (again.vocab_size, again.bos_id, again.eos_id, again.pad_id, again.chat_template) == \
           (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.chat_template)
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    again.save(tmp_path / "out", chat_template=template)  # in place, with another template
    hf = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf.chat_template == template == load_tokenizer(tmp_path / "out").chat_template
    assert hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "user: hi\n"
    assert [tok.encode(t, bos=True) for t in TEXTS] == [hf(t)["input_ids"] for t in TEXTS]


# ---- against the model's config ---------------------------------------------------------------------------------

def config_for(tok, **overrides):
    values = dict(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                  bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    values.update(overrides)
    return LlamaConfig(**values)


def test_check_tokenizer_matches_the_families_configs(bpe_tokenizer_dirs):
    llama3 = load_tokenizer(bpe_tokenizer_dirs["llama3"])
    check_tokenizer_matches(config_for(llama3), llama3)
    check_tokenizer_matches(config_for(llama3, vocab_size=llama3.vocab_size + 271), llama3)  # padded, as Qwen2.5's
    with pytest.raises(ValueError, match=f"tokenizer .*llama3/tokenizer.json has {llama3.vocab_size} pieces"):
        check_tokenizer_matches(config_for(llama3, vocab_size=llama3.vocab_size - 1), llama3)
    with pytest.raises(ValueError, match=f"bos_id {llama3.bos_id} but config bos_token_id is 0"):
        check_tokenizer_matches(config_for(llama3, bos_token_id=0), llama3)
    with pytest.raises(ValueError, match=f"eos_id {llama3.eos_id} but config eos_token_id is 3"):
        check_tokenizer_matches(config_for(llama3, eos_token_id=3), llama3)
    # Llama 3.1 lists several ends; the tokenizer's own eos must be one of them.
    instruct = load_tokenizer(bpe_tokenizer_dirs["llama3-instruct"], eos_token="<|end_of_text|>")
    ends = [llama3.eos_id, instruct.own_eos_id]
    check_tokenizer_matches(config_for(instruct, eos_token_id=ends), instruct)
    with pytest.raises(ValueError, match=r"eos_token_id is \[0, 1\]"):
        check_tokenizer_matches(config_for(instruct, eos_token_id=[0, 1]), instruct)
    # Qwen: no bos is ever fed, so the config's (Qwen2.5 names <|endoftext|>) is not checked.
    qwen = load_tokenizer(bpe_tokenizer_dirs["qwen2"])
    check_tokenizer_matches(config_for(qwen, bos_token_id=qwen.pad_id), qwen)
    check_tokenizer_matches(config_for(qwen, bos_token_id=None), qwen)


def _inputs_settings(model_dir, **overrides):
    import pretrain_args
    from settings_for import settings_for

    values = dict(init_model_path=str(model_dir), tokenizer_path="", eos_token="", max_seq_length=64,
                  dropout_prob=0.0)
    values.update(overrides)
    return settings_for(pretrain_args, values)


def test_stage_inputs_from_a_tokenizer_json_model_dir(tmp_path, bpe_tokenizer_dirs):
    from training.model_loading import ModelInputError, check_model_inputs

    model_dir = make_tiny_model(tmp_path / "m", bpe_tokenizer_dirs["llama3-instruct"], dim=32, max_seq_len=128)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in
                                                                                      model_dir.iterdir()}
    inputs = check_model_inputs(_inputs_settings(model_dir))
    assert isinstance(inputs.tokenizer, TokenizerJson) and inputs.tokenizer_path == model_dir / "tokenizer.json"
    assert inputs.config.eos_token_id == inputs.tokenizer.eos_id

    # eos_token: the run ends documents with <|end_of_text|>; the config it saves says so, and so does its tokenizer.
    inputs = check_model_inputs(_inputs_settings(model_dir, eos_token="<|end_of_text|>"))
    end = inputs.tokenizer.eos_id
    assert inputs.tokenizer.eos_token == "<|end_of_text|>" and inputs.config.eos_token_id == end
    inputs.config.save_pretrained(tmp_path / "next")
    inputs.tokenizer.save(tmp_path / "next")
    shutil.copyfile(model_dir / "model.safetensors", tmp_path / "next" / "model.safetensors")
    following = check_model_inputs(_inputs_settings(tmp_path / "next"))  # the next stage, no setting needed
    assert following.tokenizer.eos_id == end and following.config.eos_token_id == end

    with pytest.raises(ModelInputError, match=r"^setting eos_token='<\|im_end\|>' is not a token of"):
        check_model_inputs(_inputs_settings(model_dir, eos_token="<|im_end|>"))
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(ModelInputError, match=r"init_model_path \(tokenizer_path is empty\): .*neither tokenizer.model"
                                              r" \(SentencePiece\) nor tokenizer.json"):
        check_model_inputs(_inputs_settings(model_dir))
    with pytest.raises(ModelInputError, match=r"^tokenizer_path: tokenizer not found: .*missing.json"):
        check_model_inputs(_inputs_settings(model_dir, tokenizer_path=str(tmp_path / "missing.json")))


def test_eos_token_setting_is_checked_as_a_setting():
    import pretrain_args
    from training.settings import SettingsError, load_settings

    assert load_settings(pretrain_args, ["eos_token=<|end_of_text|>"]).model.eos_token == "<|end_of_text|>"
    assert load_settings(pretrain_args, []).model.eos_token == ""
    with pytest.raises(SettingsError, match="'eos_token'"):
        load_settings(pretrain_args, ["eos_token=' </s>'"])


def test_stage_1_from_a_tokenizer_json_dir_keeps_the_runs_end_token(tmp_path, bpe_tokenizer_dirs):
    """Stage 1 from a Llama-3-Instruct-style dir with eos_token=<|end_of_text|>: its final dir holds the same
    tokenizer.json and names that end token in tokenizer_config.json and config.json, so that the next stage needs no
    setting. An eos_token that is no token stops the launch with one error line."""
    from training.model_loading import check_model_inputs
    from training_runs import TINY_RUN, explain, torchrun

    model = make_tiny_model(tmp_path / "m", bpe_tokenizer_dirs["llama3-instruct"], dim=32, max_seq_len=128)
    bad = torchrun(TINY_RUN + [f"init_model_path={model}", "eos_token=<|im_end|>", f"output_dir={tmp_path}/bad"],
                   nproc=1)
    assert bad.returncode != 0
    assert "error: ModelInputError: setting eos_token='<|im_end|>' is not a token of" in bad.stdout + bad.stderr
    out = tmp_path / "out"
    result = torchrun(TINY_RUN + ["eos_token=<|end_of_text|>", f"init_model_path={model}", "max_steps=3",
                                  "saving_steps=3", f"output_dir={out}", f"logdir={out}/logs"], nproc=1)
    assert result.returncode == 0, explain(result)
    final = out / "final"
    assert (final / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()
    following = check_model_inputs(_inputs_settings(final))
    tok = following.tokenizer
    assert tok.eos_token == "<|end_of_text|>" and tok.bos_id == load_tokenizer(model).bos_id
    assert following.config.eos_token_id == tok.eos_id
    assert json.loads((final / "config.json").read_text())["eos_token_id"] == tok.eos_id


def test_tiny_cli_trains_a_bpe_tokenizer_json_model_dir(tmp_path):
    from conftest import TOKENIZER_TEXT
    from llama.pretrained import load_pretrained
    from llama.tiny import main as tiny_main

    (tmp_path / "corpus.txt").write_text("\n".join(TOKENIZER_TEXT), encoding="utf-8")
    tiny_main(["--corpus", str(tmp_path / "corpus.txt"), "--output", str(tmp_path / "m"), "--bpe-family", "smollm2",
               "--vocab-size", "400", "--dim", "32", "--layers", "1"])
    model, tok = load_pretrained(tmp_path / "m")
    assert isinstance(tok, TokenizerJson) and tok.bos_id is None and tok.eos_token == "<|im_end|>"
    assert model.config.vocab_size == tok.vocab_size == 400 and not (tmp_path / "m" / "tokenizer.model").exists()
