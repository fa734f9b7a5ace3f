"""GGUF files (llama.cpp) -> a transformers-layout model dir, for `python -m llama.convert from_gguf`.

A GGUF file holds the weights (often quantized), the hyper-parameters and the tokenizer as metadata. We read it
with the `gguf` package (llama.cpp's own gguf-py) and write what transformers itself would load: config.json
(LlamaForCausalLM or Qwen2ForCausalLM), model.safetensors under transformers' names, tokenizer.json and
tokenizer_config.json. llama.convert then turns that dir into one of ours with the from_hf path, so the layout
table lives once, in llama/weight_layouts.py.

What llama.cpp's convert_hf_to_gguf.py changes on the way in, and we undo here:
- names: transformers' names -> GGUF's (blk.N.attn_q ...); gguf-py's TensorNameMap does the mapping both ways.
- q/k rows: for the llama architecture, LlamaModel.permute turns transformers' rotate_half rows into Meta's
  interleaved rows (the same function as transformers' own Meta->HF inverse); weight_layouts.permute_to_hf undoes
  it. Qwen2Model does not permute, so qwen2 tensors are taken as they are.
- Llama-3.1 RoPE scaling: written as a `rope_freqs` tensor of per-frequency divisors (LlamaModel.
  generate_extra_tensors), not as the rope_scaling dict; _llama3_rope_scaling recovers the dict from it.
- the tokenizer: tokens, merges and token types as arrays, the pre-tokenizer as a name (tokenizer.ggml.pre) that
  llama.cpp maps to its split regexes (llama-vocab.cpp); _PRE_TOKENIZERS holds the tokenizer.json form of each.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import math
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from llama.model_files import DEFAULT_MAX_SHARD_SIZE, TOKENIZER_JSON_NAME, save_tensors
from llama.tokenizer_config import write_tokenizer_config
from llama.weight_layouts import _HF_TO_OURS, permute_to_hf

# GGUF general.architecture -> (transformers class, transformers model_type)
ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}
# Architectures whose q/k rows llama.cpp's converter permutes (LlamaModel.permute); Qwen2Model does not.
_PERMUTED = {"llama"}
_ROPE_FREQS = "rope_freqs.weight"
# llama.cpp's defaults where LlamaModel.generate_extra_tensors computes rope_freqs: it reads
# original_max_position_embeddings at the top level of config.json (Llama 3.1 has none there, so 8192 is used),
# low_freq_factor 1 and high_freq_factor 4 when rope_scaling lacks them.
_LLAMA3_ORIGINAL_CONTEXT = 8192
_LLAMA3_LOW_FREQ, _LLAMA3_HIGH_FREQ = 1.0, 4.0

# tokenizer.ggml.pre -> (normalizer, pre-tokenizer, BPE ignore_merges) as in the source models' tokenizer.json;
# each matches the split regexes llama.cpp's llama-vocab.cpp uses for that name.
_GPT2_SPLIT = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_BYTES_ONLY = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


_PRE_TOKENIZERS = {
    "gpt-2": (None, _GPT2_SPLIT, False),
    # SmolLM, StarCoder: every digit alone, then GPT-2's split.
    "smollm": (None, {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                              _GPT2_SPLIT]}, False),
    # Llama 3.x: tiktoken's cl100k split; its tokenizer.json takes a whole-word vocab hit before merges.
    "llama-bpe": (None, {"type": "Sequence", "pretokenizers": [_split(_LLAMA3_REGEX), _BYTES_ONLY]}, True),
    # Qwen2/2.5/3: single digits; NFC first, as its tokenizer.json does.
    "qwen2": ({"type": "NFC"}, {"type": "Sequence", "pretokenizers": [_split(_QWEN2_REGEX), _BYTES_ONLY]}, False),
}


class GGUFError(ValueError):
    """Bad or unsupported GGUF input; the message names the file and what is wrong."""


def open_gguf(path: str | Path):
    """A gguf.GGUFReader over `path` (memory-mapped: nothing is read until a tensor is dequantized)."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise GGUFError(f"{path}: not a readable GGUF file ({e})") from None


