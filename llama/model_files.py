"""Weight files of a model dir: safetensors, one file or shards with a transformers-standard index.

A dir holds `model.safetensors`, or shards listed in `model.safetensors.index.json` ({"weight_map": {name: file}})
under any file names -- transformers writes model-00001-of-00002.safetensors, ColossalAI's booster.save_model
writes model-00001.safetensors. transformers dirs may instead hold pytorch_model.bin (+ .index.json), read with
torch.load(weights_only=True). The weight files hold the model only (no optimizer state).

Tensors are cast to the requested dtype one at a time, so loading never holds a second full copy of the model.
"""
from __future__ import annotations

import json
import re
import struct
import zipfile
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"
BIN_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
TOKENIZER_NAME = "tokenizer.model"  # SentencePiece (LLaMA 1/2, the recipe's)
TOKENIZER_JSON_NAME = "tokenizer.json"  # the `tokenizers` library's (Llama 3, Qwen, Mistral, SmolLM2)
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"  # transformers': bos/eos tokens, chat template, tokenizer class
SPECIAL_TOKENS_MAP_NAME = "special_tokens_map.json"

_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or a string like "5GB", "500MB", "2GiB"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes as an int or a string like '5GB' or '500MB'")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def read_json_object(path: Path) -> dict:
    """A JSON file holding one object (config.json, tokenizer_config.json); ValueError naming the file and line."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d


def weight_files(directory: str | Path) -> list[Path]:
    """The weight files of `directory` in index order; a clear error if none or a listed shard is missing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model dir not found: {directory}")
    for index_name, single_name in ((SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME),
                                    (BIN_WEIGHTS_INDEX_NAME, BIN_WEIGHTS_NAME)):
        index_path = directory / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index_path}: not a weight index with a 'weight_map' ({e})") from None
            files = [directory / name for name in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(f"{f}: listed in {index_path} but missing")
            return [_whole(f) for f in files]
        if (directory / single_name).is_file():
            return [_whole(directory / single_name)]
    raise FileNotFoundError(f"{directory}: no weights ({SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME}, "
                            f"{BIN_WEIGHTS_NAME} or {BIN_WEIGHTS_INDEX_NAME})")


def _whole(path: Path) -> Path:
    """`path`, or a ValueError naming it when it is cut short, before any model is built from it."""
    problem = weight_file_problem(path)
    if problem:
        raise ValueError(f"{path}: not a whole weight file ({problem}): copy it again")
    return path


def weight_file_problem(path: Path) -> str | None:
    """What is wrong with the safetensors or torch weight file `path`, in words, or None when it is whole: what
    model dirs and checkpoints are checked with before any is loaded. Cheap: headers and zip directories only."""
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    try:
        with zipfile.ZipFile(path):  # torch.save's format; a truncated file has lost its zip directory, at its end
            pass
    except zipfile.BadZipFile as e:
        if _is_legacy_torch_file(path):
            return None  # torch.save's pre-zipfile format has no directory to check
        return f"not a whole torch file ({e})"
    except OSError as e:
        return f"not a whole torch file ({e})"
    return None


def _safetensors_problem(file: Path) -> str | None:
    """safetensors layout: an 8-byte little-endian header length, a JSON header whose data_offsets end where the
    file ends. A truncated file ends early."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        (header_length,) = struct.unpack("<Q", head)
        if 8 + header_length > size:
            return f"{size} bytes, shorter than its own header ({header_length} bytes)"
        try:
            header = json.loads(f.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "its header is not valid JSON"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    expected = 8 + header_length + max(ends, default=0)
    if size != expected:
        return f"{size} bytes where its header promises {expected} (truncated or overwritten)"
    return None


def _is_legacy_torch_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x80\x02"  # a pickle (protocol 2) at byte 0: torch.save(_use_new_zipfile_serialization=False)


def iter_tensors(directory: str | Path, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu") -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight in `directory`, each cast to `dtype` (None keeps the stored dtype)."""
    for path in weight_files(directory):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for name in f.keys():
                    yield name, _cast(f.get_tensor(name), dtype)
        else:
            # weights_only: a .bin is a pickle; never let it run code.
            try:
                shard = torch.load(path, map_location=device, weights_only=True, mmap=True)
            except RuntimeError:  # pre-zipfile (legacy) .bin files cannot be memory-mapped
                shard = torch.load(path, map_location=device, weights_only=True)
            for name in list(shard):
                yield name, _cast(shard.pop(name), dtype)
            del shard


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or not t.is_floating_point() else t.to(dtype)


def load_tensors(directory: str | Path, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return dict(iter_tensors(directory, dtype, device))


def save_tensors(state_dict: dict[str, torch.Tensor], directory: str | Path,
                 max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[Path]:
    """Write `state_dict` as model.safetensors, or as shards + model.safetensors.index.json above max_shard_size.

    Shards are named as transformers names them (model-00001-of-00002.safetensors); stale weight files of an
    earlier save are removed so the dir never mixes two checkpoints.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in state_dict.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > limit:
            shards.append({})
            shard_bytes = 0
        # safetensors needs contiguous CPU tensors that own their storage (no shared views).
        shards[-1][name] = tensor.detach().to("cpu").contiguous().clone() if tensor.device.type != "cpu" \
            else tensor.detach().contiguous()
        shard_bytes += size

    for stale in [*directory.glob("model*.safetensors"), directory / SAFE_WEIGHTS_INDEX_NAME,
                  directory / BIN_WEIGHTS_NAME, directory / BIN_WEIGHTS_INDEX_NAME, *directory.glob("pytorch_model*.bin")]:
        if stale.is_file():
            stale.unlink()

    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        path = directory / SAFE_WEIGHTS_NAME
        save_file(shards[0], str(path), metadata=metadata)
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata=metadata)
        weight_map.update({k: name for k in shard})
        paths.append(directory / name)
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return paths


def is_transformers_dir(config_dict: dict) -> bool:
    """A transformers config.json (its weights use transformers' names and q/k layout); this repo's own config.json
    has none of these keys (its class is in `architecture`)."""
    return any(key in config_dict for key in ("architectures", "model_type", "max_position_embeddings"))
