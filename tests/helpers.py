"""Helpers shared by the trainer tests (no tests here)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def set_fields(c, **kw):
    """c with dotted fields set: set_fields(cfg, **{"train.lr": 0.1, "resume": True})."""
    from kdjax.train_config import override
    return override(c, kw)


def run_kdjax(*args, timeout=600):
    """`python -m kdjax ARGS` from the repository root; the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, "-m", "kdjax", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
