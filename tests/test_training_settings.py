"""Settings: typed key=value overrides, errors that name the setting, validation, and the model-input checks
that run before any data or model memory."""
import subprocess
import sys
import types

import pytest
import torch

import alignment_sft_args
import pretrain_args
import task_instruct_tuning_args
from settings_for import settings_for
from training.settings import SettingsError, load_settings, resolve_global_batch
from training.settings_concerns import DataSettings, OptimisationSettings
from training_runs import REPO, tiny_model  # noqa: F401 (fixture)


def test_overrides_keep_the_args_type():
    s = load_settings(pretrain_args, ["lr=1e-5", "max_steps=100_000", "min_lr=0", "packing=true",
                                      "gradient_checkpointing=False", "plugin=zero2", "output_dir=out/x y",
                                      "tokenizer_path='  spaced  '", "pretrain_data_split={'zh': 1, 'en': 2}"])
    o = s.optimisation
    assert o.lr == 1e-5 and isinstance(o.lr, float)
    assert o.max_steps == 100_000 and isinstance(o.max_steps, int)
    assert o.min_lr == 0.0 and isinstance(o.min_lr, float)  # an int is fine for a float setting
    assert s.data.packing is True and s.model.gradient_checkpointing == "none"  # False: its meaning before the modes
    assert s.engine.plugin == "zero2" and s.output.output_dir == "out/x y"  # str settings take any text, unquoted
    assert s.model.tokenizer_path == "  spaced  "  # quotes keep the spaces
    assert s.data.pretrain_data_split == {"zh": 1, "en": 2}
    assert s.overridden >= {"lr", "plugin", "packing"}
    assert s.data.batch_size == pretrain_args.batch_size  # untouched values come from the args file


def test_logdir_follows_output_dir_unless_set():
    assert load_settings(pretrain_args, ["output_dir=runs/a"]).output.logdir == "runs/a/logs"
    assert load_settings(pretrain_args, ["output_dir=runs/a", "logdir=tb/a"]).output.logdir == "tb/a"


