"""bench/data_throughput.py runs on a small corpus and prints the promised JSON line."""
import importlib.util
import json
from pathlib import Path

from data_corpus_helpers import stage1_corpus

BENCH = Path(__file__).resolve().parents[1] / "bench" / "data_throughput.py"


def test_data_throughput_bench_prints_one_json_line(tmp_path, tokenizer_path, capsys):
    stage1_corpus(tmp_path)
    spec = importlib.util.spec_from_file_location("data_throughput", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--stage", "pretrain", "--corpus", str(tmp_path), "--tokenizer", str(tokenizer_path),
                "--batches", "5", "--batch-size", "4", "--max-seq-length", "512", "--packing"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == {"batches_per_s", "real_tokens_per_s", "padded_tokens_per_s", "real_fraction",
                           "discarded_tokens", "sp_tokens_per_s", "ratio", "cpu_ratio"}
    assert result["discarded_tokens"] == 0 and 0 < result["real_fraction"] <= 1
    assert result["real_tokens_per_s"] > 0 and result["sp_tokens_per_s"] > 0
