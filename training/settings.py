"""Settings: the constants of a `<stage>_args.py` module, with `key=value` command-line overrides, validated.

    settings = load_settings(pretrain_args, ["lr=1e-5", "plugin=zero2"])
    settings.optimisation.lr   # 1e-05: one typed dataclass per concern (training/settings_concerns.py)
    settings.to_dict()         # plain dict, stored in every checkpoint

An override must name an existing setting and keep its type (an int setting takes an int, a float setting an int or
a float, a str setting any text, a dict setting a Python dict literal); anything else is a SettingsError that names
the setting. Values are then checked against the rules below, so a bad value stops the run before any work starts.
A setting the args file leaves out takes its concern's default; a constant no concern holds is a SettingsError.
"""
from __future__ import annotations

import ast
import copy
import logging
import math
import types
from pathlib import Path
from typing import Any, Callable

from llama.chat_template import CHAT_FORMATS
from llama.llama_model import CHECKPOINTING_MODES, checkpointing_mode
from training.engine import ENGINES
from training.settings_concerns import (CONCERN_OF, SHARED_CONCERNS, STAGE_CONCERNS, Settings, SettingsError,
                                        concern_defaults)

__all__ = ["Settings", "SettingsError", "load_settings", "parse_override", "validate", "resolve_global_batch",
           "fit_global_batch", "args_file_layout"]

PLUGINS = tuple(ENGINES)  # each engine's `name` (training/engine/)
PRECISIONS = ("fp16", "bf16", "fp32")
LONG_TEXT_MODES = ("split", "truncate")
LONG_PROMPT_MODES = ("middle", "recipe")
GEMINI_PLACEMENTS = ("static", "auto")

logger = logging.getLogger(__name__)


def load_settings(args_module: types.ModuleType, argv: list[str]) -> Settings:
    """Read the public constants of `args_module`, apply `key=value` items of argv, validate, return Settings.

    `-h` or `--help` prints every setting with its comment from the args file and exits.
    """
    source = Path(getattr(args_module, "__file__", None) or args_module.__name__).name
    values = {name: copy.deepcopy(value) for name, value in vars(args_module).items() if _is_setting(name, value)}
    if any(item in ("-h", "--help") for item in argv):
        print(_help_text(args_module, values))
        raise SystemExit(0)
    values = _normalized(_with_defaults(values, source), source)
    overridden = set()
    for item in argv:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise SettingsError(f"command-line item {item!r} is not key=value (settings are in {source})")
        if name not in values:
            raise SettingsError(f"unknown setting {name!r}: {source} has no such name{_did_you_mean(name, values)}")
        if name in overridden:  # a script's default and the user's own value: which one was meant is unknowable
            raise SettingsError(f"setting {name!r} is given twice on the command line ({values[name]!r}, then "
                                f"{text!r}); give it once")
        values[name] = parse_override(name, text, values[name])
        values = _normalized(values, source)
        overridden.add(name)
    validate(values, source)
    if values.get("global_batch_size", 0) > 0 and "gradient_accumulation_steps" in overridden:
        raise SettingsError(f"setting 'gradient_accumulation_steps' is derived from 'global_batch_size' = "
                            f"{values['global_batch_size']} and the number of processes; set global_batch_size=0 to "
                            f"choose it yourself ({source})")
    if values.get("logdir") == "" and "output_dir" in values:
        values["logdir"] = str(Path(values["output_dir"]) / "logs")  # follows an overridden output_dir
    settings = Settings.from_values(values, source, overridden)
    ENGINES[settings.engine.plugin].check_engine_settings(settings.engine, source)  # the plugin's own rules
    return settings


def _with_defaults(values: dict[str, Any], source: str) -> dict[str, Any]:
    """The args file's settings in its order, then those it leaves out, at their concern's default: every shared
    concern, and a stage's own concern where the args file sets one of its settings."""
    for name in values:
        if name not in CONCERN_OF:
            raise SettingsError(f"{source} sets {name!r}, which is no setting of this repo"
                                f"{_did_you_mean(name, CONCERN_OF)}")
    concerns = list(SHARED_CONCERNS) + [concern for concern in STAGE_CONCERNS if concern in map(CONCERN_OF.get, values)]
    for concern in concerns:
        for name, default in concern_defaults(concern).items():
            values.setdefault(name, default)
    return values


