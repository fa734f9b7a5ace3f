"""training/engine/optimizer.py and each engine's adam_kind on CPU: which Adam runs for which settings, the toolchain check's one error line (with
CUDA_HOME and nvcc faked), and the CPU Adam thread count."""
import os
import stat
import sys

import pytest
import torch
from torch.utils import cpp_extension

import pretrain_args
from training import optimizer as build_command
from training.engine import EngineChoice, engine_for
from training.engine import optimizer
from training.engine.optimizer import (ADAMW, FUSED_ADAMW, HYBRID_ADAM, ToolchainError, build_optimizer,
                                       offloaded_adam_threads, omp_threads_set_by_user)
from training.settings import load_settings

CUDA = torch.device("cuda", 0)  # only a name here: nothing runs on it
CPU = torch.device("cpu")


def _settings(*overrides):
    return load_settings(pretrain_args, list(overrides))


@pytest.mark.parametrize("overrides, device, kind, offloaded", [
    (["plugin=gemini"], CUDA, HYBRID_ADAM, True),  # the recipe: static placement, all Adam states in CPU memory
    (["plugin=gemini", "gemini_offload_optim_frac=0.0"], CUDA, HYBRID_ADAM, False),
    (["plugin=gemini", "gemini_placement_policy=auto", "gemini_offload_optim_frac=0.0"], CUDA, HYBRID_ADAM, True),
    (["plugin=zero2"], CUDA, FUSED_ADAMW, False),
    (["plugin=zero2", "zero2_cpu_offload=True"], CUDA, HYBRID_ADAM, True),
    (["plugin=ddp", "precision=bf16"], CUDA, FUSED_ADAMW, False),
    (["plugin=ddp", "precision=fp32"], CPU, ADAMW, False),  # the CPU fallback
])
def test_optimizer_for_each_setting(overrides, device, kind, offloaded):
    settings = _settings(*overrides)
    engine = engine_for(settings, EngineChoice(settings.engine.plugin, settings.optimisation.precision, device))
    assert engine.adam_kind == kind
    assert engine.optimizer_offloaded == offloaded


def check_toolchain(settings, choice):
    engine_for(settings, choice).check_toolchain()


def test_the_plugin_setting_offers_every_engine():
    from training.engine import ENGINES
    from training.settings import SettingsError

    with pytest.raises(SettingsError) as raised:
        _settings("plugin=zero3")
    assert all(repr(name) in str(raised.value) for name in ENGINES) and len(ENGINES) == 3


@pytest.mark.parametrize("device, fused", [(CUDA, True), (CPU, None)])
def test_torch_adamw_carries_the_settings(device, fused):
    settings = _settings("plugin=zero2", "lr=3e-4", "adam_beta2=0.9", "weight_decay=0.05")
    params = [torch.nn.Parameter(torch.ones(3))]
    kind = engine_for(settings, EngineChoice("zero2", "bf16", device)).adam_kind
    built = build_optimizer(settings.optimisation, kind, device, False, params)
    assert type(built) is torch.optim.AdamW and built.defaults["fused"] == fused
    assert built.defaults["lr"] == 3e-4 and built.defaults["betas"] == (0.9, 0.9)
    assert built.defaults["weight_decay"] == 0.05


def _fake_cuda_home(root, release: str, toolkit: bool = True):
    """An nvcc printing `release`; with `toolkit`, the headers and libraries the kernels' build reads (empty files)."""
    nvcc = root / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    if toolkit:
        for path in [f"include/{h}" for h in optimizer.CUDA_HEADERS] + ["lib64/libcudart.so.12", "lib64/libcublas.so"]:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).touch()
    return str(root)


