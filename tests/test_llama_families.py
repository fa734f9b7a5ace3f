"""The four transformers families this model implements (Llama with tied embeddings, biases, explicit head_dim and
RoPE scaling; Mistral; Qwen2; Qwen3), each a tiny random model built from transformers' own config class: the same
logits and loss as the transformers class, an exact from_hf -> to_hf round trip, and a clear error for the rest."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from llama import Llama, LlamaConfig, load_tokenizer
from llama.convert import main as convert_main
from llama.llama_model import rope_inv_freq

REPO = Path(__file__).resolve().parents[1]
VOCAB = 120
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, attn_implementation="sdpa")
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}  # 16 positions: every band of a 16-wide head is hit
FAMILIES = {  # name: (transformers class, its config class, settings beyond COMMON)
    # Llama 3.2 style: tied, llama3 RoPE scaling, a list of eos ids, no pad.
    "llama3-tied": ("LlamaForCausalLM", "LlamaConfig",
                    dict(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, bos_token_id=1,
                         eos_token_id=[2, 3])),
    # Every Llama switch at once: biases on q/k/v/o, head_dim 24 (heads * head_dim != hidden), linear scaling.
    "llama-bias-headdim": ("LlamaForCausalLM", "LlamaConfig",
                           dict(attention_bias=True, head_dim=24, rope_scaling={"type": "linear", "factor": 2.0})),
    # Mistral-Nemo style explicit head_dim; the window is longer than any sequence.
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(head_dim=32, sliding_window=4096, rope_theta=1e6)),
    # Qwen2.5 small: q/k/v biases without an o bias, tied, bos none, window switched off. (transformers 4.51's sdpa
    # mask applies sliding_window even with use_sliding_window false, its flash-attention path does not; Qwen2.5's
    # windows are as long as its context, so a window beyond the test's sequences keeps the comparison fair.)
    "qwen2-tied": ("Qwen2ForCausalLM", "Qwen2Config",
                   dict(tie_word_embeddings=True, use_sliding_window=False, sliding_window=64, max_window_layers=2,
                        bos_token_id=None, eos_token_id=5, rope_theta=1e6)),
    # Qwen3: per-head q/k RMSNorm, explicit head_dim.
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=32, attention_bias=False, rope_theta=1e6,
                                                      bos_token_id=4, eos_token_id=5)),
}


SOURCE_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


def hf_model(name: str, **changes):
    class_name, config_name, extra = FAMILIES[name]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **changes})
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(config).eval()
    with torch.no_grad():  # transformers starts biases at 0 and norms at 1, where a wrong permutation is invisible
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if p.dim() == 1 else 0.02)
    return model


def bpe_family(name: str) -> str:
    """The session's tokenizer.json (tests/conftest.py bpe_tokenizer_dirs) a family's checkpoints come with."""
    return "qwen2" if name.startswith("qwen") else "llama3"


def save_hf_tokenizer(bpe_dir: Path, hf_dir: Path) -> None:
    """The tokenizer as transformers writes it into a checkpoint (save_pretrained), with SOURCE_TEMPLATE."""
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(bpe_dir)
    hf_tokenizer.chat_template = SOURCE_TEMPLATE
    hf_tokenizer.save_pretrained(hf_dir)


@pytest.fixture(params=list(FAMILIES))
def family(request, tmp_path, bpe_tokenizer_dirs):
    """(name, transformers model, its saved dir holding a tokenizer.json, our model loaded from that dir)."""
    hf = hf_model(request.param)
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir)
    save_hf_tokenizer(bpe_tokenizer_dirs[bpe_family(request.param)], hf_dir)
    return request.param, hf, hf_dir, Llama.from_pretrained(hf_dir).eval()


def test_logits_and_loss_match_transformers(family):
    name, hf, _, ours = family
    assert ours.config.architecture == FAMILIES[name][0]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 40), generator=g)
    labels = ids.masked_fill(torch.rand(3, 40, generator=g) < 0.3, -100)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[1], hf(ids).logits, atol=1e-5, rtol=0)
    expected = hf(ids, labels=labels).loss
    for path in ("fused", "checkpointed", "plain"):
        ours.loss_path = path
        loss, _ = ours(ids, labels=labels)
        torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(ours.tok_embeddings.weight.grad, hf.model.embed_tokens.weight.grad, atol=1e-6,
                               rtol=1e-4)


def test_tied_model_has_one_parameter_for_embedding_and_output(family):
    name, hf, _, ours = family
    tied = FAMILIES[name][2].get("tie_word_embeddings", False)
    assert ours.config.tie_word_embeddings == tied
    assert ("output.weight" in ours.state_dict()) == (not tied)
    assert ours.output.weight is (ours.tok_embeddings.weight if tied else ours.output.weight)
    n_hf = sum(p.numel() for p in hf.parameters())  # transformers counts the tied matrix once too
    assert sum(p.numel() for p in ours.parameters()) == n_hf


def test_from_hf_to_hf_round_trip_is_exact(family, tmp_path):
    name, hf, hf_dir, _ = family
    convert_main(["from_hf", "--input", str(hf_dir), "--output", str(tmp_path / "ours")])
    convert_main(["to_hf", "--input", str(tmp_path / "ours"), "--output", str(tmp_path / "back")])
    ours_files = _tensors(tmp_path / "ours" / "model.safetensors")
    assert "output.weight" not in ours_files or not FAMILIES[name][2].get("tie_word_embeddings")
    source, back = _tensors(hf_dir / "model.safetensors"), _tensors(tmp_path / "back" / "model.safetensors")
    assert back.keys() == source.keys()  # a tied model writes no lm_head.weight, as transformers saves it
    for key, t in source.items():
        assert back[key].dtype == t.dtype and torch.equal(back[key], t), key
    src_config = json.loads((hf_dir / "config.json").read_text())
    out_config = json.loads((tmp_path / "back" / "config.json").read_text())
    for key, value in src_config.items():
        if key not in ("transformers_version", "torch_dtype"):
            assert out_config.get(key, "absent") == value, key
    # The tokenizer through load_tokenizer(...).save both ways: transformers reads it back as it wrote it.
    text = "Human: 北京是中国的首都。\nAssistant: The capital is Beijing.<|im_end|>"
    source_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for written in (tmp_path / "ours", tmp_path / "back"):
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(written)
        assert hf_tokenizer(text)["input_ids"] == source_tokenizer(text)["input_ids"]
        assert (hf_tokenizer.bos_token, hf_tokenizer.eos_token) == (source_tokenizer.bos_token,
                                                                    source_tokenizer.eos_token)
        assert hf_tokenizer.chat_template == SOURCE_TEMPLATE
        assert load_tokenizer(written).encode(text, bos=True) == source_tokenizer(text)["input_ids"]
    generation = json.loads((tmp_path / "back" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == src_config["eos_token_id"]
    reloaded = getattr(transformers, FAMILIES[name][0]).from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, hf(ids).logits, atol=0, rtol=0)


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3_ROPE,
                                     {**LLAMA3_ROPE, "factor": 32.0, "low_freq_factor": 2.0,
                                      "original_max_position_embeddings": 8192}],
                         ids=["default", "linear", "llama3", "llama3-8k"])
@pytest.mark.parametrize("head_dim", [16, 128])
def test_rope_inverse_frequencies_equal_transformers(scaling, head_dim):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, rope_theta=500000.0,
                                         rope_scaling=scaling)
    expected, attention_factor = ROPE_INIT_FUNCTIONS[hf_config.rope_scaling["rope_type"] if scaling else "default"](
        hf_config, "cpu")
    ours = LlamaConfig.from_dict(hf_config.to_diff_dict(), source="test")
    assert attention_factor == 1.0 and torch.equal(rope_inv_freq(ours), expected)


def _hf_config_dict(name: str, **changes) -> dict:
    class_name, config_name, extra = FAMILIES[name]
    d = getattr(transformers, config_name)(**COMMON, **extra).to_diff_dict()
    d["architectures"] = [class_name]
    d.update(changes)
    return d


@pytest.mark.parametrize("changes, message", [
    (dict(architectures=["MixtralForCausalLM"], model_type="mixtral"),
     "architecture MixtralForCausalLM is not supported; supported: LlamaForCausalLM, MistralForCausalLM, "
     "Qwen2ForCausalLM, Qwen3ForCausalLM"),
    (dict(architectures=None, model_type="gemma"), "model_type 'gemma' is not supported; supported: llama, mistral"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling type 'yarn' is not supported"),
    (dict(mlp_bias=True), "mlp_bias=True is not supported"),
])
def test_unsupported_configs_are_one_error_line(tmp_path, changes, message):
    (tmp_path / "config.json").write_text(json.dumps(_hf_config_dict("llama3-tied", **changes)))
    with pytest.raises(ValueError) as raised:
        LlamaConfig.from_pretrained(tmp_path)
    assert str(raised.value).startswith(f"{tmp_path / 'config.json'}: ") and message in str(raised.value)
    if "architectures" in changes:  # at the command line: one line, before any weight is read
        result = subprocess.run([sys.executable, "-m", "llama.convert", "from_hf", "--input", str(tmp_path),
                                 "--output", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 1 and result.stderr == f"error: {raised.value}\n"


@pytest.mark.parametrize("name, changes, length, accepted", [
    ("mistral", dict(sliding_window=32), 32, True),  # a window as long as the run's sequences cuts nothing
    ("mistral", dict(sliding_window=32), 33, False),
    ("mistral", dict(sliding_window=None), 64, True),  # Mistral v0.3: switched off
    ("qwen2-tied", dict(use_sliding_window=False, sliding_window=8), 64, True),
    ("qwen2-tied", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), 64, False),
    ("qwen2-tied", dict(use_sliding_window=True, sliding_window=8, max_window_layers=2), 64, True),  # no layer slides
])
def test_sliding_window_is_accepted_only_where_it_cuts_nothing(name, changes, length, accepted):
    config = LlamaConfig.from_dict(_hf_config_dict(name, **changes), source="x/config.json")
    if accepted:
        config.check_sequence_length(length, "max_seq_length", "x/config.json")
        return
    with pytest.raises(ValueError, match=rf"max_seq_length={length} is above the sliding_window=\d+ of x/config.json"):
        config.check_sequence_length(length, "max_seq_length", "x/config.json")


def test_our_config_json_records_every_switch(tmp_path):
    config = LlamaConfig.from_dict(_hf_config_dict("qwen2-tied"), source="test")
    assert (config.architecture, config.attention_bias, config.attention_output_bias, config.bos_token_id) == (
        "Qwen2ForCausalLM", True, False, None)
    config.save_pretrained(tmp_path)
    assert LlamaConfig.from_pretrained(tmp_path) == config
    with pytest.raises(ValueError, match="qk_norm=True is not possible in LlamaForCausalLM"):
        LlamaConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, qk_norm=True)


@pytest.mark.parametrize("name", ["llama3-tied", "mistral", "qwen2-tied", "qwen3"])
def test_stage1_from_a_transformers_dir_trains_as_the_transformers_class(tmp_path, bpe_tokenizer_dirs, name):
    """A transformers dir of each family, with the family's tokenizer.json (Llama 3's for Llama and Mistral,
    Qwen2's for Qwen2/3; its bos/eos ids written into the config as the family's checkpoints have them), trained by
    stage 1 straight from the dir: every step's loss, lr and gradient norm equal those of transformers' own class
    trained by the same loop on the same batches (HARNESS_TRANSFORMERS swaps the model in), to fp32 summation
    order."""
    from training_runs import TINY_RUN, explain, read_metrics, torchrun

    tokenizer = load_tokenizer(bpe_tokenizer_dirs[bpe_family(name)])
    eos = tokenizer.eos_id
    if isinstance(FAMILIES[name][2].get("eos_token_id"), list):  # Llama 3.1+: the end of text and of a turn
        eos = [eos, tokenizer.tk.token_to_id("<|eot_id|>")]
    changes = dict(vocab_size=tokenizer.vocab_size, max_position_embeddings=128, bos_token_id=tokenizer.bos_id,
                   eos_token_id=eos)
    if "rope_scaling" in FAMILIES[name][2]:  # llama3 scaling over this run's 64 positions
        changes["rope_scaling"] = {**LLAMA3_ROPE, "original_max_position_embeddings": 32}
    hf_model(name, **changes).save_pretrained(tmp_path / "hf")
    save_hf_tokenizer(bpe_tokenizer_dirs[bpe_family(name)], tmp_path / "hf")
    run = [*TINY_RUN, f"init_model_path={tmp_path / 'hf'}", "dropout_prob=0.0", "plugin=ddp", "max_steps=3",
           "saving_steps=100"]
    losses = {}
    for who, env in (("ours", {}), ("transformers", {"HARNESS_TRANSFORMERS": "1"})):
        result = torchrun(run + [f"output_dir={tmp_path / who}", f"logdir={tmp_path / who}/logs"], nproc=1, env=env)
        assert result.returncode == 0, explain(result)
        # our load_model logs the model it built; the transformers run replaces it
        assert ("M parameters, 2 layers, dim 64" in result.stdout + result.stderr) == (who == "ours")
        losses[who] = read_metrics(tmp_path / who / "logs")
    assert sorted(losses["ours"]) == sorted(losses["transformers"]) == [1, 2, 3]
    for step, expected in losses["transformers"].items():
        for key in ("loss", "lr", "grad_norm"):
            assert losses["ours"][step][key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), (step, key)
    assert losses["ours"][3]["loss"] != losses["ours"][1]["loss"]  # the weights did move


def test_flops_per_token_count_the_tied_output_projection():
    from training.flops import flops_per_token

    shapes = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    with torch.device("meta"):
        untied, tied = Llama(LlamaConfig(**shapes)), Llama(LlamaConfig(**shapes, tie_word_embeddings=True))
    assert flops_per_token(tied, 2, 32, 64) == flops_per_token(untied, 2, 32, 64)
    full = flops_per_token(untied, 2, 32, 64)
    frozen = sum(p.numel() for name, p in untied.named_parameters() if name.startswith(("layers.", "norm.")))
    for name, p in untied.named_parameters():  # new_rows_only: the blocks get no weight gradient
        p.requires_grad_(name.startswith(("tok_embeddings", "output")))
    assert flops_per_token(untied, 2, 32, 64) == full - 2.0 * frozen


def test_kv_cache_decoding_equals_the_full_forward_for_every_switch(family):
    """Biases, q/k norms, explicit head_dim, scaled RoPE and the tied output in generation's cached path."""
    _, _, _, ours = family
    ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = ours(ids)[1]
        cache = ours.new_cache(2, 14)
        ours.forward_with_cache(ids[:, :9], cache, 0)
        torch.testing.assert_close(ours.forward_with_cache(ids[:, 9:13], cache, 9), full[:, 12], atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.forward_with_cache(ids[:, 13:], cache, 13), full[:, 13], atol=1e-5, rtol=0)


