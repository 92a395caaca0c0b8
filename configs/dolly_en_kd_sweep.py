"""English Dolly KD (configs/dolly_en_kd.py) over MiniLLM's whole learning-rate grid in one command
that runs the Qwen2.5-3B teacher once:

    kdjax study --config=configs/dolly_en_kd_sweep.py --grid="train.lr=5e-4,1e-4,5e-5,1e-5,5e-6" --seeds=0
    kdjax teacher-cache verify runs/dolly_en_kd_sweep/teacher_cache     # what K = 64 loses

The teacher's top 64 log-probs + tail mass over every training row go to a tensorstore cache, and
the five 0.5B students learn from it with no teacher in memory (a KD step then costs 6 N_student
FLOPs a token instead of 6 N_student + 2 N_teacher). Each run lands in runs/dolly_en_kd_sweep/run-*,
the table of them all in runs/dolly_en_kd_sweep/study.md.
"""
from kdjax.train_config import sibling

dolly_en_kd = sibling(__file__, "dolly_en_kd")


def get_config():
    c = dolly_en_kd.get_config()
    c.out_dir = "runs/dolly_en_kd_sweep"
    c.kd.teacher_cache = "runs/dolly_en_kd_sweep/teacher_cache"
    c.cache.top_k = 64
    c.cache.chunk_rows = 32
    c.cache.batch_size = 8  # rows a device takes a teacher pass
    return c
