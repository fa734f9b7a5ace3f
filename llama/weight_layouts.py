"""Weight layouts: transformers' and Meta's LLaMA checkpoints <-> this repo's parameters.

Our parameters keep Meta's names and Meta's q/k rotary layout (dims 2i, 2i+1 of a head rotate together).
transformers' convert_llama_weights_to_hf.py permutes wq/wk so that its rotate_half form (dims i and
i + head_dim/2 rotate together) computes the same thing; `permute_to_hf` is that exact function and
`permute_from_hf` its inverse, so a round trip is bit for bit. Everything indexed by q/k output dims moves with the
rows: Qwen2's q/k biases (per head) and Qwen3's q/k norm weights (one head wide). Used by llama.convert (the CLI) and by
Llama.from_pretrained (transformers dirs converted on load).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator

import torch

from llama.configuration_llama import CONFIG_NAME, LlamaConfig
from llama.model_files import is_transformers_dir, iter_tensors

# transformers name -> our (Meta's) name; "{}" is the layer number.
_HF_TO_OURS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attention.wq.bias",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attention.wk.bias",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attention.wv.bias",
    "model.layers.{}.self_attn.o_proj.bias": "layers.{}.attention.wo.bias",
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attention.q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attention.k_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
}
_OURS_TO_HF = {ours: hf for hf, ours in _HF_TO_OURS.items()}
_LAYER = re.compile(r"(?<=layers\.)(\d+)(?=\.)")


def _rename(name: str, table: dict[str, str], source: str) -> str:
    m = _LAYER.search(name)
    template = _LAYER.sub("{}", name, count=1) if m else name
    if template not in table:
        raise KeyError(f"{source}: unexpected weight {name!r}")
    return table[template].format(m.group(1)) if m else table[template]


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved q/k rows -> transformers' rotate_half rows (transformers' `permute`). w: a weight
    (n_heads * head_dim, dim) or a vector along those rows (a bias; a q/k norm weight with n_heads=1)."""
    dim1 = w.shape[0]
    # (n_heads, head_dim/2, 2, rest) -> (n_heads, 2, head_dim/2, rest)
    return w.reshape(n_heads, dim1 // n_heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of permute_to_hf."""
    dim1 = w.shape[0]
    # (n_heads, 2, head_dim/2, rest) -> (n_heads, head_dim/2, 2, rest)
    return w.reshape(n_heads, 2, dim1 // n_heads // 2, -1).transpose(1, 2).reshape(w.shape)


def _rotary_heads(name: str, config: LlamaConfig) -> int | None:
    """How many heads' worth of rotary rows tensor `name` (ours) has: q/k weights and biases, q/k norms (one);
    None for tensors not in the rotary layout."""
    if re.search(r"attention\.wq\.(weight|bias)$", name):
        return config.num_attention_heads
    if re.search(r"attention\.wk\.(weight|bias)$", name):
        return config.num_key_value_heads
    if re.search(r"attention\.[qk]_norm\.weight$", name):
        return 1
    return None


def hf_to_llama_state_dict(tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
                           config: LlamaConfig, source: str = "transformers checkpoint") -> dict[str, torch.Tensor]:
    """transformers LlamaForCausalLM weights -> ours. Accepts a dict or a lazy (name, tensor) stream."""
    items = tensors.items() if isinstance(tensors, dict) else tensors
    return dict(hf_to_llama_tensors(items, config, source))


def hf_to_llama_tensors(tensors: Iterable[tuple[str, torch.Tensor]], config: LlamaConfig,
                        source: str = "transformers checkpoint") -> Iterator[tuple[str, torch.Tensor]]:
    """hf_to_llama_state_dict one tensor at a time."""
    for name, t in tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue  # older transformers saved this buffer; it is recomputed from rope_theta
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # some tied checkpoints store the embedding twice; the model has it once
        ours = _rename(name, _HF_TO_OURS, source)
        heads = _rotary_heads(ours, config)
        yield ours, (t if heads is None else permute_from_hf(t, heads))


def llama_tensors(directory: str | Path, config: LlamaConfig, dtype: torch.dtype | None = None,
                  device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, tensor) for every weight of a model dir of this repo or of transformers (converted as read), one
    tensor at a time, cast to `dtype` (None keeps the stored dtype)."""
    directory = Path(directory)
    tensors = iter_tensors(directory, dtype, device)
    if is_transformers_dir(json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))):
        return hf_to_llama_tensors(tensors, config, source=str(directory))
    return tensors


def llama_to_hf_state_dict(state_dict: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our weights -> transformers weights of config.architecture (a tied model has no lm_head.weight, as
    transformers saves it)."""
    out = {}
    for name, t in state_dict.items():
        heads = _rotary_heads(name, config)
        out[_rename(name, _OURS_TO_HF, "model")] = t if heads is None else permute_to_hf(t, heads)
    return out


def hf_config_dict(config: LlamaConfig, dtype: torch.dtype) -> dict:
    """A transformers config.json of config.architecture, with the keys its config class reads (dropout_prob is a
    training setting and is not carried; transformers' bookkeeping keys get their class defaults)."""
    d = {
        "architectures": [config.architecture],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_sequence_length,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "attention_bias": config.attention_bias,
        "attention_dropout": 0.0,
        "sliding_window": config.sliding_window,
        "use_sliding_window": config.use_sliding_window,
        "max_window_layers": config.max_window_layers,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if config.architecture == "LlamaForCausalLM":
        d.update({"mlp_bias": False, "pretraining_tp": 1})
    # Keys the class has no parameter for (it would keep them as stray attributes): Qwen2 has no head_dim (it is
    # hidden_size / heads there) and no attention_bias (always on); Mistral no rope_scaling or attention_bias;
    # Llama no sliding window.
    absent = {"LlamaForCausalLM": ("sliding_window", "use_sliding_window", "max_window_layers"),
              "MistralForCausalLM": ("rope_scaling", "attention_bias", "use_sliding_window", "max_window_layers"),
              "Qwen2ForCausalLM": ("head_dim", "attention_bias"),
              "Qwen3ForCausalLM": ()}[config.architecture]
    for key in absent:
        del d[key]
    return d


# Meta's params.json keys -> ours; the rest of its keys are listed in _META_IGNORED.
_META_PARAMS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                "n_kv_heads": "num_key_value_heads", "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta",
                "max_seq_len": "max_sequence_length", "multiple_of": "multiple_of",
                "ffn_dim_multiplier": "ffn_dim_multiplier"}
_META_IGNORED = {"vocab_size", "max_batch_size"}  # vocab_size is -1 in LLaMA-1; read from the embedding instead
# Model-parallel shards split these along this dim; norms are replicated.
_META_CONCAT_DIM = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}


def load_meta_checkpoint(directory: str | Path, dtype: torch.dtype | None = None
                         ) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Meta's consolidated.*.pth (model-parallel shards merged) + params.json -> (config, our state dict)."""
    directory = Path(directory)
    params_path = directory / "params.json"
    if not params_path.is_file():
        raise FileNotFoundError(f"Meta checkpoint: {params_path} not found")
    params = json.loads(params_path.read_text(encoding="utf-8"))
    shards = sorted(directory.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"Meta checkpoint: no consolidated.*.pth in {directory}")
    kwargs = {}
    for key, value in params.items():
        if key in _META_PARAMS:
            if value is not None:
                kwargs[_META_PARAMS[key]] = value
        elif key not in _META_IGNORED:
            raise ValueError(f"{params_path}: unsupported params.json key {key!r}")

    parts = [torch.load(p, map_location="cpu", weights_only=True, mmap=True) for p in shards]
    state = {}
    for name in parts[0]:
        if name == "rope.freqs":
            continue  # a buffer, recomputed from rope_theta
        kind = name.split(".")[-2]
        if len(parts) == 1 or kind not in _META_CONCAT_DIM:
            t = parts[0][name]
        else:
            t = torch.cat([p[name] for p in parts], dim=_META_CONCAT_DIM[kind])
        state[name] = t if dtype is None else t.to(dtype)
    # Sizes Meta derives at run time (vocab from the tokenizer, FFN width from multiple_of) are read off the weights.
    kwargs["vocab_size"] = state["tok_embeddings.weight"].shape[0]
    kwargs["intermediate_size"] = state["layers.0.feed_forward.w1.weight"].shape[0]
    config = LlamaConfig.from_dict(kwargs, source=str(params_path))
    return config, state