def parse_override(name: str, text: str, default: Any) -> Any:
    """Turn the text of `name=text` into a value of the same type as the args file's `default`."""
    kind = type(default)
    if kind is str:
        # Any text is a string; quotes are only needed to keep leading/trailing spaces or an empty value.
        literal = _literal(text)
        return literal if isinstance(literal, str) else text
    literal = _literal(text)
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if isinstance(literal, bool):
            return literal
    elif kind is int:
        if isinstance(literal, int) and not isinstance(literal, bool):
            return literal
    elif kind is float:
        if isinstance(literal, (int, float)) and not isinstance(literal, bool):
            return float(literal)
    elif kind in (dict, list, tuple):
        if isinstance(literal, kind):
            return literal
    elif default is None:
        return literal if literal is not _UNPARSED else text
    shown = text if len(text) < 60 else text[:57] + "..."
    raise SettingsError(f"setting {name!r} expects {_type_word(kind)} (args file value {default!r}), got {shown!r}")


# Settings whose older values keep their meaning under a newer spelling: name -> value -> canonical value (a
# ValueError names what is valid). gradient_checkpointing was True/False before it had modes.
_CANONICAL: dict[str, Callable[[Any], Any]] = {"gradient_checkpointing": checkpointing_mode}


def _normalized(values: dict[str, Any], source: str) -> dict[str, Any]:
    for name, canonical in _CANONICAL.items():
        if name in values:
            try:
                values[name] = canonical(values[name])
            except ValueError as e:
                raise SettingsError(f"setting {name!r} = {values[name]!r} is invalid: {e} ({source})") from None
    return values


# name -> (check, what a valid value is). Checked on every load, defaults included.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "plugin": (lambda v: v in PLUGINS, f"one of {PLUGINS}"),
    "precision": (lambda v: v in PRECISIONS, f"one of {PRECISIONS}"),
    "long_text": (lambda v: v in LONG_TEXT_MODES, f"one of {LONG_TEXT_MODES}"),
    "long_prompt": (lambda v: v in LONG_PROMPT_MODES, f"one of {LONG_PROMPT_MODES}"),
    "chat_format": (lambda v: v in CHAT_FORMATS, f"one of {CHAT_FORMATS}"),
    "gemini_placement_policy": (lambda v: v in GEMINI_PLACEMENTS, f"one of {GEMINI_PLACEMENTS}"),
    "gemini_offload_optim_frac": (lambda v: 0.0 <= v <= 1.0, "between 0 and 1"),
    "gemini_offload_param_frac": (lambda v: 0.0 <= v <= 1.0, "between 0 and 1"),
    "init_model_path": (lambda v: v.strip() != "", "a model directory"),
    "eos_token": (lambda v: v == v.strip(), "a token of the vocabulary without surrounding spaces (empty: the "
                                           "tokenizer's eos)"),
    "pretrain_data_root_dir": (lambda v: v.strip() != "", "a directory"),
    "pretrain_data_split": (lambda v: len(v) > 0, "a non-empty dict {set: weight}"),
    "output_dir": (lambda v: v.strip() != "", "a directory"),
    "max_seq_length": (lambda v: v >= 8, "an int >= 8"),
    "batch_size": (lambda v: v >= 1, "an int >= 1"),
    "max_steps": (lambda v: v >= 1, "an int >= 1"),
    "warmup_steps": (lambda v: v >= 0, "an int >= 0"),
    "gradient_accumulation_steps": (lambda v: v >= 1, "an int >= 1"),
    "global_batch_size": (lambda v: v >= 0, "an int >= 0 (0: batch_size x processes x gradient_accumulation_steps)"),
    "logging_steps": (lambda v: v >= 1, "an int >= 1"),
    "saving_steps": (lambda v: v >= 1, "an int >= 1"),
    "eval_steps": (lambda v: v >= 1, "an int >= 1"),
    "eval_samples_per_set": (lambda v: v >= 1, "an int >= 1"),
    "eval_sets": (lambda v: all(isinstance(name, str) and name and "/" not in name and not name.startswith(".")
                                for name in v) and len(set(v)) == len(v),
                  "a list of distinct set names (plain folder names); empty: the training mix's sets"),
    "keep_checkpoints": (lambda v: v >= 1, "an int >= 1"),
    "saving_minutes": (lambda v: v >= 0, "a number >= 0 (0: saving_steps only)"),
    "stop_grace_seconds": (lambda v: v >= 0, "a number of seconds >= 0 (0: a stop never saves)"),
    "accept_changed_files": (lambda v: isinstance(v, bool), "True or False"),
    "max_bad_steps": (lambda v: v >= 1, "an int >= 1"),
    "lr": (lambda v: v > 0, "a float > 0"),
    "min_lr": (lambda v: v >= 0, "a float >= 0"),
    "weight_decay": (lambda v: v >= 0, "a float >= 0"),
    "adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "max_grad_norm": (lambda v: v >= 0, "a float >= 0 (0 turns clipping off)"),
    "dropout_prob": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "initial_loss_scale": (lambda v: v >= 1, "a number >= 1"),
    "peak_tflops_per_gpu": (lambda v: v >= 0, "a float >= 0 (0: look the GPU up by name)"),
    "gradient_checkpointing": (lambda v: v in CHECKPOINTING_MODES, f"one of {CHECKPOINTING_MODES}"),
    "compile": (lambda v: isinstance(v, bool), "True or False"),
    "preview_samples": (lambda v: isinstance(v, bool), "True or False"),
}


