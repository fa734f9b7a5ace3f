"""Stage 2's task types: a record without one takes the recipe's no-prompt form, counted and logged once per set;
a type without prompt files is reported once, naming the file; inspect_corpus lists every type."""
import logging
import re
from pathlib import Path

import task_instruct_tuning_main
from data_corpus_helpers import settings, stream, task_records, write_set
from llama.tokenization_llama import SentencePieceTokenizer
from tools.inspect_corpus import main as inspect_main

CORPUS = Path(__file__).resolve().parents[1] / "pretraining_corpora"
BILLA_TYPES = ("dureader", "cmrc2018", "ape210k", "cnewsum-gen-abs", "hotpotqa", "mathqa", "wikihow-step", "squad2",
               "cnndm", "samsum", "mediasum-abs", "wikihow-gen-headlines")


def stage2(root, set_name, tok, **overrides):
    # long_text="truncate" keeps a set's samples in file order (split draws them from a buffer), so that the i-th
    # sample is the i-th record's.
    return stream(task_instruct_tuning_main,
        settings(root, {set_name: {"weight": 1, "file_start": 0}}, batch_size=1, max_seq_length=512,
                 long_text="truncate", **overrides),
        tok, 0, 1)


def take(processor, n):
    with processor:
        return [(b["input_ids"][0].tolist(), b["loss_mask"][0].tolist()) for _, b in zip(range(n), processor)]


def warnings_about(caplog, needle):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and needle in r.getMessage()]


def test_record_without_type_takes_the_no_prompt_form_counted_and_logged_once(tmp_path, tokenizer_path, caplog):
    tok = SentencePieceTokenizer(tokenizer_path)
    records = task_records(12, "qa")
    for i in (1, 4, 7):
        del records[i]["type"]  # as BiLLa's zh-qa-long records
    records[9] = dict(records[9], type="", input=records[9]["input"] + "\n", output=records[9]["output"] + " \n")
    write_set(tmp_path, "zh-qa-long", records, n_files=1)
    (tmp_path / "prompts").mkdir()
    for position in ("pre", "post"):
        (tmp_path / "prompts" / f"qa.{position}.prompt").write_text(f"A {position} prompt:\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        processor = stage2(tmp_path, "zh-qa-long", tok)
        assert not warnings_about(caplog, "untyped_records")  # the start-up check neither counts nor logs
        samples = take(processor, 24)  # two passes over the file
    for i in (1, 4, 7, 9):
        prefix = [tok.bos_id] + tok.encode(records[i]["input"] + " ")  # bos + input + " ", input not stripped
        answer = tok.encode(records[i]["output"].rstrip()) + [tok.eos_id]
        expected = (prefix + answer, [0] * len(prefix) + [1] * len(answer))
        assert samples[i] == samples[12 + i] == expected
    typed = tok.decode(samples[0][0])
    assert "A pre prompt:" in typed or "A post prompt:" in typed
    assert processor.counters["untyped_records"] == 8
    logged = warnings_about(caplog, "untyped_records")
    assert len(logged) == 1 and re.search(r"set 'zh-qa-long', file .*10001\.jsonl, line 2: no 'type'", logged[0])


def test_type_without_prompt_file_is_reported_once_naming_the_file(tmp_path, tokenizer_path, caplog):
    tok = SentencePieceTokenizer(tokenizer_path)
    records = task_records(24, "preonly")
    records[3::4] = [dict(r, type="nofile") for r in records[3::4]]
    records[20] = dict(records[20], type="late")  # past the start-up check of the first lines
    write_set(tmp_path, "qa", records, n_files=1)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "preonly.pre.prompt").write_text("Before:\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        processor = stage2(tmp_path, "qa", tok)
        at_start = list(caplog.records)
        samples = take(processor, 48)
    start_messages = [r.getMessage() for r in at_start]
    assert [m for m in start_messages if "'preonly'" in m] == [
        f"task type 'preonly' has no prompt file {prompts / 'preonly.post.prompt'}: its records take the no-prompt "
        f"form (input + ' ') when that position is drawn"]
    assert [m for m in start_messages if "'nofile'" in m] == [
        f"task type 'nofile' has no prompt file {prompts / 'nofile.pre.prompt'} nor {prompts / 'nofile.post.prompt'}: "
        f"its records take the no-prompt form (input + ' ')"]
    assert not [m for m in start_messages if "'late'" in m]
    for task_type in ("preonly", "nofile", "late"):  # once per type, however often it is met
        assert len(warnings_about(caplog, f"task type '{task_type}'")) == 1
    assert f"{prompts / 'late.pre.prompt'} nor {prompts / 'late.post.prompt'}" in warnings_about(caplog, "'late'")[0]
    nofile = [tok.bos_id] + tok.encode(records[3]["input"] + " ")
    assert samples[3][0][:len(nofile)] == nofile
    assert processor.counters["untyped_records"] == 0  # a type without a file is not "untyped"


TYPE_ROW = re.compile(r"^  (\S+) +(\(no type\)|\S+) +(\d+)  (.+)$", re.M)  # set, type, records, prompts


def test_inspect_corpus_lists_every_type_with_records_and_prompts(tmp_path, capsys):
    assert inspect_main(["task_instruct_tuning", "--root", str(CORPUS), "--quiet"]) == 0
    rows = {(set_name, task_type): (int(count), prompts)
            for set_name, task_type, count, prompts in TYPE_ROW.findall(capsys.readouterr().out)}
    assert set(BILLA_TYPES) <= {task_type for _, task_type in rows}  # BiLLa's own type names
    for (set_name, task_type), (count, prompts) in rows.items():
        assert count > 0 and prompts == ("none: no prompt (input + ' ')" if task_type == "(no type)" else "pre, post")
    assert rows[("zh-qa-long", "(no type)")][0] == 5  # records without a "type" field, as BiLLa's
    assert rows[("zh-qa-short", "dureader")][0] == 6 and rows[("zh-qa-short", "cmrc2018")][0] == 7
    # every bundled prompt file serves a type of the bundled records
    assert {p.name.split(".")[0] for p in (CORPUS / "prompts").glob("*.prompt")} <= {t for _, t in rows}
    # a type with one prompt file, one with none
    root = tmp_path / "corpora"
    write_set(root, "zh-qa-long", task_records(3, "half") + task_records(2, "gone"), n_files=1)
    (root / "prompts").mkdir()
    (root / "prompts" / "half.post.prompt").write_text("After:\n", encoding="utf-8")
    assert inspect_main(["task_instruct_tuning", "--root", str(root), "--quiet",
                         "pretrain_data_split={'zh-qa-long': {'weight': 1, 'file_start': 0}}"]) == 0
    rows = {(s, t): (int(c), p) for s, t, c, p in TYPE_ROW.findall(capsys.readouterr().out)}
    assert rows == {("zh-qa-long", "gone"): (2, "NO prompt files: no prompt (input + ' ')"),
                    ("zh-qa-long", "half"): (3, "post only: no prompt when 'pre' is drawn")}