def test_tied_output_stays_the_embedding_through_meta_and_to_empty():
    """zero2's lazy load (training/model_loading._model_without_weights) builds on meta, then to_empty() makes new
    parameters: the output follows the embedding, with nothing to re-tie."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         tie_word_embeddings=True)
    with torch.device("meta"):
        model = Llama(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    assert model.output.weight is model.tok_embeddings.weight and model.output.weight.device.type == "cpu"
    assert [name for name, _ in model.named_parameters()].count("tok_embeddings.weight") == 1
    assert not any("output" in name for name, _ in model.named_parameters())


def test_smollm2_config_as_published_is_read():
    """SmolLM2-135M-Instruct's config.json keys (nanotron's and transformers.js's extras included)."""
    published = {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041,
        "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
        "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": False,
        "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers.js_config": {"kv_cache_dtype": {"q4f16": "float16", "fp16": "float16"}},
        "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 49152}
    config = LlamaConfig.from_dict(published, source="SmolLM2/config.json")
    assert (config.head_dim, config.num_key_value_heads, config.tie_word_embeddings, config.pad_token_id) == (
        64, 3, True, 2)


def test_to_hf_after_a_billa_stage3_writes_the_billa_template(tmp_path, bpe_tokenizer_dirs):
    from llama.chat_template import BILLA_CHAT_TEMPLATE, write_chat_format

    hf_dir = tmp_path / "tokenizer"
    save_hf_tokenizer(bpe_tokenizer_dirs["qwen2"], hf_dir)
    Llama(LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      tie_word_embeddings=True)).save_pretrained(tmp_path / "ours")
    write_chat_format(tmp_path / "ours", "billa")  # as save_final after stage 3 with chat_format="billa"
    convert_main(["to_hf", "--input", str(tmp_path / "ours"), "--output", str(tmp_path / "back"),
                  "--tokenizer", str(hf_dir)])
    written = json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())
    assert written["chat_template"] == BILLA_CHAT_TEMPLATE
