"""Distil a teacher into a student (token-level KD) and report Rouge-L before and after.

With no flags: SmolLM2-135M-Instruct (from pip) into a student of half its layers (first 8, last 7), on
docstring -> code pairs from the Python standard library, on CPU.
"""
from absl import app

from kdjax.commands import train_flags
from kdjax.commands.train_flags import run

train_flags.define_flags()
FLAG_MODULES = (train_flags,)  # --config, --resume, --overwrite, --distributed


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    run("distill")
