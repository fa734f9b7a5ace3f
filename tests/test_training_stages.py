"""The three stages end to end on the bundled corpus, 2 processes each: stage 1 starts from a tiny random model,
stage 2 from stage 1's final/, stage 3 from stage 2's final/; each scores its held-out sets from heldout_corpora;
the last model generates."""
import json
import math

from training_runs import CORPUS, HELDOUT, TINY_RUN, explain, read_metrics, tiny_model, torchrun  # noqa: F401

# Held-out sets per stage (stage 1: empty, i.e. the sets of its mix); eval_steps=3 of 4: at 0, 3 and the end.
EVAL_SETS = {"pretrain": ([], ["zh", "en", "translate"]),
             "task_instruct_tuning": (["zh", "zh-qa-short", "en-squad2"], ["zh", "zh-qa-short", "en-squad2"]),
             "alignment_sft": (["mwp-zh", "cot-en", "others"], ["mwp-zh", "cot-en", "others"])}
EVAL = [f"eval_data_root_dir={HELDOUT}", "eval_steps=3", "eval_samples_per_set=4"]


def test_stage_1_then_2_then_3(tiny_model, tmp_path):
    init = tiny_model
    for stage, extra in (("pretrain", []),
                         ("task_instruct_tuning", ["global_batch_size=8"]),  # 2 per GPU x 2 processes x 2
                         ("alignment_sft", ["packing=True"])):
        out = tmp_path / stage
        asked, scored = EVAL_SETS[stage]
        result = torchrun(TINY_RUN + extra + EVAL + [f"eval_sets={asked}", f"init_model_path={init}", "max_steps=4",
                                                     "saving_steps=4", f"output_dir={out}", f"logdir={out}/logs"],
                          stage=stage)
        assert result.returncode == 0, f"{stage}: {explain(result)}"
        metrics = read_metrics(out / "logs")
        assert sorted(metrics) == [1, 2, 3, 4]
        assert all(m["skipped_steps"] == 0 and m["tokens_per_s"] > 0 for m in metrics.values())
        # Held-out loss per set at step 0 (the starting model), at eval_steps and at the end, on the same tokens.
        evals = read_metrics(out / "logs", kind="eval")
        assert sorted(evals) == [0, 3, 4], f"{stage}: {sorted(evals)}"
        assert evals[0]["tokens_seen"] == 0 and evals[3]["tokens_seen"] == metrics[3]["tokens_seen"] > 0
        for record in evals.values():
            sets = record["eval"]["sets"]
            assert list(sets) == scored
            assert all(math.isfinite(s["loss"]) and s["tokens"] > 0 for s in sets.values())
            assert {name: s["tokens"] for name, s in sets.items()} == \
                   {name: s["tokens"] for name, s in evals[0]["eval"]["sets"].items()}
            assert math.isfinite(record["eval"]["mix"]["loss"])
        assert "eval step 0 | " in result.stdout  # the compact console line
        if stage == "task_instruct_tuning":  # the log's first lines: the batch of a step, accumulation derived
            assert ("batch: 2 per GPU x 2 processes x 2 accumulation = 8 samples per optimizer step "
                    "(global_batch_size=8); x 64 tokens = 512 tokens per step at most") in result.stdout
        assert "eval step 4 (" in (out / "logs" / "log.txt.1").read_text()  # every rank's log file
        final = out / "final"
        assert {"config.json", "tokenizer.model", "model.safetensors.index.json"} <= {p.name for p in final.iterdir()}
        # Stage 3 stores its chat format with the model (tools.chat and tools.eval_ppl follow it).
        assert (json.loads((final / "chat_format.json").read_text()) == {"chat_format": "billa"}
                if stage == "alignment_sft" else not (final / "chat_format.json").exists())
        # Checkpoints carry the settings they ran with, the stage's data mix included.
        checkpoint = next(out.glob("ckpt_step-4_*"))
        settings = json.loads((checkpoint / "trainer_state.json").read_text())["settings"]
        assert settings["init_model_path"] == str(init) and settings["pretrain_data_root_dir"] == str(CORPUS)
        init = final

    import torch

    from llama.generation import generate
    from llama.llama_model import Llama
    from llama.tokenization_llama import SentencePieceTokenizer

    model = Llama.from_pretrained(init).eval()
    assert model.config.dropout_prob == 0.05  # the config as trained
    tokenizer = SentencePieceTokenizer(init / "tokenizer.model")
    prompt = tokenizer.encode("Human: 你好\nAssistant: ", bos=True)
    with torch.no_grad():
        new = generate(model, prompt, max_new_tokens=8)
        assert new == generate(model, prompt, max_new_tokens=8, use_cache=False)  # the KV cache changes nothing
        _, logits = model(torch.tensor([prompt + new[:-1]]))  # (1, len, vocab)
    assert len(new) == 8 and new == logits[0, len(prompt) - 1:].argmax(-1).tolist()  # greedy: the model's argmax


