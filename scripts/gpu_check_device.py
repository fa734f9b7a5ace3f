"""The GPU-side steps of scripts/gpu_check.py, one subcommand each; every step but `train` prints one JSON object.

    python scripts/gpu_check_device.py facts                       torch, CUDA, GPUs, colossalai import, toolchain
    python scripts/gpu_check_device.py imports                     every module the device side loads, and ninja
    python scripts/gpu_check_device.py build-kernels               HybridAdam's CPU and CUDA Adam kernels, built once
    python scripts/gpu_check_device.py scale-output DIR FACTOR     multiply DIR's output projection by FACTOR
    python scripts/gpu_check_device.py reference SPEC.json         fp32 step-1 losses, final/ reloads, flash probe
    torchrun ... scripts/gpu_check_device.py train key=value ...   one stage-1 run that records what the checks need

`train` is training.loop.train with pretrain_main's PretrainRecords, unchanged, plus two records in <logdir>:
    first_batch.rank<R>.pt  the first micro-batch rank R trained on (input_ids, loss_mask, doc_ids when packed)
    trained_logits.pt       with GPU_CHECK_LOGITS=1, rank 0: fp32 logits of the trained, still boosted model on the
                            first row of rank 0's first batch, taken just before final/ is written: what final/ must
                            give back when reloaded
GPU_CHECK_DETERMINISTIC=1 asks torch for deterministic kernels and SDPA's math attention (the flash and memory-
efficient backward passes accumulate with atomics), so that a resumed run repeats the straight one (the resume check).
GPU_CHECK_REHEARSE=1 (scripts/gpu_check.sh --rehearse): the same steps on CPU under tests/zero_cpu.py's ZeRO-on-CPU
stand-ins; `facts` reports the stand-in device and `build-kernels` the stand-in CPU Adam.
Everything here also runs on CPU (the tests run `reference` and `train` there on the CPU fallback).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from llama.llama_model import Llama  # noqa: E402


def bitsandbytes_stand_in() -> bool:
    """Where bitsandbytes is not installed (the carried wheels leave out its 43 MB), register a module that holds
    only what `import colossalai.nn.optimizer` needs of it: colossalai/nn/optimizer/galore.py and
    distributed_galore.py subclass `bitsandbytes.optim.optimizer.Optimizer2State` at import, for GaLore's 8-bit
    Adam, which the check never builds (HybridAdam and torch's AdamW are what it runs). True when registered."""
    import importlib.machinery
    import importlib.util
    import types

    try:
        if importlib.util.find_spec("bitsandbytes") is not None:
            return False
    except (ImportError, ValueError):
        pass

    class Optimizer2State(torch.optim.Optimizer):
        def __init__(self, *args, **kwargs):
            raise RuntimeError("bitsandbytes is not installed (gpu_check_device.py's import stand-in)")

    for name in ("bitsandbytes", "bitsandbytes.optim", "bitsandbytes.optim.optimizer"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=name != "bitsandbytes.optim.optimizer")
        sys.modules[name] = module
    sys.modules["bitsandbytes.optim.optimizer"].Optimizer2State = Optimizer2State
    sys.modules["bitsandbytes"].optim = sys.modules["bitsandbytes.optim"]
    sys.modules["bitsandbytes.optim"].optimizer = sys.modules["bitsandbytes.optim.optimizer"]
    return True


BITSANDBYTES_STAND_IN = bitsandbytes_stand_in()  # before anything imports colossalai

FIRST_BATCH = "first_batch.rank{rank}.pt"
TRAINED_LOGITS = "trained_logits.pt"
BATCH_KEYS = ("input_ids", "loss_mask", "doc_ids")
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
REHEARSE = os.environ.get("GPU_CHECK_REHEARSE") == "1"
REHEARSAL_GPU_GB = 150.8  # an H200's torch.cuda.get_device_properties(0).total_memory / 1e9: the plan on an H200
STAND_INS = "tests/zero_cpu.py: CPU accelerator named cuda, null streams, torch CPU Adam"


def install_stand_ins() -> None:
    """The ZeRO-on-CPU stand-ins of the tests (tests/zero_cpu.py), for the rehearsal."""
    sys.path.insert(0, str(REPO / "tests"))
    import zero_cpu

    zero_cpu.install()


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not REHEARSE else "cpu")


# ---- facts ------------------------------------------------------------------------------------------------------

