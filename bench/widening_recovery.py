"""How much of a widening's cost training wins back: stage-1 runs from a widened model (tools.expand_vocab), each
scored on held-out text in bits per character (tools.eval_ppl), the scale on which the base and its widened copy
compare. The figures of docs/development.md ("What widening costs the model") and docs/training-runs.md come from it.

    python bench/widening_recovery.py --widened outputs/demo/smollm2-zh --data heldout.jsonl \
        --warmup-lrs 1e-4 3e-4 1e-3 --warmup-steps 16 --stage1-steps 16 --set 'eos_token=<|endoftext|>'
    python bench/widening_recovery.py --widened outputs/demo/smollm2-zh --data heldout.jsonl \
        --stage1-steps 160 --stage1-lr 1e-4 --eval-steps 16 --set 'eos_token=<|endoftext|>'

Runs, each `pretrain_main.py` under torchrun with the demo's settings (DEFAULTS; --set adds or replaces any):
  stage1                   --stage1-steps steps from the widened model at --stage1-lr (cosine to a tenth)
  warmup lr=X              for each --warmup-lrs X: --warmup-steps steps of new_rows_only=True from the widened model;
  warmup lr=X + stage1     and, with --stage1-steps, stage 1 from that warm-up's final/
Prints one JSON line:
  widened                  {lang: bits_per_char} of the widened model before any step
  runs                     [{name, steps, bits_per_char: {lang: ...}, step_s, curve}]: step_s the mean seconds per
                           optimizer step; curve {step: {set: bits_per_char}} from the run's own held-out evaluation
                           every --eval-steps steps (on eval_data_root_dir's zh and en, samples cut at
                           max_seq_length), else {}
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.metrics import read_records  # noqa: E402

DEFAULTS = ["plugin=ddp", "precision=fp32", "gradient_checkpointing=False", "dropout_prob=0.0", "warmup_steps=2",
            "batch_size=2", "global_batch_size=0", "max_seq_length=128", "logging_steps=4", "saving_steps=1000000"]


def train(out: Path, init: Path, steps: int, lr: float, settings: list[str], nproc: int) -> None:
    """One pretrain_main.py run into `out` (its final/ and logs/); stops with the run's output if it fails."""
    named = {item.partition("=")[0] for item in settings}
    run = [item for item in DEFAULTS if item.partition("=")[0] not in named] + settings
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "pretrain_main.py"), *run, f"init_model_path={init}", f"max_steps={steps}", f"lr={lr}",
           f"min_lr={lr / 10}", f"output_dir={out}", f"logdir={out / 'logs'}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def bits_per_char(models: list[Path], data: Path, scratch: Path) -> dict[str, dict[str, float]]:
    """{model dir: {lang: bits_per_char}} from one tools.eval_ppl run over all of them."""
    table = scratch / "eval_ppl.json"
    cmd = [sys.executable, "-m", "tools.eval_ppl", "--data", str(data), "--quiet", "--json", str(table)]
    for model in models:
        cmd += ["--model", str(model)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    scores = json.loads(table.read_text())
    return {str(m): {lang: s["bits_per_char"] for lang, s in scores[str(m)].items() if lang != "all"} for m in models}


def step_seconds(logdir: Path) -> float:
    """Mean seconds per optimizer step between the first and the last logged training window."""
    windows = read_records(logdir / "metrics.jsonl", "loss")
    first, last = windows[0], windows[-1]
    return (last["time"] - first["time"]) / (last["step"] - first["step"]) if last["step"] > first["step"] else 0.0


def curve(logdir: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: {name: s["bits_per_char"] for name, s in r["eval"]["sets"].items()}
            for r in read_records(logdir / "metrics.jsonl", "eval")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widened", type=Path, required=True, help="a model dir tools.expand_vocab wrote")
    parser.add_argument("--data", type=Path, required=True, help="held-out JSONL as tools.eval_ppl reads it")
    parser.add_argument("--warmup-lrs", type=float, nargs="*", default=[], help="one new_rows_only run per lr")
    parser.add_argument("--warmup-steps", type=int, default=16)
    parser.add_argument("--stage1-steps", type=int, default=0, help="0: no stage-1 runs")
    parser.add_argument("--stage1-lr", type=float, default=5e-5)
    parser.add_argument("--eval-steps", type=int, default=0,
                        help="stage-1 runs score heldout_corpora's zh and en this often (0: not during the run)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a stage setting for every run (e.g. eos_token=<|endoftext|>, pretrain_data_root_dir=D)")
    parser.add_argument("--out", type=Path, default=None, help="where the runs are written (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.stage1_steps == 0 and not args.warmup_lrs:
        parser.error("nothing to run: give --stage1-steps and/or --warmup-lrs")

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        stage1_eval = [f"eval_data_root_dir={REPO / 'heldout_corpora'}", f"eval_steps={args.eval_steps}",
                       "eval_samples_per_set=64", "eval_sets=['zh', 'en']"] if args.eval_steps else []
        runs = []  # (name, steps, run dir)
        if args.stage1_steps:
            train(root / "stage1", args.widened, args.stage1_steps, args.stage1_lr, args.set + stage1_eval, args.nproc)
            runs.append(("stage1", args.stage1_steps, root / "stage1"))
        for lr in args.warmup_lrs:
            warm = root / f"warmup-{lr:g}"
            train(warm, args.widened, args.warmup_steps, lr, args.set + ["new_rows_only=True"], args.nproc)
            runs.append((f"warmup lr={lr:g}", args.warmup_steps, warm))
            if args.stage1_steps:
                after = root / f"warmup-{lr:g}-stage1"
                train(after, warm / "final", args.stage1_steps, args.stage1_lr, args.set + stage1_eval, args.nproc)
                runs.append((f"warmup lr={lr:g} + stage1", args.stage1_steps, after))
        scores = bits_per_char([args.widened] + [run / "final" for _, _, run in runs], args.data, root)
        result = {"widened": scores[str(args.widened)],
                  "runs": [{"name": name, "steps": steps, "bits_per_char": scores[str(run / "final")],
                            "step_s": step_seconds(run / "logs"), "curve": curve(run / "logs")}
                           for name, steps, run in runs],
                  "seconds": time.perf_counter() - start}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
