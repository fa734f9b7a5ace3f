"""The typed settings of a run: one frozen dataclass per concern, and Settings, which holds them all.

    settings = load_settings(pretrain_args, argv)     # training/settings.py: the one parser
    settings.data.batch_size, settings.optimisation.lr, settings.engine.plugin, settings.chat  # None before stage 3
    settings.to_dict()                                # flat {setting: value}, as stored in every checkpoint

A concern's fields are the settings of one heading of the args files; a setting's name is unique over all of them,
so the command line and the checkpoints stay flat. A field's default here is the value a setting takes when an args
file does not set it (the recipe's stage-1 value); the args files set every shared setting themselves. A stage's own
keys are a concern of their own, present only where that stage's args file sets them (chat: stage 3).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


class SettingsError(ValueError):
    """A setting is unknown, has the wrong type or an invalid value; the message names it."""


@dataclass(frozen=True)
class ModelSettings:
    """Heading "model": the model directory and tokenizer, and how the model is built."""
    init_model_path: str = "models/llama-7b-zh"
    tokenizer_path: str = ""
    eos_token: str = ""
    dropout_prob: float = 0.05
    gradient_checkpointing: str = "full"
    compile: bool = True


@dataclass(frozen=True)
class DataSettings:
    """Heading "data": the corpus, its mix, and how records become batches (training/data_stream.py)."""
    pretrain_data_root_dir: str = "pretraining_corpora"
    pretrain_data_split: dict = field(default_factory=lambda: {"zh": 4, "en": 4, "translate": 2})
    max_seq_length: int = 1024
    batch_size: int = 20
    long_text: str = "split"
    long_prompt: str = "middle"
    packing: bool = False
    skip_bad_records: bool = False
    accept_changed_files: bool = False
    seed: int = 42


@dataclass(frozen=True)
class OptimisationSettings:
    """Heading "optimisation": the schedule, the global batch, AdamW, precision and non-finite steps."""
    lr: float = 3e-5
    min_lr: float = 3e-6
    warmup_steps: int = 2000
    max_steps: int = 100_000
    global_batch_size: int = 0
    global_batch_exact: bool = False
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.1
    weight_decay_skip: bool = False
    new_rows_only: bool = False
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_grad_norm: float = 2.0
    precision: str = "fp16"
    initial_loss_scale: float = 16384
    max_bad_steps: int = 50


@dataclass(frozen=True)
class EngineSettings:
    """Heading "engine": the ColossalAI plugin and its placement (training/engine/)."""
    plugin: str = "gemini"
    zero2_cpu_offload: bool = False
    gemini_placement_policy: str = "static"
    gemini_offload_optim_frac: float = 1.0
    gemini_offload_param_frac: float = 0.0


@dataclass(frozen=True)
class OutputSettings:
    """Heading "logging and checkpoints": where the run writes, how often, and where it resumes from."""
    output_dir: str = "outputs/pretrain"
    logdir: str = ""  # load_settings resolves "" to <output_dir>/logs
    logging_steps: int = 10
    preview_samples: bool = True
    peak_tflops_per_gpu: float = 0.0
    saving_steps: int = 1000
    saving_minutes: float = 0.0
    keep_checkpoints: int = 3
    stop_grace_seconds: float = 25.0
    recover_training_from_checkpoint: str = ""


@dataclass(frozen=True)
class EvaluationSettings:
    """Heading "held-out evaluation" (training/evaluation.py)."""
    eval_data_root_dir: str = ""
    eval_sets: list = field(default_factory=list)
    eval_steps: int = 500
    eval_samples_per_set: int = 256


@dataclass(frozen=True)
class ChatSettings:
    """Stage 3's own: the format conversations are rendered in (training/conversation.py) and exported with."""
    chat_format: str = "billa"


# Settings' field -> its concern; every run has these.
SHARED_CONCERNS: dict[str, type] = {"model": ModelSettings, "data": DataSettings, "optimisation": OptimisationSettings,
                                    "engine": EngineSettings, "output": OutputSettings,
                                    "evaluation": EvaluationSettings}
# A stage's own concerns: present where its args file sets one of their settings, None elsewhere.
STAGE_CONCERNS: dict[str, type] = {"chat": ChatSettings}
# setting -> the Settings field of its concern
CONCERN_OF: dict[str, str] = {f.name: concern for concern, cls in {**SHARED_CONCERNS, **STAGE_CONCERNS}.items()
                              for f in dataclasses.fields(cls)}


def concern_defaults(concern: str) -> dict[str, Any]:
    """The settings of `concern` with the values they take when an args file does not set them."""
    return dataclasses.asdict({**SHARED_CONCERNS, **STAGE_CONCERNS}[concern]())


@dataclass(frozen=True)
class Settings:
    """A run's settings, parsed and validated once (load_settings), read-only. `names` keeps the args file's order
    for to_dict() and format(); `overridden` holds the names set on the command line."""
    model: ModelSettings
    data: DataSettings
    optimisation: OptimisationSettings
    engine: EngineSettings
    output: OutputSettings
    evaluation: EvaluationSettings
    chat: Optional[ChatSettings]
    source: str
    names: tuple[str, ...]
    overridden: frozenset[str] = frozenset()

    @classmethod
    def from_values(cls, values: dict[str, Any], source: str, overridden=()) -> "Settings":
        """Settings from a flat, complete and validated {setting: value} (load_settings builds it)."""
        unknown = [name for name in values if name not in CONCERN_OF]
        if unknown:
            raise SettingsError(f"{source} sets {unknown[0]!r}, which is no setting of this repo")
        by_concern: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            by_concern.setdefault(CONCERN_OF[name], {})[name] = value
        concerns = {concern: kind(**by_concern.get(concern, {})) for concern, kind in SHARED_CONCERNS.items()}
        concerns.update({concern: kind(**by_concern[concern]) if concern in by_concern else None
                         for concern, kind in STAGE_CONCERNS.items()})
        return cls(**concerns, source=source, names=tuple(values), overridden=frozenset(overridden))

    def value(self, name: str) -> Any:
        """One setting by its name, for code that walks the flat names (resume's changed-settings report)."""
        return getattr(getattr(self, CONCERN_OF[name]), name)

    def to_dict(self) -> dict[str, Any]:
        return {name: copy.deepcopy(self.value(name)) for name in self.names}

    def format(self) -> str:
        """One line per setting, command-line overrides marked, for the rank-0 console and log file."""
        width = max(len(name) for name in self.names)
        lines = [f"settings from {self.source} (* = overridden on the command line):"]
        for name in self.names:
            mark = "*" if name in self.overridden else " "
            lines.append(f"  {mark} {name:<{width}} = {self.value(name)!r}")
        return "\n".join(lines)

    def with_batch(self, batch_size: int, gradient_accumulation_steps: int) -> "Settings":
        """These settings with the per-GPU batch and the accumulation the launch derived (resolve_global_batch)."""
        return dataclasses.replace(
            self, data=dataclasses.replace(self.data, batch_size=batch_size),
            optimisation=dataclasses.replace(self.optimisation,
                                             gradient_accumulation_steps=gradient_accumulation_steps))

    def __repr__(self) -> str:
        return f"Settings({self.source}, {len(self.names)} values)"
