"""The bundled pretraining_corpora/ passes every stage's start-up checks and yields batches, on 1 and 8 ranks."""
import importlib
from pathlib import Path

import pytest

from llama.tokenization_llama import SentencePieceTokenizer
from data_corpus_helpers import stream
from training.settings import load_settings

CORPUS = Path(__file__).resolve().parents[1] / "pretraining_corpora"
STAGES = ["pretrain", "task_instruct_tuning", "alignment_sft"]


@pytest.mark.skipif(not CORPUS.is_dir(), reason="pretraining_corpora/ not bundled yet")
@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("stage", STAGES)
def test_bundled_corpus_validates_and_streams(stage, packing, tokenizer_path):
    args = importlib.import_module(f"{stage}_args")
    main = importlib.import_module(f"{stage}_main")
    settings = load_settings(args, [f"pretrain_data_root_dir={CORPUS}", f"packing={packing}", "batch_size=4",
                                    "max_seq_length=256"])
    tok = SentencePieceTokenizer(tokenizer_path)
    for rank, world in ((0, 1), (7, 8)):  # 8 ranks > 2 files per set: sharded by line
        with stream(main, settings, tok, rank, world) as dp:
            for _ in range(3):
                batch = next(dp)
                assert batch["num_target_tokens"] > 0
            counters = dp.counters
            assert counters["bad_records"] == 0 and counters["too_long"] == 0


# The recipe's stage 2 starts zh, en and translate where stage 1 stopped reading, so it trains on text stage 1 never
# saw; the bundled corpus is numbered so that each stage's args file reads only its own files.
OWN_FILES = {
    "pretrain": {"zh": [10001, 10002], "en": [10001, 10002], "translate": [10001, 10002]},
    "task_instruct_tuning": {"zh": [10017, 10018], "en": [10041, 10042], "translate": [10009, 10010],
                             "zh-qa-long": [10001, 10002], "en-wikihow": [10001, 10002]},
}


@pytest.mark.parametrize("stage", list(OWN_FILES))
def test_each_stage_reads_its_own_files_of_the_bundled_corpus(stage, tokenizer_path):
    args = importlib.import_module(f"{stage}_args")
    main = importlib.import_module(f"{stage}_main")
    settings = load_settings(args, [f"pretrain_data_root_dir={CORPUS}"])
    with stream(main, settings, SentencePieceTokenizer(tokenizer_path), 0, 1) as dp:
        files = {name: [int(path.stem) for path in reader.files] for name, reader in dp.readers.items()}
    for name, numbers in OWN_FILES[stage].items():
        assert files[name] == numbers, name
    if stage == "pretrain":  # every file of the folders, split between the two stages without overlap
        for name, numbers in OWN_FILES["task_instruct_tuning"].items():
            if name in files:
                everything = sorted(int(path.stem) for path in (CORPUS / name).glob("*.jsonl"))
                assert sorted(files[name] + numbers) == everything, name
