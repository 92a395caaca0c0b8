"""MiniLLM: distil on the student's own samples, minimising the sequence-level reverse KL.

Takes the distillation configs (--config=configs/NAME.py; no flags: the default job's models and
data, with MiniLLM's loss); --config.minillm.alpha and .max_new_tokens tune the sampling.
kdjax/training/minillm.py says what a step computes. The report is `kdjax distill`'s.
"""
from absl import app

from kdjax.commands import train_flags
from kdjax.commands.train_flags import run

train_flags.define_flags()
FLAG_MODULES = (train_flags,)  # --config, --resume, --overwrite, --distributed


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    run("minillm")
