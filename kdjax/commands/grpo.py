"""GRPO on code problems with tests: think-format, reasoning-steps, tests-passed and length rewards.

With no flags: SmolLM2-135M-Instruct (from pip) on HumanEval problems (from pip), 10 short steps on
CPU, then greedy pass@1 / format / steps on held-out problems before and after (report.md).
--config=configs/grpo_mbpp.py is the paper's run; kdjax/training/grpo.py says what a step does.
"""
import os

from absl import app

import kdjax.grpo_config
from kdjax.commands import train_flags
from kdjax.commands.train_flags import run

train_flags.define_flags(os.path.abspath(kdjax.grpo_config.__file__))
FLAG_MODULES = (train_flags,)  # --config, --resume, --overwrite, --distributed


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    run("grpo")
