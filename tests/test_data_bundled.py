"""The bundled pretraining_corpora/ passes every stage's start-up checks and yields batches, on 1 and 8 ranks."""
import importlib
from pathlib import Path

import pytest

from llama.tokenization_llama import Tokenizer
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
    tok = Tokenizer(tokenizer_path)
    for rank, world in ((0, 1), (7, 8)):  # 8 ranks > 2 files per set: sharded by line
        with main.DataProcessor(settings, tok, rank, world) as dp:
            for _ in range(3):
                batch = next(dp)
                assert batch["num_target_tokens"] > 0
            counters = dp.counters
            assert counters["bad_records"] == 0 and counters["too_long"] == 0
