"""LlamaConfig: the hyper-parameters of a LLaMA model, saved as config.json.

Reads this repo's config.json and a transformers LLaMA config.json alike (BiLLa's released checkpoints are
transformers dirs: `max_position_embeddings` there is `max_sequence_length` here), so nobody renames keys by hand.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama.model_files import read_json_object

CONFIG_NAME = "config.json"

# transformers keys that mean the same as one of ours under another name.
_HF_RENAMED = {"max_position_embeddings": "max_sequence_length"}
# transformers keys we accept without storing: bookkeeping, or settings whose only supported value is checked
# in _HF_REQUIRED below. attention_dropout is dropout on attention probabilities, which this model does not do.
_HF_IGNORED = {
    "architectures", "model_type", "torch_dtype", "transformers_version", "use_cache", "initializer_range",
    "pretraining_tp", "attention_dropout", "tokenizer_class", "_name_or_path", "return_dict", "output_attentions",
    "output_hidden_states", "torchscript", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "max_length", "min_length", "do_sample", "num_beams", "temperature", "top_p", "top_k",
    "_attn_implementation_autoset", "pad_token", "bos_token", "eos_token",
}
# transformers keys that change the architecture: accepted only at the value this model implements.
_HF_REQUIRED = {
    "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
    "rope_scaling": None,
}


def meta_intermediate_size(hidden_size: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's FeedForward width: 2/3 of 4*dim, optionally scaled, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * (4 * hidden_size) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    # None -> Meta's rule (meta_intermediate_size with multiple_of / ffn_dim_multiplier); resolved on creation so
    # that config.json always holds the concrete width.
    intermediate_size: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    # LLaMA-2-style grouped-query attention; None -> one key/value head per query head.
    num_key_value_heads: int | None = None
    # Read from config.json, as the checkpoint was trained with (LLaMA: 1e-6). A deliberate fix: BiLLa's model code
    # hard-coded 1e-5 and ignored the config; put "rms_norm_eps": 1e-5 in config.json to train exactly as it did.
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_sequence_length: int = 2048
    # Dropout after attention and after the FFN (before each residual add). BiLLa trained with 0.05; the default
    # 0.0 keeps a loaded model deterministic unless a recipe asks for it.
    dropout_prob: float = 0.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = meta_intermediate_size(self.hidden_size, self.multiple_of,
                                                            self.ffn_dim_multiplier)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "num_key_value_heads", "max_sequence_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"LlamaConfig.hidden_size ({self.hidden_size}) is not divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim {self.head_dim} must be even for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LlamaConfig.num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if not 0.0 <= self.dropout_prob < 1.0:
            raise ValueError(f"LlamaConfig.dropout_prob must be in [0, 1), got {self.dropout_prob}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "LlamaConfig":
        """Build from our keys or transformers' keys; `source` names the file in error messages."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in fields:
                kwargs[key] = value
            elif key in _HF_RENAMED:
                kwargs[_HF_RENAMED[key]] = value
            elif key in _HF_REQUIRED:
                if value != _HF_REQUIRED[key]:
                    raise ValueError(f"{source}: {key}={value!r} is not supported by this LLaMA implementation "
                                     f"(only {_HF_REQUIRED[key]!r})")
            elif key == "head_dim":
                pass  # checked below, once hidden_size and num_attention_heads are known
            elif key in _HF_IGNORED:
                pass
            else:
                raise ValueError(f"{source}: unknown config key {key!r} (known keys: {sorted(fields)})")
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if key in kwargs and kwargs[key] is None:
                del kwargs[key]  # transformers writes null for "no such token"; keep our default id
            elif key in kwargs and not isinstance(kwargs[key], int):
                raise ValueError(f"{source}: {key} must be a single integer id, got {kwargs[key]!r}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in kwargs]
        if missing:
            raise ValueError(f"{source}: missing config key(s) {missing}")
        try:
            config = cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        if d.get("head_dim") not in (None, config.head_dim):
            raise ValueError(f"{source}: head_dim={d['head_dim']} must equal hidden_size / num_attention_heads "
                             f"({config.head_dim})")
        return config

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "LlamaConfig":
        """Read `path` (a model dir holding config.json, or the config.json itself)."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"LLaMA config not found: {path}")
        return cls.from_dict(read_json_object(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path
