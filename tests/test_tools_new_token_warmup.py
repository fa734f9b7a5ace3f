"""tools.new_token_warmup: only the new rows move; every old row and every other weight stays bit-identical."""
import copy

import torch

from conftest import TOKENIZER_TEXT
from llama import Llama, load_tokenizer
from llama.tiny import make_tiny_model
from tools.new_token_warmup import chunks_of, warm_up


def test_the_freeze_is_exact_and_the_new_rows_move(tmp_path, tokenizer_path):
    """The same tokenizer stands in as old and new, its last 8 ids taken as the new ones; the tiny model is untied:
    the old rows of both matrices and every layer are bit-identical after the warm-up, the new output rows are not
    (they take part in every softmax of the LM loss)."""
    base = make_tiny_model(tmp_path / "tiny", tokenizer_path, dim=32, max_seq_len=128, seed=5)
    model = Llama.from_pretrained(base)
    tok = load_tokenizer(base)
    first_id = tok.vocab_size - 8  # pretend the last 8 rows are new
    before = copy.deepcopy(model.state_dict())
    texts = list(dict.fromkeys(TOKENIZER_TEXT))
    records = warm_up(model, tok, tok, texts, first_id, steps=3, lr=1e-2, batch_size=4, chunk_chars=40,
                      log=lambda line: None)
    assert len(records) == 3 and not model.config.tie_word_embeddings
    assert not torch.equal(model.state_dict()["output.weight"][first_id:], before["output.weight"][first_id:])
    after = model.state_dict()
    for name, tensor in before.items():
        if name in ("tok_embeddings.weight", "output.weight"):
            assert torch.equal(after[name][:first_id], tensor[:first_id])
        else:
            assert torch.equal(after[name], tensor), name


def test_aligned_points_end_at_the_same_byte(tokenizer_path, bpe_tokenizer_dirs):
    """Old (byte-level BPE) and new (SentencePiece without its dummy-prefix space) tokenizations of one chunk: at
    every aligned point both have spelt the same bytes, and points are where both tokenizations have a token end."""

    old, new = load_tokenizer(bpe_tokenizer_dirs["smollm2"]), load_tokenizer(bpe_tokenizer_dirs["llama3"])
    old_table, new_table = old.token_bytes(), new.token_bytes()
    chunks = chunks_of(["北京是中国的首都，有着悠久的历史。 The quick brown fox."], old, new, 64)
    assert len(chunks) == 1
    chunk = chunks[0]
    old_ends = {len(b"".join(old_table[t] for t in chunk.old[:i + 1])): i for i in range(len(chunk.old))}
    new_ends = {len(b"".join(new_table[t] for t in chunk.new[:j + 1])): j for j in range(len(chunk.new))}
    common = sorted(set(old_ends) & set(new_ends))
    assert len(common) > 5
    assert (chunk.old_pos, chunk.new_pos) == ([old_ends[e] for e in common], [new_ends[e] for e in common])
