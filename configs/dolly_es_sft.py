"""Spanish Dolly SFT: fine-tune the teacher (the paper's first step) or, as the baseline that KD
must beat, the student, on the responses alone. Run with `kdjax sft` (the command sets the mode):

    kdjax sft --config=configs/dolly_es_sft.py                 # Qwen2.5-3B-Instruct -> runs/dolly_es_sft
    kdjax sft --config=configs/dolly_es_sft.py:student         # Qwen2.5-0.5B-Instruct -> runs/dolly_es_sft_student
    kdjax sft --config=configs/dolly_es_sft.py:student,5e-5    # MODEL,LR

Everything else is dolly_es_kd.py (data, batch, epochs, schedule, evaluation), so the runs differ
only in what they learn from. MiniLLM fine-tunes Qwen2.5 at lr 1e-5 (scripts/qwen2.5/sft/sft_1.5B.sh).
"""
from kdjax.train_config import sibling

dolly_en_kd = sibling(__file__, "dolly_en_kd")
dolly_es_kd = sibling(__file__, "dolly_es_kd")

MODELS = {"teacher": "Qwen/Qwen2.5-3B-Instruct", "student": "Qwen/Qwen2.5-0.5B-Instruct"}


def get_config(arg: str = "teacher"):
    which, comma, lr = str(arg).partition(",")
    try:
        lr = dolly_en_kd.parse_lr(lr) if comma else float(dolly_en_kd.DEFAULT_LR)
    except ValueError:
        lr = None
    if which not in MODELS or lr is None:
        raise ValueError(f"--config=configs/dolly_es_sft.py:{arg}: expected MODEL or MODEL,LR with MODEL one "
                         f"of {sorted(MODELS)} and LR > 0, e.g. configs/dolly_es_sft.py:student,5e-5")
    name = "dolly_es_sft" if which == "teacher" else "dolly_es_sft_student"
    c = dolly_es_kd.get_config(str(lr))
    c.mode = "sft"  # `kdjax sft` sets it too; `kdjax distill` would distil instead
    c.out_dir = f"runs/{name}/lr{lr:g}" if comma else f"runs/{name}"
    c.teacher = MODELS[which]  # the model that is fine-tuned; or a local HF directory
    c.student = ""  # not used by SFT
    return c
