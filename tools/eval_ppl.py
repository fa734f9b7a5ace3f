"""Perplexity of a model dir on held-out texts, overall and per language: BiLLa's language-model metric.

    python -m tools.eval_ppl --model outputs/pretrain/final --data heldout.jsonl --batch-size 8 --device cuda
    python -m tools.eval_ppl --model DIR --data heldout.jsonl --conditional     # second half given the first

The data is JSONL, one {"text": ..., "lang": ...} per line ("lang" optional: without it a text with at least 20%
CJK characters counts as "zh", any other as "en"). Each text becomes bos + its tokens, cut to --max-seq-length
(default: the model's context). Every text token counts, each predicted from what comes before it; with
--conditional only the second half of the text's tokens counts (the first n//2 are the condition), as the BiLLa
authors evaluated on Pile and WuDao. A line may also be a stage-3 record ({"messages": [...]} or {"instruction",
"input", "output"}): it is rendered in the chat format stored with the model dir (chat_format.json; "billa" when
there is none) exactly as stage 3 renders it, and only its answers and their end tokens count; one longer than the
maximum length loses its earliest turns as in training. Perplexity = exp(total loss / counted tokens), over all texts
and per language. The loss is the model's own loss_mask path; a batch holds texts of one language, so its mean loss
times its counted tokens is exactly that language's share of the sum.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from llama.chat_template import stored_chat_format
from llama.pretrained import DTYPES, load_pretrained
from tools.chat_format import sft_record_chat
from tools.text_stats import detect_language
from training.batching import pad_batch
from training.conversation import Chat, ChatRenderer
from training.corpus import RecordError, parse_record, text_field
from training.samples import Sample



@dataclass
class Text:
    lang: str
    ids: list[int]  # bos + text tokens, already cut to the maximum length
    n_context: int  # the first n_context ids (bos included) are not counted
    counted: tuple | None = None  # a conversation: the counted spans (its answers), as training counts them


@dataclass
class Figures:
    texts: int = 0
    tokens: int = 0  # counted targets
    loss_sum: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.tokens if self.tokens else float("nan")

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if self.tokens else float("nan")


def read_texts(path: Path) -> list[tuple[str | Chat, str]]:
    """(text or stage-3 conversation, lang) per non-blank line; lang from the "lang" field or from the script. A
    conversation whose answer is empty is left out, as stage 3 skips it."""
    items = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = parse_record(raw)
                if "text" in record or not ({"messages", "instruction", "output"} & set(record)):
                    text = text_field(record, "text")
                    script = text
                else:
                    text = sft_record_chat(record)
                    if text is None:
                        continue
                    script = " ".join(message["content"] for message in text.messages())
                lang = record.get("lang")
                if lang is not None and (not isinstance(lang, str) or not lang.strip()):
                    raise RecordError(f"field 'lang' must be a non-empty string, got {lang!r}")
            except RecordError as e:
                raise ValueError(f"{path}:{number}: {e}") from None
            items.append((text, lang.strip() if lang else detect_language(script)))
    return items


def prepare_chats(renderer: ChatRenderer, items: list[tuple[Chat, str]], max_seq_length: int, notes: dict
                  ) -> list[Text]:
    """Conversations as stage 3 builds them (ChatRenderer.fit: earliest turns dropped to fit)."""
    texts = []
    for chat, lang in items:
        fitted = renderer.fit(chat, max_seq_length)
        if fitted is None:
            notes["too_long"] += 1
            continue
        ids, spans, dropped = fitted
        notes["dropped_turns"] += dropped
        texts.append(Text(lang, ids, spans[0][0], tuple(spans)))
    return texts


def prepare_texts(tokenizer, items: list[tuple[str | Chat, str]], max_seq_length: int, conditional: bool,
                  chat_format: str = "billa") -> tuple[list[Text], dict]:
    """Tokenized texts (and conversations, in chat_format) to score, and counts of what was cut or left out."""
    notes = {"truncated": 0, "too_short": 0, "too_long": 0, "dropped_turns": 0}
    chats = [(chat, lang) for chat, lang in items if isinstance(chat, Chat)]
    items = [(text, lang) for text, lang in items if not isinstance(text, Chat)]
    texts = prepare_chats(ChatRenderer(tokenizer, chat_format), chats, max_seq_length, notes) if chats else []
    encoded = tokenizer.encode_batch([text for text, _ in items], bos=True)  # bos where the tokenizer adds one
    for (_, lang), ids in zip(items, encoded):
        if len(ids) > max_seq_length:
            notes["truncated"] += 1
            ids = ids[:max_seq_length]
        n = len(ids) - 1  # tokens with one before them: the text's (after bos), or all but the first
        n_context = 1 + n // 2 if conditional else 1
        if n < (2 if conditional else 1):
            notes["too_short"] += 1  # nothing (or no condition) to count
            continue
        texts.append(Text(lang, ids, n_context))
    return texts, notes


@torch.no_grad()
def evaluate(model, texts: list[Text], batch_size: int, pad_id: int, device, show_progress: bool = False
             ) -> dict[str, Figures]:
    """{language: Figures} plus "all"; batches never mix languages (see the module docstring)."""
    model.eval()
    figures: dict[str, Figures] = {}
    by_lang: dict[str, list[Text]] = {}
    for text in texts:
        by_lang.setdefault(text.lang, []).append(text)
    bar = tqdm(total=len(texts), unit="text", desc="ppl", disable=not show_progress, file=sys.stderr)
    for lang, group in sorted(by_lang.items()):
        group = sorted(group, key=lambda t: len(t.ids), reverse=True)  # similar lengths share a batch: less padding
        fig = figures.setdefault(lang, Figures())
        for start in range(0, len(group), batch_size):
            batch = group[start:start + batch_size]
            padded = pad_batch([Sample(text.ids, text.n_context, counted=text.counted) for text in batch],
                               pad_id)  # as training pads
            loss, _ = model(padded["input_ids"].to(device), loss_mask=padded["loss_mask"].to(device))
            counted = padded["num_target_tokens"]
            fig.loss_sum += float(loss) * counted
            fig.tokens += counted
            fig.texts += len(batch)
            bar.update(len(batch))
    bar.close()
    total = Figures(sum(f.texts for f in figures.values()), sum(f.tokens for f in figures.values()),
                    sum(f.loss_sum for f in figures.values()))
    return {**figures, "all": total}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.eval_ppl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="model dir (config.json, weights, tokenizer.model)")
    p.add_argument("--data", required=True, type=Path, help='JSONL of {"text": ..., "lang": ...}')
    p.add_argument("--tokenizer", type=Path, help="tokenizer.model (default: the model dir's)")
    p.add_argument("--conditional", action="store_true", help="count only the second half of each text's tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-length", type=int, help="tokens per text, bos included (default: the model's context)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def run(args: argparse.Namespace, out=None) -> dict[str, Figures]:
    out = out or sys.stdout
    model, tokenizer = load_pretrained(args.model, DTYPES[args.dtype], args.device, args.tokenizer)
    max_len = args.max_seq_length or model.config.max_sequence_length
    if not 2 <= max_len <= model.config.max_sequence_length:
        raise ValueError(f"--max-seq-length {max_len}: must be in 2..{model.config.max_sequence_length} "
                         f"(the model's max_sequence_length)")
    texts, notes = prepare_texts(tokenizer, read_texts(args.data), max_len, args.conditional,
                                 stored_chat_format(args.model))
    if not texts:
        raise ValueError(f"{args.data}: no text to score")
    figures = evaluate(model, texts, args.batch_size, tokenizer.pad_id, args.device, show_progress=not args.quiet)
    mode = "conditional (second half given the first)" if args.conditional else "all tokens"
    print(f"perplexity of {args.model} on {args.data}: {mode}, max {max_len} tokens per text", file=out)
    print(f"{'lang':<8}{'texts':>8}{'tokens':>12}{'loss':>10}{'ppl':>12}", file=out)
    for lang, fig in figures.items():
        print(f"{lang:<8}{fig.texts:>8}{fig.tokens:>12,}{fig.loss:>10.4f}{fig.ppl:>12.3f}", file=out)
    if notes["truncated"] or notes["too_short"]:
        print(f"note: {notes['truncated']} text(s) cut to {max_len} tokens, {notes['too_short']} too short to score",
              file=out)
    if notes["too_long"] or notes["dropped_turns"]:
        print(f"note: conversations: {notes['dropped_turns']} earliest turn(s) dropped to fit {max_len} tokens, "
              f"{notes['too_long']} left out (too long even so)", file=out)
    if args.json:
        args.json.write_text(json.dumps({lang: {"texts": f.texts, "tokens": f.tokens, "loss": f.loss, "ppl": f.ppl}
                                         for lang, f in figures.items()}, indent=2) + "\n", encoding="utf-8")
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"eval_ppl: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
