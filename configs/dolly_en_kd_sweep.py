"""English Dolly KD (configs/dolly_en_kd.py) over MiniLLM's whole learning-rate grid, in one command
that runs the Qwen2.5-3B teacher once: its top 64 log-probs + tail mass over the training rows go
to a tensorstore cache, and the five 0.5B students learn from it with no teacher in memory (a KD
step then costs 6 N_student FLOPs a token instead of 6 N_student + 2 N_teacher). Each run lands in
runs/dolly_en_kd_sweep/lr<lr>, the table of them all in runs/dolly_en_kd_sweep/sweep.md.

    kdjax distill --config=configs/dolly_en_kd_sweep.py
    kdjax teacher-cache verify runs/dolly_en_kd_sweep/teacher_cache     # what K = 64 loses
"""
from kdjax.train_config import sibling

dolly_en_kd = sibling(__file__, "dolly_en_kd")


def get_config():
    c = dolly_en_kd.get_config()
    c.out_dir = "runs/dolly_en_kd_sweep"
    c.sweep.lr = ",".join(dolly_en_kd.LR_SWEEP)
    c.kd.teacher_cache = "runs/dolly_en_kd_sweep/teacher_cache"
    c.cache.top_k = 64
    c.cache.rows = "all"  # 10 epochs read every row
    c.cache.chunk_rows = 32
    c.cache.batch_size = 8  # rows a device takes a teacher pass
    return c
