"""Held-out evaluation (training/evaluation.py): the per-set loss and bits per byte / character against a direct
computation on the same samples,
ranks' shares, bad eval folders, and the metrics it writes. The three stages evaluating under torchrun with
2 processes are in test_training_stages.py; resume with evaluation on in test_training_resume.py."""
import contextlib
import json
import logging
import math
import random
import shutil
import subprocess
import sys
import time
import types

import pytest
import torch

import pretrain_args
import pretrain_main
from training.corpus import DataError
from llama.text_units import TextUnits
from training.evaluation import HeldOut, Score, Scores, held_out_samples, load_held_out
from training.metrics import Metrics, setup_logging
from training.samples import Sample
from settings_for import settings_for
from training.settings import load_settings
from data_corpus_helpers import stream
from training_runs import (HELDOUT, REPO, TINY_RUN, explain, on_cpu, one_each, one_process_group,  # noqa: F401
                           tiny_model)


def stage1_data(tokenizer_path, eval_root, *overrides):
    from llama.tokenization_llama import SentencePieceTokenizer

    settings = load_settings(pretrain_args, one_each(TINY_RUN + ["batch_size=4", f"eval_data_root_dir={eval_root}",
                                                                 "eval_samples_per_set=6", *overrides]))
    return settings, stream(pretrain_main, settings, SentencePieceTokenizer(tokenizer_path), 0, 1)


def test_per_set_loss_is_the_token_weighted_mean_over_the_held_out_samples(tokenizer_path, tmp_path,
                                                                           one_process_group):
    """Stage 1 on zh, translate and a set outside the mix: each set's loss equals the summed token loss of its
    samples, computed here one sample at a time from the logits, over their counted tokens; mix weights 4:2."""
    from llama.configuration_llama import LlamaConfig
    from llama.llama_model import Llama
    from llama.tokenization_llama import SentencePieceTokenizer

    root = tmp_path / "heldout"
    for name in ("zh", "translate"):
        shutil.copytree(HELDOUT / name, root / name)
    (root / "news-zh").mkdir()
    (root / "news-zh" / "10001.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in (
        "今天的天气非常好，我们去公园散步。", "", "北京是中国的首都，有着悠久的历史。")) + "\n", encoding="utf-8")
    # 128 tokens: a translation source is never cut, and at 64 some held-out pairs would not fit at all.
    settings, data = stage1_data(tokenizer_path, root, "eval_sets=['zh', 'translate', 'news-zh']", "seed=7",
                                 "max_seq_length=128")
    held_out = load_held_out(settings, data, rank=0, world_size=1)

    vocab_size = SentencePieceTokenizer(tokenizer_path).vocab_size
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_sequence_length=128, dropout_prob=0.5)
    torch.manual_seed(0)
    model = Llama(config).train()  # as the loop leaves it: evaluation must turn dropout off and back on
    engine = types.SimpleNamespace(model=model, choice=types.SimpleNamespace(device=torch.device("cpu")),
                                   autocast=contextlib.nullcontext, inference_ready=lambda: True)
    torch_rng, python_rng = torch.get_rng_state(), random.getstate()
    scores = held_out.evaluate(engine)
    assert model.training
    assert torch.equal(torch.get_rng_state(), torch_rng) and random.getstate() == python_rng

    model.eval()
    table = data.tokenizer.token_bytes()
    rules = pretrain_main.PretrainRecords(data.root, ["zh", "translate", "news-zh"])
    for name in ("zh", "translate", "news-zh"):
        files = sorted((root / name).glob("*.jsonl"))
        samples = held_out_samples(rules, data.builder, files, name, 6, False)
        assert len(samples) == (2 if name == "news-zh" else 6)  # the empty text is skipped; no wrap-around
        total, counted, spelt = 0.0, 0, b""
        with torch.no_grad():
            for sample in samples:
                _, logits = model(torch.tensor([sample.ids]))  # (1, L, vocab)
                log_probs = logits[0, :-1].log_softmax(-1)  # row t-1 predicts token t
                targets = torch.tensor(sample.ids[1:])
                token_loss = -log_probs[torch.arange(len(targets)), targets]
                total += float(token_loss[sample.n_masked - 1:].sum())  # tokens t >= n_masked count
                counted += len(sample.ids) - sample.n_masked
                spelt += b"".join(table[i] for i in sample.ids[sample.n_masked:])
        assert scores.sets[name].tokens == counted
        score = scores.sets[name]
        # a masked prefix may end inside a character: its continuation bytes count as bytes, not as a character
        starts = sum(1 for byte in spelt if byte & 0xC0 != 0x80)
        assert (score.bytes, score.chars) == (len(spelt), starts) and score.chars > 0
        assert score.bits_per_byte * score.bytes * math.log(2) == pytest.approx(total, rel=1e-5)
        assert score.bits_per_char * score.chars * math.log(2) == pytest.approx(total, rel=1e-5)
        assert scores.sets[name].loss == pytest.approx(total / counted, rel=1e-5)
        assert scores.sets[name].ppl == pytest.approx(math.exp(total / counted), rel=1e-5)
    assert scores.weights == {"zh": 4, "translate": 2}  # news-zh is scored but not in the mix
    assert scores.mix.loss == pytest.approx((4 * scores.sets["zh"].loss + 2 * scores.sets["translate"].loss) / 6)
    assert scores.mix.tokens == scores.sets["zh"].tokens + scores.sets["translate"].tokens
    assert scores.mix.bits_per_char == pytest.approx(
        (4 * scores.sets["zh"].bits_per_char + 2 * scores.sets["translate"].bits_per_char) / 6)

    # The samples do not depend on the training seed: another seed builds the same ones.
    other_settings, other_data = stage1_data(tokenizer_path, root, "eval_sets=['zh', 'translate']", "seed=8",
                                             "max_seq_length=128")
    other = load_held_out(other_settings, other_data, rank=0, world_size=1)
    for name in ("zh", "translate"):
        assert [b["input_ids"].tolist() for b in other.batches[name]] == \
               [b["input_ids"].tolist() for b in held_out.batches[name]]
        assert [b["loss_mask"].tolist() for b in other.batches[name]] == \
               [b["loss_mask"].tolist() for b in held_out.batches[name]]


