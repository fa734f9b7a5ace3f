"""The optimizer: which Adam runs for which settings, the toolchain ColossalAI's HybridAdam needs, building its kernels
once per node, and the CPU threads of an offloaded Adam.

    settings (each engine's adam_kind)        optimizer
    plugin=gemini (any placement)             HybridAdam: GeminiOptimizer accepts only ColossalAI's Adam classes
                                              (`_AVAIL_OPTIM_LIST` in colossalai/zero/gemini/gemini_optimizer.py)
    plugin=zero2 zero2_cpu_offload=True       HybridAdam: its CPU kernel updates the fp32 states kept in CPU memory
    plugin=zero2 or ddp, no offload, on CUDA  torch.optim.AdamW(fused=True): no ColossalAI kernel to build
    no CUDA (the CPU fallback)                torch.optim.AdamW

HybridAdam's kernels: the colossalai wheel ships none (colossalai/_C/ holds only __init__.py), so `KernelLoader.load`
(colossalai/kernel/kernel_loader.py) compiles them on first use. Before every load, even of a kernel built earlier,
`_CudaExtension.assert_compatible` (colossalai/kernel/extensions/cuda_extension.py) asserts CUDA_HOME and an nvcc
whose major version equals torch's CUDA (`check_system_pytorch_cuda_match` in .../extensions/utils.py), and torch's
`cpp_extension.load` needs ninja and a C++ compiler. The CPU Adam's header (csrc/kernel/x86/cpu_adam.h) includes
cublas_v2.h, cuda.h, cuda_fp16.h and cuda_runtime_api.h from CUDA_HOME/include (`_CudaExtension.include_dirs`), and
the fused CUDA Adam links libcudart from CUDA_HOME/lib64 (torch's `_prepare_ldflags`): an nvcc wrapper in
/usr/local/bin makes torch take CUDA_HOME=/usr/local, where neither is. `check_toolchain` checks all of that before
the model is built.

    python -m training.optimizer --build-kernels     compile them once per node, before the first run (minutes)
(training/optimizer.py is that command's name; the code is here.)
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from training.settings_concerns import OptimisationSettings, SettingsError

logger = logging.getLogger(__name__)

HYBRID_ADAM = "ColossalAI HybridAdam"
FUSED_ADAMW = "torch.optim.AdamW(fused=True)"
ADAMW = "torch.optim.AdamW"


class ToolchainError(SettingsError):
    """The settings need a kernel this machine cannot build; the message says what to install or which setting
    avoids it. A SettingsError, so the loop ends the run with it as one line before the model is built."""


# ---------------------------------------------------------------------------------------------------- toolchain


def _nvcc_release(nvcc: Path) -> str:
    """"12.4" from `nvcc -V` ("Cuda compilation tools, release 12.4, V12.4.131"), the line ColossalAI parses."""
    output = subprocess.run([str(nvcc), "-V"], capture_output=True, text=True, timeout=60).stdout
    match = re.search(r"release (\d+)\.(\d+)", output)
    return f"{match.group(1)}.{match.group(2)}" if match else ""


# What the kernels' build reads from CUDA_HOME (see the module docstring); a library counts in any of its versions.
CUDA_HEADERS = ("cublas_v2.h", "cuda.h", "cuda_fp16.h", "cuda_runtime.h", "cuda_runtime_api.h")
CUDA_LIBRARIES = ("libcudart.so", "libcublas.so")
CUDA_LIBRARY_DIRS = ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")


def _search_path(variable: str) -> list[Path]:
    return [Path(d) for d in os.environ.get(variable, "").split(os.pathsep) if d]


def cuda_home_problem(cuda_home: str) -> str | None:
    """The headers and libraries of CUDA_HEADERS and CUDA_LIBRARIES that neither CUDA_HOME nor the compiler's and
    linker's search paths (CPATH, CPLUS_INCLUDE_PATH; LIBRARY_PATH) hold, in words, or None. A toolkit without cuBLAS
    may take it from torch's own CUDA wheels (site-packages/nvidia/cu13) through those variables."""
    home = Path(cuda_home)
    include_dirs = [home / "include", *_search_path("CPATH"), *_search_path("CPLUS_INCLUDE_PATH")]
    library_dirs = [home / d for d in CUDA_LIBRARY_DIRS] + _search_path("LIBRARY_PATH")
    headers = [h for h in CUDA_HEADERS if not any((d / h).is_file() for d in include_dirs)]
    libraries = [lib for lib in CUDA_LIBRARIES if not any(any(d.glob(lib + "*")) for d in library_dirs)]
    if not headers and not libraries:
        return None
    missing = ([f"{', '.join(headers)} in {home / 'include'} (or CPATH)"] if headers else []) + (
        [f"{', '.join(libraries)} in {home}/{{{','.join(CUDA_LIBRARY_DIRS)}}} (or LIBRARY_PATH)"] if libraries else [])
    return (f"CUDA_HOME={cuda_home} lacks the CUDA toolkit's {' and '.join(missing)} (an nvcc wrapper outside a "
            f"toolkit? set CUDA_HOME to the toolkit's directory)")


