"""packing=True: rows of max_seq_length holding several samples as separate documents, checked through the model."""
import random
from collections import Counter

import pytest
import torch

import alignment_sft_main
import pretrain_main
from data_corpus_helpers import settings, sft_records, stage1_corpus, stream, write_set
from llama.configuration_llama import LlamaConfig
from llama.llama_model import Llama
from llama.tokenization_llama import SentencePieceTokenizer
from training.samples import SampleBuilder

LENGTH = 96


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return SentencePieceTokenizer(tokenizer_path)


def documents(batch):
    """[(row, start, end)] of every document run of a packed batch, padding runs left out."""
    docs = []
    for row, (ids, doc_ids) in enumerate(zip(batch["input_ids"], batch["doc_ids"])):
        real = int((ids != 0).sum())  # the test corpora hold no unk, so pad (0) marks the tail
        start = 0
        for end in range(1, LENGTH + 1):
            if end == LENGTH or doc_ids[end] != doc_ids[start]:
                if start < real:
                    docs.append((row, start, end))
                start = end
    return docs


def test_packed_batch_format_and_the_stages_samples(tmp_path, tok):
    records = [dict(r, output=r["output"] + " more" * (i % 7)) for i, r in enumerate(sft_records(300))]
    write_set(tmp_path, "others", records, n_files=2)
    with stream(alignment_sft_main, settings(tmp_path, {"others": 1}, max_seq_length=LENGTH, packing=True,
                                             batch_size=4), tok, 0, 1) as dp:
        packed = [next(dp) for _ in range(5)]
        state = dp.state_dict()
    stage = alignment_sft_main.AlignmentSftRecords(tmp_path, ["others"])  # the stage's samples, unpacked
    specs = [stage.build("others", record, random.Random(0)) for record in records]
    singles = [tuple(sample.ids) for [sample] in SampleBuilder(tok, LENGTH, "split", "middle").build(
        specs, random.Random(0), Counter())]
    seen = []
    real = 0
    for batch in packed:
        assert set(batch) == {"input_ids", "loss_mask", "doc_ids", "num_tokens", "num_target_tokens"}
        assert batch["input_ids"].shape == batch["doc_ids"].shape == (4, LENGTH)
        assert batch["num_target_tokens"] == int(batch["loss_mask"].sum())
        docs = documents(batch)
        for row, start, end in docs:
            ids = tuple(batch["input_ids"][row, start:end].tolist())
            assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
            assert batch["loss_mask"][row, start] == 0  # a document's first token is never a target
            seen.append(singles.index(ids))
        real += sum(end - start for _, start, end in docs)
        padding = batch["input_ids"] == tok.pad_id
        assert (batch["loss_mask"][padding] == 0).all()
        assert batch["num_tokens"] == int((~padding).sum())
    assert len(set(seen)) == len(seen)  # each sample once (one pass holds 300): none repeated
    assert len(seen) + len(state["packing_pool"]) == state["counters"]["samples"]  # none lost
    assert real / (5 * 4 * LENGTH) > 0.95


def test_packed_documents_are_independent_through_the_model(tmp_path, tok):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_sequence_length=LENGTH)
    model = Llama(config).eval()
    split = stage1_corpus(tmp_path)
    dp = stream(pretrain_main, settings(tmp_path, split, max_seq_length=LENGTH, batch_size=2, packing=True),
                tok, 0, 1)
    with dp, torch.no_grad():
        batch = next(dp)
        docs = documents(batch)
        assert len(docs) > len(batch["input_ids"])  # some row holds several documents
        _, logits = model(batch["input_ids"], doc_ids=batch["doc_ids"])  # (bs, L, vocab)
        loss, _ = model(batch["input_ids"], loss_mask=batch["loss_mask"], doc_ids=batch["doc_ids"])
        loss_sum, counted = 0.0, 0
        for row, start, end in docs:
            ids = batch["input_ids"][row:row + 1, start:end]
            mask = batch["loss_mask"][row:row + 1, start:end]
            _, alone = model(ids)
            torch.testing.assert_close(logits[row, start:end], alone[0], atol=1e-5, rtol=1e-5)
            doc_loss, _ = model(ids, loss_mask=mask)
            loss_sum += doc_loss.item() * int(mask[0, 1:].sum())
            counted += int(mask[0, 1:].sum())
        assert counted == batch["num_target_tokens"]
        assert loss.item() == pytest.approx(loss_sum / counted, rel=1e-5)
