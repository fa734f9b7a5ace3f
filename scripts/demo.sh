#!/usr/bin/env bash
# The whole recipe in miniature, on CPU: a tiny tokenizer and model built from the bundled corpus, then
# stage 1 -> 2 -> 3 with 2 processes each, each scoring its held-out sets (heldout_corpora/) every 10 steps, then
# a table of the held-out losses, the curves as a picture (curves.png) and a "Human: ... Assistant: ..." generation.
#
#   scripts/demo.sh                  (what `make demo-tiny` runs after creating .venv)
#   PY=python DEMO_DIR=/tmp/d STEPS=60 scripts/demo.sh
#
# On a GPU machine drop the plugin/precision overrides below: the args files' defaults (gemini, fp16/bf16) apply.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
DEMO_DIR=${DEMO_DIR:-outputs/demo-tiny}
STEPS=${STEPS:-40}  # optimizer steps per stage
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per process: 2 processes on 2 cores

rm -rf "$DEMO_DIR"
start=$(date +%s)

echo "== tiny tokenizer (3,000 pieces) and random model (dim 64, 2 layers) from pretraining_corpora/"
"$PY" -m llama.tiny --corpus pretraining_corpora --output "$DEMO_DIR/tiny-model" --vocab-size 3000 \
    --dim 64 --layers 2 --heads 4 --max-seq-len 256

# Demo-sized settings: everything else comes from each stage's args file.
DEMO_SETTINGS=(
    plugin=ddp precision=fp32 gradient_checkpointing=False dropout_prob=0.0
    max_steps="$STEPS" warmup_steps=4 lr=3e-3 min_lr=3e-4
    batch_size=8 global_batch_size=0 max_seq_length=256 logging_steps=5 saving_steps="$STEPS"
    eval_data_root_dir=heldout_corpora eval_steps=10 eval_samples_per_set=12
)

run_stage() {  # run_stage <stage> <init_model_path> <eval_sets>
    local stage=$1 init=$2 eval_sets=$3
    echo
    echo "== ${stage}_main.py from $init"
    "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "${stage}_main.py" \
        "${DEMO_SETTINGS[@]}" init_model_path="$init" eval_sets="$eval_sets" \
        output_dir="$DEMO_DIR/$stage" logdir="$DEMO_DIR/$stage/logs" 2>&1 \
        | grep -v -e "^W[0-9]* .*torch/distributed/run.py" -e "^\*\*\*\*" -e "OMP_NUM_THREADS"
}

# Held-out sets: stage 1 its whole mix (empty list), stage 2 the LM sets and two reading tasks, stage 3 three sets.
run_stage pretrain "$DEMO_DIR/tiny-model" "[]"
run_stage task_instruct_tuning "$DEMO_DIR/pretrain/final" "['zh', 'en', 'translate', 'zh-qa-short', 'en-squad2']"
run_stage alignment_sft "$DEMO_DIR/task_instruct_tuning/final" "['mwp-zh', 'cot-en', 'others']"

echo
"$PY" -m tools.plot_metrics "$DEMO_DIR/pretrain" "$DEMO_DIR/task_instruct_tuning" "$DEMO_DIR/alignment_sft" \
    --out "$DEMO_DIR/curves.png" >/dev/null

echo
"$PY" scripts/demo_summary.py "$DEMO_DIR"

"$PY" - "$DEMO_DIR" <<'EOF'
import sys
from pathlib import Path

import torch

from llama.generation import generate
from llama.llama_model import Llama
from llama.tokenizer_files import load_tokenizer

demo = Path(sys.argv[1])
final = demo / "alignment_sft" / "final"
model = Llama.from_pretrained(final).eval()
tokenizer = load_tokenizer(final)
prompt = "Human: 请用一句话介绍北京。\nAssistant:"  # the space before an answer is the answer's (stage 3 trains it)
torch.manual_seed(0)
with torch.no_grad():
    ids = generate(model, tokenizer.encode(prompt, bos=True), max_new_tokens=40, temperature=0.7, top_p=0.9,
                   eos_id=tokenizer.eos_id)
print(f"\n== generation from {final} (a 0.5M-parameter model after {3} tiny stages: expect babble)")
print(prompt + tokenizer.decode(ids))
EOF
echo
echo "demo finished in $(( $(date +%s) - start )) s; outputs in $DEMO_DIR"
