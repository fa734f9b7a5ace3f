"""ColossalAI's ZeRO engines on CPU (tests/zero_cpu.py): the three stages under zero2 and gemini, bf16 and fp16, with
2 processes on gloo. Each run trains, is SIGKILLed after a checkpoint, resumes, and must log the straight run's
per-step figures bit for bit (S1); its weights and fp32 masters as loaded after boost must equal the source (S3);
and each carries one of the faults the GPU path must survive.

    zero2  bf16  pretrain              an inf gradient on one rank at step 3 (S2)
    gemini bf16  pretrain              the same; its losses equal zero2's
    zero2  fp16  task_instruct_tuning  step 1 has no target token (S4), so step 1's checkpoint holds no optimizer
                                       state (C4) and the resume starts from it; step 3 has one empty micro-batch
    gemini fp16  alignment_sft         gradient accumulation and a loss scale that overflows for the first steps
                                       (C2); the resume restores the backed-off scale and its counters
    zero2, gemini bf16 and ddp fp32    a Llama-3.2-style model with tied embeddings (tied_tiny_model): one parameter
                                       for embedding and output, updated once per step, saved once, resumed exactly
"""
import json
import math

import pytest
import torch

from training_runs import TINY_RUN, explain, read_metrics, tied_tiny_model, tiny_model, torchrun  # noqa: F401

INF_GRAD_STEP = 3
COMBOS = {  # name: (stage, settings, harness environment, the step whose checkpoint is followed by SIGKILL: None for
    # the straight run's first). The bf16 runs keep norms and embeddings out of weight decay: two parameter groups
    # through GeminiOptimizer and LowLevelZeroOptimizer, their sharded saves and the resume.
    "zero2-bf16": ("pretrain", ["plugin=zero2", "precision=bf16", "max_steps=4", "saving_steps=2",
                                "weight_decay_skip=True"],
                   {"HARNESS_INF_GRAD_STEPS": str(INF_GRAD_STEP)}, 2),
    "gemini-bf16": ("pretrain", ["plugin=gemini", "precision=bf16", "max_steps=4", "saving_steps=2",
                                 "weight_decay_skip=True"],
                    {"HARNESS_INF_GRAD_STEPS": str(INF_GRAD_STEP)}, 2),
    "zero2-fp16": ("task_instruct_tuning", ["plugin=zero2", "precision=fp16", "max_steps=4", "saving_steps=1",
                                            "keep_checkpoints=4", "gradient_accumulation_steps=2"],
                   {"HARNESS_EMPTY_BATCHES": "1.0,1.1,3.0"}, 1),
    # 2**20 overflows this model's fp16 gradients, about 2**17 does not: the first 3 or 4 steps overflow, and the save
    # due at step 2 waits for the first good step; the SIGKILL follows that checkpoint.
    "gemini-fp16": ("alignment_sft", ["plugin=gemini", "precision=fp16", "max_steps=8", "saving_steps=2",
                                      "keep_checkpoints=5", "gradient_accumulation_steps=2", "packing=True",
                                      f"initial_loss_scale={2**20}"],
                    {}, None),
    # Tied embeddings, one stage-1 run per engine (ddp: fp32 on CPU, the reference the ZeRO ones must follow).
    "zero2-tied": ("pretrain", ["plugin=zero2", "precision=bf16", "max_steps=4", "saving_steps=2"], {}, 2),
    "gemini-tied": ("pretrain", ["plugin=gemini", "precision=bf16", "max_steps=4", "saving_steps=2"], {}, 2),
    "ddp-tied": ("pretrain", ["plugin=ddp", "max_steps=4", "saving_steps=2"], {}, 2),
}
COMPARED = ("loss", "lr", "grad_norm", "loss_scale", "skipped_steps", "empty_steps")


@pytest.fixture(scope="module")
def zero_runs(tiny_model, tied_tiny_model, tmp_path_factory):
    """name -> (straight run's output dir, its metrics by step), each combo run once per module."""
    done = {}

    def run(name):
        if name not in done:
            model = tied_tiny_model if name.endswith("-tied") else tiny_model
            done[name] = _straight_killed_resumed(name, model, tmp_path_factory.mktemp(name))
        return done[name]

    return run


