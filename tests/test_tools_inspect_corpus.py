"""tools.inspect_corpus: the bundled corpus is clean for every stage; broken corpora exit non-zero and say why."""
import json
import re
import shutil
from pathlib import Path

import pytest

from tools.file_sampling import sample_file
from tools.inspect_corpus import main

CORPUS = Path(__file__).resolve().parents[1] / "pretraining_corpora"


@pytest.mark.parametrize("stage", ["pretrain", "task_instruct_tuning", "alignment_sft"])
def test_bundled_corpus_is_clean(stage, tokenizer_path, capsys):
    assert main([stage, "--root", str(CORPUS), "--tokenizer", str(tokenizer_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    import importlib

    split = importlib.import_module(f"{stage}_args").pretrain_data_split
    for name in split:
        assert f"\n{name} " in out
    assert "PROBLEM" not in out and "problem:" not in out
    assert "start-up check was not run" not in out  # the stage's data stream was constructed


def test_mix_shares_and_ranks(capsys):
    assert main(["pretrain", "--root", str(CORPUS), "--quiet", "batch_size=10"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.split()}
    assert rows["zh"][1:4] == ["4", "40.0%", "4.00"] and rows["translate"][1:4] == ["2", "20.0%", "2.00"]
    assert rows["zh"][6] == "62"  # records, counted exactly (two bundled files of 31)
    # 8 ranks over 2 files: the stages shard by line; a warning, and an error with --strict.
    assert main(["pretrain", "--root", str(CORPUS), "--world-size", "8", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "all 2, by line" in out and "keeps 1 line in 8" in out
    assert main(["pretrain", "--root", str(CORPUS), "--world-size", "8", "--quiet", "--strict"]) == 1


def test_broken_corpus_exits_nonzero_and_names_every_problem(tmp_path, tokenizer_path, capsys):
    root = tmp_path / "corpora"
    shutil.copytree(CORPUS, root)
    with open(root / "zh-summary" / "10002.jsonl", "a", encoding="utf-8") as f:
        f.write('{"input": "x", "output": 3, "type": "cnewsum-gen-abs"}\n')
        f.write(json.dumps({"input": "问题", "output": "答案", "type": "no-such-type"}, ensure_ascii=False) + "\n")
    shutil.rmtree(root / "en-wikihow")
    code = main(["task_instruct_tuning", "--root", str(root), "--quiet"])
    out = capsys.readouterr().out
    assert code == 1
    assert f"bad record at {root / 'zh-summary' / '10002.jsonl'}:" in out and "field 'output' must be a string" in out
    assert re.search(r"\n  zh-summary +no-such-type +1  NO prompt files", out)
    assert "type 'no-such-type' has no prompts/no-such-type.pre/post" in out
    assert "en-wikihow: problem: set 'en-wikihow': folder" in out
    # A missing translation prompt file is found by the stage's own prepare().
    shutil.copytree(CORPUS / "en-wikihow", root / "en-wikihow")
    (root / "translate" / "zh-en.prompt").unlink()
    assert main(["task_instruct_tuning", "--root", str(root), "--quiet", "--tokenizer", str(tokenizer_path)]) == 1
    out = capsys.readouterr().out
    assert "zh-en.prompt does not exist" in out


def test_bad_settings_and_missing_root_exit_nonzero(tmp_path, capsys):
    assert main(["alignment_sft", "--root", str(tmp_path / "nowhere"), "--quiet"]) == 1
    assert "does not exist" in capsys.readouterr().out
    assert main(["alignment_sft", "batch_size=zero", "--quiet"]) == 1
    assert "batch_size" in capsys.readouterr().err


def test_global_batch_is_resolved_as_a_launch_resolves_it(capsys):
    # Stage 3's 48 samples a step on 8 GPUs: the launch lowers the per-GPU batch to 6, and so does the inspection.
    assert main(["alignment_sft", "--root", str(CORPUS), "--world-size", "8", "--quiet"]) == 0
    assert "batch 6 per GPU x 8 processes x 1 accumulation" in capsys.readouterr().out
    # Where the launch would stop (the exact batch insisted on, and 48 is no multiple of 5), so does the inspection.
    assert main(["alignment_sft", "--root", str(CORPUS), "--world-size", "5", "--quiet",
                 "global_batch_exact=True"]) == 1
    assert "'global_batch_size' = 48 is not a multiple of batch_size 24 x 5 processes" in capsys.readouterr().err


def test_big_file_record_count_is_estimated_from_samples(tmp_path):
    path = tmp_path / "10001.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(20000):
            f.write(json.dumps({"text": "x" * (i % 97)}) + "\n")
    exact = sample_file(path, exact_bytes=path.stat().st_size, sample_bytes=10_000)
    assert exact.exact and exact.records == 20000
    estimate = sample_file(path, exact_bytes=1000, sample_bytes=64_000)
    assert not estimate.exact and estimate.sampled_bytes < path.stat().st_size / 5
    assert abs(estimate.records - 20000) / 20000 < 0.05


def test_full_checks_every_line_of_a_big_file(tmp_path, capsys):
    root = tmp_path / "corpus"
    shutil.copytree(CORPUS, root)
    big = root / "zh" / "10001.jsonl"
    with open(big, "w", encoding="utf-8") as f:  # 2.6 MB: sampled in 4 windows at --exact-mb 0.5, not read whole
        for i in range(20000):
            f.write(json.dumps({"text": "一段文字" * 10}, ensure_ascii=False) + "\n")
            if i == 7777:
                f.write('{"text": "cut off\n')  # one bad line, away from the sampled windows' reach
    # The windows (at 0, 1/3, 2/3 and the end of the file, 2.5 KB each) miss the line at 40% of it.
    assert main(["pretrain", "--root", str(root), "--quiet", "--exact-mb", "0.5", "--sample-mb", "0.01"]) == 0
    assert main(["pretrain", "--root", str(root), "--quiet", "--exact-mb", "0.5", "--full"]) == 1
    assert f"bad record at {big}:7779" in capsys.readouterr().out
