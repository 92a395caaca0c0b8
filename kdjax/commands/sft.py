"""Supervised fine-tuning of the teacher on the data (the paper's first step), with a report."""
from absl import app

from kdjax.commands import train_flags
from kdjax.commands.train_flags import run

train_flags.define_flags()
FLAG_MODULES = (train_flags,)  # --config, --resume, --overwrite, --distributed


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    run("sft")