def metadata(reader) -> dict[str, Any]:
    """Every key/value of the file (strings, numbers, lists) except the header's own GGUF.* fields."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _float(value: float) -> float:
    # GGUF stores floats as float32: 1e-5 reads back as 9.99999974e-06. The shortest float32 repr gives 1e-05 again.
    return float(str(np.float32(value)))


def _architecture(meta: dict, path: Path) -> str:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    return arch


def _layout_names(n_layers: int) -> Iterator[str]:
    """Every transformers name of the layout table (weight_layouts), each weight also as its bias."""
    for template in _HF_TO_OURS:
        for name in ([template.format(i) for i in range(n_layers)] if "{}" in template else [template]):
            yield name
            if name.endswith(".weight"):
                yield name.removesuffix(".weight") + ".bias"


def _hf_names(arch: str, n_layers: int) -> dict[str, str]:
    """GGUF tensor name -> transformers name, for every name of the layout table that GGUF has one for."""
    import gguf

    arch_enum = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    name_map = gguf.get_tensor_name_map(arch_enum, n_layers)
    out = {}
    for name in _layout_names(n_layers):
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is not None:
            out[gguf_name] = name
    return out


def _check_quant_types(reader, path: Path) -> None:
    """One error naming the first tensor whose type gguf-py cannot dequantize, and the types it can, before any
    tensor is read."""
    supported = _dequantizable_types()
    for t in reader.tensors:
        if t.tensor_type.name not in supported:
            raise GGUFError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which gguf "
                            f"{importlib.metadata.version('gguf')} cannot dequantize; supported: "
                            f"{', '.join(supported)}")


@functools.lru_cache(maxsize=None)
def _dequantizable_types() -> tuple[str, ...]:
    """The tensor types the installed gguf-py dequantizes: asked of gguf-py itself, on one zero block of each type,
    since its dequantize is the only list of them."""
    import gguf

    names = []
    for qtype in gguf.GGMLQuantizationType:
        if qtype not in gguf.GGML_QUANT_SIZES:
            continue
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        try:
            gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
        except (NotImplementedError, ValueError, TypeError):
            continue
        names.append(qtype.name)
    return tuple(names)


def _llama3_rope_scaling(factors: np.ndarray, meta: dict, arch: str, head_dim: int, theta: float,
                         path: Path) -> dict:
    """The llama3 rope_scaling dict whose per-frequency divisors are `factors` (LlamaModel.generate_extra_tensors
    in reverse). Divisor 1 marks high frequencies, `factor` low ones, and in between 1/((1-s)/factor + s) with
    s = (L/wavelen - low)/(high - low): linear in 1/wavelen, so two points in between fix low and high for the
    original context L (a key in newer files, else llama.cpp's 8192). The result is checked by recomputing."""
    factor = float(factors.max())
    context = int(meta.get(f"{arch}.rope.scaling.original_context_length", _LLAMA3_ORIGINAL_CONTEXT))
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / inv_freq
    mid = (factors > 1.0 + 1e-6) & (factors < factor - 1e-6)
    low, high = _LLAMA3_LOW_FREQ, _LLAMA3_HIGH_FREQ
    if mid.sum() >= 2 and factor > 1:
        s = (1.0 / factors[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
        slope, intercept = np.polyfit(context / wavelen[mid], s, 1)  # s = (x - low) / (high - low)
        low, high = -intercept / slope, (1.0 - intercept) / slope
        low, high = round(low, 4), round(high, 4)
    scaling = {"rope_type": "llama3", "factor": _float(factor), "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": context}
    expected = np.array(_llama3_factors(wavelen, factor, low, high, context))
    if not np.allclose(expected, factors, rtol=1e-4, atol=0):
        raise GGUFError(f"{path}: tensor {_ROPE_FREQS!r} matches no llama3 rope scaling (recovered {scaling})")
    return scaling


def _llama3_factors(wavelen: np.ndarray, factor: float, low: float, high: float, context: int) -> list[float]:
    """rope_freqs as llama.cpp's LlamaModel.generate_extra_tensors computes it."""
    out = []
    for w in wavelen:
        if w < context / high:
            out.append(1.0)
        elif w > context / low:
            out.append(factor)
        else:
            s = (context / w - low) / (high - low)
            out.append(1.0 / ((1 - s) / factor + s))
    return out


def hf_config(reader, meta: dict, path: Path) -> dict:
    """The transformers config.json of the model in `reader` (checked against its tensors)."""
    arch = _architecture(meta, path)
    cls, model_type = ARCHITECTURES[arch]
    tensors = {t.name: t for t in reader.tensors}

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise GGUFError(f"{path}: metadata key {arch}.{name} missing")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    kv_heads = int(key("attention.head_count_kv", heads))
    head_dim = int(key("attention.key_length", hidden // heads))
    rope_dims = int(key("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise GGUFError(f"{path}: rope.dimension_count {rope_dims} != head dim {head_dim} (partial rotary is not "
                        f"supported)")
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: no token_embd.weight tensor")
    theta = _float(key("rope.freq_base", 10000.0))
    config = {
        "architectures": [cls],
        "model_type": model_type,
        # GGUF lists dims fastest first: token_embd is [hidden, vocab].
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": _float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "rope_scaling": None,
        # llama.cpp writes no output.weight when the embedding serves as the output layer.
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if head_dim != hidden // heads:
        config["head_dim"] = head_dim
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = False
    else:  # Qwen2's q/k/v always carry biases; sliding window off, as in its released configs
        config.update(use_sliding_window=False, sliding_window=config["max_position_embeddings"],
                      max_window_layers=config["num_hidden_layers"])

    scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
    if _ROPE_FREQS in tensors:
        factors = _dequantize(tensors[_ROPE_FREQS]).astype(np.float64)
        config["rope_scaling"] = _llama3_rope_scaling(factors, meta, arch, head_dim, theta, path)
    elif scaling_type == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": _float(key("rope.scaling.factor"))}
    elif scaling_type != "none":
        raise GGUFError(f"{path}: rope scaling type {scaling_type!r} is not supported (llama3 and linear are)")

    for name, token_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                            ("pad_token_id", "padding_token_id")):
        value = meta.get(f"tokenizer.ggml.{token_key}")
        config[name] = None if value is None else int(value)
    return config


def _dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as float32 numpy, in transformers' (rows, cols) order."""
    import gguf

    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    # GGUF lists dims fastest first; numpy (and torch) want them slowest first.
    return np.array(data, dtype=np.float32).reshape(tuple(reversed([int(d) for d in tensor.shape])))


def hf_tensors(reader, config: dict, arch: str, path: Path, dtype: torch.dtype = torch.float32
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, tensor) for every weight of the file, dequantized, q/k rows back in transformers'
    order. Names are all checked before the first tensor is dequantized."""
    names = _hf_names(arch, config["num_hidden_layers"])
    wanted = {}
    for t in reader.tensors:
        if t.name == _ROPE_FREQS:
            continue  # carried as config["rope_scaling"]
        if t.name not in names:
            raise GGUFError(f"{path}: unexpected tensor {t.name!r} for architecture {arch}")
        wanted[names[t.name]] = t
    expected = _expected_hf_names(config, arch)
    missing = sorted(expected - set(wanted))
    extra = sorted(set(wanted) - expected)
    if missing or extra:
        gguf_names = {hf: g for g, hf in names.items()}
        raise GGUFError(f"{path}: tensors missing {[gguf_names.get(n, n) for n in missing]}, unexpected "
                        f"{[wanted[n].name for n in extra]} for {config['architectures'][0]}")
    head_counts = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for name, t in wanted.items():
        w = torch.from_numpy(_dequantize(t))
        proj = name.split(".")[-2]
        if arch in _PERMUTED and proj in head_counts:
            # bias rows are permuted like weight rows: (rows,) -> (rows, 1) for the permutation and back
            w = permute_to_hf(w if w.dim() == 2 else w[:, None], head_counts[proj]).reshape(w.shape)
        yield name, w.to(dtype)


def _expected_hf_names(config: dict, arch: str) -> set[str]:
    """transformers' parameter names for `config`: biases where the class has them, no q/k norms (Qwen3's, which
    llama and qwen2 lack), no lm_head when tied."""
    if arch == "qwen2":
        biased = {"q_proj", "k_proj", "v_proj"}
    else:
        biased = {"q_proj", "k_proj", "v_proj", "o_proj"} if config.get("attention_bias") else set()
    out = set()
    for name in _layout_names(config["num_hidden_layers"]):
        module = name.split(".")[-2]
        if name == "lm_head.weight" and config["tie_word_embeddings"] or module in ("q_norm", "k_norm"):
            continue
        if not name.endswith(".bias") or module in biased:
            out.add(name)
    return out


def build_tokenizer(meta: dict, path: Path):
    """(tokenizers.Tokenizer, tokenizer_config dict) rebuilt from the file's byte-level BPE vocabulary."""
    import gguf
    from tokenizers import AddedToken, Tokenizer

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model {kind!r} is not supported; only byte-level BPE ('gpt2', "
                        f"as in Llama 3, Qwen2 and SmolLM2) is rebuilt as tokenizer.json")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise GGUFError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported; supported: "
                        f"{', '.join(_PRE_TOKENIZERS)}")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type", [int(gguf.TokenType.NORMAL)] * len(tokens)))
    merges = list(meta.get("tokenizer.ggml.merges", []))
    vocab = {}
    for i, token in enumerate(tokens):
        if token in vocab:
            raise GGUFError(f"{path}: token {token!r} appears twice in tokenizer.ggml.tokens (ids {vocab[token]}, {i})")
        vocab[token] = i
    normalizer, pre_tokenizer, ignore_merges = _PRE_TOKENIZERS[pre]
    # Built as tokenizer.json text, the form the source models ship, so every field is the one they have.
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": [m.split(" ") for m in merges]},
    }
    tokenizer = Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    # CONTROL tokens are special (never split, skipped on decode); USER_DEFINED ones are added text.
    added = [AddedToken(tokens[i], special=types[i] == gguf.TokenType.CONTROL, normalized=False)
             for i in range(len(tokens)) if types[i] in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)]
    tokenizer.add_tokens(added)

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return None if i is None else tokens[int(i)]

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    bos = token("bos_token_id")
    if add_bos:
        if bos is None:
            raise GGUFError(f"{path}: tokenizer.ggml.add_bos_token is set but there is no bos_token_id")
        from tokenizers import processors
        # Llama 3's own post-processor: bos before every sequence.
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": token("eos_token_id"), "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "add_bos_token": add_bos, "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{meta.get('general.architecture')}.context_length", 0)) or None,
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tokenizer, {k: v for k, v in config.items() if v is not None}


def gguf_to_hf(path: str | Path, output: str | Path, dtype: torch.dtype = torch.float32,
               max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> dict:
    """Write the transformers dir of GGUF file `path` to `output`; returns its config. Every check (architecture,
    quant types, tensor names, rope scaling, tokenizer) runs before the first weight is dequantized."""
    path, output = Path(path), Path(output)
    reader = open_gguf(path)
    meta = metadata(reader)
    arch = _architecture(meta, path)
    _check_quant_types(reader, path)
    config = hf_config(reader, meta, path)
    tokenizer, tokenizer_config = build_tokenizer(meta, path)
    if tokenizer.get_vocab_size() > config["vocab_size"]:
        raise GGUFError(f"{path}: {tokenizer.get_vocab_size()} tokens but an embedding of {config['vocab_size']} rows")
    names = hf_tensors(reader, config, arch, path, dtype)
    first = next(names)  # the name checks run here, before anything is written
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    output.mkdir(parents=True, exist_ok=True)
    save_tensors(dict([first, *names]), output, max_shard_size)
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tokenizer.save(str(output / TOKENIZER_JSON_NAME))
    tokens = {key: tokenizer_config[key] for key in ("bos_token", "eos_token", "pad_token", "unk_token")
              if key in tokenizer_config}
    write_tokenizer_config(output, tokenizer_config, tokens, tokenizer_config.get("chat_template"))
    return config


@contextlib.contextmanager
def gguf_as_hf_dir(path: str | Path, dtype: torch.dtype, near: str | Path) -> Iterator[Path]:
    """gguf_to_hf into a temporary dir beside `near` (same disk as the final output), removed afterwards."""
    Path(near).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".from_gguf-", dir=near) as tmp:
        gguf_to_hf(path, tmp, dtype)
        yield Path(tmp)
