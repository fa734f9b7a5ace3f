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

# The transformers classes this model implements -> their model_type. Each is the dense LLaMA block with its own
# switches: Qwen2 has q/k/v biases (no o bias), Qwen3 a per-head RMSNorm on q and k before RoPE, Mistral and Qwen a
# sliding window (accepted only where it never cuts anything: see LlamaConfig.attention_window).
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3"}
_MODEL_TYPES = {model_type: arch for arch, model_type in ARCHITECTURES.items()}
# rope_scaling["rope_type"] (or the older "type") values whose inverse frequencies llama_model.rope_inv_freq computes.
ROPE_TYPES = ("default", "linear", "llama3")
_ROPE_KEYS = {"default": set(), "linear": {"factor"},
              "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}}

# transformers keys that mean the same as one of ours under another name.
_HF_RENAMED = {"max_position_embeddings": "max_sequence_length"}
# transformers keys we accept without storing: bookkeeping, or settings whose only supported value is checked
# in _HF_REQUIRED below. attention_dropout is dropout on attention probabilities, which this model does not do.
_HF_IGNORED = {
    "model_type", "torch_dtype", "transformers_version", "use_cache", "initializer_range",
    "pretraining_tp", "attention_dropout", "tokenizer_class", "_name_or_path", "return_dict", "output_attentions",
    "output_hidden_states", "torchscript", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "max_length", "min_length", "do_sample", "num_beams", "temperature", "top_p", "top_k",
    "_attn_implementation_autoset", "pad_token", "bos_token", "eos_token",
    "is_llama_config", "transformers.js_config",  # SmolLM2's: nanotron's export marker, a browser runtime's
}
# transformers keys that change the architecture: accepted only at the value this model implements.
_HF_REQUIRED = {"hidden_act": "silu", "mlp_bias": False, "rope_interleaved": False}  # the last: SmolLM2's
# Keys whose default differs by family, as each transformers config class sets it when config.json leaves it out
# (Qwen3Config's head_dim is 128, not hidden_size / heads; Mistral's and Qwen's sliding_window 4096).
_NO_TOKENS = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}  # PretrainedConfig's
_FAMILY_DEFAULTS = {
    "LlamaForCausalLM": {"max_sequence_length": 2048, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None},
    "MistralForCausalLM": {"max_sequence_length": 4096 * 32, "sliding_window": 4096, "bos_token_id": 1,
                           "eos_token_id": 2, "pad_token_id": None},
    "Qwen2ForCausalLM": {"max_sequence_length": 32768, "sliding_window": 4096, "use_sliding_window": False,
                         "max_window_layers": 28, **_NO_TOKENS},
    "Qwen3ForCausalLM": {"max_sequence_length": 32768, "sliding_window": 4096, "use_sliding_window": False,
                         "max_window_layers": 28, "head_dim": 128, **_NO_TOKENS},
}


