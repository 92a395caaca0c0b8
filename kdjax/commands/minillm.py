"""MiniLLM: distil on the student's own samples, minimising the sequence-level reverse KL.

Takes the distillation configs (--config=configs/NAME.py; no flags: the default job's models and
data, with MiniLLM's loss); --config.minillm.alpha and .max_new_tokens tune the sampling.
kdjax/training/minillm.py says what a step computes. The report is `kdjax distill`'s.
"""

from kdjax.commands.train_flags import command

main, FLAG_MODULES = command("minillm")  # --config, --resume, --overwrite, --distributed
