"""Stage 1: continued LM pretraining on Chinese and English text plus translation pairs.

Plain constants, no logic. Override any of them on the command line:
    torchrun --standalone --nproc_per_node=8 pretrain_main.py lr=1e-5 batch_size=16
"""

# ---------------------------------------------------------------- model
init_model_path = "models/llama-7b-zh"  # this repo's model dir or a transformers LLaMA dir (converted on load)
tokenizer_path = ""  # a tokenizer.model or tokenizer.json; empty: <init_model_path>/tokenizer.model, else tokenizer.json
eos_token = ""  # ends every document and answer; empty: the tokenizer's eos. Llama-3 Instruct: "<|end_of_text|>", not <|eot_id|>
dropout_prob = 0.05  # BiLLa's dropout after attention and after the FFN
gradient_checkpointing = "full"  # the recipe's: every block recomputed in backward (~30% slower), fits batch 20 x 1024 on 32 GB; "selective" (every other block) or "none" where activations fit (80 GB GPUs)
compile = True  # torch.compile each block on CUDA (fused kernels; the first steps compile); not under gemini (its hooks do not trace); False: eager

# ---------------------------------------------------------------- data
pretrain_data_root_dir = "pretraining_corpora"  # holds one folder per set: <set>/<NNNNN>.jsonl
pretrain_data_split = {  # set: weight, files file_start <= n < file_stop; every 10 samples: 4 zh, 4 en, 2 translate
    "zh": {"weight": 4, "file_start": 0, "file_stop": 10017},  # WuDao; 10017 on: stage 2's (no file_stop: the recipe)
    "en": {"weight": 4, "file_start": 0, "file_stop": 10041},  # Pile-CC and Github; 10041 on: stage 2's
    "translate": {"weight": 2, "file_start": 0, "file_stop": 10009},  # WMT; 10009 on: stage 2's
}
max_seq_length = 1024  # tokens per sample, bos and eos included
batch_size = 20  # samples per GPU (the most, under global_batch_size): 20 x 8 GPUs x 1024 tokens = 163,840 tokens/step
long_text = "split"  # "split": a long document becomes several samples; "truncate": the recipe's cut-off
long_prompt = "middle"  # too-long translation: source whole, target's end cut, as the recipe; "recipe": the same here
packing = False  # True: pack samples into rows of max_seq_length (20 x 1024 = 20,480 tokens per GPU)
skip_bad_records = False  # True: count, log and skip bad records instead of stopping
accept_changed_files = False  # resume: a corpus file changed since the checkpoint stops the run; True reads that file again from its start
seed = 42  # data order and masks; each rank derives its own stream from it

# ---------------------------------------------------------------- optimisation
lr = 3e-5  # peak learning rate
min_lr = 3e-6  # cosine floor: 0.1 x lr
warmup_steps = 2000  # linear warmup: 2,000 of 100,000 steps = 2%
max_steps = 100_000  # 100,000 steps x 163,840 tokens = 16.4B tokens
global_batch_size = 160  # samples per optimizer step: the recipe's 20 x 8 GPUs; 6 GPUs: nearest, 13 x 6 x 2 = 156; 0: off
global_batch_exact = False  # True: stop where batch_size x GPUs x accumulation cannot make global_batch_size; False: nearest
gradient_accumulation_steps = 1  # micro-batches per optimizer step; derived instead when global_batch_size > 0
weight_decay = 0.1  # AdamW decoupled weight decay
weight_decay_skip = False  # True: norms, biases, embeddings get no decay; False: all decay, the recipe's
new_rows_only = False  # True: a warm-up run before stage 1: only the rows tools.expand_vocab added train, the rest frozen, no decay (training/new_rows.py); False: every weight, the recipe
adam_beta1 = 0.9  # AdamW beta1
adam_beta2 = 0.95  # AdamW beta2
max_grad_norm = 2.0  # clip the global gradient norm to this
precision = "fp16"  # "fp16" (V100, dynamic loss scale), "bf16" (A100/H100) or "fp32"
initial_loss_scale = 16384  # 2**14, fp16 only
max_bad_steps = 50  # stop after this many consecutive non-finite losses

# ---------------------------------------------------------------- engine
plugin = "gemini"  # "gemini" (ZeRO-3 chunks, as the recipe; HybridAdam: needs nvcc), "zero2" or "ddp" (fp32 weights, grads and Adam on each GPU: (4+4+8) bytes x 7e9 = 112 GB, no 7B on one GPU); CPU-only machines use "ddp"
zero2_cpu_offload = False  # zero2 only: keep optimizer states in CPU memory
gemini_placement_policy = "static"  # gemini only: "static": fixed placement set by the next two lines; "auto": chunks move with free GPU memory
gemini_offload_optim_frac = 1.0  # gemini static only: 1.0 = all Adam states in CPU memory, the recipe's CPU placement
gemini_offload_param_frac = 0.0  # 0.0 = params on GPU, faster; 1.0 = in CPU memory as the recipe (needs optim frac 1.0)

# ---------------------------------------------------------------- logging and checkpoints
output_dir = "outputs/pretrain"  # checkpoints: ckpt_step-<step>_loss-<loss>/, and final/ at the end
logdir = ""  # log.txt.<rank>, metrics.jsonl and TensorBoard events; empty: <output_dir>/logs
logging_steps = 10  # log every 10 optimizer steps
preview_samples = True  # rank 0 logs the first sample of each set at start, its counted tokens between ⟦ ⟧; False: none
peak_tflops_per_gpu = 0.0  # MFU denominator; 0: look the GPU up by name (V100 125, A100 312, H100 989 dense fp16/bf16)
saving_steps = 1000  # checkpoint every 1,000 steps = every 164M tokens
saving_minutes = 0.0  # also checkpoint every this many minutes of training (0: saving_steps only); e.g. 60 = at most an hour lost
keep_checkpoints = 3  # delete older step checkpoints beyond the newest 3
recover_training_from_checkpoint = ""  # "": fresh start; "latest": newest in output_dir; or a checkpoint path
stop_grace_seconds = 25.0  # SIGTERM/SIGINT: save only if the last save took at most the grace left; 25 = torchrun's 30 s before SIGKILL - 5 s to exit

# ---------------------------------------------------------------- held-out evaluation
eval_data_root_dir = ""  # held-out <set>/<NNNNN>.jsonl files; empty: no evaluation; "heldout_corpora": the bundled ones
eval_sets = []  # sets to score, each a folder of eval_data_root_dir; empty: the sets of pretrain_data_split
eval_steps = 500  # and at step 0 and at the end: 500 x 163,840 tokens = every 82M tokens; 201 evaluations
eval_samples_per_set = 256  # first 256 samples of each set, shared by the ranks: 32 per GPU on 8 GPUs = 2 batches of 20
