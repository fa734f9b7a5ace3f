"""Stage 2: stage-1 data mixed 1:1 with task data, each task record wrapped in a random prompt.

Plain constants, no logic. Override any of them on the command line:
    torchrun --standalone --nproc_per_node=8 task_instruct_tuning_main.py lr=1e-5
"""

# ---------------------------------------------------------------- model
init_model_path = "outputs/pretrain/final"  # stage 1's final model
tokenizer_path = ""  # a tokenizer.model or tokenizer.json; empty: <init_model_path>/tokenizer.model, else tokenizer.json
eos_token = ""  # ends every document and answer; empty: the tokenizer's eos. Llama-3 Instruct: "<|end_of_text|>", not <|eot_id|>
dropout_prob = 0.05  # BiLLa's dropout after attention and after the FFN
gradient_checkpointing = "full"  # the recipe's: every block recomputed in backward (~30% slower), fits batch 20 x 1024 on 32 GB; "selective" (every other block) or "none" where activations fit (80 GB GPUs)
compile = True  # torch.compile each block on CUDA (fused kernels; the first steps compile); not under gemini (its hooks do not trace); False: eager

# ---------------------------------------------------------------- data
pretrain_data_root_dir = "pretraining_corpora"  # holds one folder per set: <set>/<NNNNN>.jsonl
pretrain_data_split = {  # set: weight and first file number; LM 10 : tasks 10 = the recipe's 1:1 mix
    "zh": {"weight": 4, "file_start": 10017},  # WuDao; the recipe's: text stage 1 (files 10001-10016) never saw
    "en": {"weight": 4, "file_start": 10041},  # Pile-CC and Github; the recipe's: stage 1 read 10001-10040
    "translate": {"weight": 2, "file_start": 10009},  # WMT, prompt after the source; stage 1 read 10001-10008
    "zh-qa-long": {"weight": 1, "file_start": 10001},  # WebQA (Baidu); task sets start at the first file
    "zh-qa-short": {"weight": 1, "file_start": 10001},  # CMRC2018, DuReader
    "zh-reasoning": {"weight": 1, "file_start": 10001},  # Ape210k, Math23k, COIG leetcode
    "zh-summary": {"weight": 1, "file_start": 10001},  # CNewsSum
    "en-hotpotqa": {"weight": 1, "file_start": 10001},  # HotpotQA
    "en-reasoning": {"weight": 1, "file_start": 10001},  # MathQA, HotpotQA rationales, CodeAlpaca, WikiHow steps
    "en-squad2": {"weight": 1, "file_start": 10001},  # SQuAD 2.0
    "en-summary": {"weight": 1, "file_start": 10001},  # CNN/DM
    "en-summary-dialogue": {"weight": 1, "file_start": 10001},  # SamSum, MediaSum
    "en-wikihow": {"weight": 1, "file_start": 10001},  # WikiHow
}
max_seq_length = 1024  # tokens per sample, bos and eos included
batch_size = 20  # samples per GPU (the most, under global_batch_size): 20 x 8 GPUs x 1024 tokens = 163,840 tokens/step
long_text = "split"  # "split": a long document becomes several samples; "truncate": the recipe's cut-off
long_prompt = "middle"  # too long: the input's middle goes, question and answer stay; "recipe": the original's end cut
packing = False  # True: pack samples into rows of max_seq_length (20 x 1024 = 20,480 tokens per GPU)
skip_bad_records = False  # True: count, log and skip bad records instead of stopping
accept_changed_files = False  # resume: a corpus file changed since the checkpoint stops the run; True reads that file again from its start
seed = 42  # data order, prompts and masks; each rank derives its own stream from it

# ---------------------------------------------------------------- optimisation
lr = 2e-5  # peak learning rate
min_lr = 2e-6  # cosine floor: 0.1 x lr
warmup_steps = 2000  # linear warmup: 2,000 of 20,000 steps = 10%
max_steps = 20_000  # 20,000 steps x 163,840 tokens = 3.3B tokens
global_batch_size = 160  # samples per optimizer step: the recipe's 20 x 8 GPUs; 6 GPUs: nearest, 13 x 6 x 2 = 156; 0: off
global_batch_exact = False  # True: stop where batch_size x GPUs x accumulation cannot make global_batch_size; False: nearest
gradient_accumulation_steps = 1  # micro-batches per optimizer step; derived instead when global_batch_size > 0
weight_decay = 0.1  # AdamW decoupled weight decay
weight_decay_skip = False  # True: norms, biases, embeddings get no decay; False: all decay, the recipe's
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
output_dir = "outputs/task_instruct_tuning"  # checkpoints: ckpt_step-<step>_loss-<loss>/, and final/ at the end
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
eval_steps = 500  # and at step 0 and at the end: 500 x 163,840 tokens = every 82M tokens; 41 evaluations
eval_samples_per_set = 256  # first 256 samples of each set, shared by the ranks: 32 per GPU on 8 GPUs = 2 batches of 20