def _straight_killed_resumed(name, tiny_model, root):
    stage, settings, env, kill_step = COMBOS[name]
    zero = "plugin=ddp" not in settings
    env = {"HARNESS_ZERO_ON_CPU": "1", **env} if zero else env
    run = TINY_RUN + settings + [f"init_model_path={tiny_model}"]
    whole, split = root / "whole", root / "split"
    (root / "loaded").mkdir()

    straight = torchrun(run + [f"output_dir={whole}", f"logdir={whole}/logs"], stage=stage,
                        env={**env, "HARNESS_DUMP_LOADED": str(root / "loaded")} if zero else env)
    assert straight.returncode == 0, explain(straight)
    if zero:
        assert "host memory with the model loaded, GiB resident / peak: rank 0 " in straight.stdout
        assert ", rank 1 " in straight.stdout.split("host memory with the model loaded")[1].splitlines()[0]
        _check_loaded(root / "loaded", tiny_model, torch.bfloat16 if "precision=bf16" in settings else torch.float16)
    kill_step = kill_step or min(_step_of(path) for path in whole.glob("ckpt_step-*"))
    killed = torchrun(run + [f"output_dir={split}", f"logdir={split}/logs"], stage=stage,
                      env={**env, "HARNESS_KILL_AFTER_SAVE": str(kill_step)})
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr + killed.stdout, explain(killed)
    resumed = torchrun(run + [f"output_dir={split}", f"logdir={split}/logs", "recover_training_from_checkpoint=latest"],
                       stage=stage, env=env)
    assert resumed.returncode == 0, explain(resumed)
    assert f"resumed from {split}/ckpt_step-{kill_step}_" in resumed.stdout
    assert "will not match an uninterrupted one" not in resumed.stdout + resumed.stderr

    expected, got = read_metrics(whole / "logs"), read_metrics(split / "logs")
    assert sorted(got) == sorted(expected) == list(range(1, max(expected) + 1))
    for step in expected:
        for key in COMPARED:
            a, b = expected[step].get(key), got[step].get(key)
            assert a == b or (a != a and b != b), f"{name} step {step} {key}: straight {a}, resumed {b}"
    assert _weights(whole / "final") == _weights(split / "final")
    return root, expected


def _check_loaded(loaded, tiny_model, dtype):
    """Loaded lazily after boost: the same half-precision weights as a plain load; fp32 masters equal to the fp32
    source (S3), where a copy of the half-precision weights would differ."""
    from safetensors.torch import load_file

    from llama.model_files import load_tensors

    source, plain = load_tensors(tiny_model), load_tensors(tiny_model, dtype=dtype)
    weights, masters = load_tensors(loaded / "weights"), load_file(str(loaded / "masters.safetensors"))
    assert weights.keys() == masters.keys() == source.keys()
    for key in source:
        assert torch.equal(weights[key].to(dtype), plain[key]), key
        assert masters[key].dtype == torch.float32 and torch.equal(masters[key], source[key]), key
    assert any(not torch.equal(source[k], plain[k].float()) for k in source)


def _step_of(checkpoint) -> int:
    return int(checkpoint.name.split("_")[1].removeprefix("step-"))


def _weights(model_dir):
    """Every weight as bytes, from a dir that Llama.from_pretrained loads."""
    from llama.llama_model import Llama

    model = Llama.from_pretrained(model_dir)
    return {name: t.detach().numpy().tobytes() for name, t in model.state_dict().items()}


@pytest.mark.parametrize("name", ["zero2-bf16", "gemini-bf16"])
def test_bf16_skips_an_inf_gradient(zero_runs, name):
    metrics = zero_runs(name)[1]
    assert metrics[INF_GRAD_STEP]["skipped_steps"] == 1
    assert math.isnan(metrics[INF_GRAD_STEP]["loss"]) and math.isnan(metrics[INF_GRAD_STEP]["grad_norm"])
    for step in (1, 2, 4):
        assert metrics[step]["skipped_steps"] == 0 and math.isfinite(metrics[step]["loss"])
    assert metrics[4]["loss"] < metrics[1]["loss"]


def test_bf16_losses_match_between_zero2_and_gemini(zero_runs):
    zero2, gemini = zero_runs("zero2-bf16")[1], zero_runs("gemini-bf16")[1]
    for step in zero2:
        # The same weights, data and dropout, to round-off: gemini computes the loss without the fused kernel, each
        # reduces bf16 gradients in its own order, and gemini's Adam runs HybridAdam's torch path on bf16 gradients
        # where zero2's gets fp32 ones.
        a, b = zero2[step]["loss"], gemini[step]["loss"]
        assert a == pytest.approx(b, rel=1e-4) or (math.isnan(a) and math.isnan(b)), f"step {step}"