def facts() -> dict:
    """What the plan depends on. A colossalai import failure is a fact, not a crash: the report names it."""
    from torch.utils.cpp_extension import CUDA_HOME  # where torch's extension builder will look for nvcc

    from training.optimizer import toolchain_problem

    nvcc = shutil.which("nvcc") or (str(Path(CUDA_HOME) / "bin" / "nvcc") if CUDA_HOME else None)
    found = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
             "cpus": os.cpu_count(), "nvcc": nvcc if nvcc and Path(nvcc).is_file() else None,
             "python": sys.version.split()[0], "cuda_home": CUDA_HOME, "cpath": os.environ.get("CPATH"),
             "toolchain_problem": toolchain_problem(),
             "bitsandbytes": "stand-in" if BITSANDBYTES_STAND_IN else "installed"}
    if REHEARSE:  # what the plan reads, as the stand-in device presents it; the CPU Adam is the stand-in's
        found.update(gpus=1, gpu_name="CPU (ZeRO-on-CPU stand-ins), planned as one H200",
                     gpu_memory_gb=REHEARSAL_GPU_GB, capability=None, bf16=True, toolchain_problem=None,
                     rehearsal=STAND_INS)
    elif found["gpus"]:
        props = torch.cuda.get_device_properties(0)
        found.update(gpu_name=props.name, gpu_memory_gb=round(props.total_memory / 1e9, 1),
                     capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    try:
        from training.engine import import_colossalai

        import_colossalai()  # the whole chain the engine imports, with this machine's torch
        import colossalai

        found["colossalai"] = colossalai.__version__
    except Exception as e:  # noqa: BLE001 - reported as the environment check's failure
        found["colossalai"] = None
        found["colossalai_error"] = f"{type(e).__name__}: {e}"[:500]
    return found


# ---- imports ----------------------------------------------------------------------------------------------------

# Every module a device step or a training run loads beyond torch (training.*, llama.*, pretrain_main and what they
# import, colossalai's engine chain, HybridAdam and its kernel loaders), so that a wheel set missing one fails here,
# in seconds, and not in the middle of the check. torch.utils.tensorboard needs the tensorboard package.
DEVICE_MODULES = ("training.engine", "training.loop", "training.optimizer", "training.lr_schedule", "training.flops",
                  "training.metrics", "training.checkpoint", "training.engine.masters", "training.settings",
                  "pretrain_main", "pretrain_args", "llama.llama_model", "llama.tiny", "colossalai.nn.optimizer",
                  "colossalai.kernel.kernel_loader",
                  "colossalai.kernel.extensions.pybind.optimizer.fused_optimizer_cuda", "colossalai.lazy",
                  "colossalai.zero.gemini.utils", "torch.utils.tensorboard", "sentencepiece", "safetensors.torch",
                  "psutil", "tqdm", "numpy", "ninja")


def imports() -> dict:
    """Import DEVICE_MODULES (after the engine's own import chain, training.engine.import_colossalai) and say which
    fail; the ninja executable counts too (torch's JIT build runs it)."""
    import importlib

    from torch.utils import cpp_extension

    failed = {}
    try:
        from training.engine import import_colossalai

        import_colossalai()
    except Exception as e:  # noqa: BLE001 - reported, with every other failure
        failed["import_colossalai"] = f"{type(e).__name__}: {e}"[:300]
    for name in DEVICE_MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001
            failed[name] = f"{type(e).__name__}: {e}"[:300]
    if not cpp_extension.is_ninja_available():
        failed["ninja executable"] = "`ninja --version` does not run (torch's JIT build needs it on PATH)"
    return {"ok": not failed, "modules": len(DEVICE_MODULES) + 1, **({"failed": failed} if failed else {})}


# ---- kernels ----------------------------------------------------------------------------------------------------

def build_kernels() -> dict:
    """Load (JIT-building on first use) the kernels HybridAdam takes, as the training runs will load them
    (training.optimizer.load_kernels: the CPU Adam, and the fused CUDA Adam for this GPU's architecture only)."""
    if REHEARSE:
        return {"ok": True, "seconds": 0.0, "stand_in": STAND_INS}
    from training.optimizer import load_kernels, toolchain_problem

    os.environ.setdefault("MAX_JOBS", str(max(1, (os.cpu_count() or 4) // 2)))  # half: the small runs go on
    start = time.perf_counter()
    problem = toolchain_problem()
    if problem:
        return {"ok": False, "error": f"toolchain: {problem}", "seconds": 0.0}
    try:
        load_kernels()
    except Exception as e:  # noqa: BLE001 - gemini is then reported not runnable here, with this reason
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[-800:], "seconds": time.perf_counter() - start}
    return {"ok": True, "seconds": round(time.perf_counter() - start, 1)}


# ---- the model the checks start from ----------------------------------------------------------------------------

def scale_output(model_dir: str, factor: float) -> dict:
    """Sharpen a random model's predictions: its loss then lies far above ln(vocab), the loss of any freshly
    initialised model, so a run that trained from random weights instead of these cannot pass the step-1 check."""
    model = Llama.from_pretrained(model_dir)
    with torch.no_grad():
        model.output.weight.mul_(factor)
    model.save_pretrained(model_dir)
    return {"ok": True, "factor": factor}


# ---- references -------------------------------------------------------------------------------------------------

def load_batches(logdir: Path) -> list[dict]:
    paths = sorted(logdir.glob(FIRST_BATCH.format(rank="*")), key=lambda p: int(p.stem.rsplit("rank", 1)[1]))
    return [torch.load(p, weights_only=True) for p in paths]


def batch_loss(model: Llama, batch: dict) -> float:
    dev = next(model.parameters()).device
    doc_ids = batch.get("doc_ids")
    with torch.no_grad():
        loss, _ = model(batch["input_ids"].to(dev), loss_mask=batch["loss_mask"].to(dev),
                        doc_ids=None if doc_ids is None else doc_ids.to(dev))
    return loss.item()


def mean_rank_loss(model: Llama, batches: list[dict]) -> float:
    """The logged step-1 loss: the mean over ranks of each rank's mean loss (training/loop.py, one micro-batch)."""
    return sum(batch_loss(model, b) for b in batches) / len(batches)


def compute_setup(plugin: str, precision: str) -> tuple[torch.dtype, torch.dtype | None]:
    """(weight dtype, autocast dtype) under which a run's model computes: ZeRO plugins hold half-precision
    weights; ddp holds fp32 weights and autocasts (training/engine/)."""
    if plugin in ("gemini", "zero2") and precision in HALF:
        return HALF[precision], None
    return torch.float32, HALF.get(precision)


def first_row(batch: dict) -> dict:
    return {k: v[:1] for k, v in batch.items()}  # (1, L) each


def logits(model: Llama, batch: dict, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    dev = next(model.parameters()).device
    doc_ids = batch.get("doc_ids")
    with torch.no_grad(), torch.autocast(dev.type, dtype=autocast_dtype or torch.float32,
                                         enabled=autocast_dtype is not None):
        _, out = model(batch["input_ids"].to(dev), doc_ids=None if doc_ids is None else doc_ids.to(dev))
    return out.float().cpu()


def reload_comparison(run: dict, init_dir: str, batch: dict) -> dict:
    """final/ reloaded with Llama.from_pretrained against the trained model's own logits; the logits' change from
    the initial weights gives the scale (a stale or wrong save differs by about that much)."""
    final = Path(run["output_dir"]) / "final"
    trained_path = Path(run["logdir"]) / TRAINED_LOGITS
    if not (final / "config.json").is_file() or not trained_path.is_file():
        return {"error": f"missing {final}/config.json or {trained_path}"}
    dtype, autocast_dtype = compute_setup(run["plugin"], run["precision"])
    trained = torch.load(trained_path, weights_only=True)["logits"]
    row = first_row(batch)
    reloaded = logits(Llama.from_pretrained(final, dtype=dtype, device=device()).eval(), row, autocast_dtype)
    initial = logits(Llama.from_pretrained(init_dir, dtype=dtype, device=device()).eval(), row, autocast_dtype)
    return {"max_abs_diff": (reloaded - trained).abs().max().item(),
            "train_change": (trained - initial).abs().max().item()}


def flash_probe(model: Llama, batch: dict) -> dict:
    """The unpacked path (is_causal, no mask) under SDPA's flash kernel alone, against the math kernel: fails if
    flash attention cannot take this model's shapes on this GPU."""
    if not torch.cuda.is_available() and not REHEARSE:  # the rehearsal probes torch's CPU flash kernel
        return {"ok": False, "error": "no CUDA device"}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    bf16 = REHEARSE or torch.cuda.is_bf16_supported()  # the CPU kernel of the rehearsal takes bf16
    half = model.to(torch.bfloat16 if bf16 else torch.float16)  # in place: its last use
    ids = batch["input_ids"]
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = logits(half, {"input_ids": ids}, None)
        with sdpa_kernel(SDPBackend.MATH):
            math = logits(half, {"input_ids": ids}, None)
    except RuntimeError as e:
        return {"ok": False, "error": str(e)[:500]}
    return {"ok": True, "max_abs_diff_vs_math": (flash - math).abs().max().item()}


def reference(spec_path: str) -> dict:
    """For each run of the spec: the fp32 loss of the initial weights on the run's recorded first batches, the loss
    a freshly initialised model gives there, and the final/ reload comparison; then the flash probe."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 reference in fp32 arithmetic
    init = Llama.from_pretrained(spec["init_model"], device=device()).eval()
    torch.manual_seed(1234)
    with torch.device(device()):
        fresh = Llama(init.config).eval()
    out: dict = {"runs": {}}
    unpacked_batch = None
    for run in spec["runs"]:
        try:  # one run's broken records fail that run's judges only
            batches = load_batches(Path(run["logdir"]))
            if not batches:
                raise FileNotFoundError(f"no {FIRST_BATCH.format(rank='*')} in {run['logdir']}")
            result = {"ref_loss": mean_rank_loss(init, batches), "random_init_loss": mean_rank_loss(fresh, batches)}
            if run.get("reload"):
                try:
                    result["reload"] = reload_comparison(run, spec["init_model"], batches[0])
                except Exception as e:  # noqa: BLE001 - the reload judge says so; step1_loss still holds
                    result["reload"] = {"error": f"{type(e).__name__}: {e}"[:800]}
        except Exception as e:  # noqa: BLE001
            result = {"error": f"{type(e).__name__}: {e}"[:800]}
        out["runs"][run["name"]] = result
        if "error" not in result and "doc_ids" not in batches[0]:
            unpacked_batch = batches[0]
    if spec.get("flash_probe") and unpacked_batch is not None:
        try:
            out["flash"] = flash_probe(init, unpacked_batch)
        except Exception as e:  # noqa: BLE001
            out["flash"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:800]}
    return out


# ---- train ------------------------------------------------------------------------------------------------------

def train(argv: list[str]) -> None:
    import pretrain_args
    import training.loop as loop
    from pretrain_main import PretrainRecords
    from training.data_stream import DataStream
    from training.settings import load_settings

    settings = load_settings(pretrain_args, argv)
    if REHEARSE:
        install_stand_ins()
    if os.environ.get("GPU_CHECK_DETERMINISTIC") == "1":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for determinism
        torch.use_deterministic_algorithms(True, warn_only=True)
        # SDPA's math attention only: flash's and memory-efficient attention's backward passes stay
        # nondeterministic under use_deterministic_algorithms (warn_only) and would break the resume comparison.
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
    rank = int(os.environ.get("RANK", "0"))
    logdir = Path(settings.output.logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    kept: dict = {}

    class FirstBatchRecorded(DataStream):
        def __iter__(self):
            return self

        def __next__(self):
            batch = super().__next__()
            if not kept:
                kept.update({k: batch[k].clone() for k in BATCH_KEYS if batch.get(k) is not None})
                torch.save(kept, logdir / FIRST_BATCH.format(rank=rank))
            return batch

    save_final = loop.save_final

    def save_final_after_logits(engine, *args, **kwargs):
        engine.model.eval()
        dev, row = engine.choice.device, first_row(kept)
        # Every rank runs the forward: gemini gathers each layer's shards from all ranks.
        with torch.no_grad(), engine.autocast():
            _, out = engine.model(row["input_ids"].to(dev),
                                  doc_ids=row["doc_ids"].to(dev) if "doc_ids" in row else None)
        if rank == 0:  # a plain tensor: gemini returns a ColoTensor, which torch.load(weights_only=True) refuses
            plain = out.as_subclass(torch.Tensor) if isinstance(out, torch.Tensor) else out
            torch.save({"logits": plain.detach().float().cpu().clone()}, logdir / TRAINED_LOGITS)
        return save_final(engine, *args, **kwargs)

    if os.environ.get("GPU_CHECK_LOGITS") == "1":
        loop.save_final = save_final_after_logits
    loop.DataStream = FirstBatchRecorded  # the stream the loop builds, recording its first batch
    loop.train(settings, PretrainRecords)


def main(argv: list[str]) -> None:
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "train":
        train(rest)
        return
    steps = {"facts": facts, "imports": imports, "build-kernels": build_kernels,
             "scale-output": lambda: scale_output(rest[0], float(rest[1])), "reference": lambda: reference(rest[0])}
    if command not in steps:
        sys.exit(f"usage: gpu_check_device.py {{{','.join([*steps, 'train'])}}} ...")
    result = steps[command]()
    print(json.dumps(result), flush=True)
    sys.exit(0 if result.get("ok", True) else 1)  # a kernel that did not build stops the runs that need it


if __name__ == "__main__":
    main(sys.argv[1:])
