"""Training curves as a picture: training loss, held-out loss per set, held-out bits per character per set and learning
rate against tokens seen. Bits per character do not depend on the tokenizer: a widened model's stages and its base
read on that panel's one axis, where per-token losses of different vocabularies cannot be compared.

    python -m tools.plot_metrics outputs/demo/pretrain outputs/demo/task_instruct_tuning outputs/demo/alignment_sft \\
        --out curves.png

Each RUN_DIR is a run's output_dir (read: <output_dir>/logs/metrics.jsonl), its logdir, or a metrics.jsonl file.
Several runs are consecutive stages: they share one horizontal axis, each shifted by the tokens of the runs before it
and shaded as its own span. Records are told apart by their fields (training/metrics.py): "loss" marks a training
window, "eval" a held-out evaluation; a step logged twice (a resumed run appends) keeps its last record. Logs
without "tokens_seen" (written before it was logged) are drawn against optimizer steps instead.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from training.metrics import read_records


@dataclass
class Run:
    name: str
    train: list[dict] = field(default_factory=list)  # training-window records, by step
    evals: list[dict] = field(default_factory=list)  # held-out records, by step


def metrics_file(path: Path) -> Path:
    for candidate in (path, path / "metrics.jsonl", path / "logs" / "metrics.jsonl"):
        if candidate.is_file():
            return candidate
    raise ValueError(f"{path}: no metrics.jsonl there (nor in {path / 'logs'})")


def read_run(path: Path) -> Run:
    source = metrics_file(path)
    directory = source.parent.parent if source.parent.name == "logs" else source.parent
    return Run(directory.name, read_records(source, "loss"), read_records(source, "eval"))


def draw(runs: list[Run]) -> Figure:
    """Four panels over one axis: training loss (one line per run), held-out loss and held-out bits per character
    (one line per run and set, one colour per set; records written before bits were logged have none), learning
    rate (one line per run)."""
    records = [r for run in runs for r in run.train + run.evals]
    by_tokens = bool(records) and all("tokens_seen" in r for r in records)
    x_key = "tokens_seen" if by_tokens else "step"

    fig = Figure(figsize=(10, 10), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_eval, ax_bits, ax_lr = fig.subplots(4, 1, sharex=True)
    set_colours: dict[str, str] = {}
    offset = 0.0
    for index, run in enumerate(runs):
        end = offset + max((r[x_key] for r in run.train + run.evals), default=0)
        if index % 2:
            for ax in (ax_loss, ax_eval, ax_bits, ax_lr):
                ax.axvspan(offset, end, color="0.5", alpha=0.08, linewidth=0)
        ax_loss.text((offset + end) / 2, 1.02, run.name, transform=ax_loss.get_xaxis_transform(), ha="center",
                     va="bottom", fontsize="small")
        x = [offset + r[x_key] for r in run.train]
        ax_loss.plot(x, [r["loss"] for r in run.train], color="C0", linewidth=1.2)
        ax_lr.plot(x, [r["lr"] for r in run.train], color="0.3", linewidth=1.2)
        for name in dict.fromkeys(name for r in run.evals for name in r["eval"]["sets"]):
            new = name not in set_colours
            colour = set_colours.setdefault(name, f"C{len(set_colours) % 10}")
            for ax, key in ((ax_eval, "loss"), (ax_bits, "bits_per_char")):
                points = [(offset + r[x_key], r["eval"]["sets"][name][key]) for r in run.evals
                          if key in r["eval"]["sets"].get(name, {})]
                if points:
                    ax.plot(*zip(*points), color=colour, marker="o", markersize=3, linewidth=1.2,
                            label=name if new else "_" + name)  # one legend entry per set
        offset = end

    ax_loss.set_ylabel("training loss")
    ax_eval.set_ylabel("held-out loss\n(nats per token)")
    ax_bits.set_ylabel("held-out bits\nper character")
    ax_lr.set_ylabel("learning rate")
    if set_colours:
        ax_eval.legend(title="held-out set", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    else:
        ax_eval.text(0.5, 0.5, "no held-out evaluation in these runs", transform=ax_eval.transAxes,
                     ha="center", va="center", color="0.4")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if by_tokens:
        ax_lr.xaxis.set_major_formatter(EngFormatter())
        ax_lr.set_xlabel("tokens seen" + (" (stages one after another)" if len(runs) > 1 else ""))
    else:
        ax_lr.set_xlabel("optimizer steps" + (" (stages one after another)" if len(runs) > 1 else ""))
    for ax in (ax_loss, ax_eval, ax_bits, ax_lr):
        ax.grid(True, alpha=0.3)
    return fig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.plot_metrics", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="output_dir, logdir or metrics.jsonl")
    p.add_argument("--out", type=Path, default=Path("curves.png"), help="PNG to write (default: curves.png)")
    p.add_argument("--dpi", type=int, default=100, help="pixels per inch; the figure is 10 x 10 inches")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = [read_run(path) for path in args.runs]
    except (ValueError, OSError) as e:
        print(f"plot_metrics: {e}", file=sys.stderr)
        return 1
    fig = draw(runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=args.dpi)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
