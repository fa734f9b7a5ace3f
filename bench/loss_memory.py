"""Peak memory and time of a training step under each loss path of llama/loss.py, at a config where the vocabulary
projection dominates (what gemini's "checkpointed" path is for).

    python bench/loss_memory.py --vocab 32000 --dim 256 --layers 2 --heads 4 --seq 1024 --bs 4 --device cpu

Prints one JSON line: {"<path>_peak_mb", "<path>_s_per_step", "<path>_loss" for path in fused, checkpointed, plain;
"fp32_logits_mb" (bs x seq x vocab x 4 bytes, the plain path's largest tensor); config}.
- Every position counts in the loss (a full loss mask), as in pretraining.
- Peak memory is a step's peak above the loaded model, in MB (2^20), measured as bench/model_step.py does: CUDA
  max_memory_allocated in this process; on CPU each path runs in fresh subprocesses (RSS high-water mark of the
  step after a warmup step), the smallest of --mem-repeats runs kept, the order of the paths rotating.
- Time: one model, its loss_path switched between steps, the paths taking turns over --rounds; the fastest step
  of each counts (other load on a shared machine only slows steps down).
- The losses of one batch under each path are printed too: they must agree (tests/test_llama_model.py checks
  values and gradients).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.model_step import (add_step_args, alternating_child_peaks, cuda_peak_mb, inputs, our_config,  # noqa: E402
                              rss_peak_mb, step, step_argv, sync)
from llama import Llama  # noqa: E402
from llama.loss import LOSS_PATHS  # noqa: E402

PATHS = tuple(LOSS_PATHS)  # fused, checkpointed, plain


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_args(p, dim=256, layers=2, heads=4, seq=1024)
    p.add_argument("--rounds", type=int, default=3, help="timed steps per path, the paths taking turns")
    p.add_argument("--mem-repeats", type=int, default=2, help="fresh subprocesses per path for CPU peak memory")
    p.add_argument("--child-peak", choices=PATHS, help=argparse.SUPPRESS)  # internal: one CPU memory run
    return p.parse_args(argv)


def build(args) -> Llama:
    torch.manual_seed(0)
    return Llama(our_config(args)).to(device=args.device, dtype=getattr(torch, args.dtype)).train()


def run_step(model: Llama, path: str, ids: torch.Tensor, mask: torch.Tensor) -> None:
    model.loss_path = path
    step("ours", model, ids, mask)


def child_peak(args) -> None:
    model = build(args)
    ids, mask = inputs(args)
    print(json.dumps({"peak_mb": rss_peak_mb(lambda: run_step(model, args.child_peak, ids, mask), 1)}))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child_peak:
        child_peak(args)
        return
    model = build(args)
    ids, mask = inputs(args)
    losses = {}
    with torch.no_grad():
        for path in PATHS:
            model.loss_path = path
            losses[path] = model(ids, loss_mask=mask)[0].item()
    for path in PATHS:  # warmup
        run_step(model, path, ids, mask)
    times: dict[str, list[float]] = {path: [] for path in PATHS}
    for r in range(args.rounds):
        for path in PATHS[r % len(PATHS):] + PATHS[:r % len(PATHS)]:
            sync(args.device)
            t0 = time.perf_counter()
            run_step(model, path, ids, mask)
            sync(args.device)
            times[path].append(time.perf_counter() - t0)
    if args.device.startswith("cuda"):
        peaks = {path: cuda_peak_mb(lambda: run_step(model, path, ids, mask), args.device) for path in PATHS}
    else:
        del model
        command = [sys.executable, str(Path(__file__).resolve()), *step_argv(args)]
        peaks = alternating_child_peaks(command, PATHS, args.mem_repeats)
    result = {}
    for path in PATHS:
        result[f"{path}_peak_mb"] = round(peaks[path], 1)
        result[f"{path}_s_per_step"] = round(min(times[path]), 3)
        result[f"{path}_loss"] = losses[path]
    print(json.dumps({
        **result, "fp32_logits_mb": round(args.bs * args.seq * args.vocab * 4 / 2**20, 1),
        "dim": args.dim, "layers": args.layers, "heads": args.heads, "vocab": args.vocab, "seq": args.seq,
        "bs": args.bs, "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
