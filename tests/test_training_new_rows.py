"""new_rows_only=True (training/new_rows.py): a warm-up in which only the vocabulary rows expand_vocab added train.
The freeze is exact: after the run every old row and every other weight is bit-identical to the source, under ddp
and under the ZeRO engines on CPU (tests/zero_cpu.py), where a killed warm-up also resumes exactly; a checkpoint
resumes only with the same setting."""
import json
import shutil

import pytest
import torch

from llama.configuration_llama import LlamaConfig
from llama.llama_model import Llama
from llama.model_files import load_tensors
from training.engine.optimizer import parameter_groups
from training.model_loading import ModelInputError, check_model_inputs
from training.new_rows import NEW_ROWS_REPORT, train_new_rows_only
from training_runs import TINY_RUN, explain, read_metrics, tied_tiny_model, tiny_model, torchrun  # noqa: F401
from settings_for import settings_for

import pretrain_args

MATRICES = ("tok_embeddings.weight", "output.weight")


def widened_copy(source, directory, first_new_row: int):
    """A copy of model dir `source` as if expand_vocab had added the rows from first_new_row on."""
    shutil.copytree(source, directory)
    (directory / NEW_ROWS_REPORT).write_text(json.dumps({"first_new_row": first_new_row}))
    return directory


def assert_only_new_rows_moved(source, trained, first: int) -> None:
    before, after = load_tensors(source), load_tensors(trained)
    assert before.keys() == after.keys()
    for name in before:  # in fp32, so an fp32 master saved for a bf16 source is compared in full
        old, new = before[name].float(), after[name].float()
        if name in MATRICES:
            assert torch.equal(new[:first], old[:first]), f"{name}: an old row moved"
            if name == "output.weight" or "output.weight" not in before:  # every output row has a gradient
                moved = (new[first:] != old[first:]).any(dim=1)
                assert moved.all(), f"{name}: {int((~moved).sum())} of {len(moved)} new rows never moved"
        else:
            assert torch.equal(new, old), f"{name} moved"


@pytest.mark.parametrize("tied", [False, True])
def test_frozen_rows_change_no_value_and_stop_every_old_rows_gradient(tied):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         max_sequence_length=32, tie_word_embeddings=tied)
    model = Llama(config)
    ids = torch.randint(0, 96, (2, 16))
    ids[0, :4] = torch.tensor([70, 71, 90, 95])  # new tokens read and predicted
    mask = torch.ones_like(ids)

    def loss_and_grads(frozen_rows):
        model.zero_grad()
        model.frozen_rows = frozen_rows
        loss, _ = model(ids, loss_mask=mask)
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if name in MATRICES}

    free_loss, free = loss_and_grads(0)
    loss, gated = loss_and_grads(64)
    assert torch.equal(loss, free_loss)  # the same values, bit for bit
    for name, grad in gated.items():
        assert not grad[:64].any(), f"{name}: an old row has a gradient"
        assert grad[64:].abs().sum() > 0
        if name == "output.weight" or tied:  # untied input rows: only those of tokens read; output: all
            torch.testing.assert_close(grad[64:], free[name][64:], rtol=1e-6, atol=1e-7)


def test_only_the_embedding_and_output_train_without_weight_decay(tiny_model):
    model = Llama.from_pretrained(tiny_model)
    train_new_rows_only(model, 300)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == list(MATRICES)
    settings = settings_for(pretrain_args, {"new_rows_only": True, "weight_decay": 0.1, "init_model_path": "x"})
    (group,) = parameter_groups(settings.optimisation, model)
    assert group["weight_decay"] == 0.0 and len(group["params"]) == 2


def test_a_model_dir_without_expand_vocabs_report_stops_before_anything_is_built(tiny_model, tmp_path):
    settings = settings_for(pretrain_args, {"new_rows_only": True, "init_model_path": str(tiny_model),
                                            "max_seq_length": 64})
    with pytest.raises(ModelInputError, match=f"{tiny_model / NEW_ROWS_REPORT} does not exist. tools.expand_vocab"):
        check_model_inputs(settings)
    widened = widened_copy(tiny_model, tmp_path / "widened", 10_000)
    with pytest.raises(ModelInputError, match="first_new_row=10000 names no added row of this model"):
        check_model_inputs(settings_for(pretrain_args, {"new_rows_only": True, "init_model_path": str(widened),
                                                        "max_seq_length": 64}))


