"""Behaviour of the model itself: causality, packing, loss counting, fused loss, checkpointing, KV cache, sampling."""
import pytest
import torch

from llama import Llama, LlamaConfig, generate, stream
from llama.loss import (checkpointed_linear_cross_entropy_sum, linear_cross_entropy_sum,
                        plain_linear_cross_entropy_sum)

VOCAB = 97


def make_model(n_kv_heads=None, dropout=0.0, seed=0) -> Llama:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=n_kv_heads, max_sequence_length=64, dropout_prob=dropout)
    return Llama(config).eval()


def rand_ids(*shape, seed=0):
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_changing_a_later_token_changes_no_earlier_logit(n_kv_heads):
    model = make_model(n_kv_heads)
    ids = rand_ids(1, 20)
    changed = ids.clone()
    changed[0, 12] = (ids[0, 12] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids)[1], model(changed)[1]
    assert torch.equal(a[0, :12], b[0, :12])
    assert not torch.allclose(a[0, 12:], b[0, 12:])


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_packed_row_gives_each_document_its_own_logits(n_kv_heads):
    model = make_model(n_kv_heads)
    doc_a, doc_b = rand_ids(1, 11, seed=1), rand_ids(1, 7, seed=2)
    packed = torch.cat([doc_a, doc_b], dim=1)
    doc_ids = torch.tensor([[0] * 11 + [1] * 7])
    with torch.no_grad():
        _, packed_logits = model(packed, doc_ids=doc_ids)
        _, alone_a = model(doc_a)
        _, alone_b = model(doc_b)
    torch.testing.assert_close(packed_logits[:, :11], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed_logits[:, 11:], alone_b, atol=1e-5, rtol=0)


def test_packed_loss_never_counts_a_target_across_a_boundary():
    model = make_model()
    doc_a, doc_b = rand_ids(1, 9, seed=3), rand_ids(1, 6, seed=4)
    packed = torch.cat([doc_a, doc_b], dim=1)
    doc_ids = torch.tensor([[5] * 9 + [6] * 6])
    with torch.no_grad():
        loss, _ = model(packed, loss_mask=torch.ones_like(packed), doc_ids=doc_ids)
        loss_a, _ = model(doc_a, loss_mask=torch.ones_like(doc_a))
        loss_b, _ = model(doc_b, loss_mask=torch.ones_like(doc_b))
    # 8 targets in doc a, 5 in doc b; doc b's first token is not predicted from doc a's last.
    torch.testing.assert_close(loss, (8 * loss_a + 5 * loss_b) / 13, atol=1e-6, rtol=1e-6)


def test_a_reused_doc_id_after_another_document_is_a_new_document():
    model = make_model()
    docs = [rand_ids(1, n, seed=10 + n) for n in (5, 4, 6)]
    packed = torch.cat(docs, dim=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 4 + [0] * 6])
    with torch.no_grad():
        _, logits = model(packed, doc_ids=doc_ids)
        _, alone = model(docs[2])
    torch.testing.assert_close(logits[:, 9:], alone, atol=1e-5, rtol=0)


def test_loss_counts_only_masked_targets():
    model = make_model()
    ids = rand_ids(2, 16, seed=5)
    mask = torch.zeros_like(ids)
    mask[0, 5] = mask[1, 9] = 1
    with torch.no_grad():
        loss, _ = model(ids, loss_mask=mask)
        _, logits = model(ids)
    logp = torch.log_softmax(logits, dim=-1)
    expected = -(logp[0, 4, ids[0, 5]] + logp[1, 8, ids[1, 9]]) / 2
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)


def test_position_zero_never_counts_and_an_empty_mask_gives_zero_loss_with_grads_everywhere():
    model = make_model().train()
    ids = rand_ids(2, 8, seed=6)
    mask = torch.zeros_like(ids)
    mask[:, 0] = 1  # position 0 has nothing to be predicted from
    loss, _ = model(ids, loss_mask=mask)
    assert loss.item() == 0.0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunked", [linear_cross_entropy_sum, checkpointed_linear_cross_entropy_sum],
                         ids=["fused", "checkpointed"])
