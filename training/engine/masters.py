"""The ZeRO plugins' training state that ColossalAI's checkpoints leave out: fp32 master weights and the loss scaler.

Master weights. booster.save_model writes half-precision weights, and at load both plugins rebuild their fp32 masters
from them: GeminiDDP._load_from_state_dict gathers each chunk in the mixed-precision dtype
(get_temp_total_chunk_on_cuda) and copies it into the fp32 pair; LowLevelZeroCheckpointIO.load_*_model ends with
update_master_params, which copies the half-precision working params. Each resume would round every master to 10
(fp16) or 7 (bf16) mantissa bits. The same rounding hits a fresh start: the masters are cloned after the model is
cast (GeminiDDP._init_chunks, LowLevelZeroOptimizer._create_master_param_current_rank).
Each ZeRO engine names this rank's masters as views into the plugin's own storage (`master_views`: gemini.py,
zero2.py) and says where each parameter's elements lie in them (`master_layout`). They are saved per rank with
safetensors and copied back after the booster load (same model, plugin and world size), or written from a more
precise source model (masters_from_source). Each file's metadata holds its layout, by parameter name and element
offset, so that another world size re-cuts them (load_resharded_masters).

A layout maps parameter name -> [key, offset, start, length]: views[key][offset:offset + length] holds elements
[start, start + length) of the flattened parameter. The keys and cuts depend on the world size, the names do not.

Loss scaler. The fp16 DynamicGradScaler is in no checkpoint, and its own state_dict leaves out the growth and
hysteresis counters; here it is three numbers.
"""
from __future__ import annotations

from typing import Iterable

import torch

Layout = dict[str, list]  # parameter name -> [key, offset, start, length]


def master_windows(views: dict[str, torch.Tensor], layout: Layout) -> dict[str, list[tuple[torch.Tensor, int]]]:
    """parameter name -> [(view into this rank's masters, index into the flattened parameter where it starts)]."""
    return {name: [(views[key][offset:offset + length], start)]
            for name, (key, offset, start, length) in layout.items()}


@torch.no_grad()
def load_resharded_masters(windows: dict[str, list[tuple[torch.Tensor, int]]],
                           saved: list[tuple[Layout, object]]) -> list[str]:
    """Fill this rank's master `windows` from the masters another world size saved: `saved` holds, for each old rank,
    its layout and a safetensors safe_open() handle of its file. Only the slices this rank needs are read
    (get_slice). Returns the names of parameters not wholly covered by the saved windows (then left as they are).

    The plugins' own sharded loaders cannot do this: the masters are in no ColossalAI checkpoint (see the module
    docstring), so the windows are re-cut here by parameter name and element offset."""
    missing = []
    for name, name_windows in windows.items():
        for view, start in name_windows:
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
def masters_from_source(windows: dict[str, list[tuple[torch.Tensor, int]]],
                        tensors: Iterable[tuple[str, torch.Tensor]], compute_dtype: torch.dtype) -> int:
    """Write the fp32 master `windows` from the source weights (our names), where the source is stored in another
    dtype than the one the model computes in; the half-precision weights are left as they are (the source rounded,
    the same values). Returns the number of parameters written."""
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