def test_ranks_score_every_sample_once_in_the_same_number_of_forwards():
    samples = [Sample(list(range(1, 4 + k % 5)), 1 + k % 2) for k in range(11)]  # each with a counted token
    units = TextUnits(torch.arange(10).numpy(), (torch.arange(10) % 2).numpy())  # id i spells i bytes
    shares = [HeldOut({"s": samples}, {}, 1, 2, 0, rank, 3, units).batches["s"] for rank in range(3)]
    assert len({len(batches) for batches in shares}) == 1  # 11 samples, 3 ranks, batch 2: 2 forwards each
    rows = [(tuple(row[row != 0].tolist()), int(mask.sum())) for batches in shares for b in batches
            for row, mask in zip(b["input_ids"], b["loss_mask"]) if mask.sum() > 0]
    assert sorted(rows) == sorted((tuple(s.ids), len(s.ids) - s.n_masked) for s in samples)
    assert sum(b["num_counted"] for batches in shares for b in batches) == \
           sum(len(s.ids) - s.n_masked for s in samples)
    assert sum(b["num_bytes"] for batches in shares for b in batches) == sum(sum(s.ids[s.n_masked:]) for s in samples)
    assert sum(b["num_chars"] for batches in shares for b in batches) == \
           sum(sum(i % 2 for i in s.ids[s.n_masked:]) for s in samples)


