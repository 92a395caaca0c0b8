"""Supervised fine-tuning of the teacher on the data (the paper's first step), with a report."""
from absl import app

from kdjax.commands import _training
from kdjax.commands._training import run

_training.define_flags()
FLAG_MODULES = (_training,)  # --config, --resume


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    run("sft")