def validate(values: dict[str, Any], source: str = "settings") -> None:
    """Check single values against _RULES, then the relations between settings (a plugin's own rules are its
    engine's check_engine_settings, which load_settings asks next)."""
    for name, (check, wanted) in _RULES.items():
        if name in values and not check(values[name]):
            raise SettingsError(f"setting {name!r} = {values[name]!r} is invalid: it must be {wanted} ({source})")
    if "min_lr" in values and "lr" in values and values["min_lr"] > values["lr"]:
        raise SettingsError(f"setting 'min_lr' = {values['min_lr']!r} is above 'lr' = {values['lr']!r} ({source})")
    if "warmup_steps" in values and "max_steps" in values and values["warmup_steps"] >= values["max_steps"]:
        raise SettingsError(f"setting 'warmup_steps' = {values['warmup_steps']} must be below 'max_steps' = "
                            f"{values['max_steps']}: the cosine decay needs at least one step ({source})")


def resolve_global_batch(settings: Settings, world_size: int) -> Settings:
    """The settings with batch_size (per GPU) and gradient_accumulation_steps derived from global_batch_size (samples
    per optimizer step) and the number of processes: global = batch_size x world_size x accumulation. Unchanged when
    global_batch_size is 0.

    By default batch_size is the most one GPU holds: a smaller per-GPU batch keeps global_batch_size exactly where one
    fits, and where none does (160 on 6 processes) the nearest global batch is used; either is logged. With
    global_batch_exact=True, batch_size and global_batch_size are taken as set, and a global batch that is not their
    product is a SettingsError naming the numbers and the per-GPU batch sizes that would fit."""
    wanted = settings.optimisation.global_batch_size
    if wanted == 0:
        return settings
    per_step = settings.data.batch_size * world_size  # samples of one micro-batch over all processes
    if settings.optimisation.global_batch_exact:
        if wanted % per_step:
            raise SettingsError(_global_batch_mismatch(settings, wanted, world_size, per_step))
        batch, accumulation = settings.data.batch_size, wanted // per_step
    else:
        batch, accumulation = fit_global_batch(wanted, settings.data.batch_size, world_size)
        got = batch * world_size * accumulation
        if got != wanted:
            logger.warning("global_batch_size=%d fits no per-GPU batch on %d processes (%d is not a multiple of %d): "
                           "training with the nearest, %d per GPU x %d x %d accumulation = %d samples per step "
                           "(global_batch_exact=True stops instead) (%s)", wanted, world_size, wanted, world_size,
                           batch, world_size, accumulation, got, settings.source)
        elif batch != settings.data.batch_size:
            logger.info("global_batch_size=%d on %d processes: %d per GPU (batch_size=%d is the most) x %d x %d "
                        "accumulation = %d", wanted, world_size, batch, settings.data.batch_size, world_size,
                        accumulation, wanted)
    return settings.with_batch(batch, accumulation)