@pytest.mark.parametrize("case, message", [
    ("no root", "setting 'eval_data_root_dir': folder .*/nowhere does not exist"),
    ("no folder", "held-out set 'en': folder .*/heldout/en does not exist \\(eval_sets names it\\)"),
    ("only empty texts", "held-out set 'zh': no usable record in .*/heldout/zh .*2 empty"),
    ("bad record", "held-out set 'zh', file .*/heldout/zh/10001.jsonl, line 2: missing field 'text'"),
])
def test_a_bad_eval_folder_stops_at_start_up_naming_the_set_and_path(tokenizer_path, tmp_path, case, message):
    root = tmp_path / "heldout"
    (root / "zh").mkdir(parents=True)
    lines = {"only empty texts": ['{"text": "  "}', '{"text": ""}'],
             "bad record": ['{"text": "好"}', '{"txt": "坏"}']}.get(case, ['{"text": "好"}'])
    (root / "zh" / "10001.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    sets = "eval_sets=['zh', 'en']" if case == "no folder" else "eval_sets=['zh']"
    settings, data = stage1_data(tokenizer_path, tmp_path / "nowhere" if case == "no root" else root, sets)
    with pytest.raises(DataError, match=message):
        load_held_out(settings, data, rank=0, world_size=1)


def test_the_run_stops_before_the_model_on_a_missing_eval_set(tiny_model, tmp_path):
    result = subprocess.run([sys.executable, "pretrain_main.py", *on_cpu([*TINY_RUN, f"init_model_path={tiny_model}",
                             "max_steps=4", f"output_dir={tmp_path}", f"eval_data_root_dir={HELDOUT}",
                             "eval_sets=['zh', 'zh-typo']"])], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, explain(result)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert errors == [f"error: DataError: held-out set 'zh-typo': folder {HELDOUT}/zh-typo does not exist "
                      f"(eval_sets names it)"], explain(result)
    assert "Traceback" not in result.stdout + result.stderr
    assert "engine:" not in result.stdout  # stopped before the model and the engine were built


def test_paused_time_leaves_the_throughput_window_and_eval_records_stand_apart(tmp_path, capsys):
    settings = settings_for(pretrain_args, {"logging_steps": 1, "max_steps": 10, "warmup_steps": 0,
                                            "logdir": str(tmp_path)})
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging(tmp_path, 0)
    try:
        metrics = Metrics(settings, 0, 1, flops_per_token=1.0, peak_tflops=None, start_step=0)
        metrics.record(2.0, False, 1.0, None, 1e-3, global_tokens=1000)
        time.sleep(0.2)
        counted = metrics.log(1, tokens_seen=1000)["tokens_per_s"]
        metrics.record(1.5, False, 1.0, None, 1e-3, global_tokens=1000)
        with metrics.paused():
            time.sleep(0.2)
        paused = metrics.log(2, tokens_seen=2000)["tokens_per_s"]
        assert counted < 1000 / 0.2 and paused > 4 * counted
        zh, news = Score(3.0, 120, 1.25, 2.5, 415, 208), Score(4.0, 80, 1.5, 6.0, 320, 80)
        metrics.log_eval(2, 2000, Scores({"zh": zh, "news": news}, zh, {"zh": 4}, seconds=0.5))
        metrics.close()
    finally:
        root.handlers[:], root.level = saved
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["tokens_seen"], "loss" in r, "eval" in r) for r in records] == \
           [(1, 1000, True, False), (2, 2000, True, False), (2, 2000, False, True)]
    zh_row = {"loss": 3.0, "ppl": math.exp(3.0), "tokens": 120, "bits_per_byte": 1.25, "bits_per_char": 2.5,
              "bytes": 415, "chars": 208}
    assert records[2]["eval"] == {"sets": {"zh": zh_row,
                                           "news": {"loss": 4.0, "ppl": math.exp(4.0), "tokens": 80,
                                                    "bits_per_byte": 1.5, "bits_per_char": 6.0, "bytes": 320,
                                                    "chars": 80}},
                                  "mix": {**zh_row, "weights": {"zh": 4}}, "seconds": 0.5}
    console, log_file = capsys.readouterr().out, (tmp_path / "log.txt.0").read_text()
    assert ("eval step 2 | zh 3.0000 (2.500 bits/char) | news 4.0000 (6.000 bits/char) | mix 3.0000 (ppl 20.09) "
            "| 0.5 s") in console
    detail = ("zh loss 3.0000 ppl 20.09 tokens 120 bits/byte 1.2500 bits/char 2.5000; news loss 4.0000 ppl 54.6 "
              "tokens 80 bits/byte 1.5000 bits/char 6.0000 (not in the mix)")
    assert detail in log_file and detail not in console
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert {"eval/zh/loss", "eval/zh/ppl", "eval/zh/tokens", "eval/news/loss", "eval/mix-weighted/loss",
            "train/loss"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("eval/news/loss")] == [(2, 4.0)]
