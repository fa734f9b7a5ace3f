"""training/corpus.py: the mix, file listing, sharding by file and by line, exact restartable line streams."""
import json
from collections import Counter

import pytest

from data_corpus_helpers import write_set
from training.corpus import DataError, list_set_files, parse_split, weighted_cycle
from training.set_reader import SetReader


def test_weighted_cycle_holds_exact_counts_in_every_window_and_interleaves():
    order = weighted_cycle({"zh": 4, "en": 4, "translate": 2})
    stream = order * 5
    for start in range(len(stream) - 10):
        assert Counter(stream[start:start + 10]) == {"zh": 4, "en": 4, "translate": 2}
    # smooth: no set twice in a row for this mix
    assert all(a != b for a, b in zip(stream, stream[1:]))
    big = weighted_cycle({"a": 6, "b": 1, "c": 2, "d": 1, "e": 1, "f": 1})
    assert Counter(big) == {"a": 6, "b": 1, "c": 2, "d": 1, "e": 1, "f": 1}
    assert "a,a,a" not in ",".join(big)


def test_parse_split_accepts_both_forms_and_names_bad_entries():
    specs = parse_split({"zh": 4, "en": {"weight": 2, "file_start": 10002}, "off": 0,
                         "translate": {"weight": 1, "file_stop": 10009}})
    assert [(n, s.weight, s.file_start, s.file_stop) for n, s in specs.items()] == [
        ("zh", 4, 0, None), ("en", 2, 10002, None), ("translate", 1, 0, 10009)]
    for bad, needle in [({"zh": -1}, "'zh'"), ({"zh": {"weight": 1, "start": 3}}, "start"),
                        ({"zh": {"weight": 1, "file_stop": "10017"}}, "file_stop must be an integer"),
                        ({"zh": {"weight": 1, "file_start": 10017, "file_stop": 10017}}, "must be above file_start"),
                        ({"zh": {"file_start": 3}}, "missing 'weight'"), ({"zh": 1.5}, "'zh'"), ({}, "non-empty"),
                        ({"zh": 0}, "every weight is 0"), ({"../x": 1}, "plain folder name")]:
        with pytest.raises(DataError, match=needle):
            parse_split(bad)


def test_list_set_files_orders_by_number_and_applies_file_start_and_stop(tmp_path):
    write_set(tmp_path, "zh", [{"text": str(i)} for i in range(4)], n_files=4, first=10001)
    assert [p.name for p in list_set_files(tmp_path, "zh", 0)] == ["10001.jsonl", "10002.jsonl", "10003.jsonl",
                                                                  "10004.jsonl"]
    assert [p.name for p in list_set_files(tmp_path, "zh", 10003)] == ["10003.jsonl", "10004.jsonl"]
    assert [p.name for p in list_set_files(tmp_path, "zh", 0, 10003)] == ["10001.jsonl", "10002.jsonl"]  # stop: out
    assert [p.name for p in list_set_files(tmp_path, "zh", 10002, 10004)] == ["10002.jsonl", "10003.jsonl"]
    with pytest.raises(DataError, match=r"set 'zh': file_start=10005 leaves no file .*10001\.\.10004"):
        list_set_files(tmp_path, "zh", 10005)
    with pytest.raises(DataError, match=r"set 'zh': file_start=0, file_stop=10001 leaves no file"):
        list_set_files(tmp_path, "zh", 0, 10001)
    with pytest.raises(DataError, match="set 'en': folder .* does not exist"):
        list_set_files(tmp_path, "en", 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="set 'empty': folder .* holds no"):
        list_set_files(tmp_path, "empty", 0)
    (tmp_path / "zh" / "part-a.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match="part-a.jsonl is not named"):
        list_set_files(tmp_path, "zh", 0)


def read_texts(reader, n):
    return [json.loads(reader.next_line()[0])["text"] for _ in range(n)]


def test_sharding_by_file_when_files_at_least_ranks(tmp_path):
    files = write_set(tmp_path, "en", [{"text": f"f{i % 4}-{i // 4}"} for i in range(12)], n_files=4)
    seen = []
    for rank in range(2):
        reader = SetReader("en", files, rank, 2)
        assert reader.files == files[rank::2]
        seen += read_texts(reader, 6)
    assert sorted(seen) == sorted(f"f{i % 4}-{i // 4}" for i in range(12))  # disjoint and complete
    reader = SetReader("en", files, 1, 2)
    assert read_texts(reader, 8)[6:] == ["f1-0", "f1-1"]  # wraps around to its first file


def test_sharding_by_line_when_fewer_files_than_ranks(tmp_path, caplog):
    files = write_set(tmp_path, "zh", [{"text": f"t{i}"} for i in range(10)], n_files=2)  # 5 lines per file
    per_rank = []
    with caplog.at_level("INFO"):
        for rank in range(3):
            per_rank.append(read_texts(SetReader("zh", files, rank, 3), 3))
    assert "sharding it by line" in caplog.text
    # pass order: file 1 then file 2 -> t0 t2 t4 t6 t8 t1 t3 t5 t7 t9; rank r keeps pass lines r, r+3, ...
    assert per_rank == [["t0", "t6", "t3"], ["t2", "t8", "t5"], ["t4", "t1", "t7"]]
    with pytest.raises(DataError, match="gave this rank no line"):
        read_texts(SetReader("zh", [files[0]], 7, 8), 1)  # 5 lines, rank 7 of 8 never gets one


def test_reader_position_is_json_and_seek_resumes_exactly(tmp_path):
    files = write_set(tmp_path, "en", [{"text": f"x{i}"} for i in range(7)], n_files=2)
    reader = SetReader("en", files, 0, 1)
    read_texts(reader, 5)
    position = json.loads(json.dumps(reader.position()))
    expected = read_texts(reader, 9)
    other = SetReader("en", files, 0, 1)
    other.seek(position)
    assert read_texts(other, 9) == expected
    bad = dict(position, file="99999.jsonl")
    with pytest.raises(DataError, match="99999.jsonl"):
        other.seek(bad)
