"""Text generation with a KV cache: greedy, temperature, top-p, stop at eos. Works on any device the model is on."""
from __future__ import annotations

from typing import Iterator

import torch

from llama.llama_model import Llama


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> int:
    """One token id from fp32 logits (vocab,): argmax at temperature 0, else nucleus sampling (Meta's rule)."""
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    sorted_probs, order = torch.sort(probs, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (the top token is always kept).
    sorted_probs[torch.cumsum(sorted_probs, dim=-1) - sorted_probs > top_p] = 0.0
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])


def stream(model: Llama, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
           eos_id: int | None = None, use_cache: bool = True,
           generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield new token ids one by one; stops at eos (not yielded), after max_new_tokens, or at the model's
    max_sequence_length. The model runs in eval mode meanwhile (no dropout) and is put back as it was."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: start with at least the bos id")
    max_len = model.config.max_sequence_length
    if len(prompt_ids) >= max_len:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in max_sequence_length {max_len}")
    total = min(max_len, len(prompt_ids) + max_new_tokens)
    device = model.output.weight.device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            tokens = list(prompt_ids)
            cache = model.new_cache(1, total) if use_cache else None
            pos = 0
            while len(tokens) < total:
                if cache is not None:
                    new = torch.tensor([tokens[pos:]], dtype=torch.long, device=device)  # (1, L_new)
                    logits = model.forward_with_cache(new, cache, pos)[0]  # (vocab,)
                    pos = len(tokens)
                else:
                    _, all_logits = model(torch.tensor([tokens], dtype=torch.long, device=device))
                    logits = all_logits[0, -1]  # (vocab,)
                next_id = sample_next(logits, temperature, top_p, generator)
                if eos_id is not None and next_id == eos_id:
                    return
                tokens.append(next_id)
                yield next_id
    finally:
        model.train(was_training)


def generate(model: Llama, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             eos_id: int | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None) -> list[int]:
    """New token ids only (eos not included); see stream()."""
    return list(stream(model, prompt_ids, max_new_tokens, temperature, top_p, eos_id, use_cache, generator))
