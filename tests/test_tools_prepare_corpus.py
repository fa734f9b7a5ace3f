"""tools.prepare_corpus: checked records, a deterministic external shuffle in bounded memory, numbered files that
the stage reads, and no silent overwrite."""
import json
import random
from collections import Counter
from pathlib import Path

import pytest

import alignment_sft_args
from data_corpus_helpers import settings, stream
from llama.tokenization_llama import SentencePieceTokenizer
from tools import external_shuffle
from tools.external_shuffle import LINE_OVERHEAD, ExternalShuffler
from tools.prepare_corpus import main, parse_args, run

SFT_RECORDS = [{"instruction": f"问题 {i}: what is {i} + {i}?", "input": "", "output": f"答案是 {2 * i}."}
               for i in range(60)]


def write_jsonl(path: Path, records, extra_lines=()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def output_lines(folder: Path) -> list[str]:
    return [line for p in sorted(folder.glob("*.jsonl")) for line in p.read_text(encoding="utf-8").splitlines()]


def prepare(argv) -> dict:
    return run(parse_args([str(a) for a in argv] + ["--quiet"]), out=open("/dev/null", "w"))


def test_checks_records_shuffles_and_splits_into_numbered_files(tmp_path):
    raw = write_jsonl(tmp_path / "raw" / "a.jsonl", SFT_RECORDS[:30],
                      extra_lines=["{not json", "", json.dumps({"instruction": "", "input": "", "output": "x"}),
                                   json.dumps({"instruction": "q", "input": "", "output": "  "})])
    write_jsonl(tmp_path / "raw" / "b.jsonl", SFT_RECORDS[30:])
    stats = prepare([tmp_path / "raw", "--out", tmp_path / "corpus" / "others", "--num-files", 4,
                     "--memory-mb", 0.002])
    folder = tmp_path / "corpus" / "others"
    assert [p.name for p in sorted(folder.glob("*.jsonl"))] == ["10001.jsonl", "10002.jsonl", "10003.jsonl",
                                                                "10004.jsonl"]
    lines = output_lines(folder)
    assert sorted(lines) == sorted(json.dumps(r, ensure_ascii=False) for r in SFT_RECORDS)  # each once, unchanged
    assert lines != [json.dumps(r, ensure_ascii=False) for r in SFT_RECORDS]  # shuffled
    assert [len(p.read_text().splitlines()) for p in sorted(folder.glob("*.jsonl"))] == [15, 15, 15, 15]
    assert stats["stage"] == "alignment_sft" and stats["records"] == 60  # set name "others" -> stage 3
    assert stats["bad_records"] == 2 and stats["empty_records"] == 1 and stats["blank_lines"] == 1
    assert stats["bad"][0].startswith(f"{tmp_path / 'raw' / 'a.jsonl'}:31: malformed JSON")
    assert stats["bad"][1].startswith(f"{tmp_path / 'raw' / 'a.jsonl'}:33: neither 'instruction' nor 'input'")


def test_output_is_read_by_the_stage(tmp_path, tokenizer_path):
    import alignment_sft_main

    write_jsonl(tmp_path / "raw.jsonl", SFT_RECORDS)
    prepare([tmp_path / "raw.jsonl", "--out", tmp_path / "corpus" / "mine", "--kind", "sft", "--num-files", 2])
    config = settings(tmp_path / "corpus", {"mine": 1}, alignment_sft_args, seed=0)
    with stream(alignment_sft_main, config, SentencePieceTokenizer(tokenizer_path), 0, 2) as dp:
        assert next(dp)["num_target_tokens"] > 0


def test_deterministic_for_a_seed(tmp_path):
    write_jsonl(tmp_path / "raw.jsonl", SFT_RECORDS)
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        prepare([tmp_path / "raw.jsonl", "--out", tmp_path / name / "others", "--seed", seed, "--num-files", 3,
                 "--memory-mb", 0.003])
    a, b, c = (output_lines(tmp_path / name / "others") for name in "abc")
    assert a == b and a != c and sorted(a) == sorted(c)


def test_plain_text_per_line_and_per_file_and_tokens(tmp_path, tokenizer_path):
    (tmp_path / "lines.txt").write_text("第一篇文章。\n\nsecond document\r\nthird one\n", encoding="utf-8")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "1.txt").write_text("line one\nline two\n", encoding="utf-8")
    stats = prepare([tmp_path / "lines.txt", "--out", tmp_path / "c" / "zh", "--num-files", 1,
                     "--tokenizer", tokenizer_path])
    texts = sorted(json.loads(line)["text"] for line in output_lines(tmp_path / "c" / "zh"))
    assert texts == sorted(["第一篇文章。", "second document", "third one"]) and stats["blank_lines"] == 1
    tok = SentencePieceTokenizer(tokenizer_path)
    assert stats["tokens"] == sum(len(tok.encode(t)) for t in texts)
    prepare([tmp_path / "docs", "--out", tmp_path / "c2" / "en", "--kind", "lm", "--text-unit", "file"])
    assert [json.loads(line)["text"] for line in output_lines(tmp_path / "c2" / "en")] == ["line one\nline two\n"]