def toolchain_problem() -> str | None:
    """What stops HybridAdam's kernels from building here, in words, or None when nothing does."""
    from torch.utils import cpp_extension

    torch_cuda = torch.version.cuda
    if not torch_cuda:
        return f"this torch ({torch.__version__}) was built without CUDA"
    cuda_home = cpp_extension.CUDA_HOME  # what ColossalAI reads: CUDA_HOME, CUDA_PATH, nvcc on PATH, /usr/local/cuda
    if not cuda_home:
        return "CUDA_HOME is not set and no nvcc is on PATH"
    nvcc = Path(cuda_home) / "bin" / "nvcc"
    if not nvcc.is_file():
        return f"{nvcc} does not exist (CUDA_HOME={cuda_home})"
    try:
        release = _nvcc_release(nvcc)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{nvcc} -V failed ({e})"
    if not release:
        return f"{nvcc} -V printed no CUDA release"
    if release.split(".")[0] != torch_cuda.split(".")[0]:
        return (f"{nvcc} is CUDA {release} but torch was built with CUDA {torch_cuda}: the major versions must "
                f"match")
    missing = cuda_home_problem(cuda_home)
    if missing:
        return missing
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler {compiler!r} on PATH"
    return None


def check_toolchain(kind: str, why_hybrid_adam: str) -> None:
    """Before the model is built: stop with one line where the engine's Adam `kind` is HybridAdam (`why_hybrid_adam`
    says which setting asks for it) and its kernels cannot be built."""
    if kind != HYBRID_ADAM:
        return
    problem = toolchain_problem()
    if problem is None:
        return
    major = (torch.version.cuda or "12").split(".")[0]
    raise ToolchainError(
        f"{why_hybrid_adam}, whose kernels are compiled on this machine, but {problem}. Install "
        f"a CUDA {major}.x toolkit with nvcc, ninja and a C++ compiler, set CUDA_HOME to the toolkit and build them "
        f"once with `python -m training.optimizer --build-kernels`; or use plugin=zero2 without zero2_cpu_offload, "
        f"which runs torch's fused AdamW and needs no compiler")


def gencode_for_this_node() -> list[str]:
    """nvcc's -gencode flags for the GPUs of this node only, for the fused CUDA Adam.

    ColossalAI's FusedOptimizerCudaExtension.nvcc_flags adds one -gencode per arch of torch's own build list up to this
    GPU's (`get_cuda_cc_flag`, colossalai/kernel/extensions/utils.py), whatever TORCH_CUDA_ARCH_LIST says: on an H200
    under a CUDA 13 torch that is sm_75, 80, 86 and 90, four builds of every kernel. The kernel cache is per node
    already (see main's --build-kernels help)."""
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return [flag for major, minor in caps
            for flag in ("-gencode", f"arch=compute_{major}{minor},code=sm_{major}{minor}")]


def _without_std_flags(cls) -> None:
    """Drop the -std= flags from an extension's compiler flags, leaving torch's own (once per class)."""
    for method in ("cxx_flags", "nvcc_flags"):
        original = getattr(cls, method)
        if getattr(original, "torch_std", False):
            continue

        def flags(self, original=original):
            return [flag for flag in original(self) if not flag.startswith("-std=")]

        flags.torch_std = True
        setattr(cls, method, flags)


