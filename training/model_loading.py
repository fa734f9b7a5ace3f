"""The model inputs of a run: checked before anything large is allocated, then the model itself.

check_model_inputs reads only config.json, the tokenizer and the weight index, so a wrong path, a tokenizer that does
not fit the embedding, or a max_seq_length the model cannot take stops the run in seconds, before the data is built
and before any model memory exists.
"""
from __future__ import annotations

import itertools
import json
import logging
import resource
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from llama.configuration_llama import CONFIG_NAME, LlamaConfig
from llama.llama_model import Llama
from llama.model_files import TOKENIZER_JSON_NAME, TOKENIZER_NAME, is_transformers_dir, weight_files
from llama.tokenizer import Tokenizer, check_tokenizer_matches
from llama.tokenizer_files import load_tokenizer, tokenizer_file
from llama.weight_layouts import llama_tensors

logger = logging.getLogger(__name__)


class ModelInputError(ValueError):
    """init_model_path / tokenizer_path / max_seq_length do not describe a model this run can train."""


@dataclass
class ModelInputs:
    config: LlamaConfig  # as it will be trained (the run's dropout_prob); saved into every checkpoint
    tokenizer: Tokenizer  # with the run's end token (eos_token); saved into every checkpoint
    tokenizer_path: Path


def resolved_tokenizer_path(settings) -> Path:
    """tokenizer_path (a tokenizer.model or tokenizer.json), or when it is empty init_model_path's tokenizer file
    (tokenizer.model, else tokenizer.json). FileNotFoundError naming the setting when there is none."""
    try:
        return tokenizer_file(settings.tokenizer_path or settings.init_model_path)
    except FileNotFoundError as e:
        which = "tokenizer_path" if settings.tokenizer_path else "init_model_path (tokenizer_path is empty)"
        raise FileNotFoundError(f"{which}: {e}") from None


def check_model_inputs(settings) -> ModelInputs:
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
        tokenizer = load_tokenizer(tokenizer_path, getattr(settings, "eos_token", ""))
    except (FileNotFoundError, ValueError) as e:  # a missing file, or an eos_token not in the vocabulary
        raise ModelInputError(str(e)) from None
    try:
        check_tokenizer_matches(config, tokenizer)
    except ValueError as e:
        raise ModelInputError(f"tokenizer_path / init_model_path: {e}") from None
    _end_with(config, tokenizer)
    try:  # the model's length, and a sliding window (Mistral, Qwen) that would cut the run's sequences
        config.check_sequence_length(settings.max_seq_length, "max_seq_length", str(init / CONFIG_NAME))
    except ValueError as e:
        raise ModelInputError(str(e)) from None
    config.dropout_prob = float(settings.dropout_prob)
    return ModelInputs(config, tokenizer, tokenizer_path)


def _end_with(config: LlamaConfig, tokenizer) -> None:
    """With eos_token set to another token than the model's eos, the run teaches the model to end with it: the
    config saved with every checkpoint says so, and so does the tokenizer's (Tokenizer.save), so that the next stage,
    chat and generation stop there."""
    listed = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    if tokenizer.eos_id not in listed:
        logger.info("eos_token %r (id %d): documents and answers end with it; the saved config's eos_token_id "
                    "becomes it (was %s)", tokenizer.eos_token, tokenizer.eos_id, config.eos_token_id)
        config.eos_token_id = [tokenizer.eos_id, *listed] if isinstance(config.eos_token_id, list) else tokenizer.eos_id


