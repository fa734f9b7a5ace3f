"""A launch given a bad output_dir, a corrupt tokenizer.model or truncated starting weights stops before any work
with one `error:` line naming the file or the setting, never a traceback."""
import shutil
import subprocess
import sys

import pytest
import torch

from training_runs import REPO, TINY_RUN, on_cpu, one_each, tiny_model  # noqa: F401 (fixture)


def _launch(*settings: str, cpu: bool = True) -> list[str]:
    """The lines a one-process stage 1 launch prints, after checking that it failed (cpu: on plugin=ddp in fp32)."""
    argv = [*TINY_RUN, "max_steps=4", *settings]
    result = subprocess.run([sys.executable, "pretrain_main.py", *(on_cpu(argv) if cpu else one_each(argv))], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    return [line for line in output.splitlines() if line.startswith("error:")]


def _model_copy(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    return model


def test_unwritable_output_dir(tiny_model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    [line] = _launch(f"init_model_path={tiny_model}", f"output_dir={blocker / 'out'}")
    assert line.startswith("error: SettingsError: setting 'logdir' = ") and str(blocker / "out" / "logs") in line
    assert "Not a directory" in line


@pytest.mark.parametrize("damage, expected", [
    ("tokenizer.model", "tokenizer.model: not a SentencePiece model (Internal: could not parse ModelProto"),
    ("model.safetensors", "model.safetensors: not a whole weight file ("),
])
def test_damaged_model_files(tiny_model, tmp_path, damage, expected):
    model = _model_copy(tiny_model, tmp_path)
    path = model / damage
    if not path.exists():  # sharded weights: damage the first shard
        path = sorted(model.glob("*.safetensors"))[0]
    data = path.read_bytes()
    path.write_bytes(b"\x00garbage" * 8 if damage == "tokenizer.model" else data[: len(data) // 2])
    [line] = _launch(f"init_model_path={model}", f"output_dir={tmp_path / 'out'}")
    assert line.startswith("error: ModelInputError: ") and str(model) in line, line
    assert (expected if path.name == damage else "not a whole weight file (") in line, line
    assert "copy it again" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA: gemini runs")
def test_a_cuda_plugin_without_cuda_names_the_cpu_way(tiny_model, tmp_path):
    """The args files' plugin (gemini, fp16) on a machine without CUDA stops at once, naming what runs there,
    instead of training something else than asked."""
    [line] = _launch(f"init_model_path={tiny_model}", f"output_dir={tmp_path / 'out'}", cpu=False)
    assert line == ("error: SettingsError: settings 'plugin' = 'gemini', 'precision' = 'fp16' need a CUDA device and "
                    "this machine has none; on CPU run plugin=ddp precision=fp32 (gloo, torch.optim.AdamW)")
    [line] = _launch(f"init_model_path={tiny_model}", f"output_dir={tmp_path / 'out'}", "plugin=ddp", cpu=False)
    assert "'plugin' = 'ddp', 'precision' = 'fp16' need a CUDA device" in line  # ddp in half precision needs one too
    assert not list((tmp_path / "out").glob("ckpt_*"))
