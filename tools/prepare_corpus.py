"""Turn raw dumps into a set folder the stages read: every record checked, globally shuffled, numbered files.

    python -m tools.prepare_corpus RAW [RAW ...] --out pretraining_corpora/zh --kind lm --num-files 8
    python -m tools.prepare_corpus dump.jsonl --out corpora/others --stage alignment_sft --file-size-mb 256

Input: JSONL files (one object per line), or plain text for LM sets (one document per line, or per file with
--text-unit file); folders are read recursively. Each record is checked with the stage's own record rules
(tools/stage_schema.py): --kind picks a schema, --stage reads the set the way that stage reads the output folder's
name (default: the first stage whose args file mixes that name). Bad records are left out and listed with
file:line; records the stage would skip (text empty after stripping) are left out and counted. Whenever something is
left out, the summary gives the count per reason with the first file:line of each (and so does the error when
nothing is usable). A file that is one JSON array rather than JSON Lines is named as such.

For stage 3 (--kind sft), ShareGPT records {"conversations": [{"from": "human" | "gpt" | "system", "value"}, ...]}
are written as {"messages": [{"role": "user" | "assistant" | "system", "content"}, ...]}, the shape stage 3 reads.

The shuffle is external (tools/external_shuffle.py): memory stays within --memory-mb whatever the input size.
Output: <out>/10001.jsonl, 10002.jsonl, ... split by --num-files (equal record counts) or --file-size-mb. Existing
numbered files are never overwritten silently: the tool stops unless --overwrite (replace them, only once the
new files are complete) or --append (number the new files after the last existing one).
Deterministic: the same inputs, options and --seed give byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from tools.external_shuffle import ExternalShuffler
from tools.raw_inputs import input_format, list_inputs, read_raw_lines
from tools.stage_schema import KINDS, STAGES, RecordChecker, stage_for_set
from tools.text_stats import text_fields
from training.corpus import DataError, RecordError, list_set_files, parse_record

FIRST_NUMBER = 10001  # the recipe's file numbering
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}  # ShareGPT "from" -> messages "role"
JSON_ARRAY = ("the file is one JSON array, not JSON Lines (one object per line): convert it first, e.g. "
              "jq -c '.[]' FILE > FILE.jsonl")
TOKENIZE_BATCH = 1024  # records per tokenizer call when counting tokens


class PrepareError(Exception):
    """A reason to stop before writing anything (bad options, files in the way, bad records with --strict)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.prepare_corpus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path, help="raw JSONL / text files or folders of them")
    p.add_argument("--out", required=True, type=Path, help="the set folder to write, e.g. pretraining_corpora/zh")
    schema = p.add_mutually_exclusive_group()
    schema.add_argument("--kind", choices=sorted(KINDS), help="record schema: lm {text}, translate {en_text, "
                        "zh_text}, task {input, output, type}, sft {instruction, input, output} or {messages} "
                        "(ShareGPT {conversations} converted)")
    schema.add_argument("--stage", choices=STAGES, help="check records as this stage reads a set named like --out")
    p.add_argument("--root", type=Path, help="corpus root holding prompts/ and translate/*.prompt "
                   "(default: the parent of --out)")
    p.add_argument("--format", choices=("auto", "jsonl", "text"), default="auto",
                   help="input format (auto: .jsonl/.json files are JSONL, anything else plain text)")
    p.add_argument("--text-unit", choices=("line", "file"), default="line",
                   help="plain text: one document per line, or per file")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--num-files", type=int, help="write this many files (default 8; at least the GPU count)")
    size.add_argument("--file-size-mb", type=float, help="start a new file once one reaches this size")
    p.add_argument("--memory-mb", type=float, default=1024, help="memory for the shuffle (default 1024)")
    p.add_argument("--tmp-dir", type=Path, help="where the shuffle buckets go (default: next to --out)")
    p.add_argument("--seed", type=int, default=42)
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace the folder's numbered files")
    existing.add_argument("--append", action="store_true", help="number new files after the existing ones")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.model, tokenizer.json (or model dir): also count tokens")
    p.add_argument("--strict", action="store_true", help="write nothing if any record is bad")
    p.add_argument("--show-bad", type=int, default=20, help="bad records listed in the summary (default 20)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.num_files is None and args.file_size_mb is None:
        args.num_files = 8
    if args.num_files is not None and args.num_files < 1:
        p.error("--num-files must be >= 1")
    if args.file_size_mb is not None and args.file_size_mb <= 0:
        p.error("--file-size-mb must be > 0")
    return args


def resolve_schema(args: argparse.Namespace) -> tuple[str, str]:
    """(stage, set name to check records as)."""
    if args.kind:
        return KINDS[args.kind]
    set_name = args.out.resolve().name
    stage = args.stage or stage_for_set(set_name)
    if stage is None:
        raise PrepareError(f"no args file mixes a set named {set_name!r}: say which schema with --kind "
                           f"({', '.join(sorted(KINDS))}) or --stage")
    return stage, set_name


def existing_numbered(out: Path) -> list[Path]:
    """The folder's numbered files, as the stages list them (a stray non-numbered .jsonl is an error there too)."""
    if not out.is_dir() or not any(out.glob("*.jsonl")):
        return []
    try:
        return list_set_files(out.parent, out.name, 0)
    except DataError as e:
        raise PrepareError(str(e)) from None


def run(args: argparse.Namespace, out=None) -> dict:
    out = out or sys.stdout
    stage, check_as = resolve_schema(args)
    root = args.root or args.out.resolve().parent
    existing = existing_numbered(args.out)
    if existing and not (args.overwrite or args.append):
        raise PrepareError(f"{args.out} already holds {len(existing)} numbered file(s) ({existing[0].name} .. "
                           f"{existing[-1].name}); pass --overwrite to replace them or --append to add after them")
    first_number = int(existing[-1].stem) + 1 if (existing and args.append) else FIRST_NUMBER
    try:
        checker = RecordChecker(stage, check_as, root)
    except DataError as e:
        raise PrepareError(f"stage {stage} cannot check set {check_as!r} with root {root}: {e}") from None
    tokenizer = None
    if args.tokenizer:
        from llama.tokenizer_files import load_tokenizer

        try:
            tokenizer = load_tokenizer(args.tokenizer)
        except ValueError as e:
            raise PrepareError(f"--tokenizer: {e}") from None

    files = list_inputs(args.inputs)
    input_bytes = sum(f.stat().st_size for f in files)
    memory_bytes = int(args.memory_mb * 2**20)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp_parent = args.tmp_dir or args.out.resolve().parent
    tmp_parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".prepare_corpus-", dir=tmp_parent))
    stats = {"input_files": len(files), "input_bytes": input_bytes, "records": 0, "bytes": 0, "blank_lines": 0,
             "empty_records": 0, "bad_records": 0, "bad": [], "tokens": None, "files": [], "stage": stage,
             "checked_as": check_as, "reasons": {}, "converted": 0}
    shuffler = None
    try:
        shuffler = ExternalShuffler(work / "buckets", memory_bytes, input_bytes, args.seed)
        token_count, pending_texts = 0, []
        with tqdm(total=input_bytes, unit="B", unit_scale=True, desc="read+check", disable=args.quiet,
                  file=sys.stderr) as bar:
            for path in files:
                fmt = input_format(path, args.format)
                array = fmt == "jsonl" and _is_json_array(path)
                for raw in read_raw_lines(path, fmt, args.text_unit, bar.update):
                    if raw.data is None or raw.data:
                        status, record, line = _check(checker, raw, stats, args.show_bad, array)
                    else:
                        stats["blank_lines"] += 1
                        continue
                    if status == "empty":
                        stats["empty_records"] += 1
                        _count_reason(stats, "empty: the stage would skip it (text empty after stripping)", raw.where)
                    elif status == "ok":
                        shuffler.add(line)
                        stats["records"] += 1
                        stats["bytes"] += len(line) + 1
                        if tokenizer is not None:
                            pending_texts += text_fields(record)
                            if len(pending_texts) >= TOKENIZE_BATCH:
                                token_count += sum(map(len, tokenizer.encode_batch(pending_texts)))
                                pending_texts = []
        if tokenizer is not None:
            token_count += sum(map(len, tokenizer.encode_batch(pending_texts))) if pending_texts else 0
            stats["tokens"] = token_count
        if args.strict and stats["bad_records"]:
            raise PrepareError(f"{stats['bad_records']} bad record(s) and --strict: nothing written "
                               f"(first: {stats['bad'][0]})")
        if stats["records"] == 0:
            raise PrepareError("no usable record in the input: nothing written; left out: " + "; ".join(
                f"{count:,} x {reason} (first at {first})" for reason, (count, first) in stats["reasons"].items()))
        staged = _write_shuffled(shuffler, stats, args, work / "out", first_number)
        _install(staged, existing if args.overwrite else [], args.out)
        stats["files"] = [args.out / p.name for p in staged]
    finally:
        if shuffler is not None:
            shuffler.close()
        shutil.rmtree(work, ignore_errors=True)
    _print_summary(stats, args, out)
    return stats


