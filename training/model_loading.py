"""The model inputs of a run: checked before anything large is allocated, then the model itself.

check_model_inputs reads only config.json, the tokenizer and the weight index, so a wrong path, a tokenizer that does
not fit the embedding, or a max_seq_length the model cannot take stops the run in seconds, before the data is built
and before any model memory exists.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from llama.configuration_llama import LlamaConfig
from llama.llama_model import Llama
from llama.model_files import TOKENIZER_NAME, weight_files
from llama.tokenization_llama import Tokenizer, check_tokenizer_matches

logger = logging.getLogger(__name__)


class ModelInputError(ValueError):
    """init_model_path / tokenizer_path / max_seq_length do not describe a model this run can train."""


@dataclass
class ModelInputs:
    config: LlamaConfig  # as it will be trained (the run's dropout_prob); saved into every checkpoint
    tokenizer: Tokenizer
    tokenizer_path: Path


def resolved_tokenizer_path(settings) -> Path:
    """tokenizer_path, or <init_model_path>/tokenizer.model when it is empty."""
    return Path(settings.tokenizer_path or Path(settings.init_model_path) / TOKENIZER_NAME)


def check_model_inputs(settings) -> ModelInputs:
    init = Path(settings.init_model_path)
    if not init.is_dir():
        raise ModelInputError(
            f"init_model_path={settings.init_model_path!r}: no such model directory. It must hold config.json, "
            f"tokenizer.model and safetensors weights (this repo's format or a transformers LLaMA dir); stages 2 and "
            f"3 start from the previous stage's <output_dir>/final")
    try:
        config = LlamaConfig.from_pretrained(init)
        weight_files(init)
    except (FileNotFoundError, ValueError) as e:
        raise ModelInputError(f"init_model_path={settings.init_model_path!r}: {e}") from None
    tokenizer_path = resolved_tokenizer_path(settings)
    if not tokenizer_path.is_file():
        which = "tokenizer_path" if settings.tokenizer_path else "init_model_path (tokenizer_path is empty)"
        raise ModelInputError(f"{which}: tokenizer not found at {tokenizer_path}")
    tokenizer = Tokenizer(tokenizer_path)
    try:
        check_tokenizer_matches(config, tokenizer)
    except ValueError as e:
        raise ModelInputError(f"tokenizer_path / init_model_path: {e}") from None
    if settings.max_seq_length > config.max_sequence_length:
        raise ModelInputError(f"max_seq_length={settings.max_seq_length} is above the model's max_sequence_length="
                              f"{config.max_sequence_length} ({init / 'config.json'})")
    config.dropout_prob = float(settings.dropout_prob)
    return ModelInputs(config, tokenizer, tokenizer_path)


def load_model(settings, inputs: ModelInputs, dtype: torch.dtype, plugin: str) -> Llama:
    """Weights straight into `dtype` on CPU (the booster moves them), with the run's dropout and checkpointing."""
    # inputs.config carries the run's dropout, not the checkpoint's: stage settings decide it (BiLLa trains with 0.05).
    model = Llama.from_pretrained(settings.init_model_path, dtype=dtype, device="cpu", config=inputs.config)
    model.set_gradient_checkpointing(bool(settings.gradient_checkpointing))
    if plugin == "gemini":
        # Gemini gathers sharded parameters through hooks on ordinary ops (ColoParameter.__torch_function__); the
        # fused loss reads output.weight inside a custom autograd function, which those hooks do not see.
        model.loss_path = "checkpointed"
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model %s: %.1fM parameters, %d layers, dim %d, vocab %d, loaded as %s", settings.init_model_path,
                n_params / 1e6, inputs.config.num_hidden_layers, inputs.config.hidden_size, inputs.config.vocab_size,
                str(dtype).replace("torch.", ""))
    return model
