"""Report on a stage's corpus before a launch: what each set holds, how the mix and the ranks see it, what is wrong.

    python -m tools.inspect_corpus pretrain --world-size 8
    python -m tools.inspect_corpus task_instruct_tuning --root /data/corpora --tokenizer models/llama-7b-zh
    python -m tools.inspect_corpus alignment_sft batch_size=12        # key=value: the stage's own overrides
    python -m tools.inspect_corpus pretrain --full                    # every line of every file checked

Reads <stage>_args.py (with the overrides) and prints one row per set: weight, share of the mix and samples per
batch, files, records (counted for files up to --exact-mb or with --full, else estimated from sampled lines; a launch
itself checks only the first lines of each file, and a bad line deeper in stops the run when it is reached, after a
checkpoint of the last step), a token estimate
(--tokenizer, else characters), files per rank for --world-size (and whether the set falls back to sharding by
line); then every task type of each set (stage 2) with its record count and which prompt files serve it ("(no
type)": records without one, which get no prompt, as the recipe's zh-qa-long), and every problem found. Records
are checked with the stage's own record rules; with a tokenizer the stage's data stream (its RecordRules in a
DataStream) is also constructed, which runs its start-up validation exactly as a launch would.

Exit status: 0 clean, 1 problems found (with --strict, warnings count as problems), 2 bad usage.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from tools.file_sampling import sample_file
from tools.stage_schema import STAGES, RecordChecker, args_module, stage_rules
from tools.text_stats import estimate_tokens, text_fields
from training.corpus import DataError, RecordError, list_set_files, parse_record, parse_split, weighted_cycle
from training.data_stream import DataStream
from training.model_loading import resolved_tokenizer_path
from training.set_reader import SetReader
from training.settings import Settings, SettingsError, load_settings, resolve_global_batch
from training.settings_concerns import ModelSettings

SHOW_PER_SET = 5  # problems listed per set before "... and N more"


@dataclass
class SetReport:
    name: str
    weight: int
    files: list[Path] = field(default_factory=list)
    records: float = 0.0
    exact: bool = True
    chars: float = 0.0
    tokens: float = 0.0
    bad: int = 0
    empty: int = 0
    types: dict[str, list[str]] = field(default_factory=dict)  # task type ("" = none) -> positions without a file
    type_records: Counter = field(default_factory=Counter)  # task type -> records (estimated like `records`)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files_per_rank: str = "-"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.inspect_corpus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings overrides, as the stage takes them")
    p.add_argument("--root", type=Path, help="corpus root (overrides pretrain_data_root_dir)")
    p.add_argument("--world-size", type=int, default=1, help="GPUs the stage will run on (default 1)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.model, tokenizer.json or model dir: token counts and the "
                   "data stream's start-up check (default: the stage's own, if it exists)")
    p.add_argument("--exact-mb", type=float, default=64, help="count every line of files up to this size")
    p.add_argument("--full", action="store_true", help="read and check every line of every file, whatever its size "
                                                        "(one file's lines in memory at a time)")
    p.add_argument("--sample-mb", type=float, default=8, help="bytes read from a bigger file to estimate it")
    p.add_argument("--token-sample-chars", type=int, default=2_000_000,
                   help="characters per set tokenized for the tokens/char ratio")
    p.add_argument("--strict", action="store_true", help="warnings are problems too")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_intermixed_args(argv)  # key=value overrides may come after the options
    if args.world_size < 1:
        p.error("--world-size must be >= 1")
    return args


def inspect(args: argparse.Namespace, out=None) -> tuple[list[SetReport], list[str]]:
    """(per-set reports, stage-wide problems)."""
    out = out or sys.stdout
    overrides = list(args.overrides) + ([f"pretrain_data_root_dir={args.root}"] if args.root else [])
    settings = load_settings(args_module(args.stage), overrides)
    settings = resolve_global_batch(settings, args.world_size)  # as the launch does: per-GPU batch, accumulation
    root = Path(settings.data.pretrain_data_root_dir)
    global_problems: list[str] = []
    if not root.is_dir():
        problem = f"corpus root {root.resolve()} does not exist (pretrain_data_root_dir)"
        print(f"problem: {problem}", file=out)
        return [], [problem]
    split = parse_split(settings.data.pretrain_data_split)
    tokenizer = _tokenizer(args.tokenizer or _stage_tokenizer(settings.model), settings.model.eos_token)
    reports = []
    for name, spec in split.items():
        report = SetReport(name, spec.weight)
        reports.append(report)
        try:
            report.files = list_set_files(root, name, spec.file_start, spec.file_stop)
            checker = RecordChecker(args.stage, name, root)
        except DataError as e:
            report.problems.append(str(e))
            continue
        _read_set(report, checker, tokenizer, args)
        _ranks(report, args.world_size)

    if tokenizer is not None and not any(r.problems for r in reports):
        # The launch's own start-up validation: settings, files, prompt files, the head of every file.
        try:
            DataStream(settings.data, tokenizer, 0, args.world_size, stage_rules(args.stage), settings.chat).close()
        except DataError as e:
            global_problems.append(f"data stream start-up check: {e}")
    _print(reports, global_problems, settings, args, tokenizer, out)
    return reports, global_problems


def _stage_tokenizer(settings: ModelSettings) -> Path | None:
    """The tokenizer the stage itself would load (tokenizer_path, else init_model_path's), if it exists here."""
    try:
        return resolved_tokenizer_path(settings)
    except FileNotFoundError:
        return None


def _tokenizer(path: Path | None, eos_token: str):
    if path is None:
        return None
    from llama.tokenizer_files import load_tokenizer

    try:
        return load_tokenizer(path, eos_token)
    except ValueError as e:  # an unreadable tokenizer file, an eos_token not in its vocabulary
        raise DataError(str(e)) from None


def _read_set(report: SetReport, checker: RecordChecker, tokenizer, args) -> None:
    sample_texts: list[str] = []
    sample_chars = 0
    for path in tqdm(report.files, desc=f"{report.name}", unit="file", disable=args.quiet, file=sys.stderr):
        exact_bytes = path.stat().st_size if args.full else int(args.exact_mb * 2**20)
        sample = sample_file(path, exact_bytes, int(args.sample_mb * 2**20))
        report.exact &= sample.exact
        report.records += sample.records
        if sample.size == 0:
            report.warnings.append(f"file {path} is empty")
        chars = 0
        for where, raw in sample.lines:
            try:
                record = parse_record(raw)
                if checker.check_record(record) == "empty":
                    report.empty += 1
            except (RecordError, DataError) as e:
                report.bad += 1
                if report.bad <= SHOW_PER_SET:
                    report.problems.append(f"bad record at {where}: {e}")
                continue
            task_type = checker.task_type(record)
            if task_type is not None:
                report.type_records[task_type] += sample.scale
                if task_type not in report.types:
                    report.types[task_type] = checker.prompt_types_missing(task_type)
            texts = text_fields(record)
            chars += sum(map(len, texts))
            if sample_chars < args.token_sample_chars:
                sample_texts += texts
                sample_chars += sum(map(len, texts))
        report.chars += chars * sample.scale
    if report.bad > SHOW_PER_SET:
        report.problems.append(f"... and {report.bad - SHOW_PER_SET} more bad record(s)")
    if report.records == 0 and report.files:
        report.problems.append(f"set '{report.name}': no record in its {len(report.files)} file(s)")
    if sample_chars:
        sample_tokens = (sum(map(len, tokenizer.encode_batch(sample_texts))) if tokenizer is not None
                         else sum(estimate_tokens(t) for t in sample_texts))
        report.tokens = report.chars * sample_tokens / sample_chars
    if report.empty:
        report.warnings.append(f"{report.empty} record(s) with empty text: the stage skips them")
    for task_type, missing in sorted(report.types.items()):
        if task_type and missing:
            report.warnings.append(f"type {task_type!r} has no prompts/{task_type}.{'/'.join(missing)}.prompt: "
                                   f"its records get no prompt (input + ' ')")


def _ranks(report: SetReport, world_size: int) -> None:
    """Files per rank as the stages shard them (training.set_reader.SetReader)."""
    if not report.files:
        return
    readers = [SetReader(report.name, report.files, rank, world_size) for rank in range(world_size)]
    if readers[0].line_stride > 1:
        report.files_per_rank = f"all {len(report.files)}, by line"
        report.warnings.append(f"{len(report.files)} file(s) for {world_size} ranks: every rank reads every file "
                               f"and keeps 1 line in {world_size} (the recipe wants >= 1 file per GPU)")
        return
    counts = sorted(len(r.files) for r in readers)
    report.files_per_rank = str(counts[0]) if counts[0] == counts[-1] else f"{counts[0]}-{counts[-1]}"


def _fmt(value: float, exact: bool) -> str:
    text = f"{value:,.0f}"
    return text if exact else "~" + text


def _print(reports: list[SetReport], global_problems: list[str], settings: Settings, args, tokenizer, out) -> None:
    total_weight = sum(r.weight for r in reports)
    batch = settings.data.batch_size
    period = weighted_cycle({r.name: r.weight for r in reports}) if reports else []
    print(f"stage {args.stage}: root {Path(settings.data.pretrain_data_root_dir).resolve()}, batch {batch} per GPU x "
          f"{args.world_size} processes x {settings.optimisation.gradient_accumulation_steps} accumulation, "
          f"mix period {len(period)} samples", file=out)
    print(f"tokens: {'counted with ' + str(tokenizer.model_path) if tokenizer else 'estimated from characters'}"
          f" ('~' = estimated)", file=out)
    header = ("set", "weight", "share", "per batch", "files", "files/rank", "records", "tokens", "status")
    rows = []
    for r in reports:
        status = "PROBLEM" if r.problems else ("warning" if r.warnings else "ok")
        rows.append((r.name, str(r.weight), f"{r.weight / total_weight:.1%}", f"{batch * r.weight / total_weight:.2f}",
                     str(len(r.files)), r.files_per_rank, _fmt(r.records, r.exact),
                     _fmt(r.tokens, r.exact and tokenizer is not None), status))
    _print_table(header, rows, out)
    type_rows = [(r.name, t or "(no type)", _fmt(r.type_records[t], r.exact), _prompt_files(t, missing))
                 for r in reports for t, missing in sorted(r.types.items())]
    if type_rows:
        print("task types (prompt files: prompts/<type>.pre.prompt and prompts/<type>.post.prompt):", file=out)
        _print_table(("set", "type", "records", "prompts"), type_rows, out, left=(0, 1, 3), indent="  ")
    for r in reports:
        for kind, lines in (("problem", r.problems), ("warning", r.warnings)):
            for line in lines:
                print(f"{r.name}: {kind}: {line}", file=out)
    for line in global_problems:
        print(f"problem: {line}", file=out)
    if tokenizer is None:
        print("note: no --tokenizer: the data stream's start-up check was not run (records were checked with the "
              "stage's own record rules)", file=out)


def _prompt_files(task_type: str, missing: list[str]) -> str:
    if not task_type:
        return "none: no prompt (input + ' ')"
    if not missing:
        return "pre, post"
    if len(missing) == 2:
        return "NO prompt files: no prompt (input + ' ')"
    return f"{'pre' if missing == ['post'] else 'post'} only: no prompt when '{missing[0]}' is drawn"


def _print_table(header: tuple, rows: list[tuple], out, left=(0,), indent: str = "") -> None:
    """Columns padded to their widest cell: those numbered in `left` left-aligned (text), the others right (numbers)."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [str(cell).ljust(width) if i in left else str(cell).rjust(width)
                 for i, (cell, width) in enumerate(zip(row, widths))]
        print(indent + "  ".join(cells).rstrip(), file=out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        reports, global_problems = inspect(args)
    except (SettingsError, DataError, FileNotFoundError) as e:
        print(f"inspect_corpus: {e}", file=sys.stderr)
        return 1
    problems = bool(global_problems) or any(r.problems for r in reports)
    warnings = any(r.warnings for r in reports)
    if problems or (args.strict and warnings):
        print(f"inspect_corpus: {'problems' if problems else 'warnings (--strict)'} found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