def fit_global_batch(wanted: int, batch_size: int, world_size: int) -> tuple[int, int]:
    """(per-GPU batch, accumulation) for `wanted` samples per optimizer step on `world_size` processes, with at most
    `batch_size` samples per GPU. Exactly `wanted` where some per-GPU batch up to batch_size fits it (the largest:
    fewest micro-batches); otherwise the fewest micro-batches in which batch_size reaches `wanted`, with the per-GPU
    batch that brings the product nearest to it (e.g. 160 on 6 processes: 13 x 6 x 2 = 156)."""
    per_gpu = wanted / world_size  # samples each process contributes to one optimizer step
    if wanted % world_size == 0:
        fits = [b for b in range(min(batch_size, wanted // world_size), 0, -1) if (wanted // world_size) % b == 0]
        return fits[0], wanted // world_size // fits[0]
    accumulation = math.ceil(per_gpu / batch_size)
    return max(1, min(batch_size, math.floor(per_gpu / accumulation + 0.5))), accumulation


def _global_batch_mismatch(settings: Settings, wanted: int, world_size: int, per_step: int) -> str:
    fits = [b for b in range(1, wanted // world_size + 1) if wanted % (b * world_size) == 0]
    if fits:
        b = max((fit for fit in fits if fit <= settings.data.batch_size), default=fits[0])  # fits its memory
        hint = (f"batch_size={b} ({b} x {world_size} x {wanted // (b * world_size)} accumulation = {wanted}); "
                f"the per-GPU batch sizes that fit: {fits}")
    else:
        hint = f"global_batch_size a multiple of {world_size}: no batch_size fits {world_size} processes"
    return (f"setting 'global_batch_size' = {wanted} is not a multiple of batch_size {settings.data.batch_size} x "
            f"{world_size} processes = {per_step} (global_batch_exact=True); use {hint} ({settings.source})")


_UNPARSED = object()


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return _UNPARSED


def _is_setting(name: str, value: Any) -> bool:
    return not name.startswith("_") and not isinstance(value, (types.ModuleType, types.FunctionType, type))


def _type_word(kind: type) -> str:
    return {bool: "True or False", int: "an int", float: "a number", dict: "a dict literal like {'a': 1}",
            list: "a list literal", tuple: "a tuple literal"}.get(kind, kind.__name__)


# Names other trainers use (transformers' TrainingArguments, Megatron, nanoGPT, ...) for settings of this repo.
_ALIASES = {
    "learning_rate": "lr", "lr_rate": "lr", "peak_lr": "lr", "max_lr": "lr", "base_lr": "lr",
    "min_learning_rate": "min_lr", "final_lr": "min_lr", "eta_min": "min_lr",
    "num_steps": "max_steps", "total_steps": "max_steps", "train_steps": "max_steps", "steps": "max_steps",
    "num_train_steps": "max_steps", "training_steps": "max_steps", "train_iters": "max_steps",
    "max_iters": "max_steps",
    "grad_accum": "gradient_accumulation_steps", "gradient_accumulation": "gradient_accumulation_steps",
    "grad_accum_steps": "gradient_accumulation_steps", "accumulation_steps": "gradient_accumulation_steps",
    "accumulate_grad_batches": "gradient_accumulation_steps",
    "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size", "train_batch_size": "batch_size",
    "per_gpu_batch_size": "batch_size", "bs": "batch_size",
    "global_batch": "global_batch_size", "total_batch_size": "global_batch_size",
    "effective_batch_size": "global_batch_size",
    "warmup": "warmup_steps", "num_warmup_steps": "warmup_steps", "warmup_iters": "warmup_steps",
    "lr_warmup_steps": "warmup_steps",
    "seq_len": "max_seq_length", "seq_length": "max_seq_length", "max_length": "max_seq_length",
    "block_size": "max_seq_length", "context_length": "max_seq_length", "max_len": "max_seq_length",
    "model_max_length": "max_seq_length", "cutoff_len": "max_seq_length",
    "wd": "weight_decay", "decay": "weight_decay",
    "grad_clip": "max_grad_norm", "clip_grad_norm": "max_grad_norm", "gradient_clipping": "max_grad_norm",
    "beta1": "adam_beta1", "beta2": "adam_beta2",
    "dropout": "dropout_prob", "model_name_or_path": "init_model_path", "model_path": "init_model_path",
    "model": "init_model_path", "tokenizer": "tokenizer_path", "tokenizer_name": "tokenizer_path",
    "data_dir": "pretrain_data_root_dir", "data_path": "pretrain_data_root_dir", "dataset": "pretrain_data_split",
    "save_steps": "saving_steps", "checkpoint_steps": "saving_steps", "save_total_limit": "keep_checkpoints",
    "log_steps": "logging_steps", "logging_dir": "logdir", "log_dir": "logdir", "output": "output_dir",
    "resume_from_checkpoint": "recover_training_from_checkpoint", "resume": "recover_training_from_checkpoint",
    "mixed_precision": "precision", "dtype": "precision", "fp16": "precision", "bf16": "precision",
    "gradient_checkpointing_enable": "gradient_checkpointing", "activation_checkpointing": "gradient_checkpointing",
    "eval_dir": "eval_data_root_dir", "eval_interval": "eval_steps", "strategy": "plugin", "zero_stage": "plugin",
    "no_decay": "weight_decay_skip",
}


def _did_you_mean(name: str, values: dict[str, Any]) -> str:
    """The setting a known alias stands for (`learning_rate` -> lr), then the closest spellings."""
    import difflib

    key = name.strip().lstrip("-").lower().replace("-", "_")
    alias = _ALIASES.get(key)
    close = [alias] if alias in values else []
    close += [match for match in difflib.get_close_matches(name, list(values), n=3) if match not in close]
    return f"; did you mean {', '.join(close[:3])}?" if close else ""


def args_file_layout(args_module: types.ModuleType) -> list[tuple[str, list[tuple[str, str]]]]:
    """The args file as written: [(heading, [(setting, its one-line comment), ...]), ...], in file order. Headings are
    the `# ---...--- name` lines; a setting's comment is the text after `  # ` on its line. Read from the source, for
    --help and for docs/settings.md (tools/settings_doc.py)."""
    values = {name: value for name, value in vars(args_module).items() if _is_setting(name, value)}
    sections: list[tuple[str, list[tuple[str, str]]]] = [("", [])]
    seen: set[str] = set()
    path = getattr(args_module, "__file__", None)
    lines = Path(path).read_text(encoding="utf-8").splitlines() if path and Path(path).exists() else []
    for line in lines:
        if line.startswith("# ---"):
            sections.append((line.strip("# -"), []))
            continue
        head, _, comment = line.partition("  # ")
        name = head.split("=")[0].strip()
        if "=" in head and name in values and name not in seen and not line[:1].isspace():
            sections[-1][1].append((name, comment.strip()))
            seen.add(name)
    sections[-1][1].extend((name, "") for name in values if name not in seen)  # set without a line of its own
    return [(heading, items) for heading, items in sections if items]


def _help_text(args_module: types.ModuleType, values: dict[str, Any]) -> str:
    """Each setting with its one-line comment, read from the args file's source."""
    comments = {name: comment for _, items in args_file_layout(args_module) for name, comment in items}
    doc = (args_module.__doc__ or "").strip()
    width = max(len(name) for name in values)
    lines = [doc, "", "Settings (override with key=value):"]
    lines += [f"  {name:<{width}} = {value!r:<24} {comments.get(name, '')}" for name, value in values.items()]
    return "\n".join(lines)
