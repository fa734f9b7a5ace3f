"""The model's attention kernels (llama/attention.py), checkpointing modes and regional compilation, on CPU in fp32:
flex_attention's block mask gives the dense-mask path's outputs and gradients; GQA makes no copy of keys/values
where the kernel groups heads; selective checkpointing recomputes every other block; compiled blocks equal eager."""
import pytest
import torch

import llama.attention as attention
from llama import Llama, LlamaConfig

VOCAB = 97
L = 48

CONFIGS = {
    "mha": dict(num_key_value_heads=None),
    "gqa": dict(num_key_value_heads=2),
    "qk_norm_gqa": dict(num_key_value_heads=2, qk_norm=True, architecture="Qwen3ForCausalLM", head_dim=32),
    "sliding_window": dict(architecture="MistralForCausalLM", sliding_window=L),  # a window that cuts nothing
}


def make_model(seed=0, **kw) -> Llama:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_sequence_length=64, **kw)
    return Llama(config)


def packed_doc_ids() -> torch.Tensor:
    """Rows with documents of every length: a 1-token document first and last, the whole row one document, many
    short ones (1, 2, 3, ... tokens), and an id reused after another document (a new document)."""
    one_first = [0] + [1] * (L - 2) + [2]
    whole = [7] * L
    short, doc = [], 0
    while len(short) < L:
        short += [doc] * min(doc % 5 + 1, L - len(short))
        doc += 1
    reused = [3] * 10 + [4] * 20 + [3] * 18
    return torch.tensor([one_first, whole, short, reused])


def loss_and_grads(model: Llama, ids: torch.Tensor, doc_ids: torch.Tensor | None):
    model.zero_grad(set_to_none=True)
    loss, _ = model(ids, loss_mask=torch.ones_like(ids), doc_ids=doc_ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_flex_block_mask_equals_the_dense_mask_in_outputs_and_gradients(name):
    model = make_model(**CONFIGS[name]).train()
    doc_ids = packed_doc_ids()
    ids = torch.randint(3, VOCAB, doc_ids.shape, generator=torch.Generator().manual_seed(1))
    results = {}
    for kernel in ("dense", "flex"):
        model.attention = kernel
        with torch.no_grad():
            _, logits = model(ids, doc_ids=doc_ids)
        results[kernel] = (logits, *loss_and_grads(model, ids, doc_ids))
    (dense_logits, dense_loss, dense_grads), (flex_logits, flex_loss, flex_grads) = results["dense"], results["flex"]
    torch.testing.assert_close(flex_logits, dense_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(flex_loss, dense_loss, atol=1e-5, rtol=0)
    for n in dense_grads:
        torch.testing.assert_close(flex_grads[n], dense_grads[n], atol=1e-5, rtol=0, msg=n)
    # the documents really are kept apart: a row of one document differs from the same tokens packed
    with torch.no_grad():
        _, one_doc = model(ids, doc_ids=torch.zeros_like(doc_ids))
    assert not torch.allclose(one_doc[2], flex_logits[2], atol=1e-3)


def test_auto_is_the_dense_mask_on_cpu_and_an_unknown_kernel_is_refused():
    runs = torch.tensor([[0, 0, 1, 1]])
    assert attention.packed_mask(runs, "auto").kind == "dense"
    assert attention.packed_mask(runs, "flex").kind == "flex"
    with pytest.raises(ValueError, match="attention kernel 'fast'"):
        attention.packed_mask(runs, "fast")


@pytest.mark.parametrize("kernel", ["flex", "causal"])
def test_grouped_query_attention_makes_no_copy_of_keys_and_values(kernel, monkeypatch):
    """Unpacked rows (SDPA's enable_gqa) and flex group the heads themselves; only the dense mask repeats them."""
    model = make_model(num_key_value_heads=2).train()
    model.attention = "flex"
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    doc_ids = torch.tensor([[0] * 5 + [1] * 11, [2] * 16]) if kernel == "flex" else None
    model.attention = "dense"
    expected = loss_and_grads(model, ids, doc_ids) if doc_ids is not None else None
    model.attention = "flex"

    def no_copy(*args):
        raise AssertionError("repeat_kv called: keys and values were copied")

    monkeypatch.setattr(attention, "repeat_kv", no_copy)
    loss, grads = loss_and_grads(model, ids, doc_ids)
    if expected is None:  # unpacked: against an explicit repeat of the key/value heads
        monkeypatch.undo()
        model.attention = "dense"
        expected = loss_and_grads(model, ids, torch.zeros_like(ids))  # one document per row: plain causal
    torch.testing.assert_close(loss, expected[0], atol=1e-5, rtol=0)
    for n in grads:
        torch.testing.assert_close(grads[n], expected[1][n], atol=1e-5, rtol=0, msg=n)


@pytest.mark.parametrize("mode, recomputed", [("none", []), ("selective", [0, 2]), ("full", [0, 1, 2, 3]),
                                               (True, [0, 1, 2, 3]), (False, [])])
def test_checkpointing_modes_recompute_their_blocks_and_keep_the_gradients(mode, recomputed):
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                              max_sequence_length=64)).train()
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    model.set_gradient_checkpointing("none")
    _, reference = loss_and_grads(model, ids, None)
    calls = []
    for i, layer in enumerate(model.layers):
        layer.register_forward_pre_hook(lambda module, args, i=i: calls.append(i))
    model.set_gradient_checkpointing(mode)
    _, grads = loss_and_grads(model, ids, None)
    assert model.checkpointed_layers() == recomputed
    assert sorted(calls) == sorted([0, 1, 2, 3] + recomputed)  # each block once, the recomputed ones again
    for n in grads:
        torch.testing.assert_close(grads[n], reference[n], atol=1e-6, rtol=0, msg=n)


def test_an_unknown_checkpointing_mode_is_refused():
    with pytest.raises(ValueError, match="gradient_checkpointing 'half'"):
        make_model().set_gradient_checkpointing("half")


def test_compiled_blocks_equal_eager_in_outputs_and_gradients():
    """Inductor on CPU (a C compiler builds its kernels), fp32, packed rows through the dense mask and unpacked rows;
    the state dict keeps its names."""
    eager = make_model(num_key_value_heads=2).train()
    compiled = make_model(num_key_value_heads=2).train()
    compiled.compile_blocks()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    ids = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(4))
    doc_ids = torch.tensor([[0] * 9 + [1] * 23, [5] * 32])
    for docs in (None, doc_ids):
        loss_e, grads_e = loss_and_grads(eager, ids, docs)
        loss_c, grads_c = loss_and_grads(compiled, ids, docs)
        torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=0)
        for n in grads_e:
            torch.testing.assert_close(grads_c[n], grads_e[n], atol=1e-5, rtol=1e-4, msg=n)
