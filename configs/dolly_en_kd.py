"""English Dolly KD: Qwen2.5-3B-Instruct -> Qwen2.5-0.5B-Instruct, forward KL, MiniLLM's setup.

Hyper-parameters follow MiniLLM's token-level KD baseline (microsoft/LMOps, minillm/finetune.py
and scripts/*/kd/*.sh, scripts/qwen2.5/sft/sft_1.5B.sh): loss = 0.5 * KD + 0.5 * cross-entropy
on the responses, global batch 32, AdamW with weight decay 0.01, gradient clipping 1.0, no
warm-up, cosine decay to ~0, 10 epochs, sequences of 512 tokens, the MiniLLM/Alpaca prompt,
1,000 validation records; Rouge-L on the test prompts sampled at temperature 1.0, top-p 1.0 with
seeds 10, 20, 30, 40, 50. MiniLLM searched the learning rate; so does this file:

    kdjax distill --config=configs/dolly_en_kd.py            # lr 1e-5
    kdjax distill --config=configs/dolly_en_kd.py:5e-5       # the text after ':' is the lr
    for lr in 5e-4 1e-4 5e-5 1e-5 5e-6; do kdjax distill --config=configs/dolly_en_kd.py:$lr; done

Each lr writes to runs/dolly_en_kd/lr<lr>. The teacher and student are hub names; point them at
local HF directories with --config.teacher=/path/to/Qwen2.5-3B-Instruct
--config.student=/path/to/Qwen2.5-0.5B-Instruct. MiniLLM fine-tunes its teachers on Dolly first:
`kdjax sft --config=configs/dolly_en_kd.py --config.out_dir=runs/dolly_en_sft`, then
`--config.teacher=runs/dolly_en_sft/sft` here.
"""
from kdjax.train_config import get_config as base_config

LR_SWEEP = ("5e-4", "1e-4", "5e-5", "1e-5", "5e-6")  # MiniLLM's grids for < 1.3B and larger models
DEFAULT_LR = "1e-5"  # MiniLLM's Qwen2.5 fine-tuning rate (scripts/qwen2.5/sft/sft_1.5B.sh)

DOLLY_RECORDS = 15011  # databricks-dolly-15k
VALID, TEST, BATCH, EPOCHS = 1000, 500, 32, 10
STEPS_PER_EPOCH = (DOLLY_RECORDS - VALID - TEST) // BATCH  # 422


def parse_lr(arg, name: str = "dolly_en_kd") -> float:
    """The learning rate from the text after ':' in --config=configs/NAME.py:LR."""
    try:
        lr = float(arg)
    except (TypeError, ValueError):
        lr = None
    if lr is None or not lr > 0:
        raise ValueError(f"--config=configs/{name}.py:{arg}: the text after ':' is the learning rate, a "
                         f"number > 0 such as configs/{name}.py:5e-5 (sweep: {', '.join(LR_SWEEP)})")
    return lr


def get_config(lr: str = DEFAULT_LR, name: str = "dolly_en_kd"):
    """name: the experiment (out_dir runs/NAME/lrLR); other configs/ files build on this one."""
    lr = parse_lr(lr, name)
    c = base_config()
    c.lock()  # a misspelt field below is an error, not a new field
    c.out_dir = f"runs/{name}/lr{lr:g}"

    c.teacher = "Qwen/Qwen2.5-3B-Instruct"  # or a local HF directory (config.json + safetensors)
    c.student = "Qwen/Qwen2.5-0.5B-Instruct"  # a checkpoint: not derived from the teacher's layers
    c.dtype = "bfloat16"  # compute; master weights and Adam moments stay float32
    c.param_dtype = "float32"
    c.attention = "auto"  # cuDNN flash attention on GPUs, kdjax's einsums on TPU / CPU

    # Hub: databricks/databricks-dolly-15k (split train). A local copy instead:
    #   --config.data.source=/data/databricks-dolly-15k.jsonl   (.jsonl, .json, .parquet, .gz)
    c.data.source = "databricks/databricks-dolly-15k"
    c.data.layout = "dolly"
    c.data.template = "minillm"
    c.data.max_length = 512  # prompt + response tokens, as MiniLLM's --max-length
    c.data.valid = VALID  # MiniLLM: --dev-num 1000
    c.data.test = TEST  # MiniLLM scores 500 held-out Dolly prompts

    # 4,220 = 10 epochs of ~13.5k records (rows over max_length are skipped, so a little more than
    # 10); --config.train.epochs=10 counts the rows actually kept instead (epochs replaces steps).
    c.train.steps = EPOCHS * STEPS_PER_EPOCH
    c.train.batch_size = BATCH  # global; per device = 32 / (data * fsdp devices) / grad_accum
    c.train.lr = lr
    c.train.warmup_steps = 0
    c.train.min_lr_ratio = 0.0  # MiniLLM: cosine to lr_min = 1e-7
    c.train.weight_decay = 0.01
    c.train.b2 = 0.999  # MiniLLM: torch AdamW's default betas (0.9, 0.999)
    c.train.clip_norm = 1.0
    c.train.seed = 10
    c.train.log_every = 10
    c.train.eval_every = STEPS_PER_EPOCH  # validation loss once an epoch
    c.train.checkpoint_every = STEPS_PER_EPOCH

    c.kd.divergence = "forward_kl"  # MiniLLM's KD baseline: soft cross-entropy to the teacher
    c.kd.temperature = 1.0
    c.kd.kd_ratio = 0.5  # MiniLLM: --kd-ratio 0.5

    # All devices of the host (or of the pod slice) hold a shard of every parameter (FSDP); the
    # batch is split over them. 32 rows need data * fsdp to divide 32: on a larger slice raise
    # train.batch_size, or set mesh.data / mesh.fsdp so that their product divides it.
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1

    c.eval.num_samples = TEST
    # MiniLLM keeps the checkpoint with the best dev Rouge-L: greedy on 100 validation prompts a
    # epoch here (the whole 1,000 every epoch would cost more than the epoch's training)
    c.train.select_best = "rougeL"
    c.minillm.max_new_tokens = 256  # `kdjax minillm` with this file: MiniLLM's 256-token generations
    c.eval.curve_samples = 100
    c.eval.max_new_tokens = 256  # MiniLLM: prompt (<= 256) + response <= 512 tokens
    c.eval.temperature = 1.0
    c.eval.top_p = 1.0
    c.eval.seeds = "10,20,30,40,50"
    return c
