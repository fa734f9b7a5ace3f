"""A run can be followed from its log file: each training line has the elapsed time, step time, ETA and the data
counters; every metrics.jsonl record has a wall-clock time; the first lines name bos, the end token and the chat
format and show the first sample of each set with its counted part marked; TensorBoard holds the settings."""
import json
import re
import time

import pytest

import alignment_sft_args
from chat_tokenizers import LLAMA3, QWEN25
from training.conversation import answer_text
from training.run_preview import COUNTED, end_token_warning, tokens_line
from training.settings import load_settings
from training_runs import CORPUS, TINY_RUN, explain, tiny_model, torchrun  # noqa: F401 (fixture)

SETS = sorted(alignment_sft_args.pretrain_data_split)
LINE = re.compile(r"step (\d+)/6 \| elapsed (\d+):(\d\d):(\d\d) \| ETA (\d+):(\d\d):(\d\d) \| loss [\d.]+ .*"
                  r"\| step ([\d.]+) s: data .* \| data: skipped ([\d,]+) "
                  r"\(bad [\d,]+, empty [\d,]+, too long [\d,]+\), "
                  r"cut answers ([\d,]+), cut input tokens [\d,]+, dropped turns [\d,]+, passes (.*)$")


@pytest.fixture(scope="module")
def sft_run(tiny_model, tmp_path_factory):  # noqa: F811 (fixture)
    out = tmp_path_factory.mktemp("runlog")
    before = time.time()
    result = torchrun(TINY_RUN + [f"init_model_path={tiny_model}", f"output_dir={out}", "max_steps=6",
                                  "logging_steps=2", "max_seq_length=128", "saving_steps=100"], stage="alignment_sft")
    assert result.returncode == 0, explain(result)
    return out / "logs", before, time.time()


def test_each_log_line_has_elapsed_step_time_eta_and_the_data_counters(sft_run):
    logdir, _, _ = sft_run
    lines = [LINE.search(line) for line in (logdir / "log.txt.0").read_text(encoding="utf-8").splitlines()
             if " training.metrics: step " in line]
    assert [int(m.group(1)) for m in lines if m] == [2, 4, 6], lines
    etas = [int(m.group(5)) * 3600 + int(m.group(6)) * 60 + int(m.group(7)) for m in lines]
    assert etas[-1] == 0 and all(float(m.group(8)) > 0 for m in lines)
    # passes per set of the mix, and the short rows of max_seq_length=128 cut some answers, summed over both ranks
    assert [part.split()[0] for part in lines[-1].group(11).split(", ")] == SETS
    records = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert int(lines[-1].group(10).replace(",", "")) == records[-1]["data"]["cut_answers"] > 0


def test_every_metrics_record_has_a_wall_clock_time_and_an_eta(sft_run):
    logdir, before, after = sft_run
    records = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    times = [r["time"] for r in records]
    assert before <= times[0] <= times[1] <= times[2] <= after
    assert records[0]["eta_s"] > 0 and records[-1]["eta_s"] == 0
    assert records[-1]["elapsed_s"] > records[0]["elapsed_s"] > 0
    data = records[-1]["data"]
    assert set(data["passes"]) == set(SETS) and data["samples"] >= 6 * 2 * 2  # 6 steps x 2 rows x 2 ranks at least


def test_first_lines_name_the_tokens_and_preview_each_set_on_rank_0(sft_run):
    logdir, _, _ = sft_run
    log = (logdir / "log.txt.0").read_text(encoding="utf-8")
    assert "tokens: bos <s> (id 1) | end token </s> (id 2, the tokenizer's eos) ends every answer | chat format " \
           "billa" in log
    previews = re.findall(r"preview: set '([^']+)', (\S+) line (\d+): (\d+) tokens, (\d+) in the loss .*\n"
                          rf"([^\n]*(?:\n(?!\d{{4}}-)[^\n]*)*)", log)
    assert [p[0] for p in previews] == SETS
    for name, file, line, *_, text in previews:
        record = json.loads((CORPUS / name / file).read_text(encoding="utf-8").splitlines()[int(line) - 1])
        counted = text[text.index(COUNTED[0]) + 1:text.rindex(COUNTED[1])]
        assert text.startswith("<s>") and "Human: " in text and text.rstrip().endswith(COUNTED[1])
        if counted.endswith("</s>"):  # the answer fit whole: it is what is counted, with its end token
            assert counted.lstrip() == answer_text(record["output"]) + "</s>"
    assert "preview:" not in (logdir / "log.txt.1").read_text(encoding="utf-8")  # rank 0 only


def test_tensorboard_holds_the_settings_as_hparams(sft_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    logdir, _, _ = sft_run
    events = EventAccumulator(str(logdir))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["max_steps"].number_value == 6 and hparams["chat_format"].string_value == "billa"
    assert "others" in hparams["pretrain_data_split"].string_value
    assert "train/loss" in events.Tags()["scalars"] and "data/cut_answers" in events.Tags()["scalars"]


@pytest.mark.parametrize("family, template, stage_3, expected", [
    # an Instruct base's eos ends its template's turns: documents would end with it
    ("llama3-instruct", LLAMA3, False, "the end token <|eot_id|> is the turn end of the tokenizer's chat template "
                                       "(an Instruct base): every document of this stage will end with it; set "
                                       "eos_token to the base's end of text (eos_token=<|end_of_text|>)"),
    ("llama3-instruct", LLAMA3, True, None),  # stage 3: answers end as the template's turns do
    ("qwen2", QWEN25, False, "the end token <|im_end|> is the turn end"),
    # a base whose eos is its end of text, with a chat template: stage 3 answers would not end as its turns do
    ("llama3", LLAMA3, True, "the tokenizer's chat template ends each turn with <|eot_id|>, but answers will end "
                             "with the end token <|end_of_text|>; set eos_token=<|eot_id|>"),
    ("llama3", LLAMA3, False, None),
])
def test_an_end_token_the_chat_template_disagrees_with_is_warned_naming_both(templated_tokenizers, family, template,
                                                                             stage_3, expected):
    tok, _ = templated_tokenizers(family, template)
    settings = load_settings(alignment_sft_args, []) if stage_3 else _stage_1_settings()
    warning = end_token_warning(tok, settings)
    assert (warning is None) if expected is None else warning.startswith(expected), warning
    assert f"end token {tok.eos_token} (id {tok.eos_id}, the tokenizer's eos)" in tokens_line(tok, settings)
    named = load_settings(alignment_sft_args, [f"eos_token={tok.eos_token}"]) if stage_3 else \
        _stage_1_settings(f"eos_token={tok.eos_token}")
    assert end_token_warning(tok, named) is None  # eos_token set: the user chose


def _stage_1_settings(*argv):
    import pretrain_args

    return load_settings(pretrain_args, list(argv))
