"""The paper's learning-rate sweep on the default job, from one teacher cache: one command.

The teacher (SmolLM2-135M-Instruct) runs once over the training rows the runs read and its top 64
log-probs + tail mass go to a tensorstore cache (kdjax/training/teacher_cache.py); then one KD run
a learning rate reads it, with no teacher in memory, each in runs/default_lr_sweep/lr<lr>, and
runs/default_lr_sweep/sweep.md tabulates them (Rouge-L, validation loss, retention, time). The
grid is MiniLLM's for students under 1.3B. Measured in docs/teacher_cache.md.

    kdjax distill --config=configs/default_lr_sweep.py
    kdjax distill --config=configs/default_lr_sweep.py --config.kd.teacher_cache=   # the live teacher instead
"""
from kdjax.train_config import get_config as base_config


def get_config():
    c = base_config()
    c.lock()  # a misspelt field below is an error, not a new field
    c.out_dir = "runs/default_lr_sweep"
    c.sweep.lr = "5e-4,1e-4,5e-5"  # MiniLLM's grid for students under 1.3B; the default job's lr is 5e-4
    c.kd.teacher_cache = "runs/default_lr_sweep/teacher_cache"
    c.cache.top_k = 64
    return c
