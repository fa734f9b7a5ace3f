"""Resume on another number of processes: 2 -> 1 -> 2 under ddp (fp32) and, in the ZeRO-on-CPU harness
(tests/zero_cpu.py), zero2 and gemini in bf16.

Each chain: 2 processes train and save; 1 process resumes from that checkpoint, writes at once a checkpoint of what it
loaded (HARNESS_SAVE_AFTER_RESUME), trains on and saves; 2 processes resume from that one the same way. What was
loaded must be what was saved: the weights, the optimizer states gathered whole, the fp32 masters put back together
from every rank's windows, the lr schedule, and the samples in flight. And no record is trained on twice: every row
of every batch is traced back to its corpus line (a tag in each record's text, HARNESS_RECORD_BATCHES=2).
"""
import json
import re
from collections import Counter

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from data_corpus_helpers import words, write_set
from training_runs import TINY_RUN, explain, tiny_model, torchrun  # noqa: F401

TAG = re.compile(r"#(en|zh)-(\d+)-(\d+)")


def tagged_corpus(root):
    """en: 3 files (shared by file on 1 and 2 ranks); zh: 1 file (shared by line on 2 ranks). Each record is one
    short sample whose text ends with a tag naming its set, file and line."""
    for name, n_files, n in (("en", 3, 60), ("zh", 1, 40)):
        records = [{"text": words(i, 8)} for i in range(n)]
        for i, record in enumerate(records):  # write_set deals records round-robin over the files
            record["text"] += f" #{name}-{i % n_files}-{i // n_files + 1}"
        write_set(root, name, records, n_files=n_files)
    return root


def trained_tags(logdir, ranks):
    tags = []
    for rank in ranks:
        for line in (logdir / f"batches.rank{rank}.jsonl").read_text(encoding="utf-8").splitlines():
            for text in json.loads(line)["texts"]:
                found = TAG.findall(text)
                assert len(found) == 1, text
                tags.append(found[0])
    return tags


def optimizer_states(ckpt):
    """param index -> {state name: tensor}, whole, from a ddp optimizer.bin or a ZeRO optimizer/ directory."""
    if (ckpt / "optimizer.bin").is_file():
        return torch.load(ckpt / "optimizer.bin", weights_only=True)["state"]
    states = {}
    for shard in sorted((ckpt / "optimizer").glob("pytorch_optim-*.bin")):
        states.update(torch.load(shard, weights_only=True))
    return states


def whole_masters(ckpt):
    """parameter name -> its fp32 master, put together from every rank's file by the saved layout."""
    parts = {}
    for path in sorted(ckpt.glob("master_weights.rank*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name, (key, offset, start, length) in json.loads(f.metadata()["layout"]).items():
                parts.setdefault(name, {})[start] = f.get_slice(key)[offset:offset + length]
    return {name: torch.cat([chunks[start] for start in sorted(chunks)]) for name, chunks in parts.items()}


def in_flight(ckpt):
    """The samples built but not handed out (set buffers, packing pool) over all ranks, and the summed counters."""
    samples, counters = Counter(), Counter()
    for path in ckpt.glob("data_state.rank*.json"):
        text = path.read_text(encoding="utf-8")
        assert "\n" not in text and ": " not in text  # written compactly
        state = json.loads(text)
        for entries in [s["pending"] for s in state["sets"].values()] + [state["packing_pool"]]:
            samples.update(tuple(row[0]) for row in entries)
        counters.update(state["counters"])
    return samples, counters


def assert_loaded_equals_saved(saved, loaded, plugin):
    a, b = (load_file(next(c.glob("model*.safetensors"))) for c in (saved, loaded))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = optimizer_states(saved), optimizer_states(loaded)
    assert sa.keys() == sb.keys() and sa
    for index in sa:
        assert sa[index].keys() == sb[index].keys()
        for name in sa[index]:
            x, y = sa[index][name], sb[index][name]
            assert torch.equal(torch.as_tensor(x), torch.as_tensor(y)), (index, name)
    if plugin != "ddp":
        ma, mb = whole_masters(saved), whole_masters(loaded)
        assert ma.keys() == mb.keys() == a.keys()
        assert all(torch.equal(ma[k], mb[k]) for k in ma)
        if any(t.dtype != torch.float32 for t in a.values()):  # zero2 saves the bf16 weights, gemini the masters
            # The masters are not the bf16 weights rounded back up: the fp32 values came through.
            assert any(not torch.equal(ma[k], a[k].float().flatten()) for k in ma)
    assert json.loads((saved / "scheduler.json").read_text()) == json.loads((loaded / "scheduler.json").read_text())
    assert in_flight(saved) == in_flight(loaded)
    assert sum(in_flight(saved)[0].values()) > 0


CHAINS = {
    "ddp": [],
    "zero2-bf16": ["plugin=zero2", "precision=bf16"],
    "gemini-bf16": ["plugin=gemini", "precision=bf16"],
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_resume_on_another_number_of_processes(name, tiny_model, tmp_path):
    plugin = name.split("-")[0]
    corpus = tagged_corpus(tmp_path / "corpus")
    base = [s for s in TINY_RUN if not s.startswith("pretrain_data_root_dir=")] + CHAINS[name] + [
        f"init_model_path={tiny_model}", f"pretrain_data_root_dir={corpus}", "pretrain_data_split={'en': 1, 'zh': 1}",
        "max_steps=6", "saving_steps=2"]
    env = {"HARNESS_RECORD_BATCHES": "2", **({"HARNESS_ZERO_ON_CPU": "1"} if plugin != "ddp" else {})}
    # processes, the step after whose checkpoint the run is SIGKILLed (None: to the end), the checkpoint resumed
    chain = [(2, 2, None), (1, 4, "ckpt_step-2_"), (2, None, "ckpt_step-4_")]
    tags, previous = [], None
    for i, (nproc, kill_after, resumed_from) in enumerate(chain):
        out = tmp_path / f"run{i}"
        settings = base + [f"output_dir={out}", f"logdir={out}/logs"]
        run_env = dict(env, **({"HARNESS_KILL_AFTER_SAVE": str(kill_after)} if kill_after else {}))
        if resumed_from:
            saved = next(previous.glob(f"{resumed_from}*"))
            settings.append(f"recover_training_from_checkpoint={saved}")
            run_env["HARNESS_SAVE_AFTER_RESUME"] = str(tmp_path / f"loaded{i}")
        result = torchrun(settings, nproc=nproc, env=run_env)
        assert (result.returncode != 0) == bool(kill_after), explain(result)
        if resumed_from:
            output = result.stdout + result.stderr
            assert f"written by {3 - nproc} processes, this run has {nproc}" in output
            flight = re.search(r"continues on \d+; .*no line read before is read again.*dealt out to the new ranks: "
                               r"(.*)", output)
            assert flight, output[-3000:]
            print(f"{name} {3 - nproc} -> {nproc}: in flight at the checkpoint: {flight.group(1)}")
            assert_loaded_equals_saved(saved, next((tmp_path / f"loaded{i}").glob(f"{resumed_from}*")), plugin)
        tags += trained_tags(out / "logs", range(nproc))
        previous = out
    # Every record trained on is a different corpus line: nothing read before a change of world size came again.
    repeated = [tag for tag, count in Counter(tags).items() if count > 1]
    assert not repeated and len(tags) == 2 * 2 * 2 + 1 * 2 * 2 + 2 * 2 * 2, repeated
    assert {tag[0] for tag in tags} == {"en", "zh"}