def load_model(settings, inputs: ModelInputs, dtype: torch.dtype, plugin: str) -> Llama:
    """The model to boost, with the run's dropout and checkpointing. Under ZeRO, from a model dir in this repo's
    format, only its shapes: the weights are read after boost (load_weights_after_boost), so that no process ever
    holds the whole model in host memory. Otherwise the weights straight into `dtype` on CPU (the booster moves
    them)."""
    # inputs.config carries the run's dropout, not the checkpoint's: stage settings decide it (BiLLa trains with 0.05).
    if _loads_after_boost(settings, plugin):
        model = _model_without_weights(inputs.config, dtype, plugin)
    else:
        if plugin in ("gemini", "zero2"):
            logger.warning("init_model_path=%s is a transformers dir: every process converts it whole in host memory; "
                           "convert it once (python -m llama.convert from_hf) to load only each process's share",
                           settings.init_model_path)
        model = Llama.from_pretrained(settings.init_model_path, dtype=dtype, device="cpu", config=inputs.config)
    model.set_gradient_checkpointing(settings.gradient_checkpointing)
    logger.info("gradient checkpointing: %s (%d of %d blocks recomputed in backward)", model.gradient_checkpointing,
                len(model.checkpointed_layers()), inputs.config.num_hidden_layers)
    if plugin == "gemini":
        # Gemini gathers sharded parameters through hooks on ordinary ops (ColoParameter.__torch_function__); the
        # fused loss reads output.weight inside a custom autograd function, which those hooks do not see.
        model.loss_path = "checkpointed"
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model %s: %.1fM parameters, %d layers, dim %d, vocab %d, %s %s", settings.init_model_path,
                n_params / 1e6, inputs.config.num_hidden_layers, inputs.config.hidden_size, inputs.config.vocab_size,
                "to be loaded after boost as" if _loads_after_boost(settings, plugin) else "loaded as",
                str(dtype).replace("torch.", ""))
    return model


def _loads_after_boost(settings, plugin: str) -> bool:
    """ZeRO, and a dir booster.load_model can read: this repo's weight names (a transformers dir is converted on
    load, whole, in every process)."""
    config_path = Path(settings.init_model_path) / CONFIG_NAME
    return plugin in ("gemini", "zero2") and not is_transformers_dir(json.loads(config_path.read_text("utf-8")))


def _model_without_weights(config: LlamaConfig, dtype: torch.dtype, plugin: str) -> Llama:
    from colossalai.accelerator import get_accelerator

    device = get_accelerator().get_current_device()
    if plugin == "gemini":
        # ColossalAI's LazyInitContext: GeminiDDP._preprocess_param materializes one parameter at a time on `device`
        # and moves it into this process's chunks.
        from colossalai.lazy import LazyInitContext

        with LazyInitContext(default_device=device):
            return Llama(config)
    # zero2 clones every parameter into its master shard (LowLevelZeroOptimizer._create_master_param_current_rank),
    # which a LazyTensor cannot do; its working copy is whole on every GPU anyway, so it is allocated there,
    # uninitialised, in the compute dtype.
    with torch.device("meta"):
        model = Llama(config)
    return model.to(dtype).to_empty(device=device)


def load_weights_after_boost(engine, settings, inputs: ModelInputs) -> None:
    """A fresh start's weights, once the model is boosted. Where load_model left it empty, booster.load_model reads
    init_model_path file by file and each process keeps its share (Gemini's chunks; zero2's whole working copy on
    the GPU). Then, under ZeRO, where the source is stored more precisely than the compute dtype, the fp32 master
    weights are written from it: the plugins cloned them from the rounded copy (training/zero_state.py)."""
    init = Path(settings.init_model_path)
    if _loads_after_boost(settings, engine.choice.plugin):
        engine.booster.load_model(engine.model, str(init))
    if engine.choice.zero:
        tensors = llama_tensors(init, inputs.config)
        name, first = next(tensors)
        if first.dtype != engine.choice.load_dtype:  # a model dir holds one dtype: the first tensor tells
            written = engine.masters_from_source(itertools.chain([(name, first)], tensors))
            logger.info("fp32 master weights of %d parameters set from %s's %s weights", written, init,
                        str(first.dtype).replace("torch.", ""))


def log_host_memory(what: str) -> None:
    """Collective: each process's resident and peak host memory, in one rank-0 line."""
    import psutil

    usage = (psutil.Process().memory_info().rss / 2**30, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    every = [usage] * dist.get_world_size()
    dist.all_gather_object(every, usage)
    if dist.get_rank() == 0:
        logger.info("host memory %s, GiB resident / peak: %s", what,
                    ", ".join(f"rank {rank} {rss:.2f} / {peak:.2f}" for rank, (rss, peak) in enumerate(every)))


def compile_blocks_if_allowed(model: Llama, settings, refusal: str | None) -> bool:
    """torch.compile each block (Llama.compile_blocks) when the compile setting asks for it and the engine allows it
    (EngineChoice.compile_refusal); otherwise one log line says why the blocks run eager. True when compiled."""
    if "compile" not in settings or not settings.compile:
        return False
    if refusal:
        logger.info(refusal)
        return False
    model.compile_blocks()
    logger.info("compile: each of the %d blocks compiled with torch.compile (the first steps compile)",
                len(model.layers))
    return True
