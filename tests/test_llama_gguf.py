"""from_gguf: a tiny GGUF written here the way llama.cpp's convert_hf_to_gguf.py writes one (its names, its q/k
permutation for llama, its rope_freqs for Llama-3.1 scaling, its tokenizer arrays) converts back exactly."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM, Qwen2ForCausalLM
from transformers import LlamaConfig as HFLlamaConfig
from transformers import Qwen2Config as HFQwen2Config

import llama
from llama.gguf_reader import GGUFError, gguf_to_hf

gguf = pytest.importorskip("gguf")  # pinned in requirements.txt; the import names the package if it is missing

from conftest import REPO, TOKENIZER_TEXT  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def _bundled_lines(n: int = 20) -> list[str]:
    lines = []
    for lang in ("zh", "en"):
        for path in sorted((REPO / "pretraining_corpora" / lang).glob("*.jsonl"))[:2]:
            for line in path.read_text(encoding="utf-8").splitlines()[:n]:
                lines.append(json.loads(line)["text"][:400])
    return lines


def _train_tokenizer(pre: str):
    """A byte-level BPE of a few hundred pieces with the pre-tokenizer the GGUF `pre` name stands for."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        digits = r"\p{N}{1,3}" if pre == "llama-bpe" else r"\p{N}"
        regex = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|" + digits +
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"), byte_level])
        if pre == "qwen2":
            tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TOKENIZER_TEXT, trainer)
    if pre == "llama-bpe":
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


