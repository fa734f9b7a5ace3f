"""Worker script for the training tests: runs a stage's data stream through training.loop.train, with faults.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/training_harness.py key=value ...

Environment:
    HARNESS_STAGE             pretrain | task_instruct_tuning | alignment_sft (default pretrain)
    HARNESS_KILL_AFTER_SAVE   N: SIGKILL this process right after the step-N checkpoint is complete
    HARNESS_CRASH_DURING_SAVE N: SIGKILL rank 0 while the step-N checkpoint is being written (everything but
                              trainer_state.json is on disk)
    HARNESS_NAN_STEPS         "3,4": the model returns a NaN loss on these steps (1-based, every rank)
    HARNESS_DISK_FULL_AT_SAVE N: the disk is full while the step-N checkpoint is written: torch.save into it (the
                              optimizer, rank 0 on the CPU fallback) leaves an empty file and gets the kernel's
                              ENOSPC, by writing its bytes to /dev/full
    HARNESS_RECORD_BATCHES    1: append a hash of every batch to <logdir>/batches.rank<R>.jsonl; 2: also the text of
                              each row (the tokenizer's decode), for tests that trace which records were trained on
    HARNESS_ZERO_ON_CPU       1: run the settings' plugin (gemini, zero2) and precision on CPU (tests/zero_cpu.py)
    HARNESS_INF_GRAD_STEPS    "2": on these steps the last rank's gradient of one embedding element is inf (its loss
                              stays finite); under zero2 that element's shard lives on rank 0
    HARNESS_EMPTY_BATCHES     "1.0,1.1": these micro-batches (step.micro, every rank) count no target token
    HARNESS_DUMP_LOADED       DIR: once the fresh model is loaded and boosted, save its weights to DIR/weights and
                              its fp32 master weights, gathered, to DIR/masters.safetensors
    HARNESS_TRANSFORMERS      1: train transformers' own class (AutoModelForCausalLM of init_model_path, a transformers
                              dir) in place of ours, behind our forward's signature: the reference a run of ours
                              from that dir must equal (unpacked rows, no dropout)
    HARNESS_SAVE_AFTER_RESUME DIR: right after a resume, write a checkpoint of what was loaded into DIR (the same
                              save_checkpoint), to compare it with the checkpoint resumed from
Steps are the optimizer steps of the run (1-based), counted on from the checkpoint after a resume.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from llama import load_tokenizer  # noqa: E402
import training.checkpoint as checkpoint  # noqa: E402
import training.loop as loop  # noqa: E402
from tools.stage_schema import stage_rules  # noqa: E402
from training.settings import load_settings  # noqa: E402


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


STEP = {"now": 1}  # the optimizer step being computed


def track_steps() -> None:
    class StepTracking(loop.Metrics):
        def __init__(self, *args, start_step: int, **kwargs):
            super().__init__(*args, start_step=start_step, **kwargs)
            STEP["now"] = start_step + 1

        def record(self, *args, **kwargs):
            super().record(*args, **kwargs)
            STEP["now"] += 1

    loop.Metrics = StepTracking


def kill_after_save(step: int) -> None:
    original = loop.save_checkpoint

    def save_then_die(engine, data, state, *args, **kwargs):
        saved = original(engine, data, state, *args, **kwargs)
        if state.step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return saved

    loop.save_checkpoint = save_then_die


def crash_during_save(step: int) -> None:
    original = checkpoint.write_json

    def write_or_die(path, obj, **kwargs):
        if path.name == checkpoint.TRAINER_STATE and f"ckpt_step-{step}_" in path.parent.name:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(path, obj, **kwargs)

    checkpoint.write_json = write_or_die


def disk_full_at_save(step: int) -> None:
    import torch

    original = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and f"ckpt_step-{step}_" in str(f):
            Path(f).touch()
            with open("/dev/full", "wb") as full:
                return original(obj, full, *args, **kwargs)
        return original(obj, f, *args, **kwargs)

    torch.save = save


def nan_at_steps(steps: set[int]) -> None:
    from llama.llama_model import Llama

    original = Llama.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        loss, logits = original(self, *args, **kwargs)
        if self.training and loss is not None:
            calls["n"] += 1
            if calls["n"] in steps:
                loss = loss * float("nan")
        return loss, logits

    Llama.forward = forward


class _InfGradient(torch.autograd.Function):
    """Identity forward; backward makes one element of the incoming gradient inf."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[0, 0, 0] = float("inf")  # the first token (bos) of the first row: one element of one embedding row
        return grad


