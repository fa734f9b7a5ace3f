"""The attention kernels of llama/llama_model.py and the masks they take; the model chooses one (Llama.attention).

    mask = Llama.attention_mask(doc_ids)                         once per forward, shared by every layer
    out = attend(q, k, v, mask)                                  q (bs, n_heads, L, hd), k/v (bs, n_kv, S, hd)

Unpacked rows (mask.kind "causal") run SDPA with is_causal and no mask, which lets it pick its flash kernel. Packed
rows (doc_ids: attention stays inside each document) run one of:
    "flex"   torch.nn.attention.flex_attention with a BlockMask built from the documents: 128 x 128 tiles wholly
             above the diagonal or across two documents are skipped, and no (L, L) mask exists. Compiled on CUDA
             (flex_attention's eager form materialises the full scores: it is the reference, not a kernel).
    "dense"  SDPA with a boolean (bs, 1, L, L) mask, the path before flex: memory-efficient or math kernel, never
             flash (flash takes no mask), every tile computed.
    "auto"   flex on CUDA; dense elsewhere (on CPU the eager flex is the slower of the two).
Grouped-query attention without copies: flex and SDPA without a mask group the heads themselves (enable_gqa). With
a mask, SDPA's memory-efficient kernel has no GQA and would fall back to math, so the key/value heads are repeated
there (repeat_kv), as transformers' sdpa_attention does (use_gqa_in_sdpa: GQA only when attention_mask is None).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

ATTENTION_KERNELS = ("auto", "flex", "dense")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Grouped-query attention: key/value head h serves query heads h*n_rep .. h*n_rep + n_rep-1."""
    if n_rep == 1:
        return x
    bs, n_kv, seqlen, head_dim = x.shape
    # (bs, n_kv, n_rep, seqlen, head_dim) -> (bs, n_kv * n_rep, seqlen, head_dim)
    return x[:, :, None].expand(bs, n_kv, n_rep, seqlen, head_dim).reshape(bs, n_kv * n_rep, seqlen, head_dim)


def document_causal_mask(runs: torch.Tensor) -> torch.Tensor:
    """Boolean SDPA mask (True = may attend): causal and within the same document. runs: (bs, L)."""
    seqlen = runs.shape[1]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=runs.device).tril()
    same_doc = runs[:, :, None] == runs[:, None, :]  # (bs, L, L)
    return (same_doc & causal)[:, None]  # (bs, 1, L, L), broadcast over heads


@dataclass
class AttentionMask:
    """What every layer of one forward attends with. kind: "causal" (no tensor), "dense" (`dense` holds the
    (bs, 1, L, S) boolean mask, or the KV cache's (L, S) one) or "flex" (`block_mask` a flex BlockMask)."""
    kind: str
    dense: torch.Tensor | None = None
    block_mask: object | None = None


CAUSAL = AttentionMask("causal")


def resolve_kernel(kernel: str, device: torch.device) -> str:
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel {kernel!r}: expected one of {ATTENTION_KERNELS}")
    if kernel == "auto":
        return "flex" if device.type == "cuda" else "dense"
    return kernel


def packed_mask(runs: torch.Tensor, kernel: str) -> AttentionMask:
    """The document-causal mask of packed rows for `kernel` ("auto" resolved by runs' device). runs: (bs, L), the
    document index of each position (llama_model.positions_and_documents)."""
    kernel = resolve_kernel(kernel, runs.device)
    if kernel == "dense":
        return AttentionMask("dense", dense=document_causal_mask(runs))
    from torch.nn.attention.flex_attention import _DEFAULT_SPARSE_BLOCK_SIZE, create_block_mask

    bs, seqlen = runs.shape
    # create_block_mask evaluates the mask over whole tiles, up to the next multiple of the tile size: positions
    # past the row belong to document -1, which no real position shares.
    tiles = -(-seqlen // _DEFAULT_SPARSE_BLOCK_SIZE)
    padded = F.pad(runs, (0, tiles * _DEFAULT_SPARSE_BLOCK_SIZE - seqlen), value=-1)  # (bs, tiles * 128)

    def document_causal(b, h, q_idx, kv_idx):
        return (padded[b, q_idx] == padded[b, kv_idx]) & (q_idx >= kv_idx)

    # H=None: one mask for every head. On CUDA create_block_mask compiles the mask function (_compile), else it
    # evaluates it over all (L, L) pairs once per forward in eager code.
    block_mask = create_block_mask(document_causal, bs, None, seqlen, seqlen, device=runs.device,
                                   _compile=runs.device.type == "cuda")
    return AttentionMask("flex", block_mask=block_mask)


@lru_cache(maxsize=None)
def _compiled_flex():
    """flex_attention compiled once per process (a Triton kernel on CUDA); inside a compiled block it is inlined."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Softmax attention of q (bs, n_heads, L, hd) over k, v (bs, n_kv_heads, S, hd); (bs, n_heads, L, hd)."""
    gqa = q.shape[1] != k.shape[1]
    if mask.kind == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        kernel = _compiled_flex() if q.is_cuda else flex_attention
        return kernel(q, k, v, block_mask=mask.block_mask, enable_gqa=gqa)
    if mask.kind == "dense":
        n_rep = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (bs, n_heads, S, hd)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense)
    # "causal": is_causal only where the query and key positions coincide (a whole row, or a cache's prefill);
    # one new query after a cache sees every cached key.
    return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] == k.shape[2], enable_gqa=gqa)