def test_never_overwrites_silently(tmp_path, capsys):
    write_jsonl(tmp_path / "raw.jsonl", SFT_RECORDS[:10])
    out = tmp_path / "corpus" / "others"
    base = [str(tmp_path / "raw.jsonl"), "--out", str(out), "--num-files", "2", "--quiet"]
    assert main(base) == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.jsonl")}
    assert main(base) == 2 and "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.glob("*.jsonl")} == before
    assert main(base + ["--append"]) == 0
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["10001.jsonl", "10002.jsonl", "10003.jsonl", "10004.jsonl"]
    assert main(base[:-3] + ["--num-files", "1", "--overwrite", "--quiet"]) == 0
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["10001.jsonl"] and len(output_lines(out)) == 10
    assert not list(out.parent.glob(".prepare_corpus-*"))  # temp files gone


def test_strict_writes_nothing_on_bad_records(tmp_path, capsys):
    write_jsonl(tmp_path / "raw.jsonl", [{"text": "fine"}], extra_lines=['{"text": 1}'])
    assert main([str(tmp_path / "raw.jsonl"), "--out", str(tmp_path / "c" / "zh"), "--strict", "--quiet"]) == 2
    assert "raw.jsonl:2: field 'text' must be a string" in capsys.readouterr().err
    assert not list((tmp_path / "c" / "zh").glob("*.jsonl"))


def test_translate_and_task_kinds_use_the_stage_checks(tmp_path):
    root = Path(__file__).resolve().parents[1] / "pretraining_corpora"
    write_jsonl(tmp_path / "t.jsonl", [{"en_text": "hi", "zh_text": "你好"}], extra_lines=['{"en_text": "x"}'])
    stats = prepare([tmp_path / "t.jsonl", "--out", tmp_path / "c" / "translate", "--root", root])
    assert stats["records"] == 1 and "missing field 'zh_text'" in stats["bad"][0]
    write_jsonl(tmp_path / "q.jsonl", [{"input": "q", "output": "a", "type": "qa-zh"}],
                extra_lines=['{"input": "q", "output": "a", "type": "../x"}'])
    stats = prepare([tmp_path / "q.jsonl", "--out", tmp_path / "c" / "mytask", "--kind", "task", "--root", root])
    assert stats["records"] == 1 and "field 'type' must be a plain name" in stats["bad"][0]


