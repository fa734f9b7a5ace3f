"""The model inputs of a run, checked before anything large is allocated (the engine builds the model from them).

check_model_inputs reads only config.json, the tokenizer and the weight index, so a wrong path, a tokenizer that does
not fit the embedding, or a max_seq_length the model cannot take stops the run in seconds, before the data is built
and before any model memory exists.
"""
from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from llama.configuration_llama import CONFIG_NAME, LlamaConfig
from llama.model_files import TOKENIZER_JSON_NAME, TOKENIZER_NAME, weight_files
from llama.tokenizer import Tokenizer, check_tokenizer_matches
from llama.tokenizer_files import load_tokenizer, tokenizer_file
from training.new_rows import NewRowsError, first_new_row
from training.settings_concerns import ModelSettings, Settings

logger = logging.getLogger(__name__)


class ModelInputError(ValueError):
    """init_model_path / tokenizer_path / max_seq_length do not describe a model this run can train."""


@dataclass
class ModelInputs:
    config: LlamaConfig  # as it will be trained (the run's dropout_prob); saved into every checkpoint
    tokenizer: Tokenizer  # with the run's end token (eos_token); saved into every checkpoint
    tokenizer_path: Path
    new_rows_from: int = 0  # new_rows_only=True: the first row expand_vocab added (training/new_rows.py); 0: off


def resolved_tokenizer_path(settings: ModelSettings) -> Path:
    """tokenizer_path (a tokenizer.model or tokenizer.json), or when it is empty init_model_path's tokenizer file
    (tokenizer.model, else tokenizer.json). FileNotFoundError naming the setting when there is none."""
    try:
        return tokenizer_file(settings.tokenizer_path or settings.init_model_path)
    except FileNotFoundError as e:
        which = "tokenizer_path" if settings.tokenizer_path else "init_model_path (tokenizer_path is empty)"
        raise FileNotFoundError(f"{which}: {e}") from None


def check_model_inputs(run: Settings) -> ModelInputs:
    settings = run.model
    init = Path(settings.init_model_path)
    if not init.is_dir():
        raise ModelInputError(
            f"init_model_path={settings.init_model_path!r}: no such model directory. It must hold config.json, "
            f"{TOKENIZER_NAME} or {TOKENIZER_JSON_NAME}, and safetensors weights (this repo's format or a "
            f"transformers LLaMA dir); stages 2 and 3 start from the previous stage's <output_dir>/final")
    try:
        config = LlamaConfig.from_pretrained(init)
        weight_files(init)
    except (FileNotFoundError, ValueError) as e:
        raise ModelInputError(f"init_model_path={settings.init_model_path!r}: {e}") from None
    try:
        tokenizer_path = resolved_tokenizer_path(settings)
        tokenizer = load_tokenizer(tokenizer_path, settings.eos_token)
    except (FileNotFoundError, ValueError) as e:  # a missing file, or an eos_token not in the vocabulary
        raise ModelInputError(str(e)) from None
    try:
        check_tokenizer_matches(config, tokenizer)
    except ValueError as e:
        raise ModelInputError(f"tokenizer_path / init_model_path: {e}") from None
    _end_with(config, tokenizer)
    try:  # the model's length, and a sliding window (Mistral, Qwen) that would cut the run's sequences
        config.check_sequence_length(run.data.max_seq_length, "max_seq_length", str(init / CONFIG_NAME))
    except ValueError as e:
        raise ModelInputError(str(e)) from None
    config.dropout_prob = float(settings.dropout_prob)
    try:
        new_rows_from = first_new_row(init, config.vocab_size) if run.optimisation.new_rows_only else 0
    except NewRowsError as e:
        raise ModelInputError(str(e)) from None
    return ModelInputs(config, tokenizer, tokenizer_path, new_rows_from)


def _end_with(config: LlamaConfig, tokenizer) -> None:
    """With eos_token set to another token than the model's eos, the run teaches the model to end with it: the
    config saved with every checkpoint says so, and so does the tokenizer's (Tokenizer.save), so that the next stage,
    chat and generation stop there."""
    listed = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    if tokenizer.eos_id not in listed:
        logger.info("eos_token %r (id %d): documents and answers end with it; the saved config's eos_token_id "
                    "becomes it (was %s)", tokenizer.eos_token, tokenizer.eos_id, config.eos_token_id)
        config.eos_token_id = [tokenizer.eos_id, *listed] if isinstance(config.eos_token_id, list) else tokenizer.eos_id


def log_host_memory(what: str) -> None:
    """Collective: each process's resident and peak host memory, in one rank-0 line."""
    import psutil

    usage = (psutil.Process().memory_info().rss / 2**30, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    every = [usage] * dist.get_world_size()
    dist.all_gather_object(every, usage)
    if dist.get_rank() == 0:
        logger.info("host memory %s, GiB resident / peak: %s", what,
                    ", ".join(f"rank {rank} {rss:.2f} / {peak:.2f}" for rank, (rss, peak) in enumerate(every)))