def _check_positive_int(config, name: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")


def _hf_architecture(d: dict[str, Any], source: str) -> str | None:
    """The transformers class a config.json names (architectures, else model_type); None for this repo's own
    config.json; a clear error naming the supported classes for any other."""
    if "architectures" not in d and "model_type" not in d:
        return None
    names = d.get("architectures") or []
    if names:
        if len(names) != 1 or names[0] not in ARCHITECTURES:
            raise ValueError(f"{source}: architecture {', '.join(map(str, names))} is not supported; supported: "
                             f"{', '.join(ARCHITECTURES)}")
        return names[0]
    if d.get("model_type") not in _MODEL_TYPES:
        raise ValueError(f"{source}: model_type {d.get('model_type')!r} is not supported; supported: "
                         f"{', '.join(_MODEL_TYPES)}")
    return _MODEL_TYPES[d["model_type"]]


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
    # Width of one attention head; None -> hidden_size / num_attention_heads. Explicit in Qwen3 (128 at dim 1024)
    # and Mistral-Nemo (128 at dim 5120 over 32 heads), where heads * head_dim != hidden_size.
    head_dim: int | None = None
    # Read from config.json, as the checkpoint was trained with (LLaMA: 1e-6). A deliberate fix: BiLLa's model code
    # hard-coded 1e-5 and ignored the config; put "rms_norm_eps": 1e-5 in config.json to train exactly as it did.
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # transformers' rope_scaling dict, kept as written: {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    # "high_freq_factor": 4.0, "original_max_position_embeddings": 8192} (Llama 3.1/3.2) or {"rope_type": "linear",
    # "factor": 2.0}; None -> plain RoPE.
    rope_scaling: dict | None = None
    max_sequence_length: int = 2048
    # The output projection is the embedding matrix itself (Llama 3.2 1B/3B, Qwen2.5 <= 3B, SmolLM2): one parameter,
    # no output.weight in the state dict or in any file.
    tie_word_embeddings: bool = False
    # Biases on the q/k/v projections (and on o, except in Qwen2ForCausalLM, whose o_proj has none).
    attention_bias: bool = False
    # Qwen3: RMSNorm over each head's q and k (weights of head_dim) before RoPE.
    qk_norm: bool = False
    # Mistral / Qwen sliding-window attention, as their config.json has it; only a window that never cuts a run's
    # sequences is accepted (attention_window, check_sequence_length). None -> the family has no such key.
    sliding_window: int | None = None
    use_sliding_window: bool | None = None
    max_window_layers: int | None = None
    # The transformers class the weights came from and `python -m llama.convert to_hf` writes back (ARCHITECTURES).
    architecture: str = "LlamaForCausalLM"
    # Dropout after attention and after the FFN (before each residual add). BiLLa trained with 0.05; the default
    # 0.0 keeps a loaded model deterministic unless a recipe asks for it.
    dropout_prob: float = 0.0
    # None where the tokenizer has no such token (Qwen adds no bos); Llama 3.1 Instruct lists several eos ids.
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = meta_intermediate_size(self.hidden_size, self.multiple_of,
                                                            self.ffn_dim_multiplier)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "num_key_value_heads", "max_sequence_length"):
            _check_positive_int(self, name)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"LlamaConfig.hidden_size ({self.hidden_size}) is not divisible by "
                                 f"num_attention_heads ({self.num_attention_heads}); set head_dim")
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check_positive_int(self, "head_dim")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim {self.head_dim} must be even for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LlamaConfig.num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if not 0.0 <= self.dropout_prob < 1.0:
            raise ValueError(f"LlamaConfig.dropout_prob must be in [0, 1), got {self.dropout_prob}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r} is not supported; supported: "
                             f"{', '.join(ARCHITECTURES)}")
        # What the recorded transformers class can hold, so that to_hf always writes a loadable checkpoint.
        fixed = {"Qwen2ForCausalLM": {"attention_bias": True, "qk_norm": False},
                 "Qwen3ForCausalLM": {"qk_norm": True},
                 "MistralForCausalLM": {"attention_bias": False, "qk_norm": False, "rope_scaling": None},
                 "LlamaForCausalLM": {"qk_norm": False}}[self.architecture]
        for name, value in fixed.items():
            if getattr(self, name) != value:
                raise ValueError(f"{name}={getattr(self, name)!r} is not possible in {self.architecture} "
                                 f"(only {value!r})")
        if self.architecture == "Qwen2ForCausalLM" and self.head_dim * self.num_attention_heads != self.hidden_size:
            raise ValueError(f"Qwen2ForCausalLM has no explicit head_dim: head_dim ({self.head_dim}) * "
                             f"num_attention_heads ({self.num_attention_heads}) must equal hidden_size "
                             f"({self.hidden_size})")
        self.rope_type  # noqa: B018 - validates rope_scaling
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{name} must be an integer id or null, got {value!r}")
        eos = self.eos_token_id
        if eos is not None and not (isinstance(eos, int) and not isinstance(eos, bool) or isinstance(eos, list)
                                    and eos and all(isinstance(i, int) and not isinstance(i, bool) for i in eos)):
            raise ValueError(f"eos_token_id must be an integer id, a list of them or null, got {eos!r}")

    @property
    def rope_type(self) -> str:
        """"default", "linear" or "llama3"; a clear error for any other rope_scaling."""
        if self.rope_scaling is None:
            return "default"
        if not isinstance(self.rope_scaling, dict):
            raise ValueError(f"rope_scaling must be an object or null, got {self.rope_scaling!r}")
        kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
        if kind not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        missing = _ROPE_KEYS[kind] - set(self.rope_scaling)
        if missing:
            raise ValueError(f"rope_scaling of type {kind!r} lacks {sorted(missing)}")
        return kind

    @property
    def model_type(self) -> str:
        return ARCHITECTURES[self.architecture]

    @property
    def attention_output_bias(self) -> bool:
        """Whether wo has a bias: attention_bias, except in Qwen2 (q/k/v biases only)."""
        return self.attention_bias and self.architecture != "Qwen2ForCausalLM"

    @property
    def attention_window(self) -> int | None:
        """The sliding window some layer applies, as the recorded transformers class decides it; None when off."""
        if self.sliding_window is None or self.use_sliding_window is False:
            return None
        if self.architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
            # Qwen2Attention / Qwen3Attention: only layers from max_window_layers on slide.
            if self.max_window_layers is not None and self.max_window_layers >= self.num_hidden_layers:
                return None
        return self.sliding_window

    def check_sequence_length(self, length: int, setting: str, source: str = "config.json") -> None:
        """Raise ValueError naming `setting` and `source` when sequences of `length` would not be computed as the
        recorded class computes them: longer than max_sequence_length, or than an active sliding window (this
        model attends to the whole causal prefix)."""
        if length > self.max_sequence_length:
            raise ValueError(f"{setting}={length} is above the model's max_sequence_length="
                             f"{self.max_sequence_length} ({source})")
        window = self.attention_window
        if window is not None and length > window:
            how = ("set use_sliding_window to false" if self.use_sliding_window is not None
                   else "set sliding_window to null")
            raise ValueError(f"{setting}={length} is above the sliding_window={window} of {source}: this model has "
                             f"no sliding-window attention; use sequences of at most {window}, or {how} there if "
                             f"the model was trained without it")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "LlamaConfig":
        """Build from our keys or transformers' keys (any of the ARCHITECTURES); `source` names the file in errors."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        architecture = _hf_architecture(d, source)
        if architecture is not None:  # a transformers config.json: its class's defaults for keys it leaves out
            kwargs.update(_FAMILY_DEFAULTS[architecture])
            kwargs["architecture"] = architecture
            kwargs["qk_norm"] = architecture == "Qwen3ForCausalLM"
        for key, value in d.items():
            if key in ("architectures", "model_type"):
                pass  # read by _hf_architecture
            elif key in fields:
                kwargs[key] = value
            elif key in _HF_RENAMED:
                kwargs[_HF_RENAMED[key]] = value
            elif key in _HF_REQUIRED:
                if value != _HF_REQUIRED[key]:
                    raise ValueError(f"{source}: {key}={value!r} is not supported by this LLaMA implementation "
                                     f"(only {_HF_REQUIRED[key]!r})")
            elif key in _HF_IGNORED:
                pass
            else:
                raise ValueError(f"{source}: unknown config key {key!r} (known keys: {sorted(fields)})")
        if architecture == "Qwen2ForCausalLM":
            kwargs["attention_bias"] = True  # Qwen2Attention: q/k/v always have biases, whatever the file says
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in kwargs]
        if missing:
            raise ValueError(f"{source}: missing config key(s) {missing}")
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}: {e}") from None

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
