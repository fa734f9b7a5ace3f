"""Training throughput on one GPU, three ways at each shape: our fast path, our old path, transformers' LLaMA.

    python bench/gpu_throughput.py                          # the ~1B shape (TinyLlama's) and the 7B shape, on CUDA
    python bench/gpu_throughput.py --shapes 1b --steps 6    # one shape
    python bench/gpu_throughput.py --shapes tiny --device cpu --peak-tflops 1   # the CPU test's shape

Prints one JSON line per shape:
    {"shape", "dim", "layers", "heads", "kv_heads", "seq", "batch_size", "device", "gpu", "peak_tflops", "note",
     "ways": {"fast": {...}, "old": {...}, "transformers": {...}}, "ours_vs_transformers", "fast_vs_old"}
each way: {"tokens_per_s_per_gpu", "mfu", "hfu", "peak_memory_gb", "step_s", "checkpointing", "attention",
"compiled", "loss"} (mfu/hfu null where the GPU's peak is unknown and --peak-tflops is not given).
    fast          our Llama on packed rows: flex_attention's block mask (llama/attention.py "auto": flex on CUDA),
                  blocks compiled (Llama.compile_blocks) on CUDA, the cheapest checkpointing that fits: "none", else
                  "selective", else "full" (the JSON says which)
    old           our Llama on the same packed rows as before: dense (bs, 1, L, L) mask, "full" checkpointing, eager
    transformers  LlamaForCausalLM(attn_implementation="sdpa") with the same weights on the same tokens as full
                  unpacked rows (causal over the whole row: no document mask), without checkpointing, else with it
Same tokens, batch, engine and loop for all three: fp32 weights, bf16 autocast on CUDA (as plugin=ddp runs), torch's
AdamW (fused on CUDA), one optimizer step per batch of --bs rows of --seq tokens. tokens/s per GPU = bs * seq *
timed steps / their seconds, after --warmup untimed steps (compilation, the allocator's first sizes). MFU and HFU as
training/flops.py defines them (PaLM model FLOPs; HFU adds the recomputed blocks' forward). ours_vs_transformers
= fast / transformers tokens/s; fast_vs_old = fast / old.
The 7B shape holds 16 bytes per parameter here (fp32 weight, gradient, two Adam moments): on a GPU too small for all
32 layers it runs the 7B width with as many layers as fit, and "note" says so (MFU at 7B width depends little on
depth: every layer is the same work).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from llama import Llama, LlamaConfig  # noqa: E402
from llama.attention import resolve_kernel  # noqa: E402
from training.flops import flops_per_token, peak_tflops_per_gpu, recompute_flops_per_token  # noqa: E402

# name: (dim, layers, heads, kv_heads, vocab, batch size at seq 2048)
SHAPES = {"1b": (2048, 22, 32, 4, 32000, 8), "7b": (4096, 32, 32, 32, 32000, 4), "tiny": (64, 2, 4, 2, 256, 2)}
BYTES_PER_PARAM = 16  # fp32 weight + gradient + Adam's two moments
ACTIVATION_RESERVE_GB = 24  # left for activations, logits and the allocator when the 7B layers are sized
CHECKPOINTING_ORDER = ("none", "selective", "full")  # cheapest first
MEAN_DOCUMENT = 600  # tokens: packed rows hold documents of random lengths around this


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="1b,7b", help=f"comma-separated of {','.join(SHAPES)}")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--bs", type=int, default=0, help="rows per step; 0: the shape's own")
    p.add_argument("--steps", type=int, default=4, help="timed steps per way")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per way first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the MFU denominator; 0: the GPU looked up by name")
    p.add_argument("--ways", default="fast,old,transformers")
    return p.parse_args(argv)


def sized_layers(shape: str, dim: int, layers: int, vocab: int, device: torch.device) -> tuple[int, str]:
    """The 7B shape's layers that fit this GPU's memory at BYTES_PER_PARAM (all of them where they fit)."""
    if shape != "7b" or device.type != "cuda":
        return layers, ""
    total_gb = torch.cuda.get_device_properties(device).total_memory / 1e9
    per_layer_gb = 12 * dim * dim * BYTES_PER_PARAM / 1e9  # attention 4 d^2 + SwiGLU 3 * 11008 d ~ 12 d^2
    fixed_gb = 2 * vocab * dim * BYTES_PER_PARAM / 1e9  # embedding and output projection
    fit = int((total_gb - ACTIVATION_RESERVE_GB - fixed_gb) // per_layer_gb)
    if fit >= layers:
        return layers, ""
    return max(fit, 1), (f"7B width with {max(fit, 1)} of its {layers} layers: all {layers} need "
                         f"~{fixed_gb + layers * per_layer_gb:.0f} GB at {BYTES_PER_PARAM} bytes per parameter, this "
                         f"GPU has {total_gb:.0f} GB")


def packed_batch(bs: int, seq: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random tokens in rows of documents of random lengths (a contiguous run of one id is a document)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (bs, seq), generator=g)
    lengths = torch.distributions.Geometric(probs=torch.tensor(1.0 / MEAN_DOCUMENT)).sample((bs, seq))
    doc_ids = torch.zeros(bs, seq, dtype=torch.long)
    for row in range(bs):
        start, doc = 0, 0
        for length in lengths[row].long().clamp(min=1).tolist():
            doc_ids[row, start:start + length] = doc
            start, doc = start + length, doc + 1
            if start >= seq:
                break
    return {"input_ids": ids.to(device), "doc_ids": doc_ids.to(device)}


def build(way: str, config: LlamaConfig, device: torch.device, checkpointing: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if way == "transformers":
        from transformers import LlamaConfig as HFConfig
        from transformers import LlamaForCausalLM

        from llama.weight_layouts import hf_config_dict, llama_to_hf_state_dict

        ours = Llama(config)
        model = LlamaForCausalLM(HFConfig(**{**hf_config_dict(config, torch.float32), "attn_implementation": "sdpa",
                                             "use_cache": False}))
        model.load_state_dict(llama_to_hf_state_dict(ours.state_dict(), config))
        del ours
        if checkpointing != "none":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model.to(device).train()
    with torch.device(device):
        model = Llama(config)
    model.set_gradient_checkpointing(checkpointing)
    model.attention = "auto" if way == "fast" else "dense"
    if way == "fast" and device.type == "cuda":
        model.compile_blocks()
    return model.train()


def loss_of(way: str, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    ids = batch["input_ids"]
    if way == "transformers":
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    return model(ids, loss_mask=torch.ones_like(ids), doc_ids=batch["doc_ids"])[0]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_way(way: str, config: LlamaConfig, batch: dict, device: torch.device, checkpointing: str, args,
            fpt: float, peak: float | None) -> dict:
    """One way's figures; raises torch.cuda.OutOfMemoryError where it does not fit."""
    model = build(way, config, device, checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, loss = 0.0, float("nan")
    for step in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        with autocast:
            out = loss_of(way, model, batch)
        out.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            seconds += time.perf_counter() - start
        loss = out.item()
    tokens_per_s = batch["input_ids"].numel() * args.steps / seconds
    recompute = 0.0
    if way != "transformers":
        recompute = recompute_flops_per_token(model, config.hidden_size, args.seq)
    elif checkpointing == "full":  # transformers recomputes every decoder layer
        recompute = (fpt - 6.0 * config.vocab_size * config.hidden_size) / 3
    figures = {"tokens_per_s_per_gpu": tokens_per_s,
               "mfu": tokens_per_s * fpt / 1e12 / peak if peak else None,
               "hfu": tokens_per_s * (fpt + recompute) / 1e12 / peak if peak else None,
               "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
               "step_s": seconds / args.steps, "checkpointing": checkpointing,
               "attention": "sdpa causal, unpacked" if way == "transformers" else resolve_kernel(model.attention, device),
               "compiled": way == "fast" and device.type == "cuda", "loss": loss}
    del model, optimizer
    return figures


def cheapest_that_fits(way: str, config, batch, device, args, fpt, peak) -> dict:
    """The old path runs as it always did ("full"); the others take the cheapest checkpointing that fits."""
    order = ("full",) if way == "old" else CHECKPOINTING_ORDER if way == "fast" else ("none", "full")
    for i, checkpointing in enumerate(order):
        try:
            return run_way(way, config, batch, device, checkpointing, args, fpt, peak)
        except torch.cuda.OutOfMemoryError:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if i == len(order) - 1:
                return {"error": f"out of memory even with checkpointing={checkpointing}"}
    raise AssertionError("unreachable")


def bench_shape(shape: str, args) -> dict:
    device = torch.device(args.device)
    dim, layers, heads, kv_heads, vocab, bs = SHAPES[shape]
    layers, note = sized_layers(shape, dim, layers, vocab, device)
    bs = args.bs or bs
    config = LlamaConfig(vocab_size=vocab, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_sequence_length=max(2048, args.seq))
    with torch.device("meta"):
        fpt = flops_per_token(Llama(config), layers, dim, args.seq)
    peak = peak_tflops_per_gpu(args.peak_tflops, device, "bf16")
    batch = packed_batch(bs, args.seq, vocab, device)
    ways = {way: cheapest_that_fits(way, config, batch, device, args, fpt, peak) for way in args.ways.split(",")}

    def ratio(a: str, b: str) -> float | None:
        if "tokens_per_s_per_gpu" not in ways.get(a, {}) or "tokens_per_s_per_gpu" not in ways.get(b, {}):
            return None
        return ways[a]["tokens_per_s_per_gpu"] / ways[b]["tokens_per_s_per_gpu"]

    return {"shape": shape, "dim": dim, "layers": layers, "heads": heads, "kv_heads": kv_heads, "seq": args.seq,
            "batch_size": bs, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "peak_tflops": peak,
            "note": note, "ways": ways, "ours_vs_transformers": ratio("fast", "transformers"),
            "fast_vs_old": ratio("fast", "old")}


def main(argv=None) -> None:
    args = parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        sys.exit(f"--shapes: unknown {unknown} (choose from {','.join(SHAPES)})")
    for shape in shapes:
        print(json.dumps(bench_shape(shape, args)), flush=True)


if __name__ == "__main__":
    main()