@pytest.fixture(scope="module", params=["smollm", "qwen2", "llama-bpe"])
def bpe(request):
    return request.param, _train_tokenizer(request.param)


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: transformers' rotate_half rows -> interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_freqs(theta: float, head_dim: int, s: dict) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors for a llama3 rope_scaling."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    old = 8192  # llama.cpp reads original_max_position_embeddings from the top level of config.json: 8192 here
    low_wavelen, high_wavelen = old / s["low_freq_factor"], old / s["high_freq_factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(s["factor"])
        else:
            smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(path: Path, model, tok, pre: str, quant: str = "F32", arch: str | None = None,
               add_bos: bool = False) -> dict[str, np.ndarray]:
    """Write `model` and `tok` as llama.cpp's converter does; returns the GGUF tensors as written (numpy)."""
    cfg = model.config
    arch = arch or cfg.model_type
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // n_head
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")  # llama.cpp always writes general.name; transformers' GGUF loader reads it
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    specials = {t["content"] for t in spec["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(vocab["<|begin_of_text|>" if add_bos else "<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)

    name_map = gguf.get_tensor_name_map({n: a for a, n in gguf.MODEL_ARCH_NAMES.items()}[cfg.model_type],
                                        cfg.num_hidden_layers)
    written = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for a tied model
        if cfg.model_type == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            t = _llama_cpp_permute(t, n_head)
        if cfg.model_type == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            t = _llama_cpp_permute(t, n_kv)
        data = t.float().numpy()
        qtype = gguf.GGMLQuantizationType[quant] if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        if qtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(data, qtype)
        new = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        w.add_tensor(new, data, raw_dtype=qtype)
        written[new] = (data, qtype)
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":
        freqs = _llama3_rope_freqs(cfg.rope_theta, head_dim, cfg.rope_scaling)
        w.add_tensor("rope_freqs.weight", freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def tiny_llama(vocab_size: int, rope_scaling: dict | None = None) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = HFLlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=rope_scaling, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(vocab_size: int) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = HFQwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # q/k/v biases start at zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_f32_llama_converts_exactly(tmp_path, bpe):
    pre, tok = bpe
    src = tiny_llama(tok.get_vocab_size(), LLAMA3_SCALING)
    write_gguf(tmp_path / "m.gguf", src, tok, pre)
    config = gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")

    state = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(state) == set(src.state_dict())  # untied: lm_head written
    for name, t in src.state_dict().items():
        assert torch.equal(state[name], t), name  # the permutation undone bit for bit
    assert config["rope_scaling"] == LLAMA3_SCALING and config["tie_word_embeddings"] is False
    out = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert out.config.rope_scaling == LLAMA3_SCALING
    ids = tok.encode("The capital of France is Paris. 北京是中国的首都。").ids
    torch.testing.assert_close(_logits(out, ids), _logits(src, ids), rtol=0, atol=1e-6)


def test_q8_0_qwen2_equals_gguf_dequantize(tmp_path):
    tok = _train_tokenizer("qwen2")
    src = tiny_qwen2(tok.get_vocab_size())
    written = write_gguf(tmp_path / "m.gguf", src, tok, "qwen2", quant="Q8_0")
    config = gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")

    assert config["tie_word_embeddings"] is True and config["architectures"] == ["Qwen2ForCausalLM"]
    state = load_file(tmp_path / "hf" / "model.safetensors")
    assert "lm_head.weight" not in state and "model.layers.1.self_attn.k_proj.bias" in state
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, 2)
    quantized = 0
    for name, t in state.items():
        data, qtype = written[name_map.get_name(name, try_suffixes=(".weight", ".bias"))]
        quantized += qtype == gguf.GGMLQuantizationType.Q8_0
        # qwen2 is not permuted: each tensor is exactly gguf's own dequantization of what was written
        assert torch.equal(t, torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(t.shape)), name
    assert quantized == 1 + 2 * 7  # embedding + 7 matrices per layer
    out, info = Qwen2ForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info  # every weight found, none left over
    with torch.no_grad():  # Q8_0 keeps the model close to the source
        src.load_state_dict({**state, "lm_head.weight": state["model.embed_tokens.weight"]})
    ids = tok.encode("请把下面的句子翻译成英文。").ids
    torch.testing.assert_close(_logits(out.eval(), ids), _logits(src, ids), rtol=0, atol=1e-5)


def test_q8_0_llama_equals_transformers_gguf_loader(tmp_path):
    """An independent reading of the same file: transformers' own GGUF loader (its dequantization and its
    reverse permutation) gives the very tensors we write."""
    tok = _train_tokenizer("smollm")
    write_gguf(tmp_path / "m.gguf", tiny_llama(tok.get_vocab_size()), tok, "smollm", quant="Q8_0")
    gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
    ours = load_file(tmp_path / "hf" / "model.safetensors")
    theirs = LlamaForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").state_dict()
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        assert torch.equal(t, theirs[name]), name


def test_tokenizer_encodes_like_the_source(tmp_path, bpe):
    pre, tok = bpe
    add_bos = pre == "llama-bpe"
    write_gguf(tmp_path / "m.gguf", tiny_llama(tok.get_vocab_size()), tok, pre, add_bos=add_bos)
    gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
    from tokenizers import Tokenizer

    rebuilt = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    texts = [*dict.fromkeys(TOKENIZER_TEXT), *_bundled_lines(),
             "<|im_start|>user\nTake 1234567 apples, café vs cafe\u0301!<|im_end|>\n", "  two  spaces\n\n\ttab "]
    for text in texts:
        assert rebuilt.encode(text).ids == tok.encode(text).ids, text
        assert rebuilt.decode(rebuilt.encode(text).ids, skip_special_tokens=False) == tok.decode(
            tok.encode(text).ids, skip_special_tokens=False)
    assert rebuilt.encode("<|im_end|>", add_special_tokens=False).ids == [tok.token_to_id("<|im_end|>")]  # whole
    if add_bos:
        assert rebuilt.encode("hi").ids[0] == tok.token_to_id("<|begin_of_text|>")

    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")  # what transformers makes of tokenizer_config.json
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == (
        "<|begin_of_text|>" if add_bos else "<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert hf_tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False) == \
        "<|im_start|>user\n你好<|im_end|>\n"


def test_unsupported_architecture_is_one_error(tmp_path):
    tok = _train_tokenizer("smollm")
    write_gguf(tmp_path / "m.gguf", tiny_llama(tok.get_vocab_size()), tok, "smollm", arch="gemma")
    with pytest.raises(GGUFError, match=r"m\.gguf: architecture 'gemma' is not supported; supported: llama, qwen2"):
        gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_unsupported_quant_type_is_one_error_line(tmp_path):
    """A type gguf-py cannot dequantize (Q8_1: llama.cpp's activation-only type) stops the CLI with one line that
    names the type, the tensor and the supported types, before anything is written."""
    tok = _train_tokenizer("smollm")
    src = tiny_llama(tok.get_vocab_size())
    write_gguf(tmp_path / "m.gguf", src, tok, "smollm")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    for field in reader.fields.values():
        if not field.name.startswith(("GGUF.", "general.architecture")):
            value_type = field.types[0]
            sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(field.name, field.contents(), value_type, sub_type)
    for t in reader.tensors:
        if t.name == "blk.1.ffn_up.weight":  # same bytes per block as Q8_0 needs, relabelled
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
            rows, cols = int(t.shape[1]), int(t.shape[0])
            w.add_tensor(t.name, np.zeros((rows, cols // block * size), np.uint8),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "ours"
    proc = subprocess.run([sys.executable, "-m", "llama.convert", "from_gguf", "--input", str(tmp_path / "bad.gguf"),
                           "--output", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.gguf" in lines[0] and "'blk.1.ffn_up.weight'" in lines[0] and "Q8_1" in lines[0]
    supported = lines[0].split("; supported: ")[1].split(", ")  # the types this gguf-py dequantizes, named
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_1", "Q4_K", "Q6_K"} <= set(supported) and "Q8_1" not in supported
    assert not out.exists() and not list(tmp_path.glob(".from_gguf-*"))


def test_cli_writes_a_model_dir_of_ours(tmp_path):
    from llama.convert import main as convert_main

    tok = _train_tokenizer("smollm")
    src = tiny_llama(tok.get_vocab_size())
    write_gguf(tmp_path / "m.gguf", src, tok, "smollm")
    convert_main(["from_gguf", "--input", str(tmp_path / "m.gguf"), "--output", str(tmp_path / "ours")])
    assert not list(tmp_path.glob(".from_gguf-*"))  # the transformers intermediate is gone
    ours = llama.Llama.from_pretrained(tmp_path / "ours").eval()
    ids = tok.encode("北京是中国的首都。").ids
    with torch.no_grad():
        torch.testing.assert_close(ours(torch.tensor([ids]))[1], _logits(src, ids), rtol=0, atol=1e-5)
    assert llama.load_tokenizer(tmp_path / "ours").encode("北京 12") == tok.encode("北京 12").ids