def load_kernels() -> None:
    """Load HybridAdam's two kernels, compiling them into ColossalAI's cache (~/.cache/colossalai/torch_extensions)
    where they are not there yet: the CPU Adam (`CPUAdam.__init__`) and the fused CUDA Adam (`HybridAdam.__init__`).

    Two of ColossalAI 0.5.0's build flags are adapted, for the rest of this process, so that HybridAdam's own loads
    pass the same flags (torch's JIT loader rebuilds a kernel whose flags changed): the CPU Adam's compiler flags
    end in -std=c++14 -std=c++17 (CpuAdamX86Extension.cxx_flags), after torch's own -std, and torch 2.14's headers
    stop with "#error C++20 or later compatible compiler is required": they are dropped, torch's -std stays; and the
    fused Adam is built for this node's GPUs only (gencode_for_this_node)."""
    from colossalai.kernel.extensions.pybind.cpu_adam import cpu_adam_arm, cpu_adam_x86
    from colossalai.kernel.kernel_loader import CPUAdamLoader, FusedOptimizerLoader

    _without_std_flags(cpu_adam_x86.CpuAdamX86Extension)
    _without_std_flags(cpu_adam_arm.CpuAdamArmExtension)
    CPUAdamLoader().load()
    if torch.cuda.is_available():  # as HybridAdam.__init__, which loads the CUDA kernel only where CUDA is
        from colossalai.kernel.extensions.pybind.optimizer import fused_optimizer_cuda

        flags = gencode_for_this_node()
        fused_optimizer_cuda.get_cuda_cc_flag = lambda: flags
        FusedOptimizerLoader().load()


