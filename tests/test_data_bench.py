"""bench/data_throughput.py prints the promised JSON line; bench/long_input_corpus.py lengthens task inputs."""
import importlib.util
import json
from pathlib import Path

import pytest

from data_corpus_helpers import stage1_corpus, task_records, write_set

BENCH = Path(__file__).resolve().parents[1] / "bench" / "data_throughput.py"


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json"])
def test_data_throughput_bench_packing_fills_rows_that_padding_leaves_empty(tmp_path, tokenizer_path,
                                                                           bpe_tokenizer_dirs, capsys, kind):
    stage1_corpus(tmp_path)
    spec = importlib.util.spec_from_file_location("data_throughput", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tokenizer = tokenizer_path if kind == "sentencepiece" else bpe_tokenizer_dirs["qwen2"] / "tokenizer.json"
    reference = "sp" if kind == "sentencepiece" else "tokenizers"  # the raw library the pipeline is measured against
    results = {}
    for packing in ([], ["--packing"]):
        bench.main(["--stage", "pretrain", "--corpus", str(tmp_path), "--tokenizer", str(tokenizer),
                    "--batches", "8", "--batch-size", "4", "--max-seq-length", "128", *packing])
        results[bool(packing)] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for result in results.values():
        assert set(result) == {"batches_per_s", "real_tokens_per_s", "padded_tokens_per_s", "real_fraction",
                               "discarded_tokens", f"{reference}_tokens_per_s", "ratio", "cpu_ratio"}
        assert result["discarded_tokens"] == 0 and result["real_tokens_per_s"] > 0
        assert result["real_tokens_per_s"] <= result["padded_tokens_per_s"]
    # Documents shorter than a 128-token row: one per row leaves slots empty (0.65 real with SentencePiece, 0.85
    # with the byte-level BPE's longer encodings), packing puts several in a row (0.80 and 0.94: a row's tail that
    # no whole document fits stays empty).
    assert results[True]["real_fraction"] >= 0.75
    assert results[True]["real_fraction"] > results[False]["real_fraction"] + 0.02


def test_long_input_corpus_puts_other_inputs_before_each_own(tmp_path):
    spec = importlib.util.spec_from_file_location("long_input_corpus", BENCH.parent / "long_input_corpus.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    stage1_corpus(tmp_path / "in")
    write_set(tmp_path / "in", "qa", task_records(9, "qa"), n_files=2)
    tool.main(["--corpus", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--max-parts", "3"])
    read = lambda path: [json.loads(line) for line in path.read_text().splitlines()]  # noqa: E731
    before = [r for name in ("10001", "10002") for r in read(tmp_path / "in" / "qa" / f"{name}.jsonl")]
    after = [r for name in ("10001", "10002") for r in read(tmp_path / "out" / "qa" / f"{name}.jsonl")]
    assert [r["output"] for r in after] == [r["output"] for r in before]
    for i, (old, new) in enumerate(zip(before, after)):
        passages = new["input"].split("\n\n")
        assert passages[-1] == old["input"] and len(passages) == 2 + i % 3
        assert all(p in [r["input"] for r in before] and p != old["input"] for p in passages[:-1])
    assert read(tmp_path / "out" / "zh" / "10001.jsonl") == read(tmp_path / "in" / "zh" / "10001.jsonl")
