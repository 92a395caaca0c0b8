"""The training config every experiment overrides, and the default job of `kdjax distill`.

Every field of every trainer is declared here, once, with a default that works (GRPO's fields
too: kdjax/grpo_config.py is only GRPO's default job). The config comes back locked, so a
misspelt field set in a config file is an error that names it, not a new field. Files under
configs/ import `get_config()` from here and change what differs. The default:
SmolLM2-135M-Instruct (from pip) distilled into a student made of half its layers (the first 8 and the last 7), on
docstring -> code pairs extracted from the Python standard library, small enough for a 2-core CPU.
"""
import importlib.util
import os

import ml_collections


def sibling(config_file: str, name: str):
    """configs/NAME.py beside `config_file` as a module: config files are loaded by path (configs/ is
    no package), and one builds on another, e.g. `dolly_en_kd = sibling(__file__, "dolly_en_kd")`."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"kdjax_configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GRPO_SYSTEM_PROMPT = (
    "You are a careful Python programmer. First think about the problem step by step inside "
    "<think> and </think> (Step 1:, Step 2:, ...). Then give the complete solution in one ```python "
    "code block, with the function names the problem uses.")


def override(cfg: ml_collections.ConfigDict, fields: dict) -> ml_collections.ConfigDict:
    """cfg with dotted fields set in place: override(cfg, {"train.lr": 1e-4, "kd.kd_ratio": 0.5})."""
    for key, value in fields.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "distill"  # "distill", "gkd", "minillm" (teacher -> student), "sft" (fine-tune `teacher`), "grpo", "qad"; set by the command
    c.out_dir = "runs/default"
    c.resume = False  # continue from the latest checkpoint in out_dir

    c.teacher = "smollm2-135m-instruct"  # HF dir, .gguf, kdjax checkpoint or preset
    c.student = ""  # a checkpoint; empty = derive from the teacher's layers
    c.student_layers = "first_last:15"  # "every_other", "first_last:N" or a comma list of teacher layer indices
    c.dtype = "float32"  # compute dtype: float32 or bfloat16
    c.param_dtype = "float32"  # master weights
    c.teacher_param_dtype = ""  # the KD teacher's weights (no gradients); "" = the compute dtype
    c.remat = False  # recompute each decoder layer in the backward pass (memory for time)
    c.remat_policy = "nothing_saveable"  # or "dots_with_no_batch_dims_saveable": keep the projections
    c.attention = "xla"  # "xla" (any backend), "cudnn" (fused flash attention, GPU, bf16), "auto", "jax"

    c.data = ml_collections.ConfigDict()
    c.data.source = ""  # a local .jsonl/.json/.parquet file or a hub dataset name; "" = stdlib pairs
    c.data.layout = "pytorrent"  # see kdjax.data.LAYOUTS
    c.data.stdlib_pairs = 1200  # docstring -> code pairs from the standard library when source is ""
    c.data.max_length = 128
    c.data.template = "minillm"  # "minillm", "chat" or "plain"
    c.data.valid = 64
    c.data.test = 48
    c.data.seed = 1234
    c.data.limit = 0  # use at most this many records (0 = all)
    c.data.packing = False  # pack several sequences a row (each attends only inside its own segment)
    # lay each step's sequences end to end in as few rows as hold them, each its own segment: the same
    # sequences and loss a step, less padding (the row count varies by step: a compile for each count)
    c.data.repack = False

    c.train = ml_collections.ConfigDict()
    c.train.steps = 60
    c.train.epochs = 0.0  # > 0: passes over the train rows instead, steps = ceil(epochs * rows / batch_size)
    c.train.batch_size = 4  # rows per optimizer step (global)
    c.train.grad_accum = 1  # micro-batches per step
    c.train.lr = 5e-4
    c.train.warmup_steps = 10
    c.train.min_lr_ratio = 0.1
    c.train.weight_decay = 0.01
    c.train.b1 = 0.9  # AdamW
    c.train.b2 = 0.95
    c.train.eps = 1e-8
    c.train.clip_norm = 1.0
    c.train.seed = 0
    c.train.log_every = 5
    c.train.eval_every = 30  # validation loss every N steps (0 = only at the end)
    # "" = the model of the last step; "rougeL" / "val_loss": the best at the validation evals
    # (kept in out_dir/best; the report, the exported model and `kdjax eval` then use that one)
    c.train.select_best = ""
    c.train.checkpoint_every = 20
    c.train.keep_checkpoints = 2
    c.train.check_finite = True  # stop at the first inf/NaN loss, gradient or weight (keeps the last good checkpoint)

    # The paper's recipe (kdjax distill / gkd / minillm): the teacher is first fine-tuned on the data
    # (teacher_sft.steps > 0), and the same student fine-tuned on the data alone is trained beside
    # the KD student (baseline) so the report shows the number KD must beat.
    c.teacher_sft = ml_collections.ConfigDict()
    c.teacher_sft.steps = 0  # 0 = distil from the teacher as it is
    c.teacher_sft.lr = 5e-4
    c.baseline = True  # train and report the SFT baseline (same student, rows, steps, lr; no teacher)

    c.kd = ml_collections.ConfigDict()
    c.kd.divergence = "forward_kl"  # forward_kl, reverse_kl, generalized_jsd, skew_kl, skew_reverse_kl, total_variation
    c.kd.temperature = 1.0
    c.kd.kd_ratio = 1.0  # loss = kd_ratio * divergence + (1 - kd_ratio) * cross-entropy
    c.kd.beta = 0.5
    c.kd.alpha = 0.1
    c.kd.chunk_size = 512
    # + this x the relative squared error of each student layer's residual stream to its teacher layer's
    # (the student made of the teacher's student_layers; live teacher only): Minitron's intermediate-state KD
    c.kd.hidden_weight = 0.0
    # sequence-level KD (kdjax distill): the student learns the teacher's distribution on the teacher's own
    # greedy answers to the data's prompts (generated once a run) instead of on the data's responses
    c.kd.teacher_answers = False
    c.kd.answer_tokens = 64  # new tokens an answer, at most (and at most what data.max_length leaves)
    c.kd.answer_share = 1.0  # of each step's rows, this share (rounded) on the teacher's answers, the rest on the data's
    # a store of `kdjax teacher-cache` (kdjax/training/teacher_cache.py): KD from the teacher's cached top-K
    # log-probs + tail mass, no teacher in memory; the pipeline builds it there first when it is missing
    c.kd.teacher_cache = ""

    c.cache = ml_collections.ConfigDict()  # `kdjax teacher-cache`: what the teacher cache stores
    c.cache.top_k = 64  # the teacher's K most likely tokens a position (ids int32 + log-probs)
    c.cache.samples = 0  # + tokens drawn from the teacher (beyond the top K: from its tail), unbiased
    c.cache.dtype = "bfloat16"  # the stored log-probs: bfloat16, float16 or float32
    c.cache.rows = "run"  # "run": the rows train.steps batches read; "all": every training row
    c.cache.chunk_rows = 16  # rows a stored chunk: the unit written atomically and resumed from
    c.cache.batch_size = 4  # rows a device takes a teacher pass
    c.cache.seed = 0  # of the sampled tokens
    # the shape of the tail: coefficients a token whose product with an [r, V] basis fitted to the teacher's
    # logits spreads the tail mass over the other tokens (tail_rank 0: one tail bucket). At most tail_rank
    # directions (the teacher's hidden size bounds them), packed into tail_bytes bytes a token, each direction
    # with its own bit width by its variance (0 bytes: tail_rank numbers in cache.dtype, unquantized).
    # docs/teacher_cache.md: KL(full || cached) at K = 64 on the default job's teacher: one bucket 0.18,
    # rank 64 in bf16 (128 B) 0.032, 128 packed bytes (541 directions) 0.008
    c.cache.tail_rank = 4096
    c.cache.tail_bytes = 128

    c.minillm = ml_collections.ConfigDict()  # `kdjax minillm` (kdjax/training/minillm.py)
    c.minillm.alpha = 0.2  # the teacher's share of the sampling distribution (MiniLLM's mix)
    c.minillm.max_new_tokens = 64  # tokens sampled a prompt
    c.minillm.ce_weight = 1.0  # + this x cross-entropy on the data's responses (MiniLLM adds an LM loss)

    c.gkd = ml_collections.ConfigDict()  # `kdjax gkd` (kdjax/training/gkd.py): on-policy KD, as TRL's GKDTrainer
    c.gkd.lmbda = 0.5  # the share of batches whose responses the student samples (the rest: the data's)
    c.gkd.temperature = 0.9  # sampling temperature of the student's responses
    c.gkd.max_new_tokens = 64  # tokens sampled a prompt (cut to fit data.max_length)

    c.grpo = ml_collections.ConfigDict()  # `kdjax grpo` (kdjax/training/grpo.py)
    c.grpo.num_generations = 4  # G completions a prompt
    c.grpo.max_new_tokens = 128
    c.grpo.temperature = 0.9
    c.grpo.top_p = 1.0
    c.grpo.beta = 0.04  # KL to the starting model (DeepSeekMath / TRL); 0 drops the reference model
    c.grpo.test_timeout = 5.0  # seconds per test in the sandbox
    c.grpo.system = GRPO_SYSTEM_PROMPT
    c.grpo.weights = ml_collections.ConfigDict(dict(format=1.0, steps=0.5, tests=2.0, length=0.5))

    # int4 (kdjax/training/qad.py): `kdjax qad` quantizes a model with quantization-aware distillation
    # (QAD: KD's step on the GPTQ int4 grid); in kdjax distill / gkd / minillm these fields add a QAD
    # stage after KD (aware) and the student's int4 rows to the report (report).
    c.quant = ml_collections.ConfigDict()
    c.quant.aware = False  # distill/gkd/minillm: QAD of the KD student after KD (out_dir/qad, quant.steps, quant.lr)
    c.quant.report = False  # distill/gkd/minillm: rows of the student in int4: after GPTQ, and after QAD with aware
    c.quant.start = "gptq"  # the int4 grid and codes QAD starts from: "gptq" or "rtn"
    c.quant.bits = 4
    c.quant.group_size = 64  # input rows per scale/zero group (-1 = one); 64 divides SmolLM2 (576) and Qwen2.5 (896)
    c.quant.sym = True  # symmetric grid (zero point 2**(bits-1)); False: a zero point per group
    c.quant.desc_act = True  # GPTQ act-order (groups follow the Hessian's diagonal, g_idx in the checkpoint)
    c.quant.damp_percent = 0.01  # GPTQ dampening, a fraction of the mean Hessian diagonal
    c.quant.mse = -1.0  # range search, gptqmodel's `mse`: -1 = 2.4 for GPTQ, 0 for RTN; 0 = off (docs/quantization.md)
    c.quant.calib_samples = 128  # GPTQ calibration rows from the train split
    c.quant.calib_length = 256  # tokens per calibration row
    c.quant.train_weights = False  # the latent weights learn, in grid coordinates: their codes move
    c.quant.train_scales = True  # the scales (and asymmetric zero points) learn; without weights: the codes stay
    # (scales alone, EfficientQAT's end-to-end step, are the default: 120 steps took GPTQ's perplexity gap from
    # +4.1% to +1.7% on the default job's student and from +5.7% to +3.0% on SmolLM2; docs/quantization.md)
    c.quant.train_norms = False  # the RMSNorm scales learn too (on SmolLM2 that made GPTQ worse: docs/quantization.md)
    c.quant.teacher = "self"  # "self": the float model being quantized teaches; "teacher": `teacher` does
    c.quant.steps = 120  # the QAD stage of distill/gkd/minillm (`kdjax qad` itself uses train.steps, train.lr)
    c.quant.lr = 0.002  # QAD's lr: a relative change (scales) / a share of a grid step (weights) per update
    c.quant.float_dtype = "float16"  # tensors that stay float in the GPTQ checkpoint (embeddings, norms, head)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.num_devices = 0  # use only the first N devices (0 = all)

    c.eval = ml_collections.ConfigDict()
    c.eval.num_samples = 32  # test prompts scored with Rouge-L (0 = skip)
    c.eval.max_new_tokens = 64
    c.eval.temperature = 0.0  # 0 = greedy; MiniLLM samples at 1.0 with several seeds
    c.eval.top_p = 1.0
    c.eval.seeds = "10"
    c.eval.batch_size = 16
    c.eval.curve_samples = 8  # greedy Rouge-L on this many validation prompts every eval_every steps
    c.eval.before = True  # also score the teacher and the untrained student
    c.lock()
    return c
