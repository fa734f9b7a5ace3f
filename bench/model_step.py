"""Forward+backward throughput and peak memory: our Llama vs transformers' LlamaForCausalLM (sdpa), same config.

    python bench/model_step.py --dim 512 --layers 8 --heads 8 --vocab 32000 --seq 512 --bs 4 --device cpu

Prints one JSON line: {"ours_tok_s", "hf_tok_s", "ratio", "ours_peak_mb", "hf_peak_mb", ...config}.
- Both models get the same weights (ours converted to transformers' layout) and a loss over every position (full
  loss mask / labels = input_ids), so both do the same work.
- Throughput: both models live in this process and are timed step by step in alternating rounds (A B B A ...).
  tok/s = bs * seq input tokens / the fastest step (other load on a shared machine only slows steps down);
  *_tok_s_median are given too.
- Peak memory is the step's peak above the loaded model (activations, logits, loss, gradients), in MB (2^20).
  CUDA: torch.cuda.max_memory_allocated. CPU: each model runs in fresh subprocesses: after one warmup step the
  kernel's RSS high-water mark is reset (/proc/self/clear_refs), and the peak (VmHWM) of the measured step minus
  the RSS before it is reported (falls back to resource.getrusage ru_maxrss deltas where clear_refs is not
  writable); the smaller of `--mem-repeats` runs per model is kept, the runs alternating between the models.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from llama import Llama, LlamaConfig  # noqa: E402
from llama.weight_layouts import hf_config_dict, llama_to_hf_state_dict  # noqa: E402


def add_step_args(p: argparse.ArgumentParser, dim: int, layers: int, heads: int, seq: int) -> None:
    """The model shape, batch, device and dtype of a benchmarked step (defaults per bench)."""
    p.add_argument("--dim", type=int, default=dim)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=seq)
    p.add_argument("--bs", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")


def step_argv(args) -> list[str]:
    """add_step_args' options as given, for a child process measuring one CPU peak."""
    argv = ["--dim", str(args.dim), "--layers", str(args.layers), "--heads", str(args.heads), "--vocab",
            str(args.vocab), "--seq", str(args.seq), "--bs", str(args.bs), "--device", "cpu", "--dtype", args.dtype]
    return argv + (["--kv-heads", str(args.kv_heads)] if args.kv_heads else [])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_args(p, dim=512, layers=8, heads=8, seq=512)
    p.add_argument("--steps", type=int, default=1, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=4, help="alternating timing rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    p.add_argument("--mem-repeats", type=int, default=2, help="fresh subprocesses per model for CPU peak memory")
    p.add_argument("--child-peak", choices=["ours", "hf"], help=argparse.SUPPRESS)  # internal: one CPU memory run
    return p.parse_args(argv)


def our_config(args) -> LlamaConfig:
    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.dim, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       max_sequence_length=max(2048, args.seq))


def build(kind: str, args, ours: Llama | None = None) -> torch.nn.Module:
    """Our model, or transformers' with the same weights when `ours` is given (else its own random init)."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if kind == "ours":
        model = ours if ours is not None else Llama(our_config(args))
    else:
        config = ours.config if ours is not None else our_config(args)
        # hf_config_dict writes a config.json's use_cache=True; a training step caches nothing
        hf_config = HFConfig(**{**hf_config_dict(config, dtype), "use_cache": False}, attn_implementation="sdpa")
        model = LlamaForCausalLM(hf_config)
        if ours is not None:
            model.load_state_dict(llama_to_hf_state_dict(ours.state_dict(), config))
    return model.to(device=args.device, dtype=dtype).train()


def step(kind: str, model: torch.nn.Module, ids: torch.Tensor, full_mask: torch.Tensor) -> None:
    if kind == "ours":
        loss, _ = model(ids, loss_mask=full_mask)
    else:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def inputs(args) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.bs, args.seq), generator=g).to(args.device)
    return ids, torch.ones_like(ids)


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_peak_mb(run_step, steps: int) -> float:
    """RSS peak of `steps` calls of run_step() above the RSS before them, in MB; after a warmup call (one-time
    allocations: grads' first use, kernel scratch)."""
    run_step()
    if reset_rss_peak():
        before = status_kib("VmRSS")
        for _ in range(max(1, steps)):
            run_step()
        after = status_kib("VmHWM")
    else:  # no clear_refs: the high-water mark so far is the baseline (can only under-report the step)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        for _ in range(max(1, steps)):
            run_step()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) / 1024


