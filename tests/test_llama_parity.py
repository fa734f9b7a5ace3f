"""Our model against transformers' LlamaForCausalLM: same logits, same loss, lossless conversion both ways."""
import pytest
import torch
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM

from llama import Llama, LlamaConfig
from llama.convert import main as convert_main
from llama.loss import LOSS_PATHS
from llama.weight_layouts import hf_to_llama_state_dict, llama_to_hf_state_dict

VOCAB = 120


def hf_model(n_kv_heads: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = HFConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=n_kv_heads, max_position_embeddings=64,
                      rms_norm_eps=1e-6, rope_theta=10000.0, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def converted(hf: LlamaForCausalLM) -> Llama:
    config = LlamaConfig.from_dict(hf.config.to_diff_dict(), source="test")
    model = Llama(config).eval()
    model.load_state_dict(hf_to_llama_state_dict(hf.state_dict(), config))
    return model


@pytest.fixture(params=[4, 2], ids=["mha", "gqa"])
def pair(request):
    hf = hf_model(request.param)
    return hf, converted(hf)


def test_logits_match_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        _, logits = ours(ids)
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_to_hf_gives_back_the_same_state_dict_bit_for_bit(pair):
    hf, ours = pair
    back = llama_to_hf_state_dict(ours.state_dict(), ours.config)
    original = hf.state_dict()
    assert back.keys() == original.keys()
    for name, t in original.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def test_loss_mask_equals_transformers_labels(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (3, 33), generator=g)
    loss_mask = (torch.rand(3, 33, generator=g) > 0.4).long()
    labels = ids.masked_fill(loss_mask == 0, -100)
    expected = hf(ids, labels=labels).loss
    for path in LOSS_PATHS:
        ours.loss_path = path
        loss, logits = ours(ids, loss_mask=loss_mask)
        assert logits is None
        torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
        loss_from_labels, _ = ours(ids, labels=labels)
        torch.testing.assert_close(loss_from_labels, expected, atol=1e-6, rtol=1e-6)


def test_gradients_match_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    hf(ids, labels=ids).loss.backward()
    ours(ids, loss_mask=torch.ones_like(ids))[0].backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    ours_as_hf = llama_to_hf_state_dict({n: p.grad for n, p in ours.named_parameters()}, ours.config)
    for name, g in hf_grads.items():
        torch.testing.assert_close(ours_as_hf[name], g, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_from_pretrained_reads_a_transformers_dir(tmp_path, safe, tokenizer_path):
    hf = hf_model(2)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=safe, max_shard_size="60KB")  # several shards
    model = Llama.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[1], hf(ids).logits, atol=1e-5, rtol=0)
    assert model.config.max_sequence_length == 64  # from max_position_embeddings


def test_convert_cli_round_trip(tmp_path, tokenizer_path):
    hf = hf_model(2)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    convert_main(["from_hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ours")])
    assert (tmp_path / "ours" / "tokenizer.model").is_file()
    ours = Llama.from_pretrained(tmp_path / "ours")
    convert_main(["to_hf", "--input", str(tmp_path / "ours"), "--output", str(tmp_path / "back")])
    back = LlamaForCausalLM.from_pretrained(tmp_path / "back")
    for name, t in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[1], back(ids).logits, atol=1e-5, rtol=0)
