"""English Dolly KD with the generalized Jensen-Shannon divergence JSD(beta=0.5) (GKD, TRL's
GKDTrainer default): dolly_en_kd.py with one change. JSD(0.5) is bounded by ln 2 per token
(unscaled: the trainer has no switch for kdjax.losses' scaled=True yet), so its gradients are
smaller than forward KL's; sweep the lr as for dolly_en_kd.py:

    kdjax distill --config=configs/dolly_en_jsd.py:5e-5
    kdjax distill --config=configs/dolly_en_jsd.py --config.kd.beta=0.9   # more mode-seeking
"""
from kdjax.train_config import sibling

dolly_en_kd = sibling(__file__, "dolly_en_kd")


def get_config(lr: str = dolly_en_kd.DEFAULT_LR):
    c = dolly_en_kd.get_config(lr, name="dolly_en_jsd")
    c.kd.divergence = "generalized_jsd"
    c.kd.beta = 0.5  # beta KL(p||m) + (1 - beta) KL(q||m), m = beta p + (1 - beta) q
    return c
