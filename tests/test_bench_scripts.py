"""Every script in bench/ runs at a tiny size, as a user runs it (`python bench/X.py ...`), and prints one JSON line
whose fields hold figures that make sense: a bench that crashes, or measures nothing, fails here."""
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from data_corpus_helpers import stage1_corpus

BENCH = REPO / "bench"
TINY_MODEL = ["--dim", "32", "--layers", "1", "--heads", "2", "--vocab", "64", "--seq", "16", "--bs", "1",
              "--device", "cpu", "--mem-repeats", "1", "--rounds", "1"]
# Scripts that print no figures, each tested where its output is checked.
NOT_MEASURING = {"long_input_corpus.py": "writes a corpus (tests/test_data_bench.py)",
                 "gpu_throughput.py": "GPU only, with its own test"}


def run_bench(script: str, argv: list) -> dict:
    result = subprocess.run([sys.executable, str(BENCH / script), *map(str, argv)], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{script}: {result.stderr[-3000:]}"
    lines = result.stdout.strip().splitlines()
    assert lines, f"{script} printed nothing"
    return json.loads(lines[-1])


def check_model_step(out: dict) -> None:
    assert out["ours_tok_s"] > 0 and out["hf_tok_s"] > 0
    assert out["ratio"] == pytest.approx(out["ours_tok_s"] / out["hf_tok_s"], rel=0.01)
    assert out["ours_peak_mb"] >= 0 and out["hf_peak_mb"] >= 0
    assert (out["dim"], out["layers"], out["vocab"], out["seq"], out["device"]) == (32, 1, 64, 16, "cpu")


def check_loss_memory(out: dict) -> None:
    # Every loss path computes one loss; a freshly initialised model is near the uniform guess, ln(vocab).
    losses = [out[f"{path}_loss"] for path in ("fused", "checkpointed", "plain")]
    assert max(losses) - min(losses) < 1e-4
    assert abs(losses[0] - math.log(64)) < 0.3
    assert all(out[f"{path}_s_per_step"] > 0 for path in ("fused", "checkpointed", "plain"))


def check_data_throughput(out: dict) -> None:
    # Packing fills rows: 4 batches of this corpus give 0.86 of real tokens, one sample per row 0.70.
    assert out["real_fraction"] >= 0.8
    assert out["real_tokens_per_s"] > 0 and out["sp_tokens_per_s"] > 0 and out["discarded_tokens"] == 0
    assert out["padded_tokens_per_s"] >= out["real_tokens_per_s"]


def check_expand_vocab_bpe(out: dict) -> None:
    (run,) = out["runs"]
    assert 0 < run["added"] <= 20 and run["en_ids_identical"] is True
    before, after = run["tokens_per_char_zh"]
    assert after < before and run["zh_reduction"] > 0  # new Chinese merges shorten the Chinese text


def check_checkpoint_save(out: dict) -> None:
    # Weights (4 bytes a parameter) and Adam's two moments (8 more) are all in the checkpoint.
    assert out["checkpoint_bytes"] > 12 * out["params"] > 0
    assert len(out["save_s"]) == 2 and out["best_s"] == min(out["save_s"]) > 0


def check_gguf_convert(out: dict) -> None:
    assert out["gguf"] == "tiny.gguf" and out["gguf_to_hf_s"] > 0
    assert out["dequant_s"]["F32"][0] > 0  # tensors dequantized, counted by type
    assert all(0 < v < 4 for v in out["tokens_per_char"].values())


def check_widening(out: dict) -> None:
    for model in ("base", "widened"):
        assert all(0 < out[model][lang]["bits_per_char"] < 64 for lang in ("zh", "en"))
        assert 0.0 <= out["answer_zh"][model]["cjk_share"] <= 1.0
    # English ids are unchanged by the widening, so English tokens per character are too; Chinese takes fewer
    assert out["widened"]["en"]["tokens_per_char"] == out["base"]["en"]["tokens_per_char"]
    assert out["widened"]["zh"]["tokens_per_char"] < out["base"]["zh"]["tokens_per_char"]
    # the split by target (and by input) covers every position once
    split = out["zh_split"]
    for side in ("target", "input"):
        assert split[f"{side}_new"] + split[f"{side}_old"] == pytest.approx(out["widened"]["zh"]["bits_per_char"])
    assert split["target_new"] > 0 and split["input_new"] > 0
    assert out["widened_old_tokens"]["zh"]["tokens_per_char"] == out["base"]["zh"]["tokens_per_char"]


def check_widening_recovery(out: dict) -> None:
    assert [run["name"] for run in out["runs"]] == ["stage1", "warmup lr=0.001", "warmup lr=0.001 + stage1"]
    for scores in [out["widened"]] + [run["bits_per_char"] for run in out["runs"]]:
        assert set(scores) == {"zh", "en"} and all(0 < v < 64 for v in scores.values())
    for run in out["runs"]:
        assert run["steps"] == 3 and run["step_s"] > 0
        # the stage-1 runs score the held-out sets at steps 0 and 2 and at their end; a warm-up does not
        assert sorted(run["curve"]) == ([] if run["name"] == "warmup lr=0.001" else ["0", "2", "3"])


def widened_pair(root, bpe_dir) -> tuple:
    """A tiny model on a byte-level BPE, its copy widened on Chinese text (tools.expand_vocab), and a JSONL of one zh
    text (from the widening text: its new merges shorten it) and one en text."""
    from conftest import TOKENIZER_TEXT
    from llama.tiny import make_tiny_model
    from tools.expand_vocab import parse_args, run

    base = make_tiny_model(root / "base", bpe_dir, dim=32, n_layers=1, n_heads=2, max_seq_len=256)
    chinese = [t for t in dict.fromkeys(TOKENIZER_TEXT) if not t.isascii()]
    zh = root / "zh.txt"
    zh.write_text("\n".join(chinese * 3) + "\n", encoding="utf-8")
    run(parse_args(["--model", str(base), "--zh-corpus", str(zh), "--zh-vocab-size", "20", "--sample-zh", str(zh),
                    "--output", str(root / "widened"), "--quiet"]), out=io.StringIO())
    data = root / "heldout.jsonl"
    data.write_text("".join(json.dumps({"text": t, "lang": lang}, ensure_ascii=False) + "\n" for t, lang in
                            (("".join(chinese[:3]), "zh"), ("The quick brown fox jumps.", "en"))),
                    encoding="utf-8")
    return base, root / "widened", data


@pytest.fixture(scope="module")
def bench_inputs(tmp_path_factory, tokenizer_path, bpe_tokenizer_dirs) -> dict:
    root = tmp_path_factory.mktemp("bench")
    stage1_corpus(root / "corpus", n=40)
    from test_llama_gguf import _train_tokenizer, tiny_llama, write_gguf

    tok = _train_tokenizer("smollm")
    write_gguf(root / "tiny.gguf", tiny_llama(tok.get_vocab_size()), tok, "smollm")
    base, widened, heldout = widened_pair(root, bpe_tokenizer_dirs["smollm2"])
    return {"corpus": root / "corpus", "tokenizer": tokenizer_path, "gguf": root / "tiny.gguf",
            "bpe": bpe_tokenizer_dirs["smollm2"] / "tokenizer.json", "base": base, "widened": widened,
            "heldout": heldout}


SCRIPTS = {
    "model_step.py": (lambda p: TINY_MODEL, check_model_step),
    "loss_memory.py": (lambda p: TINY_MODEL, check_loss_memory),
    "data_throughput.py": (lambda p: ["--stage", "pretrain", "--corpus", p["corpus"], "--tokenizer", p["tokenizer"],
                                      "--batches", 4, "--batch-size", 2, "--max-seq-length", 128, "--packing"],
                           check_data_throughput),
    "expand_vocab_bpe.py": (lambda p: ["--tokenizer", p["bpe"], "--new-tokens", 20], check_expand_vocab_bpe),
    "gguf_convert.py": (lambda p: ["--gguf", p["gguf"]], check_gguf_convert),
    "checkpoint_save.py": (lambda p: ["--dim", 32, "--layers", 1, "--ffn", 64, "--heads", 2, "--kv-heads", 1,
                                      "--vocab", 300, "--saves", 2], check_checkpoint_save),
    "widening.py": (lambda p: ["--base", p["base"], "--widened", p["widened"], "--data", p["heldout"],
                               "--max-new-tokens", 8], check_widening),
    "widening_recovery.py": (lambda p: ["--widened", p["widened"], "--data", p["heldout"], "--warmup-lrs", "1e-3",
                                        "--warmup-steps", 3, "--stage1-steps", 3, "--eval-steps", 2, "--nproc", 1,
                                        "--set", f"pretrain_data_root_dir={p['corpus']}", "--set", "max_seq_length=64",
                                        "--set", "logging_steps=1"],
                             check_widening_recovery),
}


def test_every_bench_script_is_run_here():
    scripts = {path.name for path in BENCH.glob("*.py") if path.name != "__init__.py"}
    assert scripts - set(NOT_MEASURING) == set(SCRIPTS)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_bench_script_prints_its_figures(bench_inputs, script):
    argv, check = SCRIPTS[script]
    check(run_bench(script, argv(bench_inputs)))
