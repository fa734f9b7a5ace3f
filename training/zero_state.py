"""The ZeRO plugins' training state that ColossalAI's checkpoints leave out: fp32 master weights and the loss scaler.

Master weights. booster.save_model writes half-precision weights, and at load both plugins rebuild their fp32 masters
from them: GeminiDDP._load_from_state_dict gathers each chunk in the mixed-precision dtype
(get_temp_total_chunk_on_cuda) and copies it into the fp32 pair; LowLevelZeroCheckpointIO.load_*_model ends with
update_master_params, which copies the half-precision working params. Each resume would round every master to 10
(fp16) or 7 (bf16) mantissa bits. The same rounding hits a fresh start: the masters are cloned after the model is
cast (GeminiDDP._init_chunks, LowLevelZeroOptimizer._create_master_param_current_rank).
Here, this rank's masters are named views into the plugins' own storage:
    gemini  "chunk.<i>": the local part of the i-th fp32 chunk (Chunk.payload: its shard, or all of it when the
            chunk is kept gathered), in the order of GeminiDDP.fp32_params
    zero2   "<parameter name>": LowLevelZeroOptimizer.working_to_master_param, this rank's padded 1/world slice
They are saved per rank with safetensors and copied back after the booster load (same model, plugin and world size),
or written from a more precise source model (masters_from_source). Each file's metadata holds its master_layout, by
parameter name and element offset, so that another world size re-cuts them (load_resharded_masters).

Loss scaler. The fp16 DynamicGradScaler is in no checkpoint, and its own state_dict leaves out the growth and
hysteresis counters; here it is three numbers.
"""
from __future__ import annotations

from typing import Iterable

import torch


def master_views(model, optimizer, plugin: str) -> dict[str, torch.Tensor]:
    """This rank's fp32 master weights, as live tensors (writing into them changes the masters); {} for ddp."""
    if plugin == "gemini":
        chunks = model.chunk_manager.get_chunks(model.fp32_params)
        return {f"chunk.{i}": chunk.payload for i, chunk in enumerate(chunks)}
    if plugin == "zero2":
        masters = optimizer.working_to_master_param
        return {name: masters[id(p)] for name, p in model.unwrap().named_parameters() if id(p) in masters}
    return {}


def master_layout(model, optimizer, plugin: str) -> dict[str, list[int | str]]:
    """parameter name -> [key, offset, start, length]: master_views()[key][offset:offset + length] holds elements
    [start, start + length) of the flattened parameter. Saved with the masters, it makes them readable by another
    world size (load_resharded_masters); the keys and cuts depend on the world size, the names do not.

    gemini: a parameter occupies [offset, end) of its fp32 chunk "chunk.<i>", and this rank holds [shard_begin,
    shard_end) of the chunk (all of it when kept gathered). zero2: the flattened parameter, padded to a multiple of
    the world size, is split evenly; this rank's master is slice `rank` (LowLevelZeroOptimizer.
    _create_master_param_current_rank), the last slices holding the padding."""
    layout: dict[str, list[int | str]] = {}
    if plugin == "gemini":
        chunks = model.chunk_manager.get_chunks(model.fp32_params)
        index = {id(chunk): i for i, chunk in enumerate(chunks)}
        for p, fp32_p in zip(model.fp16_params, model.fp32_params):
            chunk = model.chunk_manager.get_chunk(fp32_p)
            info = chunk.tensors_info[fp32_p]
            first, last = (0, chunk.chunk_size) if chunk.is_gathered else (chunk.shard_begin, chunk.shard_end)
            begin, end = max(info.offset, first), min(info.end, last)
            if begin < end:
                layout[model.param2name[p]] = [f"chunk.{index[id(chunk)]}", begin - first, begin - info.offset,
                                               end - begin]
    elif plugin == "zero2":
        masters = optimizer.working_to_master_param
        for name, p in model.unwrap().named_parameters():
            if id(p) not in masters:
                continue
            size = masters[id(p)].numel()
            start = torch.distributed.get_rank(optimizer.param_to_pg[p]) * size
            valid = min(size, p.numel() - start)
            if valid > 0:
                layout[name] = [name, 0, start, valid]
    return layout


def master_windows(model, optimizer, plugin: str) -> dict[str, list[tuple[torch.Tensor, int]]]:
    """parameter name -> [(view into this rank's masters, index into the flattened parameter where it starts)]
    (see master_layout)."""
    views = master_views(model, optimizer, plugin)
    return {name: [(views[key][offset:offset + length], start)]
            for name, (key, offset, start, length) in master_layout(model, optimizer, plugin).items()}


@torch.no_grad()
def load_resharded_masters(model, optimizer, plugin: str, saved: list[tuple[dict[str, list], object]]) -> list[str]:
    """Fill this rank's masters from the masters another world size saved: `saved` holds, for each old rank, its
    master_layout() and a safetensors safe_open() handle of its file. Only the slices this rank needs are read
    (get_slice). Returns the names of parameters not wholly covered by the saved windows (then left as they are).

    The plugins' own sharded loaders cannot do this: the masters are in no ColossalAI checkpoint (see the module
    docstring), so the windows are re-cut here by parameter name and element offset."""
    missing = []
    for name, windows in master_windows(model, optimizer, plugin).items():
        for view, start in windows:
            end = start + view.numel()
            covered = torch.zeros(view.numel(), dtype=torch.bool)
            for layout, handle in saved:
                if name not in layout:
                    continue
                key, offset, old_start, length = layout[name]
                begin, stop = max(start, old_start), min(end, old_start + length)
                if begin >= stop:
                    continue
                part = handle.get_slice(key)[offset + begin - old_start:offset + stop - old_start]
                view[begin - start:stop - start].copy_(part)
                covered[begin - start:stop - start] = True
            if not covered.all():
                missing.append(name)
    return missing


@torch.no_grad()
def masters_from_source(model, optimizer, plugin: str, tensors: Iterable[tuple[str, torch.Tensor]],
                        compute_dtype: torch.dtype) -> int:
    """Write the fp32 masters from the source weights (our names), where the source is stored in another dtype than
    the one the model computes in; the half-precision weights are left as they are (the source rounded, the same
    values). Returns the number of parameters written."""
    windows = master_windows(model, optimizer, plugin)
    written = 0
    for name, tensor in tensors:
        if name not in windows or tensor.dtype == compute_dtype:  # the masters already hold these values exactly
            continue
        flat = tensor.reshape(-1)
        for view, start in windows[name]:
            view.copy_(flat[start:start + view.numel()])
        written += 1
    return written


def scaler_state(scaler) -> dict[str, float | int]:
    """colossalai DynamicGradScaler: the scale and the counters that decide its next growth or backoff."""
    return {"scale": float(scaler.scale.item()), "growth_step": int(scaler._growth_step),
            "hysteresis_step": int(scaler._hysteresis_step)}


def load_scaler_state(scaler, state: dict[str, float | int]) -> None:
    scaler._scale.fill_(float(state["scale"]))
    scaler._growth_step = int(state["growth_step"])
    scaler._hysteresis_step = int(state["hysteresis_step"])