def _check(checker: RecordChecker, raw, stats: dict, show: int, array: bool = False
           ) -> tuple[str, dict | None, bytes]:
    """("ok" | "empty" | "bad", the parsed record or None, the line to write). A stage-3 ShareGPT record is
    converted to {"messages"} first; a line of a JSON-array file is bad (JSON_ARRAY) whatever it holds."""
    if array:
        problem, reason = JSON_ARRAY, JSON_ARRAY
    elif raw.data is None:
        problem, reason = raw.error, _reason(raw.error)
    else:
        try:
            record, line = parse_record(raw.data), raw.data
            if checker.stage == "alignment_sft" and "conversations" in record and "messages" not in record:
                record = sharegpt_to_messages(record)
                line = json.dumps(record, ensure_ascii=False).encode("utf-8")
                stats["converted"] += 1
            return checker.check_record(record), record, line
        except (RecordError, DataError) as e:
            problem, reason = str(e), _reason(str(e))
    stats["bad_records"] += 1
    _count_reason(stats, reason, raw.where)
    if len(stats["bad"]) < show and not (array and stats["reasons"][reason][0] > 1):  # an array: its first line
        stats["bad"].append(f"{raw.where}: {problem}")
    return "bad", None, b""


def sharegpt_to_messages(record: dict) -> dict:
    """{"conversations": [{"from", "value"}, ...], ...} -> {"messages": [{"role", "content"}, ...], ...} (other
    fields kept). Roles and order are checked by the stage afterwards; here only what the conversion needs."""
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise RecordError(f"field 'conversations' must be a list of {{\"from\", \"value\"}} objects, got "
                          f"{type(turns).__name__}")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RecordError(f"conversations[{index}] must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise RecordError(f"conversations[{index}]: 'from' {turn['from']!r} is not one of "
                              f"{tuple(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": turn["value"]})
    return {"messages": messages, **{key: value for key, value in record.items() if key != "conversations"}}


