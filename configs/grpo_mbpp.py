"""GRPO on MBPP: the distilled Qwen2.5-0.5B student learns to think (<think>...</think>) before it
writes code that passes the problem's tests (the paper's chain-of-thought RL step).

    kdjax grpo --config=configs/grpo_mbpp.py --config.student=runs/dolly_en_kd/student

Rewards (kdjax/training/rewards.py): think format 1.0, reasoning steps 0.5, fraction of tests passed 2.0,
length 0.5 (open-r1's len_reward); advantages within G = 8 completions a prompt; KL to the start
model beta = 0.04 (DeepSeekMath); lr 1e-6 constant, as open-r1's GRPO recipes. 500 held-out
problems score pass@1 before and after.

MBPP from a local copy (974 problems with asserts, e.g. ../shared/data/mbpp.jsonl) or the hub:
    --config.data.source=/path/mbpp.jsonl      (default: google-research-datasets/mbpp)
"""
from kdjax.grpo_config import get_config as grpo_config


def get_config():
    c = grpo_config()
    c.out_dir = "runs/grpo_mbpp"
    c.teacher = "Qwen/Qwen2.5-0.5B-Instruct"  # used when --config.student (the KD student) is not given
    c.student = ""
    c.dtype = "bfloat16"  # compute; master weights and AdamW moments float32
    c.param_dtype = "float32"
    c.attention = "auto"

    c.data.source = "google-research-datasets/mbpp"
    c.data.layout = "mbpp"
    c.data.max_length = 512
    c.data.test = 500

    c.train.steps = 1000
    c.train.batch_size = 16  # prompts a step: 16 x 8 = 128 completions
    c.train.lr = 1e-6
    c.train.warmup_steps = 0
    c.train.min_lr_ratio = 1.0
    c.train.log_every = 5
    c.train.checkpoint_every = 100

    c.eval.num_samples = 500
    c.eval.batch_size = 64

    c.grpo.num_generations = 8
    c.grpo.max_new_tokens = 512
    c.grpo.temperature = 0.9
    c.grpo.beta = 0.04
    return c