def test_a_stage_run_lowers_the_loss(tiny_model, tmp_path):
    """Stage 1 from a random tiny model: the training loss of the last steps and the held-out loss at the end (the
    same tokens as at step 0) are well below where they started."""
    out = tmp_path / "pretrain"
    # lr 1e-2 (TINY_RUN's 2e-3 moves a random model too little in 12 steps to tell from noise)
    result = torchrun(TINY_RUN + ["lr=1e-2", "min_lr=1e-3", f"init_model_path={tiny_model}", "plugin=ddp",
                                  "precision=fp32", "max_steps=12",
                                  "saving_steps=12", f"eval_data_root_dir={HELDOUT}", "eval_steps=12",
                                  "eval_samples_per_set=8", f"output_dir={out}", f"logdir={out}/logs"], nproc=1)
    assert result.returncode == 0, explain(result)
    losses = [m["loss"] for _, m in sorted(read_metrics(out / "logs").items())]
    assert len(losses) == 12 and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    evals = read_metrics(out / "logs", kind="eval")
    assert sorted(evals) == [0, 12]
    # measured: 5.96 -> 5.25 (training, 3 steps' mean) and 6.03 -> 4.78 (held out)
    assert evals[12]["eval"]["mix"]["loss"] < evals[0]["eval"]["mix"]["loss"] - 0.5, evals


def test_stage_3_on_conversations_then_chat_and_the_template_error_line(tiny_model, tmp_path):
    """Stage 3 trains on multi-turn {"messages"} records, stores its chat format, and tools.chat talks to the result;
    chat_format="template" with a tokenizer that has no template stops with one error line before the model."""
    import io

    from data_corpus_helpers import messages_records, write_set
    from tools.chat import main as chat_main

    write_set(tmp_path / "corpus", "chat", messages_records(20), n_files=2)
    out = tmp_path / "sft"
    common = TINY_RUN + [f"pretrain_data_root_dir={tmp_path / 'corpus'}", "pretrain_data_split={'chat': 1}",
                         "max_seq_length=128", f"init_model_path={tiny_model}", "plugin=ddp", "precision=fp32",
                         f"output_dir={out}", f"logdir={out}/logs"]
    result = torchrun(common + ["max_steps=3", "saving_steps=3"], stage="alignment_sft", nproc=1)
    assert result.returncode == 0, explain(result)
    assert json.loads((out / "final" / "chat_format.json").read_text()) == {"chat_format": "billa"}
    printed = io.StringIO()
    assert chat_main(["--model", str(out / "final"), "--prompt", "hi", "--temperature", "0", "--max-new-tokens",
                      "4", "--device", "cpu"], out=printed) == 0
    assert printed.getvalue().startswith("Assistant: ")

    result = torchrun(common + ["max_steps=3", "chat_format=template", f"output_dir={tmp_path / 'none'}"],
                      stage="alignment_sft", nproc=1)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "error:" in line]
    assert result.returncode != 0 and len(errors) == 1, explain(result)
    assert f"setting 'chat_format' = 'template': the tokenizer {tiny_model / 'tokenizer.model'} has no chat " \
           "template" in errors[0]
    assert "M parameters" not in result.stdout + result.stderr  # stopped before the model was built (its log line)
