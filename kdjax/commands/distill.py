"""Distil a teacher into a student (token-level KD) beside the same student fine-tuned alone (the SFT
baseline KD must beat), and report Rouge-L of them all.

With no flags: SmolLM2-135M-Instruct (from pip) into a student of half its layers (first 8, last 7), on
docstring -> code pairs from the Python standard library, on CPU.
"""

from kdjax.commands.train_flags import command

main, FLAG_MODULES = command("distill")  # --config, --resume, --overwrite, --distributed