@pytest.mark.parametrize("argv, message", [
    (["lrr=1e-5"], "unknown setting 'lrr'.*did you mean lr"),
    (["batch_size=1.5"], "'batch_size' expects an int"),
    (["batch_size=True"], "'batch_size' expects an int"),
    (["lr=fast"], "'lr' expects a number"),
    (["packing=yes"], "'packing' expects True or False"),
    (["pretrain_data_split=zh"], "'pretrain_data_split' expects a dict"),
    (["max_steps"], "'max_steps' is not key=value"),
    (["plugin=zero3"], "'plugin' = 'zero3' is invalid.*gemini"),
    (["precision=fp8"], "'precision' = 'fp8' is invalid"),
    (["batch_size=0"], "'batch_size' = 0 is invalid"),
    (["warmup_steps=10", "max_steps=10"], "'warmup_steps' = 10 must be below 'max_steps' = 10"),
    (["min_lr=1e-3"], "'min_lr' = 0.001 is above 'lr'"),
    (["max_steps=3", "max_steps=4"], r"setting 'max_steps' is given twice on the command line \(3, then '4'\)"),
    (["max_steps=3", "lr=1e-5", "max_steps=3"], "setting 'max_steps' is given twice"),  # even with the same value
    (["gemini_offload_param_frac=1.5"], "'gemini_offload_param_frac' = 1.5 is invalid"),
    (["gemini_offload_optim_frac=0.5", "gemini_offload_param_frac=1.0"],
     "'gemini_offload_param_frac' = 1.0 needs 'gemini_offload_optim_frac' = 1.0"),
])
def test_bad_overrides_name_the_setting(argv, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(pretrain_args, argv)


@pytest.mark.parametrize("module", [pretrain_args, task_instruct_tuning_args, alignment_sft_args])
def test_each_args_file_is_valid_as_shipped(module):
    s = load_settings(module, []).optimisation
    assert s.min_lr == pytest.approx(0.1 * s.lr)  # the recipe's cosine floor
    assert (s.adam_beta1, s.adam_beta2, s.weight_decay, s.max_grad_norm) == (0.9, 0.95, 0.1, 2.0)
    assert s.initial_loss_scale == 2 ** 14


@pytest.mark.parametrize("placement, param_frac, expected", [("static", 1.0, 1.0), ("static", 0.0, 0.0),
                                                              ("auto", 1.0, 0.0)])
def test_gemini_placement_settings_reach_the_plugin(placement, param_frac, expected):
    from training.engine import EngineChoice, engine_for

    s = load_settings(alignment_sft_args, [f"gemini_placement_policy={placement}",
                                           f"gemini_offload_param_frac={param_frac}"])
    engine = engine_for(s, EngineChoice("gemini", "fp16", None))  # only the plugin: GeminiPlugin itself needs a GPU
    plugin, _ = engine._plugin(types.SimpleNamespace(GeminiPlugin=dict))
    assert (plugin["placement_policy"], plugin["offload_param_frac"]) == (placement, expected)
    assert plugin["offload_optim_frac"] == (1.0 if placement == "static" else 0.0)


def test_settings_are_read_only_and_dict_is_a_copy():
    s = load_settings(pretrain_args, ["plugin=ddp"])
    with pytest.raises(AttributeError):
        s.optimisation.lr = 1.0
    d = s.to_dict()
    d["pretrain_data_split"]["zh"] = 99
    assert s.data.pretrain_data_split["zh"] == pretrain_args.pretrain_data_split["zh"]
    assert "* plugin" in s.format()


@pytest.mark.parametrize("override, message", [
    ("batch_sise=4", "error: SettingsError: unknown setting 'batch_sise': pretrain_args.py has no such name; "
                     "did you mean batch_size, global_batch_size?"),
    ("lr=abc", "error: SettingsError: setting 'lr' expects a number (args file value 3e-05), got 'abc'"),
])
def test_cli_error_is_one_clear_line(override, message):
    result = subprocess.run([sys.executable, "pretrain_main.py", override], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == message


def test_missing_model_path_fails_before_data_and_model(tmp_path):
    # The data root does not exist either: the model check runs first, so its message is the one reported.
    result = subprocess.run([sys.executable, "pretrain_main.py", f"init_model_path={tmp_path / 'no-model'}",
                             "plugin=ddp", "precision=fp32", f"pretrain_data_root_dir={tmp_path / 'no-data'}",
                             f"output_dir={tmp_path / 'out'}",
                             f"logdir={tmp_path / 'logs'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "init_model_path=" in result.stdout + result.stderr
    assert "no such model directory" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def _inputs_settings(model_dir, **overrides):
    values = dict(init_model_path=str(model_dir), tokenizer_path="", max_seq_length=64, dropout_prob=0.05)
    values.update(overrides)
    return settings_for(pretrain_args, values)


def test_model_inputs_checked_without_loading_weights(tiny_model, tmp_path):
    from llama.tiny import train_tokenizer
    from training.model_loading import ModelInputError, check_model_inputs

    inputs = check_model_inputs(_inputs_settings(tiny_model))
    assert inputs.config.dropout_prob == 0.05 and inputs.tokenizer.vocab_size == inputs.config.vocab_size

    with pytest.raises(ModelInputError, match="max_seq_length=4096 is above the model's max_sequence_length=128"):
        check_model_inputs(_inputs_settings(tiny_model, max_seq_length=4096))

    other = train_tokenizer(["a different tokenizer, 另一个分词器"] * 50 + [f"word{i}" for i in range(300)],
                            tmp_path / "other.model", vocab_size=700)
    with pytest.raises(ModelInputError, match="pieces but the model's embedding"):
        check_model_inputs(_inputs_settings(tiny_model, tokenizer_path=str(other)))

    with pytest.raises(ModelInputError, match="tokenizer_path: tokenizer not found"):
        check_model_inputs(_inputs_settings(tiny_model, tokenizer_path=str(tmp_path / "missing.model")))


def test_settings_left_out_of_an_args_file_take_their_concern_default_and_stay_flat_in_order():
    s = settings_for({"lr": 1e-4, "warmup_steps": 10, "max_steps": 20})
    assert (s.optimisation.lr, s.optimisation.min_lr) == (1e-4, OptimisationSettings().min_lr)
    assert s.data == DataSettings() and s.chat is None  # a stage's own concern only where its args file has one
    assert list(s.to_dict())[:3] == ["lr", "warmup_steps", "max_steps"]  # the args file's order, then the defaults
    assert set(s.to_dict()) == set(load_settings(pretrain_args, []).to_dict())  # the same flat keys as a stage's
    assert s.to_dict()["gradient_checkpointing"] == "full"
    assert load_settings(alignment_sft_args, []).chat.chat_format == "billa"
    with pytest.raises(SettingsError, match=r"test_args sets 'learning_rate', which is no setting of this repo; "
                                            r"did you mean lr\?"):
        settings_for({"learning_rate": 1e-4})


def test_help_lists_every_setting_with_its_comment(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_settings(pretrain_args, ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "warmup_steps" in text and "linear warmup: 2,000 of 100,000 steps = 2%" in text
    assert "Override any of them on the command line" in text  # the args file's docstring


def test_loaded_model_trains_with_the_runs_dropout_not_the_checkpoints(tiny_model):
    import torch

    from training.engine import EngineChoice, engine_for
    from training.model_loading import check_model_inputs

    settings = _inputs_settings(tiny_model, gradient_checkpointing="full", compile=True)
    engine = engine_for(settings, EngineChoice("ddp", "fp32", torch.device("cpu")))
    model = engine.build_model(check_model_inputs(settings))
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(p == 0.05 for p in dropouts)
    assert model.config.dropout_prob == 0.05 and model.gradient_checkpointing == "full"


@pytest.mark.parametrize("alias, meant", [
    ("learning_rate", "lr"), ("lr_rate", "lr"), ("num_steps", "max_steps"), ("total_steps", "max_steps"),
    ("train_steps", "max_steps"), ("grad_accum", "gradient_accumulation_steps"),
    ("gradient_accumulation", "gradient_accumulation_steps"), ("per_device_train_batch_size", "batch_size"),
    ("micro_batch_size", "batch_size"), ("warmup", "warmup_steps"), ("num_warmup_steps", "warmup_steps"),
    ("seq_len", "max_seq_length"), ("max_length", "max_seq_length"), ("block_size", "max_seq_length"),
    ("Learning-Rate", "lr"),
])
def test_did_you_mean_knows_other_trainers_names(alias, meant):
    with pytest.raises(SettingsError) as raised:
        load_settings(pretrain_args, [f"{alias}=1"])
    assert f"unknown setting {alias!r}" in str(raised.value)
    assert str(raised.value).split("did you mean ")[1].startswith(meant)  # the alias's setting comes first


# The recipe's per-GPU batch and GPU count of each stage (train_codes README: 8 x V100 for stages 1 and 2,
# 2 x A100 for stage 3): the args files' global batch must be their product.
RECIPE_BATCH = [(pretrain_args, 20, 8, 160), (task_instruct_tuning_args, 20, 8, 160), (alignment_sft_args, 24, 2, 48)]


@pytest.mark.parametrize("module, per_gpu, gpus, global_batch", RECIPE_BATCH)
def test_args_files_state_the_recipe_global_batch(module, per_gpu, gpus, global_batch):
    s = load_settings(module, [])
    assert (s.data.batch_size, s.optimisation.global_batch_size) == (per_gpu, global_batch) == (per_gpu, per_gpu * gpus)
    assert resolve_global_batch(s, gpus).optimisation.gradient_accumulation_steps == 1  # the recipe: no accumulation


@pytest.mark.parametrize("argv, world, accumulation", [
    ([], 8, 1), ([], 4, 2), ([], 2, 4), ([], 1, 8),  # 160 samples a step on any GPU count
    (["batch_size=10"], 8, 2), (["batch_size=5"], 16, 2),
    (["global_batch_size=0", "gradient_accumulation_steps=3"], 4, 3),  # 0: as set
])
def test_global_batch_derives_the_accumulation(argv, world, accumulation):
    settings = load_settings(pretrain_args, argv)
    resolved = resolve_global_batch(settings, world)
    accumulated = resolved.optimisation.gradient_accumulation_steps
    assert accumulated == accumulation
    if settings.optimisation.global_batch_size:
        assert resolved.data.batch_size * world * accumulated == settings.optimisation.global_batch_size
    assert resolved.overridden == settings.overridden and resolved.optimisation.lr == settings.optimisation.lr


# (stage args, GPUs, per GPU, accumulation): batch_size is the most one GPU holds, so a smaller per-GPU batch keeps the
# recipe's global batch where one fits; where none does (the global batch is not a multiple of the GPU count) the
# nearest is trained, with the fewest micro-batches.
FITTED = [(alignment_sft_args, 8, 6, 1),  # 48 = 6 x 8: batch_size=24 lowered to 6
          (pretrain_args, 16, 10, 1), (pretrain_args, 5, 16, 2),  # 160 exactly
          (pretrain_args, 6, 13, 2), (pretrain_args, 3, 18, 3), (pretrain_args, 7, 11, 2),  # 156, 162, 154
          (pretrain_args, 12, 13, 1), (pretrain_args, 24, 7, 1),  # 156, 168
          (alignment_sft_args, 5, 10, 1), (alignment_sft_args, 7, 7, 1)]  # 50, 49


@pytest.mark.parametrize("module, world, per_gpu, accumulation", FITTED)
def test_global_batch_fits_any_gpu_count(module, world, per_gpu, accumulation, caplog):
    settings = load_settings(module, [])
    with caplog.at_level("INFO", logger="training.settings"):
        resolved = resolve_global_batch(settings, world)
    assert (resolved.data.batch_size, resolved.optimisation.gradient_accumulation_steps) == (per_gpu, accumulation)
    got = per_gpu * world * accumulation
    wanted = settings.optimisation.global_batch_size
    assert abs(got - wanted) < world  # the nearest multiple of the GPU count, or exact
    if got == wanted:
        assert f"{per_gpu} per GPU (batch_size={settings.data.batch_size} is the most)" in caplog.text
    else:
        assert (f"global_batch_size={wanted} fits no per-GPU batch on {world} processes"
                in caplog.text and f"training with the nearest, {per_gpu} per GPU x {world} x {accumulation} "
                f"accumulation = {got} samples per step (global_batch_exact=True stops instead)" in caplog.text)
    with caplog.at_level("INFO", logger="training.settings"):
        caplog.clear()
        assert resolve_global_batch(load_settings(module, []), 2 if module is alignment_sft_args else 8
                                    ).data.batch_size == settings.data.batch_size
    assert caplog.text == ""  # the recipe's own GPU count: nothing to say


def test_global_batch_exact_stops_and_names_the_numbers():
    # Stage 3 as shipped (24 per GPU, 48 a step) on 8 GPUs: 24 x 8 = 192 > 48.
    with pytest.raises(SettingsError, match=r"'global_batch_size' = 48 is not a multiple of batch_size 24 x 8 "
                                            r"processes = 192 \(global_batch_exact=True\); use batch_size=6 \(6 x 8 x "
                                            r"1 accumulation = 48\); the per-GPU batch sizes that fit: \[1, 2, 3, 6\]"):
        resolve_global_batch(load_settings(alignment_sft_args, ["global_batch_exact=True"]), 8)
    with pytest.raises(SettingsError, match=r"= 160 is not a multiple of batch_size 20 x 3 processes = 60 "
                                            r"\(global_batch_exact=True\); use global_batch_size a multiple of 3"):
        resolve_global_batch(load_settings(pretrain_args, ["global_batch_exact=True"]), 3)
    exact = resolve_global_batch(load_settings(pretrain_args, ["global_batch_exact=True", "batch_size=10"]), 8)
    assert (exact.data.batch_size, exact.optimisation.gradient_accumulation_steps) == (10, 2)
    with pytest.raises(SettingsError, match="'gradient_accumulation_steps' is derived from 'global_batch_size' = 160"):
        load_settings(pretrain_args, ["gradient_accumulation_steps=2"])
    with pytest.raises(SettingsError, match="'global_batch_size' = -1 is invalid"):
        load_settings(pretrain_args, ["global_batch_size=-1"])


def test_global_batch_error_is_one_line_before_any_work(tmp_path):
    result = subprocess.run([sys.executable, "pretrain_main.py", "global_batch_size=7", "batch_size=2",
                             "global_batch_exact=True",
                             f"init_model_path={tmp_path / 'no-model'}", f"output_dir={tmp_path / 'out'}",
                             f"logdir={tmp_path / 'logs'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    output = result.stdout + result.stderr
    assert ("error: SettingsError: setting 'global_batch_size' = 7 is not a multiple of batch_size 2 x 1 processes "
            "= 2 (global_batch_exact=True); use batch_size=1 (1 x 1 x 7 accumulation = 7)") in output
    assert "Traceback" not in output and "no such model directory" not in output  # stopped before the model check


@pytest.mark.parametrize("changes, message", [
    ({"architecture": "MistralForCausalLM", "sliding_window": 32},
     r"max_seq_length=64 is above the sliding_window=32 of .*/config.json: this model has no sliding-window "
     r"attention; use sequences of at most 32, or set sliding_window to null there"),
    ({"architecture": "GemmaForCausalLM"},
     r"init_model_path=.*config.json: architecture 'GemmaForCausalLM' is not supported; supported: LlamaForCausalLM, "
     r"MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"),
])
def test_model_inputs_refuse_what_this_model_cannot_compute(tiny_model, tmp_path, changes, message):
    import json
    import shutil

    from training.model_loading import ModelInputError, check_model_inputs

    model_dir = shutil.copytree(tiny_model, tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(ModelInputError, match=message):
        check_model_inputs(_inputs_settings(model_dir))
    if "sliding_window" in changes:  # a window as long as the run's sequences cuts nothing
        check_model_inputs(_inputs_settings(model_dir, max_seq_length=32))


@pytest.mark.parametrize("given, mode", [("True", "full"), ("false", "none"), ("selective", "selective"),
                                         ("full", "full"), ("none", "none")])
def test_gradient_checkpointing_takes_modes_and_keeps_the_old_true_false(given, mode):
    assert load_settings(pretrain_args, [f"gradient_checkpointing={given}"]).model.gradient_checkpointing == mode


def test_an_old_args_file_with_a_bool_checkpointing_still_takes_a_mode(tmp_path, monkeypatch):
    old = types.ModuleType("old_args")
    old.gradient_checkpointing = True  # an args file written before the modes
    assert load_settings(old, []).model.gradient_checkpointing == "full"
    assert load_settings(old, ["gradient_checkpointing=selective"]).model.gradient_checkpointing == "selective"
    with pytest.raises(SettingsError, match="'gradient_checkpointing' = 'half' is invalid"):
        load_settings(old, ["gradient_checkpointing=half"])


@pytest.mark.parametrize("plugin, device, compiled", [("ddp", "cpu", False), ("gemini", "cuda", False),
                                                      ("zero2", "cuda", True)])
def test_compile_runs_where_the_engine_allows_it_and_says_why_not_in_one_line(plugin, device, compiled, caplog):
    from training.engine import ENGINES, EngineChoice

    calls = []
    model = types.SimpleNamespace(layers=[0, 1], compile_blocks=lambda: calls.append("compiled"))
    choice = EngineChoice(plugin, "bf16", torch.device(device))
    engine = ENGINES[plugin](load_settings(pretrain_args, []), choice)
    with caplog.at_level("INFO", logger="training.engine.base"):
        assert engine._compile_if_allowed(model) is compiled
    assert calls == (["compiled"] if compiled else [])
    assert len(caplog.records) == 1 and ("running eager" in caplog.text) != compiled
    off = ENGINES[plugin](load_settings(pretrain_args, ["compile=False"]), choice)
    assert not off._compile_if_allowed(model)


@pytest.mark.parametrize("argv", [[], ["plugin=zero2", "precision=bf16"], ["plugin=ddp"],
                                  ["plugin=ddp", "precision=bf16"]])
def test_a_pair_that_needs_cuda_is_refused_without_it_naming_the_cpu_way(argv, monkeypatch):
    """No silent fallback: a machine without CUDA trains only what it was asked to, ddp in fp32."""
    from training.engine import choose_engine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    settings = load_settings(pretrain_args, argv)
    plugin, precision = settings.engine.plugin, settings.optimisation.precision
    with pytest.raises(SettingsError, match=rf"'plugin' = '{plugin}', 'precision' = '{precision}' need a CUDA device "
                                            r".* on CPU run plugin=ddp precision=fp32"):
        choose_engine(settings)
    engine = choose_engine(load_settings(pretrain_args, ["plugin=ddp", "precision=fp32"]))
    assert (engine.choice.plugin, engine.choice.precision, engine.choice.device.type) == ("ddp", "fp32", "cpu")
