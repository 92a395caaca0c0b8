"""Supervised fine-tuning of the teacher on the data (the paper's first step), with a report."""

from kdjax.commands.train_flags import command

main, FLAG_MODULES = command("sft")  # --config, --resume, --overwrite, --distributed
