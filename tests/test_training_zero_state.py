"""training/engine/masters.py with gemini's master views and layout (training/engine/gemini.py) on its sharded chunk
layout, which the ZeRO-on-CPU harness cannot run (its test models
fit in one chunk that every rank keeps whole): each rank writes exactly its shard of the fp32 masters."""
import types

import torch

from training.engine.gemini import gemini_master_layout, gemini_master_views
from training.engine.masters import load_resharded_masters, master_windows, masters_from_source


def _windows(model):
    return master_windows(gemini_master_views(model), gemini_master_layout(model))


def _gemini(rank: int, world: int, sources: dict[str, torch.Tensor], chunk_size: int):
    """A GeminiDDP stand-in with the attributes the gemini engine reads: every parameter in one fp32 chunk, in order, padded
    to chunk_size, of which this rank holds [shard_begin, shard_end) (colossalai Chunk)."""
    fp16, fp32, infos, offset = [], [], {}, 0
    for source in sources.values():
        p, q = torch.empty(source.shape, dtype=torch.bfloat16), torch.empty(source.shape)
        fp16.append(p)
        fp32.append(q)
        infos[q] = types.SimpleNamespace(offset=offset, end=offset + source.numel())
        offset += source.numel()
    shard = chunk_size // world
    chunk = types.SimpleNamespace(tensors_info=infos, chunk_size=chunk_size, is_gathered=False,
                                  shard_begin=rank * shard, shard_end=(rank + 1) * shard,
                                  payload=torch.full((shard,), -1.0))
    manager = types.SimpleNamespace(get_chunk=lambda tensor: chunk, get_chunks=lambda tensors: (chunk,))
    return types.SimpleNamespace(fp16_params=fp16, fp32_params=fp32, chunk_manager=manager,
                                 param2name=dict(zip(fp16, sources)))


def test_gemini_masters_from_source_fill_each_ranks_shard():
    torch.manual_seed(0)
    sources = {"a": torch.randn(2, 3), "b": torch.randn(10), "c": torch.randn(2, 2)}  # 20 elements, chunk of 24
    models = [_gemini(rank, 2, sources, chunk_size=24) for rank in range(2)]
    for model in models:
        written = masters_from_source(_windows(model), sources.items(), compute_dtype=torch.bfloat16)
        assert written == 2  # rank 0 holds [0, 12) of the chunk: a and b; rank 1 [12, 24): b and c
    whole = torch.cat([gemini_master_views(model)["chunk.0"] for model in models])
    expected = torch.cat([t.reshape(-1) for t in sources.values()])
    assert torch.equal(whole[:20], expected)
    assert torch.equal(whole[20:], torch.full((4,), -1.0))  # the chunk's padding is left alone


def test_masters_from_source_leaves_what_is_already_exact():
    sources = {"a": torch.randn(4, dtype=torch.float64).to(torch.bfloat16)}
    model = _gemini(0, 1, sources, chunk_size=4)
    assert masters_from_source(_windows(model), sources.items(), compute_dtype=torch.bfloat16) == 0
    assert torch.equal(model.chunk_manager.get_chunk(None).payload, torch.full((4,), -1.0))


def test_gemini_masters_recut_for_another_world_size(tmp_path):
    """Masters saved by 2 ranks (chunk of 24, shards of 12) load into 3 ranks (shards of 8) and into 1 (the chunk
    whole): every new shard gets exactly its elements, read through the saved layout by name and offset."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sources = {"a": torch.randn(2, 3), "b": torch.randn(10), "c": torch.randn(2, 2)}
    expected = torch.cat([t.reshape(-1) for t in sources.values()])
    saved = []
    for rank in range(2):
        model = _gemini(rank, 2, sources, chunk_size=24)
        masters_from_source(_windows(model), sources.items(), compute_dtype=torch.bfloat16)
        path = tmp_path / f"rank{rank}.safetensors"
        save_file(gemini_master_views(model), str(path),
                  metadata={"layout": json.dumps(gemini_master_layout(model))})
        saved.append((json.loads(safe_open(str(path), "pt").metadata()["layout"]), safe_open(str(path), "pt")))
    for world, chunk_size in ((3, 24), (1, 20)):
        models = [_gemini(rank, world, sources, chunk_size=chunk_size) for rank in range(world)]
        for model in models:
            assert load_resharded_masters(_windows(model), saved) == []
        whole = torch.cat([gemini_master_views(model)["chunk.0"] for model in models])
        assert torch.equal(whole[:20], expected), world
    assert load_resharded_masters(_windows(_gemini(0, 1, {**sources, "d": torch.randn(3)}, 23)),
                                  saved) == ["d"]  # a parameter the saved masters do not hold is named