def inf_gradient_at_steps(steps: set[int]) -> None:
    from llama.llama_model import Llama

    original = Llama.forward
    last_rank = int(os.environ["WORLD_SIZE"]) - 1

    def forward(self, *args, **kwargs):
        if not (self.training and STEP["now"] in steps and _rank() == last_rank):
            return original(self, *args, **kwargs)
        handle = self.tok_embeddings.register_forward_hook(lambda module, inputs, out: _InfGradient.apply(out))
        try:
            return original(self, *args, **kwargs)
        finally:
            handle.remove()

    Llama.forward = forward


def emptying(stream_cls, which: set[tuple[int, int]]):
    class Emptying(stream_cls):
        """Zeroes the loss mask of the chosen micro-batches."""

        def __iter__(self):
            return self

        def __next__(self):
            batch = super().__next__()
            step = STEP["now"]
            self._micro = self._micro + 1 if getattr(self, "_step", None) == step else 0
            self._step = step
            if (step, self._micro) in which:
                batch = dict(batch, loss_mask=torch.zeros_like(batch["loss_mask"]), num_target_tokens=0)
            return batch

    return Emptying


def dump_loaded(directory: Path) -> None:
    """After a fresh start's boost: the boosted model's weights, and its fp32 masters gathered into whole tensors
    straight from ColossalAI's structures (not through training/engine/masters.py, which the tests check)."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from training.engine import Engine

    original = Engine.boost

    def load_then_dump(engine, model, initial_weights=None):
        original(engine, model, initial_weights)
        if initial_weights is None:
            return
        engine.booster.save_model(engine.model, str(directory / "weights"), shard=True, use_safetensors=True)
        masters = {}
        if engine.choice.plugin == "zero2":
            optimizer = engine.optimizer
            for name, p in engine.model.unwrap().named_parameters():
                shard = optimizer.working_to_master_param[id(p)]
                parts = [torch.empty_like(shard) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, shard)
                masters[name] = torch.cat(parts)[:p.numel()].view(p.shape)
        else:
            from colossalai.zero.gemini.utils import get_temp_total_chunk_on_cuda

            model = engine.model
            for p, fp32_p in zip(model.fp16_params, model.fp32_params):
                chunk = model.chunk_manager.get_chunk(fp32_p)
                info = chunk.tensors_info[fp32_p]
                whole = get_temp_total_chunk_on_cuda(chunk, torch.float32)
                masters[model.param2name[p]] = whole[info.offset:info.end].view(p.shape).clone()
        if _rank() == 0:
            save_file(masters, str(directory / "masters.safetensors"))

    Engine.boost = load_then_dump


class TransformersAsOurs(torch.nn.Module):
    """transformers' causal LM behind Llama.forward's (loss, logits) signature: loss_mask -> labels (-100 where a
    token is no target; transformers shifts them as we do)."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, loss_mask=None, labels=None, doc_ids=None):
        assert doc_ids is None, "transformers' class has no packed rows"
        if loss_mask is not None:
            labels = input_ids.masked_fill(loss_mask == 0, -100)
        return self.hf(input_ids, labels=labels).loss, None


