#!/usr/bin/env bash
# GPU smoke test of the training engine, on one GPU, in a few minutes:
#   for plugin in gemini (fp16, the recipe: ZeRO with Adam states in CPU memory) and zero2 (bf16):
#     20 steps of stage 1 on a ~100M-parameter model with packed 1024-token rows, checkpoint at step 10;
#     then resume from that checkpoint (ColossalAI's sharded optimizer load) and rerun steps 11-20.
#   Prints tokens/s, TFLOPS and MFU per GPU, peak memory, and how far the resumed losses are from the first run.
#
#   PY=/path/to/python scripts/gpu_smoke.sh          # a python with torch + colossalai (+ this repo's requirements)
#   SMOKE_DIR=/tmp/smoke STEPS=20 PLUGINS="gemini zero2" scripts/gpu_smoke.sh
#
# The first HybridAdam use may build ColossalAI's CPU/CUDA Adam kernels if the wheel ships none (a minute or two).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python}
SMOKE_DIR=${SMOKE_DIR:-outputs/gpu_smoke}
STEPS=${STEPS:-20}
PLUGINS=${PLUGINS:-gemini zero2}
HALF=$((STEPS / 2))
export PYTHONUNBUFFERED=1

"$PY" -c "import torch, colossalai; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'colossalai', colossalai.__version__, torch.cuda.get_device_name())"
rm -rf "$SMOKE_DIR"
start=$(date +%s)

echo "== model: dim 1024, 8 layers, 16 heads, vocab 3000 (tokenizer from pretraining_corpora/)"
"$PY" -m llama.tiny --corpus pretraining_corpora --output "$SMOKE_DIR/model" --vocab-size 3000 \
    --dim 1024 --layers 8 --heads 16 --max-seq-len 1024

SETTINGS=(
    init_model_path="$SMOKE_DIR/model" max_steps="$STEPS" warmup_steps=2 lr=3e-4 min_lr=3e-5
    batch_size=8 max_seq_length=1024 packing=True logging_steps=5 saving_steps="$HALF" keep_checkpoints=3
)

train() {  # train <name> <settings...>
    local name=$1
    shift
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 pretrain_main.py "${SETTINGS[@]}" "$@" \
        output_dir="$SMOKE_DIR/$name" logdir="$SMOKE_DIR/$name/logs" 2>&1 \
        | grep -v -e "^W[0-9]* .*torch/distributed/run.py" -e "^\*\*\*\*" -e "^  [* ] [a-z_0-9]* *= "
}

for plugin in $PLUGINS; do
    case $plugin in
        gemini) precision=fp16 ;;
        *) precision=bf16 ;;
    esac
    echo
    echo "== $plugin, $precision: $STEPS steps"
    train "$plugin" plugin="$plugin" precision="$precision"
    checkpoint=$(ls -d "$SMOKE_DIR/$plugin"/ckpt_step-"$HALF"_* | head -1)
    echo "== $plugin: resume from $checkpoint"
    train "$plugin-resumed" plugin="$plugin" precision="$precision" recover_training_from_checkpoint="$checkpoint"
done

echo
"$PY" - "$SMOKE_DIR" "$PLUGINS" "$HALF" <<'EOF'
import json
import sys
from pathlib import Path

smoke, plugins, half = Path(sys.argv[1]), sys.argv[2].split(), int(sys.argv[3])


def records(run):
    return [json.loads(line) for line in (smoke / run / "logs" / "metrics.jsonl").read_text().splitlines()]


failed = False
print(f"{'plugin':<8} {'tokens/s/GPU':>13} {'TFLOPS/GPU':>11} {'MFU':>7} {'peak GB':>8} {'loss first->last':>18} "
      f"{'resume |dloss|':>15}")
for plugin in plugins:
    first, resumed = records(plugin), records(f"{plugin}-resumed")
    last = first[-1]  # the last window: start-up and the first steps are behind it
    mfu = f"{last['mfu']:.1%}" if "mfu" in last else "n/a"
    same_steps = {r["step"]: r["loss"] for r in first if r["step"] > half}
    diffs = [abs(r["loss"] - same_steps[r["step"]]) for r in resumed if r["step"] in same_steps]
    worst = max(diffs) if diffs else float("nan")
    print(f"{plugin:<8} {last['tokens_per_s_per_gpu']:>13,.0f} {last['tflops_per_gpu']:>11.1f} {mfu:>7} "
          f"{last.get('max_memory_gb', float('nan')):>8.1f} {first[0]['loss']:>8.3f} -> {last['loss']:<6.3f} "
          f"{worst:>15.4f}")
    skipped = last["skipped_steps_total"]
    if not diffs or not worst < 0.05 or not last["loss"] < first[0]["loss"] or skipped > 5:
        failed = True
        print(f"  FAIL {plugin}: resumed losses differ by {worst}, or the loss did not fall, or {skipped} skipped")
print("MFU = tokens/s per GPU x (6 N + 12 L d s) / peak; N = parameters without the input embedding")
sys.exit(1 if failed else 0)
EOF
echo "gpu smoke finished in $(( $(date +%s) - start )) s"
