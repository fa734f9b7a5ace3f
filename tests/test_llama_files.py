"""Model dirs on disk: save/load round trips, sharding, ColossalAI-style shards, Meta checkpoints, tokenizer, errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llama import Llama, LlamaConfig, SentencePieceTokenizer, check_tokenizer_matches
from llama.convert import main as convert_main
from llama.weight_layouts import load_meta_checkpoint
from llama.model_files import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, parse_size
from llama.tiny import main as tiny_main, make_tiny_model

REPO = Path(__file__).resolve().parents[1]


def small_model(n_kv_heads=2, vocab=50) -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=n_kv_heads, max_sequence_length=32))


def assert_same_weights(a: Llama, b: Llama) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("max_shard_size", ["10GB", "20KB"], ids=["single", "sharded"])
def test_save_load_round_trip_keeps_weights_and_dtype(tmp_path, dtype, max_shard_size):
    model = small_model().to(dtype)
    model.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    sharded = (tmp_path / SAFE_WEIGHTS_INDEX_NAME).is_file()
    assert sharded == (max_shard_size == "20KB") and (tmp_path / SAFE_WEIGHTS_NAME).is_file() != sharded
    if sharded:
        weight_map = json.loads((tmp_path / SAFE_WEIGHTS_INDEX_NAME).read_text())["weight_map"]
        assert len(set(weight_map.values())) > 1 and set(weight_map) == set(model.state_dict())
    loaded = Llama.from_pretrained(tmp_path, dtype=dtype)
    assert_same_weights(model, loaded)
    assert all(p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())
    ids = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids)[1], loaded(ids)[1])


def test_load_casts_to_the_requested_dtype(tmp_path):
    small_model().save_pretrained(tmp_path)
    loaded = Llama.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_resaving_a_smaller_checkpoint_removes_stale_shards(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    model.save_pretrained(tmp_path)
    assert not (tmp_path / SAFE_WEIGHTS_INDEX_NAME).exists()
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [SAFE_WEIGHTS_NAME]


def test_colossalai_style_shards_with_index_load(tmp_path):
    """booster.save_model(shard=True, use_safetensors=True) names shards model-00001.safetensors (no -of-)."""
    model = small_model()
    state = model.state_dict()
    names = list(state)
    halves = {"model-00001.safetensors": names[: len(names) // 2], "model-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, keys in halves.items():
        save_file({k: state[k].contiguous() for k in keys}, str(tmp_path / file))
        weight_map.update({k: file for k in keys})
    (tmp_path / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    model.config.save_pretrained(tmp_path)
    assert_same_weights(model, Llama.from_pretrained(tmp_path))


def write_meta_checkpoint(model: Llama, directory, n_shards: int) -> None:
    """Split our (= Meta's) weights the way Meta's model-parallel consolidated.NN.pth files are split."""
    dims = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}
    shards = [{} for _ in range(n_shards)]
    for name, t in model.state_dict().items():
        kind = name.split(".")[-2]
        pieces = t.chunk(n_shards, dim=dims[kind]) if kind in dims else [t] * n_shards
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    shards[0]["rope.freqs"] = torch.zeros(4)  # Meta's checkpoints carry this buffer
    directory.mkdir()
    for i, shard in enumerate(shards):
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")
    c = model.config
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
              "n_kv_heads": c.num_key_value_heads, "multiple_of": c.multiple_of, "norm_eps": c.rms_norm_eps,
              "vocab_size": -1}
    (directory / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_checkpoint_converts(tmp_path, n_shards, tokenizer_path):
    model = small_model()
    write_meta_checkpoint(model, tmp_path / "7B", n_shards)
    config, state = load_meta_checkpoint(tmp_path / "7B")
    assert config.vocab_size == 50 and config.intermediate_size == model.config.intermediate_size
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())  # Meta keeps it next to 7B/
    convert_main(["from_meta", "--input", str(tmp_path / "7B"), "--output", str(tmp_path / "ours")])
    assert_same_weights(model, Llama.from_pretrained(tmp_path / "ours"))
    assert (tmp_path / "ours" / "tokenizer.model").is_file()


def test_tokenizer(tokenizer_path):
    tok = SentencePieceTokenizer(tokenizer_path)
    assert (tok.bos_id, tok.eos_id) == (1, 2) and tok.pad_id >= 0 and tok.vocab_size > 300
    text = "北京是中国的首都 and the quick fox 🦊"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids[1:-1]) == text  # byte fallback covers the unseen emoji
    texts = ["hello world", "天气非常好", ""]
    assert tok.encode_batch(texts, bos=True) == [tok.encode(t, bos=True) for t in texts]


def test_tiny_model_dir_is_complete_and_loads(tmp_path, tokenizer_path):
    path = make_tiny_model(tmp_path / "tiny", tokenizer_path, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    model = Llama.from_pretrained(path)
    tok = SentencePieceTokenizer(path / "tokenizer.model")
    check_tokenizer_matches(model.config, tok)
    assert model.config.num_key_value_heads == 2 and model.config.vocab_size == tok.vocab_size


def test_tiny_cli_trains_a_tokenizer_on_a_corpus_folder(tmp_path):
    corpus = tmp_path / "corpus" / "zh"
    corpus.mkdir(parents=True)
    lines = [{"text": f"第{i}天，我们学习了语言模型 number {i} and more English words."} for i in range(200)]
    (corpus / "10001.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n")
    tiny_main(["--corpus", str(tmp_path / "corpus"), "--output", str(tmp_path / "m"), "--vocab-size", "600",
               "--dim", "32"])
    model = Llama.from_pretrained(tmp_path / "m")
    check_tokenizer_matches(model.config, SentencePieceTokenizer(tmp_path / "m"))


def test_tiny_cli_reuses_a_tokenizer_and_stores_the_asked_dtype(tmp_path, tokenizer_path):
    tiny_main(["--tokenizer", str(tokenizer_path), "--output", str(tmp_path / "m"), "--dim", "32",
               "--dtype", "bfloat16"])
    assert (tmp_path / "m" / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()
    model = Llama.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    check_tokenizer_matches(model.config, SentencePieceTokenizer(tokenizer_path))


# ---- clear errors ---------------------------------------------------------------------------------------------

def test_missing_files_are_named(tmp_path, tokenizer_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Llama.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        SentencePieceTokenizer(tmp_path / "nope.model")
    small_model().config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights"):
        Llama.from_pretrained(tmp_path)
    small_model().save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    next((tmp_path / "sharded").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-.*listed in"):
        Llama.from_pretrained(tmp_path / "sharded")


@pytest.mark.parametrize("argv, message", [
    (["llama.convert", "from_hf", "--input", "{tmp}/none", "--output", "{tmp}/out"],
     "error: LLaMA config not found: {tmp}/none"),
    (["llama.tiny", "--corpus", "{tmp}/none", "--output", "{tmp}/out"], "tiny: text source not found: {tmp}/none"),
])
def test_cli_bad_input_is_one_line_not_a_traceback(tmp_path, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    result = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == message.format(tmp=tmp_path)


def test_wrong_config_key_is_named_with_its_file(tmp_path):
    small_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hiden_size"] = config.pop("hidden_size")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: unknown config key 'hiden_size'"):
        Llama.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="rope_scaling type 'dynamic' is not supported; supported: default, linear, "
                                         "llama3"):
        LlamaConfig.from_dict({"vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                               "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="missing config key"):
        LlamaConfig.from_dict({"vocab_size": 8})
    (tmp_path / "config.json").write_text('{"vocab_size": 8,\n "hidden_size": }')
    with pytest.raises(ValueError, match="line 2"):
        LlamaConfig.from_pretrained(tmp_path)


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    small_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vocab_size"] = 60
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"weight (output|tok_embeddings).weight has shape \(50, 32\)"):
        Llama.from_pretrained(tmp_path)
    config["vocab_size"], config["num_hidden_layers"] = 50, 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyError, match="missing.*layers.2"):
        Llama.from_pretrained(tmp_path)


def test_tokenizer_embedding_size_mismatch(tmp_path, tokenizer_path):
    tok = SentencePieceTokenizer(tokenizer_path)
    too_small = LlamaConfig(vocab_size=tok.vocab_size - 1, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(ValueError, match=f"{tok.vocab_size} pieces.*{tok.vocab_size - 1} rows"):
        check_tokenizer_matches(too_small, tok)
    padded = LlamaConfig(vocab_size=tok.vocab_size + 8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(ValueError, match="pieces"):
        check_tokenizer_matches(padded, tok)
    check_tokenizer_matches(padded, tok, allow_padded_embedding=True)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


def test_from_pretrained_allocates_no_random_init_copy(tmp_path, monkeypatch):
    """The model is built on the meta device; only the loaded tensors (already in dtype) become parameters."""
    small_model().save_pretrained(tmp_path)
    devices = []
    original = Llama.init_weights

    def spy(self, *a, **k):
        devices.append({p.device.type for p in self.parameters()})
        return original(self, *a, **k)

    monkeypatch.setattr(Llama, "init_weights", spy)
    model = Llama.from_pretrained(tmp_path, dtype=torch.float16)
    assert devices == [{"meta"}]
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cpu", torch.float16)}
