"""The paper's learning-rate sweep on the default job, from one teacher cache: one command.

    kdjax study --config=configs/default_lr_sweep.py --grid="train.lr=5e-4,1e-4,5e-5" --seeds=0

The default job's teacher (SmolLM2-135M-Instruct, fine-tuned 60 steps first) runs once over the training rows and its top 64 log-probs +
tail mass go to a tensorstore cache (kdjax/training/teacher_cache.py); each learning rate then
trains from it with no teacher in memory, in runs/default_lr_sweep/run-*, and
runs/default_lr_sweep/study.md tabulates them (Rouge-L, test loss, time a run) with the cache's
build time. The grid is MiniLLM's for students under 1.3B; --seeds=0,1,2 gives each lr's spread.
--config.kd.teacher_cache= runs the same sweep with the live teacher. Measured in docs/teacher_cache.md.
The cache holds the teacher's outputs, not its layers' states, so the default job's intermediate-state
term (kd.hidden_weight) is off here: the sweep is KD on the outputs alone.
"""
from kdjax.distill_config import get_config as base_config


def get_config():
    c = base_config()
    c.lock()  # a misspelt field below is an error, not a new field
    c.out_dir = "runs/default_lr_sweep"
    c.kd.teacher_cache = "runs/default_lr_sweep/teacher_cache"
    c.cache.top_k = 64
    c.kd.hidden_weight = 0.0
    return c
