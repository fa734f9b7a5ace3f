"""The demos' closing tables: training loss and held-out loss per set of the three stages, from each stage's
logs/metrics.jsonl (training.metrics.read_records). Shared by scripts/demo.sh and scripts/demo_real.sh.

    python scripts/demo_summary.py DEMO_DIR
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.metrics import read_records  # noqa: E402

STAGES = ("pretrain", "task_instruct_tuning", "alignment_sft")


def main(demo: Path) -> None:
    print("== training loss per stage (window means from logs/metrics.jsonl)")
    for stage in STAGES:
        train = read_records(demo / stage / "logs" / "metrics.jsonl", "loss")
        print(f"  {stage:<22} step {train[0]['step']:>3}: {train[0]['loss']:.3f}  ->  "
              f"step {train[-1]['step']:>3}: {train[-1]['loss']:.3f}")
    print("\n== held-out loss per set, first -> last evaluation (logs/metrics.jsonl)")
    for stage in STAGES:
        evals = read_records(demo / stage / "logs" / "metrics.jsonl", "eval")
        first, last = evals[0], evals[-1]
        print(f"  {stage} (step {first['step']} -> step {last['step']})")
        for name, score in first["eval"]["sets"].items():
            print(f"    {name:<20} {score['loss']:.3f}  ->  {last['eval']['sets'][name]['loss']:.3f}"
                  f"   ({score['tokens']:,} tokens)")
        if "mix" in first["eval"]:
            print(f"    {'mix-weighted':<20} {first['eval']['mix']['loss']:.3f}  ->  "
                  f"{last['eval']['mix']['loss']:.3f}")
    print(f"\n== curves (training loss, held-out loss per set, lr against tokens seen): {demo / 'curves.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
