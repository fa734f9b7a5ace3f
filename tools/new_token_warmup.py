"""A warm-up of a widened model's new token rows by self-distillation: the base model is its own teacher, and only
the new rows move (tools.expand_vocab --warmup-steps).

Why. Rows that start as the mean of their pieces' rows read badly: measured on SmolLM2-135M widened with the bundled
Chinese, held-out Chinese went from 7.49 to 10.33 bits per character, while English (ids unchanged) held. The model
has to learn what a new token means before training can use it.

What trains. Only rows first_id.. of the embedding (for a tied model the same rows are its output rows; an untied
model's new output rows train too). Every other weight is not given to the optimizer, and the old rows are copied
back after each step, so after the warm-up every old row and every other weight is bit-identical to before.

The loss, on each chunk of the widening corpus, tokenized both ways:
- distillation: at each point of the text where a token of the OLD tokenization and a token of the NEW one end at
  the same byte, the two models have read the same text. The teacher (the model reading the old tokens) gives a
  distribution over the old vocabulary for what follows; the student (the same model reading the new tokens) is
  pulled to give the same one over the old vocabulary: KL(teacher || student restricted to the old ids). This
  teaches the new input rows to put the model where the old pieces put it.
- language modelling: the ordinary next-token loss of the student on the new tokens, over the whole vocabulary. This
  teaches the new output rows to win where their text comes next, and only there.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from llama.text_units import TextUnits


@dataclass
class Chunk:
    old: list[int]  # the chunk under the old tokenizer
    new: list[int]  # under the widened one
    old_pos: list[int]  # aligned points: old token old_pos[k] and new token new_pos[k] end at the same byte
    new_pos: list[int]


def chunks_of(texts: list[str], old_tok, new_tok, chars: int) -> list[Chunk]:
    """The texts cut into pieces of at most `chars` characters, each tokenized both ways, with its aligned points."""
    pieces = [text[start:start + chars] for text in texts for start in range(0, len(text), chars)]
    pieces = [p for p in pieces if p.strip()]
    old_units, new_units = TextUnits.of(old_tok), TextUnits.of(new_tok)
    chunks = []
    for piece, old, new in zip(pieces, old_tok.encode_batch(pieces), new_tok.encode_batch(pieces)):
        if len(old) < 2 or len(new) < 2:
            continue
        old_ends = np.cumsum(old_units.bytes_per_id[old])
        new_ends = np.cumsum(new_units.bytes_per_id[new])
        common, old_pos, new_pos = np.intersect1d(old_ends, new_ends, assume_unique=False, return_indices=True)
        chunks.append(Chunk(old, new, old_pos.tolist(), new_pos.tolist()))
    return chunks


def _pad(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], dtype=torch.long)  # (bs, width)


def chunk_loss(model, params: dict, batch: list[Chunk], first_id: int, pad_id: int, device) -> tuple:
    """(distillation KL per aligned point, LM loss per new token) of one batch; the student reads `params`."""
    old = _pad([c.old for c in batch], pad_id).to(device)  # (bs, L_old)
    new = _pad([c.new for c in batch], pad_id).to(device)  # (bs, L_new)
    rows = torch.tensor([b for b, c in enumerate(batch) for _ in c.old_pos], device=device)
    with torch.no_grad():
        teacher = model(old)[1]  # (bs, L_old, vocab)
        old_pos = torch.tensor([p for c in batch for p in c.old_pos], device=device)
        target = teacher[rows, old_pos, :first_id].log_softmax(-1)  # (points, old vocab)
        del teacher
    student = functional_call(model, params, (new,))[1]  # (bs, L_new, vocab)
    new_pos = torch.tensor([p for c in batch for p in c.new_pos], device=device)
    guess = student[rows, new_pos, :first_id].log_softmax(-1)  # (points, old vocab)
    kl = F.kl_div(guess, target, log_target=True, reduction="sum") / len(rows)
    lengths = torch.tensor([len(c.new) for c in batch], device=device)
    counted = torch.arange(new.shape[1] - 1, device=device)[None, :] < (lengths[:, None] - 1)  # (bs, L_new - 1)
    lm = F.cross_entropy(student[:, :-1][counted], new[:, 1:][counted])
    return kl, lm


def warm_up(model, old_tok, new_tok, texts: list[str], first_id: int, steps: int, lr: float, batch_size: int = 8,
            chunk_chars: int = 96, lm_weight: float = 1.0, seed: int = 0, device="cpu", log=print) -> list[dict]:
    """Train the new rows (first_id..) of `model` in place for `steps` Adam steps; returns one record per step."""
    chunks = chunks_of(texts, old_tok, new_tok, chunk_chars)
    if not chunks:
        raise ValueError("new-token warm-up: no text to warm up on")
    for p in model.parameters():
        p.requires_grad_(False)
    names = ["tok_embeddings.weight"] + ([] if model.config.tie_word_embeddings else ["output.weight"])
    state = dict(model.named_parameters())
    fixed = {name: state[name][:first_id].detach().clone() for name in names}  # the old rows, to copy back
    new_rows = {name: state[name][first_id:].detach().clone().float().requires_grad_() for name in names}
    optimizer = torch.optim.Adam(new_rows.values(), lr=lr)
    rng = random.Random(seed)
    order: list[int] = []
    records = []
    model.eval()  # no dropout: teacher and student are the same function of their inputs
    for step in range(1, steps + 1):
        start = time.perf_counter()
        if len(order) < batch_size:
            order += rng.sample(range(len(chunks)), len(chunks))
        batch, order = [chunks[i] for i in order[:batch_size]], order[batch_size:]
        params = {name: torch.cat([fixed[name], new_rows[name].to(fixed[name].dtype)]) for name in names}
        kl, lm = chunk_loss(model, params, batch, first_id, new_tok.pad_id, device)
        loss = kl + lm_weight * lm
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        records.append({"step": step, "kl": float(kl), "lm": float(lm), "seconds": time.perf_counter() - start})
        log(f"new-token warm-up step {step}/{steps}: distillation {float(kl):.4f}, LM {float(lm):.4f} "
            f"({records[-1]['seconds']:.1f} s)")
    with torch.no_grad():
        for name in names:
            state[name][first_id:] = new_rows[name].to(state[name].dtype)
            state[name][:first_id] = fixed[name]  # unchanged; written back so that exactness never rests on autograd
    return records