def test_chunked_losses_match_the_plain_path_in_value_and_gradients(chunked, dtype, monkeypatch):
    import llama.loss

    monkeypatch.setattr(llama.loss, "CHUNK_BYTES", 4 * 41 * 7)  # 7 rows per chunk: several chunks, a ragged tail
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(30, 16, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(41, 16, generator=g) * 0.3).to(dtype).requires_grad_()
    targets = torch.randint(0, 41, (30,), generator=g)
    results = []
    for fn in (chunked, plain_linear_cross_entropy_sum):
        hidden.grad = weight.grad = None
        loss = fn(hidden, weight, targets)
        (loss * 0.5).backward()
        results.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
        assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for fused, plain in zip(*results):
        torch.testing.assert_close(fused.float(), plain.float(), **tol)


def test_every_loss_path_gives_the_model_the_same_loss_and_gradients_with_masks_and_packing(monkeypatch):
    import llama.loss

    monkeypatch.setattr(llama.loss, "CHUNK_BYTES", 4 * VOCAB * 5)  # 5 rows per chunk
    ids = rand_ids(2, 24, seed=9)
    loss_mask = (torch.rand(2, 24, generator=torch.Generator().manual_seed(9)) > 0.3).long()
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [3] * 5 + [4] * 12 + [3] * 7])  # targets across a boundary drop
    results = {}
    for path in ("plain", "fused", "checkpointed"):
        model = make_model(dropout=0.1).train()
        model.loss_path = path
        torch.manual_seed(5)  # the same dropout masks for every path
        loss, _ = model(ids, loss_mask=loss_mask, doc_ids=doc_ids)
        loss.backward()
        results[path] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    plain_loss, plain_grads = results.pop("plain")
    for path, (loss, grads) in results.items():
        torch.testing.assert_close(loss, plain_loss, atol=1e-6, rtol=1e-6, msg=path)
        for name, g in plain_grads.items():
            torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-5, msg=f"{path}: {name}")
    with pytest.raises(ValueError, match="loss_path 'fast'"):
        model.loss_path = "fast"
        model(ids, loss_mask=loss_mask)


def test_checkpointed_loss_shows_the_weight_to_op_hooks_and_recomputes_each_chunk_in_backward(monkeypatch):
    """What gemini needs: `weight` used by ordinary ops that ColossalAI's op hooks see, in forward and again in
    backward, where gemini gathers its shards (GeminiZeROHook, colossalai/zero/gemini/gemini_hook.py); and each
    chunk's logits recomputed there rather than kept from the forward."""
    import llama.loss
    from colossalai.tensor import ColoParameter
    from colossalai.tensor.param_op_hook import ColoParamOpHook, ColoParamOpHookManager

    class Record(ColoParamOpHook):
        def __init__(self):
            super().__init__()
            self.calls = []

        def pre_forward(self, params):
            self.calls.append("pre_forward")

        def post_forward(self, params):
            pass

        def pre_backward(self, params):
            self.calls.append("pre_backward")

        def post_backward(self, params):
            pass

    monkeypatch.setattr(llama.loss, "CHUNK_BYTES", 4 * 41 * 8)  # 8 rows per chunk: 4 chunks of 30 rows
    hidden = torch.randn(30, 16, requires_grad=True)
    targets = torch.randint(0, 41, (30,))
    calls = {}
    for fn in (checkpointed_linear_cross_entropy_sum, plain_linear_cross_entropy_sum, linear_cross_entropy_sum):
        weight = ColoParameter(torch.randn(41, 16), requires_grad=True)
        hook = Record()
        with ColoParamOpHookManager.use_hooks(hook):
            loss = fn(hidden, weight, targets)
            forward_calls = list(hook.calls)
            loss.backward()
        calls[fn.__name__] = forward_calls, hook.calls[len(forward_calls):]
        assert weight.grad is not None
    # Each chunk: F.linear in forward; in backward its recomputation (a forward op again), then its backward.
    assert calls["checkpointed_linear_cross_entropy_sum"] == (["pre_forward"] * 4, ["pre_forward", "pre_backward"] * 4)
    assert calls["plain_linear_cross_entropy_sum"] == (["pre_forward"], ["pre_backward"])
    # Why gemini cannot take the fused path: its backward shows the hooks nothing, so gemini's gradient hook
    # finds the weight not in HOLD_AFTER_BWD (GeminiDDP.grad_handle) and raises.
    assert calls["linear_cross_entropy_sum"][1] == []


