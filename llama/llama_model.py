"""LLaMA in MetaAI's layout (parameter names and q/k rotary layout of Meta's code), trainable, not a transformers class.

    loss, logits = model(input_ids, loss_mask=None, labels=None, doc_ids=None)

Differences from Meta's inference-only model.py: dropout (BiLLa's 0.05 after attention and FFN), gradient
checkpointing of every block or every other one, packed rows (doc_ids), attention through the kernels of
llama/attention.py (SDPA, flex_attention), regional torch.compile (compile_blocks), and a loss that projects to the
vocabulary only the positions whose target counts. Generation lives in llama/generation.py on top of
`forward_with_cache`.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llama.attention import CAUSAL, AttentionMask, attend, packed_mask
from llama.configuration_llama import CONFIG_NAME, LlamaConfig
from llama.loss import LOSS_PATHS
from llama.model_files import DEFAULT_MAX_SHARD_SIZE, save_tensors
from llama.weight_layouts import llama_tensors


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as Meta and transformers do), cast back, then scale.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_inv_freq(config: LlamaConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """theta^(-2j/head_dim) for j < head_dim/2, scaled as config.rope_scaling says; shape (head_dim // 2,), fp32.

    The rules of transformers' modeling_rope_utils (_compute_default_rope_parameters, _compute_linear_scaling_rope_
    parameters, _compute_llama3_parameters), op for op, so the angles match it bit for bit. Neither scaling type
    rescales cos/sin (their attention_factor is 1)."""
    dim = config.head_dim
    # int64 arange -> float, as transformers builds it
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    kind, scaling = config.rope_type, config.rope_scaling
    if kind == "linear":
        return inv_freq / scaling["factor"]  # positions divided by factor, folded into the frequencies
    if kind == "llama3":
        # Llama 3.1: wavelengths longer than the original context / low_freq_factor are stretched by `factor`, those
        # shorter than original context / high_freq_factor kept, the band between interpolated smoothly.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_frequencies(inv_freq: torch.Tensor, length: int) -> torch.Tensor:
    """e^(i * position * inv_freq) as complex64, shape (length, head_dim // 2)."""
    angles = torch.outer(torch.arange(length, device=inv_freq.device, dtype=torch.float32), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate dims (2j, 2j+1) of each head by its position's angle (Meta's interleaved layout), in fp32.

    x: (bs, L, n_heads, head_dim); freqs_cis: complex, broadcastable to (bs, L, 1, head_dim // 2).
    """
    # The complex product (x0 + i x1)(cos + i sin) in real arithmetic: torch.compile's inductor generates no code
    # for complex tensors and would leave the rotation to eager kernels.
    x0, x1 = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)  # each (bs, L, n_heads, head_dim/2)
    cos, sin = freqs_cis.real, freqs_cis.imag
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)  # (bs, L, n_heads, head_dim/2, 2)
    return rotated.flatten(3).type_as(x)  # (bs, L, n_heads, head_dim)


def positions_and_documents(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed rows: (position within its document, document run index), both (bs, L).

    A document is a contiguous run of equal doc_id; a later run that reuses an id is a new document.
    """
    bs, seqlen = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    index = torch.arange(seqlen, device=doc_ids.device).expand(bs, seqlen)
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index, starts.cumsum(dim=1)


CHECKPOINTING_MODES = ("none", "selective", "full")


def checkpointing_mode(value: str | bool) -> str:
    """A gradient_checkpointing value as one of CHECKPOINTING_MODES: True/False (and their text) are "full"/"none",
    the setting's meanings before it had modes (old args files and checkpoints)."""
    if isinstance(value, bool):
        return "full" if value else "none"
    mode = {"true": "full", "false": "none"}.get(str(value).strip().lower(), str(value).strip().lower())
    if mode not in CHECKPOINTING_MODES:
        raise ValueError(f"gradient_checkpointing {value!r}: expected one of {CHECKPOINTING_MODES} (or True/False)")
    return mode


class KVCache:
    """Keys and values of every layer for generation, on the model's device and dtype."""

    def __init__(self, config: LlamaConfig, batch_size: int, max_length: int, device: torch.device,
                 dtype: torch.dtype):
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.max_length = max_length
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (bs, n_kv, L, head_dim) at positions start..start+L; return all keys/values so far."""
        end = start + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions, asked to write up to {end}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, layer_id: int, config: LlamaConfig):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=config.attention_bias)
        self.wk = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=config.attention_bias)
        self.wv = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=config.attention_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=config.attention_output_bias)
        # Qwen3: each head's q and k normalised (one weight of head_dim, shared by the heads) before RoPE.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: AttentionMask, cache: KVCache | None = None,
                start_pos: int = 0) -> torch.Tensor:
        bs, seqlen, _ = x.shape
        q = self.wq(x).view(bs, seqlen, self.n_heads, self.head_dim)  # (bs, L, n_heads, head_dim)
        k = self.wk(x).view(bs, seqlen, self.n_kv_heads, self.head_dim)  # (bs, L, n_kv_heads, head_dim)
        v = self.wv(x).view(bs, seqlen, self.n_kv_heads, self.head_dim)  # (bs, L, n_kv_heads, head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, freqs_cis), apply_rotary(k, freqs_cis)
        # SDPA wants heads before positions: (bs, heads, L, head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_id, start_pos, k, v)  # (bs, n_kv_heads, start_pos + L, head_dim)
        out = attend(q, k, v, mask)  # (bs, n_heads, L, head_dim)
        return self.wo(out.transpose(1, 2).reshape(bs, seqlen, -1))  # (bs, L, n_heads * head_dim) -> (bs, L, dim)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, config: LlamaConfig):
        super().__init__()
        self.attention = Attention(layer_id, config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.dropout = nn.Dropout(config.dropout_prob)  # BiLLa: 0.05 after attention and after the FFN

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: AttentionMask, cache: KVCache | None = None,
                start_pos: int = 0) -> torch.Tensor:
        h = x + self.dropout(self.attention(self.attention_norm(x), freqs_cis, mask, cache, start_pos))
        return h + self.dropout(self.feed_forward(self.ffn_norm(h)))


class TiedOutput(nn.Module):
    """The output projection of a model with tie_word_embeddings: the embedding matrix itself, owning no parameter.

    It keeps a plain reference to the embedding module (not registered as a submodule), so the model has one
    parameter for both uses -- state_dict(), named_parameters() and every file hold tok_embeddings.weight only --
    and `weight` is always the embedding's current parameter, also after to_empty() / LazyInitContext / a ZeRO
    wrapper replaced it. `model.output.weight` works for either kind of model."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # bypass nn.Module registration

    @property
    def weight(self) -> nn.Parameter:
        return self._embedding.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(i, config) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = (TiedOutput(self.tok_embeddings) if config.tie_word_embeddings
                       else nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        self.gradient_checkpointing = "none"  # "none", "selective" or "full": see set_gradient_checkpointing
        # Packed rows' attention kernel (llama/attention.py): "auto" (flex on CUDA, dense mask elsewhere), "flex", or
        # "dense" (the boolean-mask path, the reference the others are tested against).
        self.attention = "auto"
        # How the counted rows reach the vocabulary (llama/loss.py): "fused" (no full fp32 logits, no recompute),
        # "checkpointed" (ordinary ops in row chunks recomputed in backward, for wrappers that must see `output`
        # used as an ordinary op, e.g. parameter-gathering hooks) or "plain" (full fp32 logits: the reference).
        self.loss_path = "fused"
        # Rows of the vocabulary below this id get no gradient, in tok_embeddings and output alike; 0: every row
        # trains. A warm-up of the rows a vocabulary expansion added sets it (training/new_rows.py).
        self.frozen_rows = 0
        # Rotary table per device. A plain attribute, not a buffer: state dicts stay Meta's names only and
        # model.to(bfloat16) cannot cast the complex table to a real dtype.
        self._rope_cache: dict[torch.device, torch.Tensor] = {}
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """Random init as transformers' LLaMA does (normal(0, std) for linears and embeddings, zero biases, ones for
        norms)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def set_gradient_checkpointing(self, mode: str | bool = "full") -> None:
        """Recompute blocks in backward (non-reentrant checkpointing) to trade compute for activation memory:
        "full" every block, "selective" every other block (half the activations kept, half the recompute), "none".
        True and False are "full" and "none" (the setting's values before the modes)."""
        self.gradient_checkpointing = checkpointing_mode(mode)

    def checkpointed_layers(self) -> list[int]:
        """The indices of the blocks recomputed in backward under the current mode (the HFU's recomputation)."""
        n = len(self.layers)
        return {"none": [], "full": list(range(n)), "selective": list(range(0, n, 2))}[self.gradient_checkpointing]

    def compile_blocks(self, **options) -> None:
        """torch.compile each transformer block in place (regional compilation: the blocks share one graph, since
        torch inlines their modules and takes their parameters as inputs; names and state dict unchanged, so
        checkpoints and ZeRO wrappers see the same model). `options` go to torch.compile. The embedding, final norm
        and loss stay eager."""
        for layer in self.layers:
            layer.compile(**options)

    def rope_table(self, device: torch.device) -> torch.Tensor:
        device = torch.device(device)
        if device not in self._rope_cache:
            inv_freq = rope_inv_freq(self.config, device)
            self._rope_cache[device] = rope_frequencies(inv_freq, self.config.max_sequence_length)
        return self._rope_cache[device]  # (max_sequence_length, head_dim // 2) complex64

    def _check_length(self, length: int) -> None:
        self.config.check_sequence_length(length, "sequence length")

    def hidden_states(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (bs, L, dim)."""
        bs, seqlen = input_ids.shape
        self._check_length(seqlen)
        table = self.rope_table(input_ids.device)
        if doc_ids is None:
            freqs_cis = table[:seqlen][None, :, None, :]  # (1, L, 1, head_dim/2)
            mask = CAUSAL  # lets SDPA pick its flash kernel
        else:
            positions, runs = positions_and_documents(doc_ids)
            freqs_cis = table[positions][:, :, None, :]  # (bs, L, 1, head_dim/2)
            mask = packed_mask(runs, self.attention)
        h = self.tok_embeddings(input_ids)  # (bs, L, dim)
        if self.frozen_rows:  # positions reading an old token pass no gradient to its row; values unchanged
            h = torch.where((input_ids >= self.frozen_rows)[..., None], h, h.detach())
        recomputed = set(self.checkpointed_layers()) if self.training and torch.is_grad_enabled() else set()
        for i, layer in enumerate(self.layers):
            if i in recomputed:
                h = checkpoint(layer, h, freqs_cis, mask, use_reentrant=False)
            else:
                h = layer(h, freqs_cis, mask)
        return self.norm(h)

    def forward(self, input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(loss, None) when loss_mask or labels is given, else (None, fp32 logits (bs, L, vocab)).

        loss_mask (bs, L) is aligned with input_ids: token t counts as a target (predicted from position t-1) iff
        loss_mask[:, t] == 1. labels follow transformers (-100 = ignore, shifted here). With doc_ids (bs, L), a
        contiguous run of equal ids is a document: attention stays inside it, positions restart at 0, and its
        first token is never a target. The loss is the fp32 mean cross-entropy over counted targets; it is 0.0
        (still connected to every parameter) when nothing counts.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seqlen), got shape {tuple(input_ids.shape)}")
        for name, t in (("loss_mask", loss_mask), ("labels", labels), ("doc_ids", doc_ids)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(f"{name} shape {tuple(t.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if loss_mask is not None and labels is not None:
            raise ValueError("pass loss_mask or labels, not both")
        h = self.hidden_states(input_ids, doc_ids)
        if loss_mask is None and labels is None:
            return None, self.output(h).float()

        if labels is not None:
            targets = labels[:, 1:]  # (bs, L-1)
            counted = targets != -100
        else:
            targets = input_ids[:, 1:]  # (bs, L-1)
            counted = loss_mask[:, 1:].bool()
        if doc_ids is not None:
            counted = counted & (doc_ids[:, 1:] == doc_ids[:, :-1])
        # Only the rows whose target counts reach the vocabulary projection.
        hidden = h[:, :-1][counted]  # (n_counted, dim)
        if self.loss_path not in LOSS_PATHS:
            raise ValueError(f"loss_path {self.loss_path!r}: expected one of {sorted(LOSS_PATHS)}")
        loss_sum = LOSS_PATHS[self.loss_path](hidden, self._trained_rows(self.output.weight), targets[counted])
        return loss_sum / counted.sum().clamp(min=1), None

    def _trained_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The output matrix with no gradient reaching its rows below frozen_rows: the same values, bit for bit (a
        copy under frozen_rows, since torch.where cannot alias)."""
        if not self.frozen_rows:
            return weight
        new = torch.arange(weight.shape[0], device=weight.device) >= self.frozen_rows  # (vocab,)
        return torch.where(new[:, None], weight, weight.detach())

    @torch.no_grad()
    def forward_with_cache(self, input_ids: torch.Tensor, cache: KVCache, start_pos: int) -> torch.Tensor:
        """Run input_ids (bs, L) as positions start_pos.., filling `cache`; fp32 logits of the last position."""
        bs, seqlen = input_ids.shape
        self._check_length(start_pos + seqlen)
        freqs_cis = self.rope_table(input_ids.device)[start_pos:start_pos + seqlen][None, :, None, :]
        if start_pos == 0 or seqlen == 1:
            mask = CAUSAL  # a prefill is causal; one new query sees every cached key
        else:
            # Query i sits at position start_pos + i and sees keys 0 .. start_pos + i.
            mask = AttentionMask("dense", dense=torch.ones(seqlen, start_pos + seqlen, dtype=torch.bool,
                                                           device=input_ids.device).tril(start_pos))
        h = self.tok_embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, freqs_cis, mask, cache, start_pos)
        return self.output(self.norm(h[:, -1])).float()  # (bs, vocab)

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        p = self.output.weight
        return KVCache(self.config, batch_size, min(max_length, self.config.max_sequence_length), p.device, p.dtype)

    # ---- files -----------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", config: LlamaConfig | None = None) -> "Llama":
        """Load a model dir of this repo, or a transformers LLaMA dir (converted on load), straight to dtype.

        The model is built on the meta device and takes the loaded tensors as its parameters, so no randomly
        initialised or fp32 copy is ever allocated. `config` replaces the dir's config.json (a training run's
        dropout, say); the weights must still fit its shapes.
        """
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"LLaMA config not found: {config_path}")
        config = config or LlamaConfig.from_pretrained(config_path)
        state = dict(llama_tensors(directory, config, dtype, device))
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise KeyError(f"{directory}: weights do not match the config: missing {missing[:8]}"
                           f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                           f"{'...' if len(unexpected) > 8 else ''}")
        for name, t in state.items():
            if t.shape != expected[name].shape:
                raise ValueError(f"{directory}: weight {name} has shape {tuple(t.shape)}, config {config_path} "
                                 f"implies {tuple(expected[name].shape)}")
        model.load_state_dict(state, strict=True, assign=True)
        return model

    def save_pretrained(self, directory: str | Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
        """Write config.json + model.safetensors (or shards + index above max_shard_size). The tokenizer's files are
        its own business: tokenizer.save(directory) completes the dir."""
        directory = Path(directory)
        save_tensors(self.state_dict(), directory, max_shard_size)
        self.config.save_pretrained(directory)
        return directory

