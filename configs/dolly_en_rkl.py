"""English Dolly KD with token-level reverse KL, KL(q||p): dolly_en_kd.py with one change.

The student is scored on the teacher's distribution at the positions of the Dolly responses (off
policy). MiniLLM's own method minimises the sequence-level reverse KL on the student's samples
(on policy, `kdjax minillm --config=configs/dolly_en_kd.py`); this is the token-level baseline next
to it. Same lr argument:

    kdjax distill --config=configs/dolly_en_rkl.py:5e-5
"""
from kdjax.train_config import sibling

dolly_en_kd = sibling(__file__, "dolly_en_kd")


def get_config(lr: str = dolly_en_kd.DEFAULT_LR):
    c = dolly_en_kd.get_config(lr, name="dolly_en_rkl")
    c.kd.divergence = "reverse_kl"
    return c
