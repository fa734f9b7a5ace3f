"""What a vocabulary widening costs a model, on a scale that does not change with the tokenizer, and where the cost
lies: a base model dir and its widened copy (tools.expand_vocab) scored on the same held-out texts.

    python bench/widening.py --base outputs/demo/smollm2 --widened outputs/demo/smollm2-zh \
        --data heldout_zh_en.jsonl

Prints one JSON line:
  base, widened            {lang: {bits_per_char, bits_per_byte, tokens_per_char}}; the base reads its own tokens,
                           the widened model the widened tokenizer's
  widened_old_tokens       the widened model reading the OLD tokenization (its new output rows still in the
                           softmax): bits/char over the base's own figure is what the new rows cost by competing alone
  zh_split                 the widened model's zh bits/char split by position: target_new / target_old (the target is
                           a new / an old token: predicting new tokens) and input_new / input_old (the token read
                           there is new / old: reading new tokens); each pair sums to the whole
  answer_zh                the greedy answer of each model to --prompt in the tokenizer's chat template (BiLLa's
                           turns when it has none), and its CJK
                           share (CJK characters over visible ones)
  seconds                  wall seconds of each model's scoring (one forward per text, no batching) and answer
Target (issue 18): widened en bits/byte within 0.5% of the base's, zh bits/char within 10%, a Chinese answer.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llama.pretrained import load_pretrained  # noqa: E402
from llama.text_units import TextUnits  # noqa: E402
from tools.chat import ChatSession  # noqa: E402
from tools.eval_ppl import read_texts  # noqa: E402
from tools.text_stats import cjk_share  # noqa: E402
from training.evaluation import bits_per  # noqa: E402


@torch.no_grad()
def token_losses(model, ids: list[int]) -> torch.Tensor:
    """Nats of each token after the first, predicted from those before it: (len(ids) - 1,)."""
    tokens = torch.tensor([ids], device=model.output.weight.device)  # (1, L)
    _, logits = model(tokens)  # (1, L, vocab)
    return F.cross_entropy(logits[0, :-1], tokens[0, 1:], reduction="none").cpu()


def score(model, tokenizer, texts: dict[str, list[str]], first_new_id: int | None = None) -> dict:
    """{lang: figures} of the model reading texts in tokenizer's tokens; with first_new_id, zh also gets its split
    by positions whose target / input id is at or above it."""
    units = TextUnits.of(tokenizer)
    figures = {}
    for lang, group in texts.items():
        nats, n_bytes, n_chars, n_tokens = 0.0, 0, 0, 0
        split = {"target_new": 0.0, "target_old": 0.0, "input_new": 0.0, "input_old": 0.0}
        for ids in tokenizer.encode_batch(group, bos=True):
            losses = token_losses(model, ids)  # (L - 1,)
            targets, inputs = torch.tensor(ids[1:]), torch.tensor(ids[:-1])  # (L - 1,) each
            nats += float(losses.sum())
            b, c = units.count(ids[1:])
            n_bytes, n_chars, n_tokens = n_bytes + b, n_chars + c, n_tokens + len(ids) - 1
            if first_new_id is not None:
                for side, which in (("target", targets), ("input", inputs)):
                    split[f"{side}_new"] += float(losses[which >= first_new_id].sum())
                    split[f"{side}_old"] += float(losses[which < first_new_id].sum())
        figures[lang] = {"bits_per_char": bits_per(nats, n_chars), "bits_per_byte": bits_per(nats, n_bytes),
                         "tokens_per_char": n_tokens / n_chars}
        if first_new_id is not None and lang == "zh":
            figures["zh_split"] = {key: bits_per(value, n_chars) for key, value in split.items()}
    return figures


def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    chat_format = "template" if tokenizer.chat_template else "billa"  # the model's own turns where it has them
    return ChatSession(model, tokenizer, max_new_tokens, temperature=0.0, chat_format=chat_format).reply(prompt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, type=Path, help="the model dir before widening")
    p.add_argument("--widened", required=True, type=Path, help="its widened copy (tools.expand_vocab --output)")
    p.add_argument("--data", type=Path, default=None, help="held-out JSONL (tools.eval_ppl's format; default: "
                   "heldout_corpora/zh and /en)")
    p.add_argument("--prompt", default="请用一句话介绍北京。")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    paths = [args.data] if args.data else sorted((REPO / "heldout_corpora").glob("[ze][hn]/*.jsonl"))
    texts: dict[str, list[str]] = {}
    for path in paths:
        for text, lang in read_texts(path):
            if isinstance(text, str):
                texts.setdefault(lang, []).append(text)
    result = {"seconds": {}, "answer_zh": {}}
    base, base_tok = load_pretrained(args.base)
    widened, widened_tok = load_pretrained(args.widened)
    first_new_id = base_tok.vocab_size
    for name, model, tokenizer, first in (("base", base, base_tok, None), ("widened", widened, widened_tok,
                                                                           first_new_id)):
        start = time.perf_counter()
        result[name] = score(model, tokenizer, texts, first)
        result["seconds"][f"{name}_score"] = time.perf_counter() - start
        start = time.perf_counter()
        answer = greedy_answer(model, tokenizer, args.prompt, args.max_new_tokens)
        result["seconds"][f"{name}_answer"] = time.perf_counter() - start
        result["answer_zh"][name] = {"text": answer, "cjk_share": cjk_share(answer)}
    start = time.perf_counter()
    result["widened_old_tokens"] = score(widened, base_tok, {"zh": texts["zh"]} if "zh" in texts else texts)
    result["seconds"]["widened_old_tokens_score"] = time.perf_counter() - start
    result["zh_split"] = result["widened"].pop("zh_split", None)
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