@pytest.mark.parametrize("cuda_home, problem", [
    (None, "CUDA_HOME is not set and no nvcc is on PATH"),
    ("missing", "bin/nvcc does not exist"),
    ("11.8", "is CUDA 11.8 but torch was built with CUDA 12.4: the major versions must match"),
])
def test_missing_or_mismatched_nvcc_stops_gemini_with_one_line(cuda_home, problem, tmp_path, monkeypatch, capsys,
                                                               caplog):
    from training.loop import _expected_errors_as_one_line

    if cuda_home == "missing":
        cuda_home = str(tmp_path)
    elif cuda_home is not None:
        cuda_home = _fake_cuda_home(tmp_path, cuda_home)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cuda_home)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    settings = _settings("plugin=gemini")
    with pytest.raises(SystemExit) as stopped, _expected_errors_as_one_line():
        check_toolchain(settings, EngineChoice("gemini", "fp16", CUDA))
    assert stopped.value.code == 1
    # Printed, or logged where logging is set up (pytest's capture handler counts as set up).
    lines = capsys.readouterr().err.strip().splitlines() + [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("error: ToolchainError: plugin='gemini' needs ColossalAI's "
                                                   "HybridAdam"), lines
    assert problem in lines[0]
    assert "--build-kernels" in lines[0] and "plugin=zero2 without zero2_cpu_offload" in lines[0]

    # zero2 without offload needs no compiler at all; with offload it is the same stop.
    check_toolchain(_settings("plugin=zero2"), EngineChoice("zero2", "bf16", CUDA))
    with pytest.raises(ToolchainError, match="zero2_cpu_offload=True needs ColossalAI's HybridAdam"):
        check_toolchain(_settings("plugin=zero2", "zero2_cpu_offload=True"), EngineChoice("zero2", "bf16", CUDA))


def test_matching_toolchain_passes_and_the_build_step_refuses_a_bad_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", _fake_cuda_home(tmp_path, "12.1"))  # minor versions may differ
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setenv("CXX", sys.executable)  # any program on disk stands for the compiler
    assert optimizer.toolchain_problem() is None
    check_toolchain(_settings("plugin=gemini"), EngineChoice("gemini", "fp16", CUDA))

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    with pytest.raises(SystemExit) as stopped:
        build_command.main(["--build-kernels"])  # python -m training.optimizer --build-kernels
    assert stopped.value.code == 1
    assert capsys.readouterr().err.strip() == ("error: cannot build HybridAdam's kernels: ninja is not installed "
                                               "(pip install ninja)")


def test_an_nvcc_wrapper_outside_the_toolkit_is_reported(tmp_path, monkeypatch):
    """nvcc in /usr/local/bin (a wrapper): torch takes CUDA_HOME=/usr/local, where the CPU Adam's cublas_v2.h and the
    fused Adam's libcudart are not; the check names them instead of passing a build that dies in the compiler."""
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", _fake_cuda_home(tmp_path, "12.4", toolkit=False))
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setenv("CXX", sys.executable)
    for variable in ("CPATH", "CPLUS_INCLUDE_PATH", "LIBRARY_PATH"):
        monkeypatch.delenv(variable, raising=False)
    problem = optimizer.toolchain_problem()
    assert problem is not None and f"CUDA_HOME={tmp_path} lacks" in problem
    assert "cublas_v2.h" in problem and "libcudart.so" in problem and "libcublas.so" in problem
    (tmp_path / "include").mkdir()
    for header in optimizer.CUDA_HEADERS:
        (tmp_path / "include" / header).touch()
    (tmp_path / "targets" / "x86_64-linux" / "lib").mkdir(parents=True)
    (tmp_path / "targets" / "x86_64-linux" / "lib" / "libcudart.so.12.4.127").touch()
    problem = optimizer.toolchain_problem()  # headers there now, one library still missing
    assert "cublas_v2.h" not in problem and "libcudart" not in problem and "libcublas.so" in problem
    (tmp_path / "targets" / "x86_64-linux" / "lib" / "libcublas.so.12").touch()
    assert optimizer.toolchain_problem() is None


def test_cublas_from_torchs_cuda_wheels_counts_through_the_compilers_search_paths(tmp_path, monkeypatch):
    """A toolkit of nvcc and cudart only, cuBLAS's header and library in torch's nvidia/cu13 wheel directory, named
    by CPATH and LIBRARY_PATH (as scripts/gpu_check.sh sets them)."""
    home = tmp_path / "cuda"
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", _fake_cuda_home(home, "13.0"))
    (home / "include" / "cublas_v2.h").unlink()
    (home / "lib64" / "libcublas.so").unlink()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setenv("CXX", sys.executable)
    monkeypatch.delenv("CPATH", raising=False)
    monkeypatch.delenv("CPLUS_INCLUDE_PATH", raising=False)
    monkeypatch.delenv("LIBRARY_PATH", raising=False)
    problem = optimizer.toolchain_problem()
    assert "cublas_v2.h" in problem and "libcublas.so" in problem and "cuda.h" not in problem
    wheel = tmp_path / "site-packages" / "nvidia" / "cu13"
    for path in ("include/cublas_v2.h", "lib/libcublas.so.13"):
        (wheel / path).parent.mkdir(parents=True, exist_ok=True)
        (wheel / path).touch()
    monkeypatch.setenv("CPATH", f"/nonexistent:{wheel / 'include'}")
    monkeypatch.setenv("LIBRARY_PATH", str(wheel / "lib"))
    assert optimizer.toolchain_problem() is None


TORCHRUN = {"TORCHELASTIC_RUN_ID": "job", "LOCAL_WORLD_SIZE": "8"}


@pytest.mark.parametrize("environ, launcher, by_user", [
    ({}, None, False),  # plain python, nothing set
    ({"OMP_NUM_THREADS": "1"}, None, True),  # not under torchrun: it can only be the user's
    ({**TORCHRUN, "OMP_NUM_THREADS": "4"}, {}, True),  # torchrun only ever writes 1
    ({**TORCHRUN, "OMP_NUM_THREADS": "1"}, {}, False),  # torchrun's default: absent from its own start
    ({**TORCHRUN, "OMP_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "1"}, True),  # the user gave torchrun 1
    ({**TORCHRUN, "OMP_NUM_THREADS": "1"}, None, False),  # cannot tell: take torchrun's default
])
def test_omp_threads_from_the_user_or_from_torchrun(environ, launcher, by_user):
    assert omp_threads_set_by_user(environ, launcher) == by_user


def test_offloaded_adam_threads_share_the_nodes_cores(monkeypatch):
    environ = {**TORCHRUN, "OMP_NUM_THREADS": "1"}
    assert offloaded_adam_threads(environ, {}, cores=96) == (12, "96 cores / 8 processes on this node")
    assert offloaded_adam_threads(environ, {}, cores=4)[0] == 1  # never 0
    assert offloaded_adam_threads({**TORCHRUN, "OMP_NUM_THREADS": "6"}, {}, cores=96)[0] is None  # the user's 6

    # Applied: torch's threads and OMP_NUM_THREADS, which the CPU Adam kernel's OpenMP reads when it loads.
    applied = []
    monkeypatch.setattr(torch, "set_num_threads", applied.append)
    monkeypatch.setattr(optimizer, "_launcher_environ", lambda: {})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    for key, value in {**TORCHRUN, "LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)
    optimizer.set_offloaded_adam_threads()
    assert applied == [4] and os.environ["OMP_NUM_THREADS"] == "4"


def test_launcher_environment_is_read_from_proc():
    launcher = optimizer._launcher_environ()
    if launcher is None:
        pytest.skip("no /proc here")
    assert "PATH" in launcher  # pytest's parent shell started with one


def _tiny_llama():
    from llama.configuration_llama import LlamaConfig
    from llama.llama_model import Llama

    return Llama(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4))


def test_weight_decay_skip_groups():
    model = _tiny_llama()
    names = {id(p): name for name, p in model.named_parameters()}
    # The recipe: one group, every weight decayed.
    assert optimizer.parameter_groups(_settings().optimisation, model) == list(model.parameters())
    decay, no_decay = optimizer.parameter_groups(_settings("weight_decay_skip=True").optimisation, model)
    assert "weight_decay" not in decay and no_decay["weight_decay"] == 0.0
    skipped = sorted(names[id(p)] for p in no_decay["params"])
    assert skipped == sorted(["tok_embeddings.weight", "norm.weight"] + [f"layers.{i}.{norm}.weight" for i in range(2)
                                                                         for norm in ("attention_norm", "ffn_norm")])
    assert {names[id(p)] for p in decay["params"]} == set(names.values()) - set(skipped)  # output, wq, ..., w3
    # A bias and a frozen parameter: the bias skips decay, the frozen one is in no group.
    extra = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    extra[1].requires_grad_(False)
    decay, no_decay = optimizer.parameter_groups(_settings("weight_decay_skip=True").optimisation, extra)
    assert decay["params"] == [extra[0].weight] and no_decay["params"] == [extra[0].bias]


@pytest.mark.parametrize("plugin", ["ddp", "gemini"])  # torch's AdamW; ColossalAI's HybridAdam (gemini's Adam)
def test_a_step_leaves_skipped_parameters_undecayed(plugin, monkeypatch):
    if plugin == "gemini":  # HybridAdam on CPU parameters: the CPU Adam kernel, here the tests' torch version of it
        import types

        from colossalai.kernel.kernel_loader import CPUAdamLoader
        from zero_cpu import TorchCPUAdam

        monkeypatch.setattr(CPUAdamLoader, "load", lambda self, ext_name=None: types.SimpleNamespace(
            CPUAdamOptimizer=TorchCPUAdam))
    model = _tiny_llama()
    settings = _settings(f"plugin={plugin}", "weight_decay_skip=True", "weight_decay=0.5", "lr=0.1")
    kind = engine_for(settings, EngineChoice(plugin, "bf16", CPU)).adam_kind
    built = build_optimizer(settings.optimisation, kind, CPU, False,
                            optimizer.parameter_groups(settings.optimisation, model))
    assert type(built).__name__ == ("AdamW" if plugin == "ddp" else "HybridAdam")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's update is 0: only decay moves a parameter
    built.step()
    for name, p in model.named_parameters():
        if name == "tok_embeddings.weight" or name.endswith("norm.weight"):
            assert torch.equal(p, before[name]), name
        else:
            assert torch.allclose(p, before[name] * (1 - 0.1 * 0.5)), name


def test_a_resumed_fused_adamw_gets_its_step_back_on_the_parameters_device():
    """ColossalAI's optimizer loaders leave `step` where it was loaded (the CPU); torch's fused AdamW wants it on the
    parameter's device. A parameter on the meta device stands in for one on the GPU: its CPU step is moved there, as
    float32, through ColossalAI's wrapper; a non-fused optimizer's step stays on the CPU, as torch keeps it."""
    from colossalai.interface import OptimizerWrapper

    from training.engine.base import fused_steps_to_param_device

    def loaded_as_colossalai_leaves_it(fused: bool):
        param = torch.nn.Parameter(torch.empty(4, device="meta"))
        optimizer = torch.optim.AdamW([param], lr=1e-3, fused=fused)
        optimizer.state[param] = {"step": torch.tensor(7, dtype=torch.int64),
                                  "exp_avg": torch.empty(4, device="meta"), "exp_avg_sq": torch.empty(4, device="meta")}
        return param, optimizer

    param, fused = loaded_as_colossalai_leaves_it(fused=True)
    fused_steps_to_param_device(OptimizerWrapper(fused))
    step = fused.state[param]["step"]
    assert step.device.type == "meta" and step.dtype == torch.float32

    param, plain = loaded_as_colossalai_leaves_it(fused=False)
    fused_steps_to_param_device(OptimizerWrapper(plain))
    assert plain.state[param]["step"].device.type == "cpu"
