"""A copy of a corpus whose prompted inputs are longer than a row: the case where samples must be cut.

    python bench/long_input_corpus.py --corpus pretraining_corpora --output /tmp/long_corpus [--max-parts 12]

The bundled sample's task inputs are short, so at max_seq_length 1024 nothing is cut; real summary and
reading-comprehension sets (CNN/DM, CNewsSum, DuReader, HotpotQA) often are. Here every record with a non-empty
"input" (stage 2 tasks, stage 3) gets the inputs of 1, 2, ..., max-parts other records of its set put in front of
its own, so that its own input, and the question at its end, comes last. Other sets, prompts and translation
prompts are copied as they are. Deterministic; prints the folder.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def lengthen(records: list[dict], max_parts: int) -> list[dict]:
    inputs = [r["input"] for r in records if r.get("input", "").strip()]
    out = []
    for i, record in enumerate(records):
        if not record.get("input", "").strip():
            out.append(record)
            continue
        parts = 1 + i % max_parts  # 1 .. max_parts passages before the record's own input
        before = [inputs[(i + j + 1) % len(inputs)] for j in range(parts)]
        out.append(dict(record, input="\n\n".join(before + [record["input"]])))
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--max-parts", type=int, default=12, help="the most passages put in front of an input")
    args = parser.parse_args(argv)
    if args.output.exists():
        shutil.rmtree(args.output)
    shutil.copytree(args.corpus, args.output)
    for folder in sorted(p for p in args.output.iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.jsonl"))
        records = {path: [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
                   for path in files}
        every = [r for path in files for r in records[path]]
        if not every or "input" not in every[0]:
            continue
        longer = iter(lengthen(every, args.max_parts))  # passages drawn from the whole set, not one file
        for path in files:
            lines = [json.dumps(next(longer), ensure_ascii=False) for _ in records[path]]
            path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    print(args.output)
    return args.output


if __name__ == "__main__":
    main()
