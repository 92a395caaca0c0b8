"""Distil a teacher into a student (token-level KD) beside the same student fine-tuned alone (the SFT
baseline KD must beat), and report Rouge-L of them all.

With no flags, the default job (kdjax/distill_config.py): SmolLM2-135M-Instruct (from pip) fine-tuned on
docstring -> code pairs from the Python standard library, then distilled into a student of half its layers
(first 8, last 7), on CPU.
"""

import os

import kdjax.distill_config
from kdjax.commands.train_flags import command

main, FLAG_MODULES = command("distill", os.path.abspath(kdjax.distill_config.__file__))  # --config, --resume, ...