def test_ddp_warm_up_moves_only_new_rows_and_resumes_only_as_a_warm_up(tiny_model, tmp_path):
    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    first = vocab // 2
    model = widened_copy(tiny_model, tmp_path / "widened", first)
    out = tmp_path / "run"
    run = TINY_RUN + [f"init_model_path={model}", "new_rows_only=True", "max_steps=3", "saving_steps=2",
                      f"output_dir={out}", f"logdir={out}/logs"]
    result = torchrun(run)
    assert result.returncode == 0, explain(result)
    assert f"new_rows_only: rows {first}..{vocab - 1} of the embedding and output train" in result.stdout
    assert_only_new_rows_moved(model, out / "final", first)

    (checkpoint,) = out.glob("ckpt_step-2_*")
    full = torchrun(TINY_RUN + [f"init_model_path={model}", "max_steps=3", f"output_dir={out}", f"logdir={out}/logs2",
                                f"recover_training_from_checkpoint={checkpoint}"])
    assert full.returncode != 0
    assert f"{checkpoint} was written with new_rows_only=True: resume it with the same" in full.stdout, explain(full)


@pytest.mark.parametrize("plugin, tied", [("zero2", True), ("gemini", False)])
def test_zero_warm_up_moves_only_new_rows_and_resumes_exactly(plugin, tied, tiny_model, tied_tiny_model, tmp_path):
    bf16 = tmp_path / "bf16"  # stored as the engine holds frozen weights
    source = tied_tiny_model if tied else tiny_model
    Llama.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(bf16)
    for f in source.glob("tokenizer*"):
        shutil.copy(f, bf16)
    vocab = json.loads((bf16 / "config.json").read_text())["vocab_size"]
    first = vocab // 2
    model = widened_copy(bf16, tmp_path / "widened", first)
    run = TINY_RUN + [f"init_model_path={model}", "new_rows_only=True", f"plugin={plugin}", "precision=bf16",
                      "max_steps=4", "saving_steps=2"]
    zero = {"HARNESS_ZERO_ON_CPU": "1"}
    straight, split = tmp_path / "straight", tmp_path / "split"
    result = torchrun(run + [f"output_dir={straight}", f"logdir={straight}/logs"], env=zero)
    assert result.returncode == 0, explain(result)
    assert_only_new_rows_moved(model, straight / "final", first)

    # Killed after its step-2 checkpoint and resumed, the warm-up goes on exactly (its masters are the new rows')
    split_run = run + [f"output_dir={split}", f"logdir={split}/logs"]
    killed = torchrun(split_run, env={**zero, "HARNESS_KILL_AFTER_SAVE": "2"})
    assert killed.returncode != 0, explain(killed)
    resumed = torchrun(split_run + ["recover_training_from_checkpoint=latest"], env=zero)
    assert resumed.returncode == 0, explain(resumed)
    expected, got = read_metrics(straight / "logs"), read_metrics(split / "logs")
    assert [got[step]["loss"] for step in (3, 4)] == [expected[step]["loss"] for step in (3, 4)]
    a, b = load_tensors(straight / "final"), load_tensors(split / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_zero_refuses_a_source_it_would_round(tiny_model, tmp_path):
    model = widened_copy(tiny_model, tmp_path / "widened", 200)  # float32 weights, held in bf16 under zero2
    out = tmp_path / "run"
    result = torchrun(TINY_RUN + [f"init_model_path={model}", "new_rows_only=True", "plugin=zero2", "precision=bf16",
                                  "max_steps=3", f"output_dir={out}", f"logdir={out}/logs"], nproc=1,
                      env={"HARNESS_ZERO_ON_CPU": "1"})
    assert result.returncode != 0
    assert ("holds the frozen weights in bfloat16, but " in result.stdout
            and "stores float32: they would be saved rounded. Widen in bfloat16 (python -m tools.expand_vocab ... "
                "--dtype bfloat16), or run plugin=ddp" in result.stdout), explain(result)