def train_transformers_class() -> None:
    from transformers import AutoModelForCausalLM

    from training.engine.ddp import DDPEngine

    def build_model(engine, inputs):  # the weights loaded whole, as DDPEngine loads ours
        settings = engine.settings.model
        assert float(settings.dropout_prob) == 0.0
        return TransformersAsOurs(AutoModelForCausalLM.from_pretrained(
            settings.init_model_path, torch_dtype=engine.load_dtype, attn_implementation="sdpa"))

    DDPEngine.build_model = build_model
    loop.save_final = lambda *args: None  # a reference run: its weights (transformers' names) are not a model dir


def save_after_resume(directory: Path) -> None:
    original = loop.load_checkpoint

    class ConfigFrom:
        def __init__(self, path):
            self.path = path

        def save_pretrained(self, target):
            import shutil
            shutil.copyfile(self.path / "config.json", Path(target) / "config.json")

    def load_then_save(path, engine, data, settings):
        state = original(path, engine, data, settings)
        checkpoint.save_checkpoint(engine, data, state, ConfigFrom(path), load_tokenizer(path), directory,
                                   1)
        return state

    loop.load_checkpoint = load_then_save


def recording(stream_cls, texts: bool):
    class Recording(stream_cls):
        """Records every batch handed to the loop (not the ones prefetched behind it)."""

        def __iter__(self):
            return self

        def __next__(self):
            batch = super().__next__()
            digest = hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest()
            record = {"sha1": digest, "num_tokens": batch["num_tokens"]}
            if texts:
                pad = self.tokenizer.pad_id
                record["texts"] = [self.tokenizer.decode([t for t in row if t != pad])
                                   for row in batch["input_ids"].tolist()]
            with open(Path(self._harness_logdir) / f"batches.rank{_rank()}.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            return batch

    return Recording


def main() -> None:
    stage = os.environ.get("HARNESS_STAGE", "pretrain")
    settings = load_settings(importlib.import_module(f"{stage}_args"), sys.argv[1:])
    stream_cls = loop.DataStream  # the stream class the loop builds; subclassed below to inject faults
    if os.environ.get("HARNESS_ZERO_ON_CPU"):
        import zero_cpu

        zero_cpu.install()
    if os.environ.get("HARNESS_KILL_AFTER_SAVE"):
        kill_after_save(int(os.environ["HARNESS_KILL_AFTER_SAVE"]))
    if os.environ.get("HARNESS_CRASH_DURING_SAVE"):
        crash_during_save(int(os.environ["HARNESS_CRASH_DURING_SAVE"]))
    if os.environ.get("HARNESS_DISK_FULL_AT_SAVE"):
        disk_full_at_save(int(os.environ["HARNESS_DISK_FULL_AT_SAVE"]))
    if os.environ.get("HARNESS_NAN_STEPS"):
        nan_at_steps({int(s) for s in os.environ["HARNESS_NAN_STEPS"].split(",")})
    track_steps()
    if os.environ.get("HARNESS_INF_GRAD_STEPS"):
        inf_gradient_at_steps({int(s) for s in os.environ["HARNESS_INF_GRAD_STEPS"].split(",")})
    if os.environ.get("HARNESS_EMPTY_BATCHES"):
        which = {tuple(int(n) for n in item.split(".")) for item in os.environ["HARNESS_EMPTY_BATCHES"].split(",")}
        stream_cls = emptying(stream_cls, which)
    if os.environ.get("HARNESS_DUMP_LOADED"):
        dump_loaded(Path(os.environ["HARNESS_DUMP_LOADED"]))
    if os.environ.get("HARNESS_TRANSFORMERS"):
        train_transformers_class()
    if os.environ.get("HARNESS_SAVE_AFTER_RESUME"):
        save_after_resume(Path(os.environ["HARNESS_SAVE_AFTER_RESUME"]))
    if os.environ.get("HARNESS_RECORD_BATCHES"):
        stream_cls = recording(stream_cls, texts=os.environ["HARNESS_RECORD_BATCHES"] == "2")
        stream_cls._harness_logdir = settings.output.logdir
    loop.DataStream = stream_cls
    loop.train(settings, stage_rules(stage))


if __name__ == "__main__":
    main()
