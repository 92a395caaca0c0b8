"""On-policy distillation (GKD): a share --config.gkd.lmbda of the batches has responses sampled from
the student, scored by the teacher over the whole vocabulary (--config.kd.divergence, e.g.
generalized_jsd with --config.kd.beta); the rest are the data's. No flags: the default job's
models and data. The report is `kdjax distill`'s; kdjax/training/gkd.py says what a step does.
"""

from kdjax.commands.train_flags import command

main, FLAG_MODULES = command("gkd")  # --config, --resume, --overwrite, --distributed