def test_fused_loss_without_grad_does_no_gradient_work():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    with torch.no_grad():
        loss = linear_cross_entropy_sum(hidden, weight, torch.randint(0, 11, (5,)))
    assert loss.grad_fn is None


def test_gradient_checkpointing_gives_the_same_gradients_with_dropout():
    ids = rand_ids(2, 16, seed=8)
    grads = []
    for ckpt in (False, True):
        model = make_model(dropout=0.1).train()
        model.set_gradient_checkpointing(ckpt)
        torch.manual_seed(123)  # same dropout masks in both runs; checkpointing replays the RNG state
        model(ids, loss_mask=torch.ones_like(ids))[0].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_dropout_is_active_in_training_only():
    model = make_model(dropout=0.5)
    ids = rand_ids(1, 10, seed=9)
    with torch.no_grad():
        assert torch.equal(model(ids)[1], model(ids)[1])
        model.train()
        assert not torch.equal(model(ids)[1], model(ids)[1])


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_greedy_generation_with_cache_equals_without(n_kv_heads):
    model = make_model(n_kv_heads, seed=1)
    prompt = rand_ids(1, 6, seed=10)[0].tolist()
    with_cache = generate(model, prompt, max_new_tokens=20, use_cache=True)
    without = generate(model, prompt, max_new_tokens=20, use_cache=False)
    assert len(with_cache) == 20 and with_cache == without


def test_cache_prefill_in_chunks_matches_the_full_forward():
    model = make_model(2)
    ids = rand_ids(1, 15, seed=11)
    cache = model.new_cache(1, 15)
    model.forward_with_cache(ids[:, :6], cache, 0)
    last = model.forward_with_cache(ids[:, 6:], cache, 6)  # several new tokens after a filled cache
    with torch.no_grad():
        _, full = model(ids)
    torch.testing.assert_close(last, full[:, -1], atol=1e-5, rtol=0)


def test_generation_stops_at_eos_and_at_max_sequence_length():
    model = make_model(seed=2)
    prompt = [1, 5, 9]
    free = generate(model, prompt, max_new_tokens=10)
    eos = free[4]
    stopped = generate(model, prompt, max_new_tokens=10, eos_id=eos)
    assert stopped == free[:free.index(eos)] and eos not in stopped
    long_run = list(stream(model, prompt, max_new_tokens=1000))
    assert len(prompt) + len(long_run) == model.config.max_sequence_length
    assert not model.training  # put back as it was


def test_sampling_is_reproducible_with_a_generator_and_tiny_top_p_is_greedy():
    model = make_model(seed=3).train()
    prompt = [1, 7]
    a = generate(model, prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(0))
    b = generate(model, prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert a == b
    assert generate(model, prompt, 12, temperature=1.0, top_p=1e-9) == generate(model, prompt, 12)
    assert model.training


def test_bad_inputs_are_rejected_clearly():
    model = make_model()
    ids = rand_ids(1, 8)
    with pytest.raises(ValueError, match="loss_mask shape"):
        model(ids, loss_mask=torch.ones(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="max_sequence_length"):
        model(rand_ids(1, 65))
    with pytest.raises(ValueError, match="not both"):
        model(ids, loss_mask=torch.ones_like(ids), labels=ids)
    with pytest.raises(ValueError, match="no room"):
        generate(model, list(range(64)), 5)