def load_kernels_once_per_node(device: torch.device) -> None:
    """Local rank 0 of each node builds (or finds) the kernels while the other ranks wait, so that N processes do
    not compile the same kernel at once; a failed build ends every rank with one line."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    failure = ""
    if local_rank == 0:
        logger.info("loading HybridAdam's kernels (compiled on first use: minutes; the other ranks wait)")
        try:
            load_kernels()
        except Exception as e:  # noqa: BLE001 - a compiler error of any kind becomes the one line below
            failure = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    if dist.is_initialized():
        failed = torch.tensor([1.0 if failure else 0.0], device=device)
        dist.all_reduce(failed)  # doubles as the barrier: nobody loads before its node's rank 0 has built
        if failed.item() > 0 and not failure:
            failure = "it failed on local rank 0 of a node"
    if failure:
        raise ToolchainError(f"building HybridAdam's kernels failed: {failure}. `python -m training.optimizer "
                             f"--build-kernels` shows the compiler's output; plugin=zero2 without zero2_cpu_offload "
                             f"needs no kernel")


# ---------------------------------------------------------------------------------------------------- CPU threads


def _launcher_environ() -> dict[str, str] | None:
    """The environment torchrun itself started with (this process's parent), or None where it cannot be read.

    torchrun sets OMP_NUM_THREADS=1 in its own os.environ when it is unset (`run` in torch/distributed/run.py), so
    the workers cannot tell that default from a user's OMP_NUM_THREADS=1; /proc/<pid>/environ holds the environment
    a process was started with, before such changes."""
    try:
        raw = Path(f"/proc/{os.getppid()}/environ").read_bytes()
    except OSError:
        return None
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def omp_threads_set_by_user(environ, launcher_environ) -> bool:
    """Whether OMP_NUM_THREADS in `environ` is the user's choice rather than torchrun's default of 1."""
    value = environ.get("OMP_NUM_THREADS")
    if value is None:
        return False
    if value != "1" or "TORCHELASTIC_RUN_ID" not in environ:  # torchrun only ever writes "1"
        return True
    if launcher_environ is None:  # cannot tell: take it for torchrun's default
        return False
    return "OMP_NUM_THREADS" in launcher_environ


def offloaded_adam_threads(environ, launcher_environ, cores: int) -> tuple[int | None, str]:
    """Threads for this rank's CPU Adam and the reason: None (leave them) where the user set OMP_NUM_THREADS, else
    this node's cores shared by its processes."""
    if omp_threads_set_by_user(environ, launcher_environ):
        return None, f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS']} set by the user"
    local_world_size = int(environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = max(1, cores // local_world_size)
    return threads, f"{cores} cores / {local_world_size} processes on this node"


def set_offloaded_adam_threads() -> None:
    """With Adam in CPU memory, each step's update runs on the CPU: one thread per rank (torchrun's default) takes
    seconds per step for 7B. Sets torch's threads and OMP_NUM_THREADS, which the CPU Adam kernel's own OpenMP
    runtime (compiled with -fopenmp, not torch's bundled one) reads when HybridAdam loads it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads, why = offloaded_adam_threads(os.environ, _launcher_environ(), cores)
    if threads is None:
        logger.info("CPU Adam threads: %d (%s)", torch.get_num_threads(), why)
        return
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    logger.info("CPU Adam threads: %d (%s)", threads, why)


# ---------------------------------------------------------------------------------------------------- build


def parameter_groups(settings: OptimisationSettings, model: torch.nn.Module) -> list[torch.nn.Parameter] | list[dict]:
    """The trainable parameters, as build_optimizer takes them. new_rows_only: one group, without weight decay
    (training/new_rows.py). weight_decay_skip=False (the recipe): one group, every weight decayed. True: two groups,
    the second with weight_decay 0 holding what decay should leave alone: norm weights and biases (1-d) and embedding
    tables (nn.Embedding's weight; a tied output shares it). Torch's AdamW, HybridAdam, and the ZeRO wrappers keep
    per-group settings: GeminiOptimizer.__init__optimizer maps each group's params to its chunk slices,
    LowLevelZeroOptimizer keeps one master group per optimizer group."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if settings.new_rows_only:  # decoupled decay would shrink the frozen old rows, whose gradient is zero
        return [{"params": [p for _, p in trainable], "weight_decay": 0.0}]
    if not settings.weight_decay_skip:
        return [p for _, p in trainable]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    no_decay = [p for _, p in trainable if p.dim() < 2 or id(p) in embeddings]
    skipped = {id(p) for p in no_decay}
    decay = [p for _, p in trainable if id(p) not in skipped]
    logger.info("weight decay %g on %d tensors; none on %d norm, bias and embedding tensors (weight_decay_skip)",
                settings.weight_decay, len(decay), len(no_decay))
    return [group for group in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if group["params"]]


def build_optimizer(settings: OptimisationSettings, kind: str, device: torch.device, offloaded: bool,
                    params: list[torch.nn.Parameter] | list[dict]) -> torch.optim.Optimizer:
    """The Adam `kind` of the table above (the engine's adam_kind) over `params` (a list, or parameter_groups'
    groups), with the settings' lr, betas and weight decay (decoupled, AdamW). `offloaded`: its states and update
    live in CPU memory (the engine's optimizer_offloaded)."""
    adam = dict(lr=settings.lr, betas=(settings.adam_beta1, settings.adam_beta2), weight_decay=settings.weight_decay)
    if offloaded:
        set_offloaded_adam_threads()
    logger.info("optimizer: %s", kind)
    if kind == HYBRID_ADAM:
        from colossalai.nn.optimizer import HybridAdam

        load_kernels_once_per_node(device)
        return HybridAdam(params, adamw_mode=True, **adam)
    return torch.optim.AdamW(params, fused=True if kind == FUSED_ADAMW else None, **adam)  # None: torch's default


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-kernels", action="store_true",
                        help="compile HybridAdam's CPU and CUDA Adam kernels into ColossalAI's cache (run it on "
                             "each node, on a GPU machine: the cache is named after the GPU's CUDA version)")
    args = parser.parse_args(argv)
    if not args.build_kernels:
        parser.print_help()
        return
    problem = toolchain_problem()
    if problem is None and not torch.cuda.is_available():
        problem = "no CUDA device here (the kernels' cache is keyed to the GPU's CUDA version)"
    if problem is not None:
        print(f"error: cannot build HybridAdam's kernels: {problem}", file=sys.stderr)
        raise SystemExit(1)
    load_kernels()
    print("HybridAdam's kernels are built")


if __name__ == "__main__":
    main()