def child_peak(args) -> None:
    """One fresh process: build one model and report the RSS peak of its measured steps."""
    model = build(args.child_peak, args)
    ids, mask = inputs(args)
    print(json.dumps({"peak_mb": rss_peak_mb(lambda: step(args.child_peak, model, ids, mask), args.steps)}))


# A fixed mmap threshold turns off glibc's dynamic one, so big freed blocks go back to the OS and RSS follows live
# memory instead of the allocator's cache; the same for every measured process.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def alternating_child_peaks(command: list[str], kinds: tuple[str, ...], repeats: int) -> dict[str, float]:
    """`command --child-peak KIND` in a fresh process per run, the order of kinds rotating between repeats; the
    smallest peak of each kind (other load only ever adds)."""
    env = {**os.environ, **CHILD_ENV}
    peaks: dict[str, list[float]] = {kind: [] for kind in kinds}
    for r in range(repeats):
        for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
            out = subprocess.run(command + ["--child-peak", kind], capture_output=True, text=True, check=True,
                                 env=env).stdout
            peaks[kind].append(json.loads(out.strip().splitlines()[-1])["peak_mb"])
    return {k: min(v) for k, v in peaks.items()}


def cpu_peaks(args) -> dict[str, float]:
    command = [sys.executable, str(Path(__file__).resolve()), *step_argv(args), "--steps", "1"]
    return alternating_child_peaks(command, ("ours", "hf"), args.mem_repeats)


def cuda_peak_mb(run_step, device) -> float:
    """Peak CUDA memory of one run_step() above what was allocated before it, in MB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run_step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child_peak:
        child_peak(args)
        return
    ours = build("ours", args)
    hf = build("hf", args, ours=ours)
    models = {"ours": ours, "hf": hf}
    ids, mask = inputs(args)
    for kind, model in models.items():
        for _ in range(args.warmup):
            step(kind, model, ids, mask)
    # Steps alternate A B B A A B ...; each step is timed alone and the fastest counts (tok/s), the median is
    # reported too: on a shared machine, other load only ever slows a step down.
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    for r in range(args.rounds):
        for kind in (("ours", "hf") if r % 2 == 0 else ("hf", "ours")):
            for _ in range(args.steps):
                sync(args.device)
                t0 = time.perf_counter()
                step(kind, models[kind], ids, mask)
                sync(args.device)
                times[kind].append(time.perf_counter() - t0)
    tokens = args.bs * args.seq
    tok_s = {k: tokens / min(v) for k, v in times.items()}
    median_tok_s = {k: tokens / statistics.median(v) for k, v in times.items()}
    if args.device.startswith("cuda"):
        peaks = {k: cuda_peak_mb(lambda: step(k, m, ids, mask), args.device) for k, m in models.items()}
    else:
        del ours, hf, models
        peaks = cpu_peaks(args)
    print(json.dumps({
        "ours_tok_s": round(tok_s["ours"], 1), "hf_tok_s": round(tok_s["hf"], 1),
        "ratio": round(tok_s["ours"] / tok_s["hf"], 3),
        "ours_tok_s_median": round(median_tok_s["ours"], 1), "hf_tok_s_median": round(median_tok_s["hf"], 1),
        "ours_peak_mb": round(peaks["ours"], 1), "hf_peak_mb": round(peaks["hf"], 1),
        "dim": args.dim, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads or args.heads,
        "vocab": args.vocab, "seq": args.seq, "bs": args.bs, "timed_steps_per_model": args.steps * args.rounds,
        "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