def test_fp16_empty_steps_and_a_checkpoint_without_optimizer_state(zero_runs):
    root, metrics = zero_runs("zero2-fp16")
    assert metrics[1]["empty_steps"] == 1 and metrics[1]["skipped_steps"] == 0 and math.isnan(metrics[1]["loss"])
    assert math.isnan(metrics[1]["grad_norm"])
    for step in (2, 3, 4):
        assert metrics[step]["empty_steps"] == 0 and metrics[step]["skipped_steps"] == 0
        # Step 3's mean is over its one counted micro-batch: with the empty one's 0 in it, it would be half.
        assert metrics[step]["loss"] > 0.8 * metrics[2]["loss"]
        assert metrics[step]["loss_scale"] == metrics[1]["loss_scale"] > 0
    assert metrics[4]["empty_steps_total"] == 1
    first = next((root / "whole").glob("ckpt_step-1_*"))
    assert json.loads((first / "optimizer.none.json").read_text())["step"] == 1
    assert not (first / "optimizer").exists()
    assert {p.name for p in first.glob("master_weights.rank*.safetensors")} == {
        "master_weights.rank0.safetensors", "master_weights.rank1.safetensors"}
    assert json.loads((first / "loss_scaler.json").read_text())["scale"] == metrics[1]["loss_scale"]


def test_fp16_gemini_accumulation_recovers_from_overflow(zero_runs):
    root, metrics = zero_runs("gemini-fp16")
    steps = sorted(metrics)
    skipped = [metrics[s]["skipped_steps"] == 1 for s in steps]
    # Every step after the first overflow would overflow too if the skipped gradients were accumulated onto (C2).
    assert skipped[0] and sum(not s for s in skipped) >= 3 and not skipped[-1], skipped
    assert all(math.isfinite(metrics[s]["loss"]) and math.isfinite(metrics[s]["grad_norm"])
               for s, skip in zip(steps, skipped) if not skip)
    # The loss scale follows colossalai's DynamicGradScaler (hysteresis 2, growth after 1000 good steps).
    scale, growth, hysteresis, expected = 2**20, 0, 0, {}
    for step, skip in zip(steps, skipped):
        growth, hysteresis = (0, hysteresis + 1) if skip else (growth + 1, hysteresis)
        scale = scale / 2 if skip and hysteresis >= 2 else scale
        expected[step] = {"scale": scale, "growth_step": growth, "hysteresis_step": hysteresis}
        assert metrics[step]["loss_scale"] == scale, step
    first = min(_step_of(path) for path in (root / "whole").glob("ckpt_step-*"))
    assert json.loads(next((root / "whole").glob(f"ckpt_step-{first}_*")).joinpath("loss_scaler.json").read_text()
                      ) == expected[first]


def test_tied_embeddings_are_one_parameter_under_every_engine(zero_runs, tied_tiny_model):
    """Each engine trains the tied matrix as one parameter: the ZeRO runs follow the fp32 ddp run to bf16 round-off
    (an embedding updated twice a step, or an output copy drifting from it, would not), every checkpoint and the
    final dir hold it once, and each resumes exactly (zero_runs)."""
    from safetensors import safe_open

    runs = {name: zero_runs(name) for name in ("ddp-tied", "zero2-tied", "gemini-tied")}
    reference = runs["ddp-tied"][1]
    for name in ("zero2-tied", "gemini-tied"):
        for step, record in runs[name][1].items():
            assert record["loss"] == pytest.approx(reference[step]["loss"], rel=5e-4), f"{name} step {step}"
    source_names = set(_weights(tied_tiny_model))
    assert "output.weight" not in source_names and "tok_embeddings.weight" in source_names
    for name, (root, metrics) in runs.items():
        assert metrics[4]["loss"] < metrics[1]["loss"], name
        for model_dir in [root / "whole" / "final", *(root / "whole").glob("ckpt_step-*")]:
            stored = []
            for f in model_dir.glob("model*.safetensors"):
                with safe_open(str(f), framework="pt") as tensors:
                    stored += list(tensors.keys())
            assert sorted(stored) == sorted(source_names), model_dir
