"""Settings: the constants of a `<stage>_args.py` module, with `key=value` command-line overrides, validated.

    settings = load_settings(pretrain_args, ["lr=1e-5", "plugin=zero2"])
    settings.lr            # 1e-05
    settings.to_dict()     # plain dict, stored in every checkpoint

An override must name an existing setting and keep its type (an int setting takes an int, a float setting an int or
a float, a str setting any text, a dict setting a Python dict literal); anything else is a SettingsError that names
the setting. Values are then checked against the rules below, so a bad value stops the run before any work starts.
"""
from __future__ import annotations

import ast
import copy
import types
from pathlib import Path
from typing import Any, Callable

PLUGINS = ("gemini", "zero2", "ddp")
PRECISIONS = ("fp16", "bf16", "fp32")
LONG_TEXT_MODES = ("split", "truncate")
LONG_PROMPT_MODES = ("middle", "recipe")
GEMINI_PLACEMENTS = ("static", "auto")


class SettingsError(ValueError):
    """A setting is unknown, has the wrong type or an invalid value; the message names it."""


class Settings:
    """Resolved settings with attribute access. `overridden` holds the names set on the command line."""

    def __init__(self, values: dict[str, Any], source: str, overridden: set[str] | None = None):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "overridden", set(overridden or ()))

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        raise AttributeError(f"no setting named {name!r} in {object.__getattribute__(self, 'source')}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("settings are read-only; override them on the command line: key=value")

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._values)

    def format(self) -> str:
        """One line per setting, command-line overrides marked, for the rank-0 console and log file."""
        width = max(len(name) for name in self._values)
        lines = [f"settings from {self.source} (* = overridden on the command line):"]
        for name, value in self._values.items():
            mark = "*" if name in self.overridden else " "
            lines.append(f"  {mark} {name:<{width}} = {value!r}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Settings({self.source}, {len(self._values)} values)"


def load_settings(args_module: types.ModuleType, argv: list[str]) -> Settings:
    """Read the public constants of `args_module`, apply `key=value` items of argv, validate, return Settings.

    `-h` or `--help` prints every setting with its comment from the args file and exits.
    """
    source = Path(getattr(args_module, "__file__", None) or args_module.__name__).name
    values = {name: value for name, value in vars(args_module).items() if _is_setting(name, value)}
    if any(item in ("-h", "--help") for item in argv):
        print(_help_text(args_module, values))
        raise SystemExit(0)
    overridden = set()
    for item in argv:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise SettingsError(f"command-line item {item!r} is not key=value (settings are in {source})")
        if name not in values:
            raise SettingsError(f"unknown setting {name!r}: {source} has no such name{_did_you_mean(name, values)}")
        values[name] = parse_override(name, text, values[name])
        overridden.add(name)
    validate(values, source)
    if values.get("logdir") == "" and "output_dir" in values:
        values["logdir"] = str(Path(values["output_dir"]) / "logs")  # follows an overridden output_dir
    return Settings(values, source, overridden)


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


# name -> (check, what a valid value is). Checked on every load, defaults included.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "plugin": (lambda v: v in PLUGINS, f"one of {PLUGINS}"),
    "precision": (lambda v: v in PRECISIONS, f"one of {PRECISIONS}"),
    "long_text": (lambda v: v in LONG_TEXT_MODES, f"one of {LONG_TEXT_MODES}"),
    "long_prompt": (lambda v: v in LONG_PROMPT_MODES, f"one of {LONG_PROMPT_MODES}"),
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
    "logging_steps": (lambda v: v >= 1, "an int >= 1"),
    "saving_steps": (lambda v: v >= 1, "an int >= 1"),
    "eval_steps": (lambda v: v >= 1, "an int >= 1"),
    "eval_samples_per_set": (lambda v: v >= 1, "an int >= 1"),
    "eval_sets": (lambda v: all(isinstance(name, str) and name and "/" not in name and not name.startswith(".")
                                for name in v) and len(set(v)) == len(v),
                  "a list of distinct set names (plain folder names); empty: the training mix's sets"),
    "keep_checkpoints": (lambda v: v >= 1, "an int >= 1"),
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
}


def validate(values: dict[str, Any], source: str = "settings") -> None:
    """Check single values against _RULES, then the relations between settings."""
    for name, (check, wanted) in _RULES.items():
        if name in values and not check(values[name]):
            raise SettingsError(f"setting {name!r} = {values[name]!r} is invalid: it must be {wanted} ({source})")
    if "min_lr" in values and "lr" in values and values["min_lr"] > values["lr"]:
        raise SettingsError(f"setting 'min_lr' = {values['min_lr']!r} is above 'lr' = {values['lr']!r} ({source})")
    if (values.get("plugin") == "gemini" and values.get("gemini_placement_policy") == "static"
            and values.get("gemini_offload_param_frac", 0.0) > 0.0 and values.get("gemini_offload_optim_frac") != 1.0):
        # StaticPlacementPolicy.__init__ (colossalai/zero/gemini/placement_policy.py) would drop it with a warning
        raise SettingsError(f"setting 'gemini_offload_param_frac' = {values['gemini_offload_param_frac']!r} needs "
                            f"'gemini_offload_optim_frac' = 1.0 (ColossalAI ignores it otherwise), got "
                            f"{values.get('gemini_offload_optim_frac')!r} ({source})")
    if "warmup_steps" in values and "max_steps" in values and values["warmup_steps"] >= values["max_steps"]:
        raise SettingsError(f"setting 'warmup_steps' = {values['warmup_steps']} must be below 'max_steps' = "
                            f"{values['max_steps']}: the cosine decay needs at least one step ({source})")


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


def _did_you_mean(name: str, values: dict[str, Any]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(values), n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _help_text(args_module: types.ModuleType, values: dict[str, Any]) -> str:
    """Each setting with its one-line comment, read from the args file's source."""
    comments: dict[str, str] = {}
    path = getattr(args_module, "__file__", None)
    if path and Path(path).exists():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            head, _, comment = line.partition("  # ")
            name = head.split("=")[0].strip()
            if "=" in head and name in values and name not in comments:
                comments[name] = comment.strip()
    doc = (args_module.__doc__ or "").strip()
    width = max(len(name) for name in values)
    lines = [doc, "", "Settings (override with key=value):"]
    lines += [f"  {name:<{width}} = {value!r:<24} {comments.get(name, '')}" for name, value in values.items()]
    return "\n".join(lines)
