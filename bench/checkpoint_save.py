"""Time of one checkpoint save, through the run's own save_checkpoint, on the CPU fallback (plugin ddp, fp32,
torch.optim.AdamW, one process on gloo).

    python bench/checkpoint_save.py --dim 2048 --layers 22 --ffn 5632 --heads 32 --kv-heads 4 --vocab 32000  # 1.1B
    python bench/checkpoint_save.py --dim 1536 --layers 16 --ffn 4096 --heads 12 --vocab 32000 --saves 2    # 0.55B

Prints one JSON line: {"params", "saves", "save_s" (each save), "best_s", "checkpoint_bytes", "write_mb_s", ...}.
- The model is built at random in fp32, boosted, and Adam's two moments are filled as one optimizer step leaves them
  (no step is taken: that would need the gradients' memory too). Memory: about 12 bytes per parameter plus one
  shard in flight; 1.1B needs about 14 GB, so check `free -g` first.
- Each save writes a whole checkpoint directory (weights, optimizer, schedule, states; atomic .tmp then rename) into
  --out (a temporary directory by default) and keep_checkpoints=1 removes the previous one, as in a run.
- best_s is the fastest save (other load on a shared machine only slows it down); write_mb_s = bytes / best_s.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import pretrain_args  # noqa: E402
from llama import Llama, LlamaConfig  # noqa: E402
from llama.tiny import train_tokenizer  # noqa: E402
from training.checkpoint import TrainerState, save_checkpoint  # noqa: E402
from training.engine import choose_engine  # noqa: E402
from training.settings import load_settings  # noqa: E402


class _NoData:
    """The data stream's part of a checkpoint, empty: this bench times the engine's part."""

    def state_dict(self) -> dict:
        return {}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--saves", type=int, default=2)
    p.add_argument("--out", default="", help="where to write (default: a temporary directory, removed after)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    with socket.socket() as s:  # a free port for this process's own group
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.out or scratch)
        tokenizer = train_tokenizer(["a small text to train a tokenizer on, 一些中文"], Path(scratch) / "tok.model")
        from llama.tokenizer_files import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
        settings = load_settings(pretrain_args, [f"output_dir={out}", "plugin=ddp", "precision=fp32",
                                                 "global_batch_size=0", "gradient_accumulation_steps=1"])
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=args.ffn,
                             num_hidden_layers=args.layers, num_attention_heads=args.heads,
                             num_key_value_heads=args.kv_heads, max_sequence_length=2048)
        engine = choose_engine(settings)
        with torch.no_grad():
            model = Llama(config)
        params = sum(p.numel() for p in model.parameters())
        engine.boost(model)
        optimizer = engine.optimizer.optim  # torch AdamW inside ColossalAI's OptimizerWrapper
        for group in optimizer.param_groups:  # the state one step leaves, without computing gradients
            for p in group["params"]:
                optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}
        state = TrainerState(world_size=1, settings=settings.to_dict())
        times, size = [], 0
        for i in range(args.saves):
            state.step, state.loss = i + 1, 1.0
            started = time.perf_counter()
            save_checkpoint(engine, _NoData(), state, config, tokenizer, out, keep=1)
            times.append(time.perf_counter() - started)
            size = sum(f.stat().st_size for f in out.glob("ckpt_step-*/**/*") if f.is_file())
    dist.destroy_process_group()
    best = min(times)
    print(json.dumps({"params": params, "dim": args.dim, "layers": args.layers, "vocab": args.vocab,
                      "saves": args.saves, "save_s": [round(t, 3) for t in times], "best_s": round(best, 3),
                      "checkpoint_bytes": size, "write_mb_s": round(size / 2**20 / best, 1),
                      "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
