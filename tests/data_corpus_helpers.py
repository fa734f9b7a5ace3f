"""Tiny corpora and settings for the data tests (not a test module)."""
from __future__ import annotations

import json
import types
from pathlib import Path

import pretrain_args
from settings_for import settings_for
from tools.stage_schema import stage_rules
from training.data_stream import DataStream
from training.settings import Settings

WORDS = ("the quick brown fox jumps over the lazy dog language models learn from text apples oranges weather "
         "sunny question answer summarise article sentence").split()
ZH = "我们今天去公园散步天气非常好大型语言模型可以理解中文和英文北京是中国的首都"


def words(i: int, n: int) -> str:
    """n deterministic words, varied by i."""
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n))


def zh_text(i: int, n: int) -> str:
    return "".join(ZH[(i * 5 + j * 3) % len(ZH)] for j in range(n))


def write_set(root: Path, name: str, records: list, n_files: int = 2, first: int = 10001) -> list[Path]:
    """Spread records round-robin over n_files files <first>.jsonl, <first+1>.jsonl, ...; records may be dicts
    (dumped as JSON) or raw bytes lines (written as they are)."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{first + i:05d}.jsonl" for i in range(n_files)]
    chunks: list[list[bytes]] = [[] for _ in paths]
    for i, record in enumerate(records):
        line = record if isinstance(record, bytes) else json.dumps(record, ensure_ascii=False).encode() + b"\n"
        chunks[i % n_files].append(line)
    for path, lines in zip(paths, chunks):
        path.write_bytes(b"".join(lines))
    return paths


def lm_records(n: int, lang: str = "en", length: int = 12) -> list[dict]:
    return [{"text": (words(i, length) if lang == "en" else zh_text(i, length)) + f" #{i}"} for i in range(n)]


def translate_records(n: int) -> list[dict]:
    return [{"en_text": words(i, 6) + f" {i}", "zh_text": zh_text(i, 6) + f"{i}"} for i in range(n)]


def write_translate_prompts(root: Path, en_zh=("Translate into Chinese:",), zh_en=("请翻译成英文：",)) -> None:
    (root / "translate").mkdir(parents=True, exist_ok=True)
    (root / "translate" / "en-zh.prompt").write_text("\n".join(en_zh) + "\n", encoding="utf-8")
    (root / "translate" / "zh-en.prompt").write_text("\n".join(zh_en) + "\n", encoding="utf-8")


def task_records(n: int, task_type: str) -> list[dict]:
    return [{"input": words(i, 8) + f" q{i}", "output": words(i + 1, 4) + f" a{i}", "type": task_type}
            for i in range(n)]


def sft_records(n: int) -> list[dict]:
    return [{"instruction": words(i, 5) + f" i{i}", "input": (words(i, 3) if i % 2 else ""),
             "output": words(i + 2, 4) + f" o{i}"} for i in range(n)]


def settings(root: Path, split: dict, args: types.ModuleType = pretrain_args, **overrides) -> Settings:
    """A stage's settings (pretrain_args unless `args` says otherwise) for a test corpus at `root`, small batches."""
    values = dict(pretrain_data_root_dir=str(root), pretrain_data_split=split, max_seq_length=64, batch_size=4,
                  long_text="split", packing=False, skip_bad_records=False, seed=7)
    values.update(overrides)
    return settings_for(args, values)


def stream(main_module: types.ModuleType, config: Settings, tokenizer, rank: int = 0,
           world_size: int = 1) -> DataStream:
    """The data stream the loop builds for the stage of `main_module` (e.g. pretrain_main)."""
    rules = stage_rules(main_module.__name__.removesuffix("_main"))
    return DataStream(config.data, tokenizer, rank, world_size, rules, config.chat)


def stage1_corpus(root: Path, n: int = 40, n_files: int = 2) -> dict:
    write_set(root, "zh", lm_records(n, "zh"), n_files)
    write_set(root, "en", lm_records(n, "en"), n_files)
    write_set(root, "translate", translate_records(n), n_files)
    write_translate_prompts(root)
    return {"zh": 4, "en": 4, "translate": 2}


def take(processor, n):
    """n samples as (ids, loss_mask) lists: batch_size 1, so rows carry no padding."""
    out = []
    with processor:
        for _, batch in zip(range(n), processor):
            assert batch["input_ids"].shape[0] == 1
            out.append((batch["input_ids"][0].tolist(), batch["loss_mask"][0].tolist()))
    return out


def sample_rows(batch: dict) -> list[tuple[list[int], list[int]]]:
    """(ids, loss_mask) of each row without its padding (rows end at their last non-pad token via num_tokens
    being per batch; with batch_size 1 there is no padding at all)."""
    return [(row.tolist(), mask.tolist()) for row, mask in zip(batch["input_ids"], batch["loss_mask"])]


def messages_records(n: int, max_turns: int = 3) -> list[dict]:
    """Multi-turn {"messages"} records: 1..max_turns turns, every third with a system turn."""
    records = []
    for i in range(n):
        messages = [{"role": "system", "content": f"system {words(i, 3)}"}] if i % 3 == 0 else []
        for turn in range(1 + i % max_turns):
            messages += [{"role": "user", "content": f"{words(i + turn, 4)} q{i}.{turn}"},
                         {"role": "assistant", "content": f"{zh_text(i + turn, 3)} a{i}.{turn}"}]
        records.append({"messages": messages})
    return records


def joined_split(tok, prefix_text: str, answer_text: str) -> tuple[list[int], list[int]]:
    """(prefix ids, answer ids) of prefix + answer tokenized as one text (stage 3, as a chat template's render is):
    the answer's ids begin where those of the whole leave those of the prefix alone (" 3" after ":")."""
    whole, apart = tok.encode(prefix_text + answer_text), tok.encode(prefix_text)
    common = next((i for i, (a, b) in enumerate(zip(whole, apart)) if a != b), min(len(whole), len(apart)))
    return whole[:common], whole[common:]
