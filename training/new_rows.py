"""A warm-up that trains only the vocabulary rows tools.expand_vocab added (new_rows_only=True).

Widening gives each new token an embedding row (and output row) that is a guess: the mean of the rows of the old
pieces that spell it. Chinese-LLaMA's first pretraining stage trained the embeddings alone, with the rest of the
model frozen, before anything else moved; EEVE (Kim et al. 2024) unfreezes in stages the same way. Here the new rows
alone train, in a run of its own from the widened model, before stage 1:

    torchrun ... pretrain_main.py init_model_path=models/llama-7b-zh new_rows_only=True lr=1e-4 max_steps=2000 \
        output_dir=outputs/new_rows
    torchrun ... pretrain_main.py init_model_path=outputs/new_rows/final          (stage 1 as usual)

How the freeze is exact, under every engine:
- every parameter except tok_embeddings.weight and an untied output.weight gets requires_grad=False before boost:
  the optimizer never holds them (ZeRO keeps them as ddp-ignored, GeminiDDP._init_chunks), so they cannot move;
- in those two matrices the old rows get a gradient of exactly zero (Llama.frozen_rows: positions reading an old
  token pass no gradient to its row, and the loss sees the output matrix through a torch.where that stops it at old
  rows), and weight decay is off for the run (parameter_groups): decoupled decay would shrink them even so. Adam's
  update of a row whose gradients were always zero is 0 / (0 + eps) = 0.

The first new row is read from the report expand_vocab writes into the model dir (NEW_ROWS_REPORT), so it cannot be
mistyped.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from llama.llama_model import Llama

logger = logging.getLogger(__name__)

NEW_ROWS_REPORT = "expand_vocab.json"  # tools.expand_vocab's report, written beside the model it widened


class NewRowsError(ValueError):
    """new_rows_only=True cannot run on this model dir; the message names the file and what to do."""


def first_new_row(model_dir: str | Path, vocab_size: int) -> int:
    """The first row tools.expand_vocab added to the model in `model_dir`."""
    path = Path(model_dir) / NEW_ROWS_REPORT
    where = f"new_rows_only=True: {path}"
    if not path.is_file():
        raise NewRowsError(f"{where} does not exist. tools.expand_vocab writes it beside the widened model, naming "
                           f"the rows it added; start this run from the dir expand_vocab wrote")
    try:
        first = json.loads(path.read_text(encoding="utf-8"))["first_new_row"]
    except (ValueError, KeyError, TypeError) as e:
        raise NewRowsError(f"{where}: expected a JSON object with an integer 'first_new_row' ({e!r})") from None
    if not isinstance(first, int) or not 0 < first < vocab_size:
        raise NewRowsError(f"{where}: first_new_row={first!r} names no added row of this model (vocab_size "
                           f"{vocab_size}): there is nothing to train")
    return first


def train_new_rows_only(model: Llama, first_row: int) -> None:
    """Freeze `model` but for rows first_row.. of its embedding and output (between build_model and boost)."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.tok_embeddings.weight.requires_grad_(True)
    model.output.weight.requires_grad_(True)  # the same parameter when tied
    model.frozen_rows = first_row
    vocab = model.config.vocab_size
    logger.info("new_rows_only: rows %d..%d of %s train (%d new tokens); the other %d rows and every other weight are "
                "frozen, weight decay off", first_row, vocab - 1,
                "the tied embedding" if model.config.tie_word_embeddings else "the embedding and output",
                vocab - first_row, first_row)
