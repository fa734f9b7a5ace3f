"""Perplexity of a model dir on held-out texts, overall and per language: BiLLa's language-model metric, and bits per
character and per UTF-8 byte, the scale on which models with different tokenizers compare.

    python -m tools.eval_ppl --model outputs/pretrain/final --data heldout.jsonl --batch-size 8 --device cuda
    python -m tools.eval_ppl --model DIR --data heldout.jsonl --conditional     # second half given the first
    python -m tools.eval_ppl --model base --model widened --model outputs/pretrain/final --data heldout.jsonl \
        --chart bits.png                                                        # several models, one table

Bits per character (byte) = the summed loss of the counted tokens / ln 2 / the characters (UTF-8 bytes) of the text
those tokens spell (llama.text_units: exact where a character spans tokens; SentencePiece's dummy-prefix space counts
as one character of each text). Per token, a widened vocabulary changes what a token is; per character it does not:
a base, its widened copy and each stage's final read on one scale. With several --model the texts are the same, each
tokenized by its model's tokenizer; one more table then gives, per model (rows), bits/char, bits/byte and tokens per
character of each language, and --chart draws bits/char per language as bars.

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
from llama.text_units import TextUnits
from tools.chat_format import sft_record_chat
from tools.text_stats import detect_language
from training.batching import pad_batch
from training.conversation import Chat, ChatRenderer
from training.corpus import RecordError, parse_record, text_field
from training.evaluation import bits_per
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
    bytes: int = 0  # UTF-8 bytes of the text the counted targets spell
    chars: int = 0  # its characters

    @property
    def loss(self) -> float:
        return self.loss_sum / self.tokens if self.tokens else float("nan")

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return bits_per(self.loss_sum, self.bytes)

    @property
    def bits_per_char(self) -> float:
        return bits_per(self.loss_sum, self.chars)

    @property
    def tokens_per_char(self) -> float:
        return self.tokens / self.chars if self.chars else float("nan")

    def row(self) -> dict:
        return {"texts": self.texts, "tokens": self.tokens, "loss": self.loss, "ppl": self.ppl, "bytes": self.bytes,
                "chars": self.chars, "bits_per_byte": self.bits_per_byte, "bits_per_char": self.bits_per_char,
                "tokens_per_char": self.tokens_per_char}


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
def evaluate(model, texts: list[Text], batch_size: int, pad_id: int, device, units: TextUnits,
             show_progress: bool = False) -> dict[str, Figures]:
    """{language: Figures} plus "all"; batches never mix languages (see the module docstring). units: the text
    each id spells, for bits per byte and character."""
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
            targets = padded["input_ids"][:, 1:][padded["loss_mask"][:, 1:].bool()]  # the counted tokens, (counted,)
            n_bytes, n_chars = units.count(targets.numpy())
            fig.bytes += n_bytes
            fig.chars += n_chars
            fig.texts += len(batch)
            bar.update(len(batch))
    bar.close()
    total = Figures(*(sum(getattr(f, key) for f in figures.values())
                      for key in ("texts", "tokens", "loss_sum", "bytes", "chars")))
    return {**figures, "all": total}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.eval_ppl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, action="append", help="model dir (config.json, weights, "
                   "tokenizer); several: one table compares them on the same texts")
    p.add_argument("--data", required=True, type=Path, help='JSONL of {"text": ..., "lang": ...}')
    p.add_argument("--tokenizer", type=Path, help="tokenizer.model or .json (default: the model dir's; one --model "
                   "only)")
    p.add_argument("--chart", type=Path, help="also draw bits per character per language and model as a PNG")
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
    if args.tokenizer is not None and len(args.model) > 1:
        p.error("--tokenizer goes with one --model (each of several models reads with its own tokenizer)")
    if len(set(args.model)) < len(args.model):
        p.error("a --model is given twice")
    return args


def run(args: argparse.Namespace, out=None) -> dict[str, dict[str, Figures]]:
    """{model dir as given: {language: Figures}}, printed per model and, for several, compared in one table."""
    out = out or sys.stdout
    items = read_texts(args.data)
    results = {str(path): score_model(args, path, items, out) for path in args.model}
    if len(results) > 1:
        print_comparison(results, out)
    if args.chart:
        draw_chart(results, args.chart)
        print(f"wrote {args.chart}", file=out)
    if args.json:
        args.json.write_text(json.dumps({name: {lang: f.row() for lang, f in figures.items()}
                                         for name, figures in results.items()}, indent=2) + "\n", encoding="utf-8")
    return results


def score_model(args: argparse.Namespace, path: Path, items: list, out) -> dict[str, Figures]:
    model, tokenizer = load_pretrained(path, DTYPES[args.dtype], args.device, args.tokenizer)
    max_len = args.max_seq_length or model.config.max_sequence_length
    if not 2 <= max_len <= model.config.max_sequence_length:
        raise ValueError(f"--max-seq-length {max_len}: must be in 2..{model.config.max_sequence_length} "
                         f"(the model's max_sequence_length)")
    texts, notes = prepare_texts(tokenizer, items, max_len, args.conditional, stored_chat_format(path))
    if not texts:
        raise ValueError(f"{args.data}: no text to score")
    figures = evaluate(model, texts, args.batch_size, tokenizer.pad_id, args.device, TextUnits.of(tokenizer),
                       show_progress=not args.quiet)
    del model
    mode = "conditional (second half given the first)" if args.conditional else "all tokens"
    print(f"perplexity of {path} on {args.data}: {mode}, max {max_len} tokens per text", file=out)
    print(f"{'lang':<8}{'texts':>8}{'tokens':>12}{'loss':>10}{'ppl':>12}{'bits/byte':>11}{'bits/char':>11}"
          f"{'tok/char':>10}", file=out)
    for lang, fig in figures.items():
        print(f"{lang:<8}{fig.texts:>8}{fig.tokens:>12,}{fig.loss:>10.4f}{fig.ppl:>12.3f}{fig.bits_per_byte:>11.4f}"
              f"{fig.bits_per_char:>11.4f}{fig.tokens_per_char:>10.3f}", file=out)
    if notes["truncated"] or notes["too_short"]:
        print(f"note: {notes['truncated']} text(s) cut to {max_len} tokens, {notes['too_short']} too short to score",
              file=out)
    if notes["too_long"] or notes["dropped_turns"]:
        print(f"note: conversations: {notes['dropped_turns']} earliest turn(s) dropped to fit {max_len} tokens, "
              f"{notes['too_long']} left out (too long even so)", file=out)
    return figures


def print_comparison(results: dict[str, dict[str, Figures]], out) -> None:
    """Rows: the models; per language: bits/char, bits/byte, tokens/char."""
    langs = list(dict.fromkeys(lang for figures in results.values() for lang in figures))
    width = max(len("model"), *map(len, results))
    print(f"\n{'':<{width}}" + "".join(f"  {lang + ' bits/char':>13}{'bits/byte':>10}{'tok/char':>9}" for lang in langs),
          file=out)
    for name, figures in results.items():
        print(f"{name:<{width}}" + "".join(
            f"  {f.bits_per_char:>13.4f}{f.bits_per_byte:>10.4f}{f.tokens_per_char:>9.3f}"
            for f in (figures.get(lang, Figures()) for lang in langs)), file=out)


def draw_chart(results: dict[str, dict[str, Figures]], path: Path) -> None:
    """Bits per character, one group of bars per language, one bar per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as Picture

    langs = list(dict.fromkeys(lang for figures in results.values() for lang in figures))
    fig = Picture(figsize=(2 + 1.2 * len(langs) * max(1, len(results)) / 2, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(results)
    for k, (name, figures) in enumerate(results.items()):
        heights = [figures[lang].bits_per_char if lang in figures else 0.0 for lang in langs]
        bars = ax.bar([i + (k - (len(results) - 1) / 2) * width for i in range(len(langs))], heights, width,
                      label=name)
        ax.bar_label(bars, fmt="%.3f", fontsize="x-small")
    ax.set_xticks(range(len(langs)), langs)
    ax.set_ylabel("bits per character")
    ax.legend(fontsize="small")
    ax.grid(True, axis="y", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


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
