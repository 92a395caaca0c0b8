"""Distil a teacher into a student (token-level KD) and report Rouge-L before and after.

With no flags: SmolLM2-135M-Instruct (from pip) into a student of half its layers (first 8, last 7), on
docstring -> code pairs from the Python standard library, on CPU.
"""
from absl import app

from kdjax.commands import _training
from kdjax.commands._training import run

_training.define_flags()
FLAG_MODULES = (_training,)  # --config, --resume


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    run("distill")
