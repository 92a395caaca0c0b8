"""BugNet KD on code: Qwen2.5-1.5B-Instruct -> Qwen2.5-0.5B-Instruct, forward KL.

The recipe of dolly_en_kd.py (0.5 KD + 0.5 cross-entropy, batch 32, AdamW, cosine, bf16, FSDP
mesh, the same lr argument) on buggy -> fixed Python programs, prompted with the models' own
chat template, 1,024-token rows, greedy decoding for the Rouge-L report:

    kdjax distill --config=configs/bugnet_kd.py                # lr 1e-5
    kdjax distill --config=configs/bugnet_kd.py:5e-5
"""
from kdjax.train_config import sibling

dolly_en_kd = sibling(__file__, "dolly_en_kd")
DEFAULT_LR = dolly_en_kd.DEFAULT_LR


def get_config(lr: str = DEFAULT_LR, name: str = "bugnet_kd"):
    c = dolly_en_kd.get_config(lr, name=name)
    c.teacher = "Qwen/Qwen2.5-1.5B-Instruct"  # or a local HF directory
    c.student = "Qwen/Qwen2.5-0.5B-Instruct"

    # Hub: alexjercan/bugnet, config "Python", split train (the layout's defaults). A local copy
    # (columns fail, pass, error, stderr, description): --config.data.source=/data/bugnet.jsonl
    c.data.source = "alexjercan/bugnet"
    c.data.layout = "bugnet"
    c.data.template = "chat"  # Qwen's chat template: the teachers are instruct models
    c.data.max_length = 1024  # longer rows (problem + buggy program + fix) are skipped
    c.data.valid = 500
    c.data.test = 500

    # 3,000 steps; --config.train.epochs=E instead trains E passes over the train rows.
    c.train.steps = 3000
    c.train.grad_accum = 2  # 2 micro-batches of 16 x 1,024 tokens (one 80 GB GPU); 1 on a pod slice
    c.train.eval_every = 500
    c.train.checkpoint_every = 500

    c.eval.num_samples = 500
    c.eval.max_new_tokens = 512
    c.eval.temperature = 0.0  # greedy: one deterministic answer per program
    c.eval.top_p = 1.0
    c.eval.seeds = "10"
    return c
