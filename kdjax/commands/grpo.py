"""GRPO on code problems with tests: think-format, reasoning-steps, tests-passed and length rewards.

With no flags: SmolLM2-135M-Instruct (from pip) on HumanEval problems (from pip), 10 short steps on
CPU, then greedy pass@1 / format / steps on held-out problems before and after (report.md).
--config=configs/grpo_mbpp.py is the paper's run; kdjax/training/grpo.py says what a step does.
"""

import os

import kdjax.grpo_config
from kdjax.commands.train_flags import command

main, FLAG_MODULES = command("grpo", os.path.abspath(kdjax.grpo_config.__file__))  # --config, --resume, ...