def _reason(problem: str) -> str:
    """A problem's kind, without the details that differ from record to record (positions, indices, field
    lists): what bad records are counted by."""
    reason = re.sub(r"\[\d+\]", "[i]", problem.split(" (")[0])
    return re.sub(r" at (byte|column) \d+.*", "", reason)


def _count_reason(stats: dict, reason: str, where: str) -> None:
    count, first = stats["reasons"].get(reason, (0, where))
    stats["reasons"][reason] = (count + 1, first)


def _is_json_array(path: Path) -> bool:
    """The file's first non-blank character is "[": a JSON array, which the stages cannot read line by line."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _write_shuffled(shuffler: ExternalShuffler, stats: dict, args, folder: Path, first_number: int) -> list[Path]:
    """The shuffled lines into folder/<number>.jsonl files, split by record count or by size."""
    folder.mkdir(parents=True)
    records = stats["records"]
    if args.num_files is not None:
        num_files = min(args.num_files, records)
        if num_files < args.num_files:
            print(f"warning: only {records} record(s): writing {num_files} file(s), not {args.num_files}",
                  file=sys.stderr)
        # File i holds records [bounds[i], bounds[i+1]): counts differ by at most one.
        bounds = [records * i // num_files for i in range(num_files + 1)]
    limit = None if args.file_size_mb is None else args.file_size_mb * 2**20
    paths, f, in_file, file_bytes = [], None, 0, 0
    with tqdm(total=records, unit="rec", desc="shuffle+write", disable=args.quiet, file=sys.stderr) as bar:
        for index, line in enumerate(shuffler):
            new_file = f is None or (limit is not None and file_bytes >= limit) or \
                (limit is None and index == bounds[len(paths)])
            if new_file:
                if f is not None:
                    f.close()
                paths.append(folder / f"{first_number + len(paths)}.jsonl")
                f, in_file, file_bytes = open(paths[-1], "wb"), 0, 0
            f.write(line + b"\n")
            in_file += 1
            file_bytes += len(line) + 1
            bar.update()
    if f is not None:
        f.close()
    return paths


def _install(staged: list[Path], replaced: list[Path], out: Path) -> None:
    """Move the complete new files into place; replaced old files go only now, so a failure keeps the old set."""
    new_names = {p.name for p in staged}
    for old in replaced:
        if old.name not in new_names:
            old.unlink()
    for path in staged:
        os.replace(path, out / path.name)


def _print_summary(stats: dict, args, out) -> None:
    print(f"checked as: stage {stats['stage']}, set {stats['checked_as']!r}", file=out)
    print(f"input: {stats['input_files']} file(s), {stats['input_bytes']:,} bytes", file=out)
    print(f"records written: {stats['records']:,} ({stats['bytes']:,} bytes) in {len(stats['files'])} file(s): "
          f"{stats['files'][0].name} .. {stats['files'][-1].name} in {args.out}", file=out)
    if stats["tokens"] is not None:
        print(f"tokens: {stats['tokens']:,} (text fields, {args.tokenizer})", file=out)
    if stats["converted"]:
        print(f"converted: {stats['converted']:,} ShareGPT record(s) to {{\"messages\"}}", file=out)
    print(f"left out: {stats['bad_records']:,} bad record(s), {stats['empty_records']:,} empty record(s) "
          f"(the stage would skip them), {stats['blank_lines']:,} blank line(s)", file=out)
    for reason, (count, first) in stats["reasons"].items():
        print(f"  {count:>9,} x {reason} (first at {first})", file=out)
    for line in stats["bad"]:
        print(f"  bad: {line}", file=out)
    if stats["bad_records"] > len(stats["bad"]):
        print(f"  ... and {stats['bad_records'] - len(stats['bad']):,} more", file=out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (PrepareError, FileNotFoundError) as e:
        print(f"prepare_corpus: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
