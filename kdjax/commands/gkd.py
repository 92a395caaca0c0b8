"""On-policy distillation (GKD): a share --config.gkd.lmbda of the batches has responses sampled from
the student, scored by the teacher over the whole vocabulary (--config.kd.divergence, e.g.
generalized_jsd with --config.kd.beta); the rest are the data's. No flags: the default job's
models and data. The report is `kdjax distill`'s; kdjax/training/gkd.py says what a step does.
"""
from absl import app

from kdjax.commands import train_flags
from kdjax.commands.train_flags import run

train_flags.define_flags()
FLAG_MODULES = (train_flags,)  # --config, --resume, --overwrite, --distributed


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    run("gkd")