def test_external_shuffle_memory_stays_within_budget(tmp_path, monkeypatch):
    loaded = []

    class Recording(random.Random):
        def shuffle(self, x):
            loaded.append(sum(len(line) + LINE_OVERHEAD for line in x))
            super().shuffle(x)

    monkeypatch.setattr(external_shuffle.random, "Random", Recording)
    lines = [(f"{i:05d}" + "x" * random.Random(i).randrange(200)).encode() for i in range(2000)]
    budget = 8 * 1024
    # Tell it a tenth of the real size: the first buckets overflow and must be split again.
    shuffler = ExternalShuffler(tmp_path / "b", budget, expected_bytes=sum(map(len, lines)) // 10, seed=3)
    for line in lines:
        shuffler.add(line)
    result = list(shuffler)
    shuffler.close()
    assert sorted(result) == sorted(lines) and result != lines
    assert max(loaded) <= budget and len(loaded) > 20
    assert not (tmp_path / "b").exists()


def test_external_shuffle_spreads_every_line_uniformly(tmp_path):
    # Where does line 0 end up? Over many seeds, at every position about equally often, across bucket borders.
    lines = [bytes([65 + i]) * 300 for i in range(8)]
    positions = Counter()
    for seed in range(400):
        shuffler = ExternalShuffler(tmp_path / str(seed), 1024, expected_bytes=sum(map(len, lines)), seed=seed)
        assert shuffler.num_buckets > 1
        for line in lines:
            shuffler.add(line)
        positions[list(shuffler).index(lines[0])] += 1
        shuffler.close()
    assert sorted(positions) == list(range(8))
    assert all(25 <= n <= 80 for n in positions.values()), positions  # 50 expected each


SHAREGPT = [{"id": f"c{i}", "conversations": [{"from": "system", "value": "Be kind."}] * (i % 2) + [
    {"from": "human", "value": f"问题 {i}"}, {"from": "gpt", "value": f"answer {i}"},
    {"from": "human", "value": "and then?"}, {"from": "gpt", "value": f"then {i + 1}"}]} for i in range(12)]


def test_sharegpt_becomes_messages_that_stage_3_reads(tmp_path, tokenizer_path):
    import alignment_sft_main

    write_jsonl(tmp_path / "sharegpt.jsonl", SHAREGPT)
    out = tmp_path / "c" / "chat"
    stats = prepare([tmp_path / "sharegpt.jsonl", "--out", out, "--kind", "sft", "--num-files", "1",
                     "--tokenizer", tokenizer_path])
    assert stats["records"] == 12 and stats["converted"] == 12 and stats["bad_records"] == 0
    # the messages' texts are counted (and the other string fields, as for any kind)
    tok = SentencePieceTokenizer(tokenizer_path)
    assert stats["tokens"] == sum(len(tok.encode(text)) for r in SHAREGPT
                                  for text in [r["id"]] + [t["value"] for t in r["conversations"]])
    written = sorted((json.loads(line) for line in output_lines(out)), key=lambda r: int(r["id"][1:]))
    for record, source in zip(written, SHAREGPT):
        assert record == {"id": source["id"], "messages": [
            {"role": {"human": "user", "gpt": "assistant", "system": "system"}[t["from"]], "content": t["value"]}
            for t in source["conversations"]]}
    with stream(alignment_sft_main, settings(out.parent, {"chat": 1}, max_seq_length=256),
          SentencePieceTokenizer(tokenizer_path), 0, 1) as dp:
        batch = next(dp)
    assert batch["num_target_tokens"] > 0


def test_nothing_usable_names_each_reason_with_its_count_and_first_line(tmp_path, capsys):
    array = tmp_path / "alpaca.json"  # what many public sets ship: one JSON array, pretty-printed
    array.write_text(json.dumps([{"instruction": "hi", "output": "yo"}] * 3, indent=2), encoding="utf-8")
    bad_sharegpt = [{"conversations": [{"from": "bing", "value": "q"}, {"from": "gpt", "value": "a"}]},
                    {"conversations": [{"from": "human", "value": "q"}]},
                    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]},
                    {"conversations": [{"from": "bing", "value": "q2"}, {"from": "gpt", "value": "a"}]}]
    write_jsonl(tmp_path / "sharegpt.jsonl", bad_sharegpt, extra_lines=["{not json"])
    out = tmp_path / "c" / "chat"
    assert main([str(array), str(tmp_path / "sharegpt.jsonl"), "--out", str(out), "--kind", "sft", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("prepare_corpus: no usable record in the input: nothing written")
    n_array_lines = len([line for line in array.read_text().splitlines() if line.strip()])
    for count, reason, first in [
            (n_array_lines, "the file is one JSON array, not JSON Lines", f"{array}:1"),
            (2, "conversations[i]: 'from' 'bing' is not one of", f"{tmp_path / 'sharegpt.jsonl'}:1"),
            (1, "messages[i]: the last message must be an assistant turn", f"{tmp_path / 'sharegpt.jsonl'}:2"),
            (1, "empty: the stage would skip it", f"{tmp_path / 'sharegpt.jsonl'}:3"),
            (1, "malformed JSON", f"{tmp_path / 'sharegpt.jsonl'}:5")]:
        assert f"{count} x {reason}" in error and f"(first at {first})" in error.split(f"{count} x {reason}")[1] \
            .split(";")[0], (count, reason, error)
    # Partly usable: the written summary lists the same reasons.
    write_jsonl(tmp_path / "ok.jsonl", [{"instruction": "hi", "output": "yo"}])  # no "input": empty input
    stats = prepare([tmp_path / "ok.jsonl", tmp_path / "sharegpt.jsonl", "--out", out, "--kind", "sft"])
    assert stats["records"] == 1 and stats["reasons"]["malformed JSON"] == (1, f"{tmp_path / 'sharegpt.jsonl'}:5")
