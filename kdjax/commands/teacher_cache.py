"""Run the teacher once over the training rows of a KD run (`--config`, as `kdjax distill` takes it) and
store (zarr v3 through tensorstore, chunked by rows), for every response token, its top-K token ids,
their log-probs and the log of its remaining mass, and the coefficients of its logits in a basis
fitted to the teacher (the shape of that remaining mass: up to --config.cache.tail_rank directions,
bit-packed into --config.cache.tail_bytes bytes a token), so that `kdjax distill
--config.kd.teacher_cache=DIR` trains with no teacher in memory. A killed build continues from its
last whole chunk when the same command runs again; with --distributed every process writes its own
chunks. `verify DIR` measures what the cache loses against the live teacher, for each K it holds.

    kdjax teacher-cache --config=configs/NAME.py --config.cache.top_k=64 --out=DIR
    kdjax teacher-cache verify DIR [--rows=8] [--k=16,64] [--student=runs/NAME/student]
"""
from absl import app, flags

from kdjax.commands import train_flags

train_flags.define_flags(resume=False)
flags.DEFINE_string("out", None, "the store's directory (default: --config.kd.teacher_cache)")
flags.DEFINE_integer("rows", 8, "verify: the store's first rows to measure on", lower_bound=1)
flags.DEFINE_string("student", None, "verify: the student whose loss and gradient are compared (default: the "
                    "config's student, or the teacher's student_layers)")
flags.DEFINE_list("k", None, "verify: the top K' to measure (default: the powers of two below the store's K, and K)")
FLAG_MODULES = (train_flags,)  # --config, --overwrite, --distributed
FLAGS = flags.FLAGS


def main(argv):
    train_flags.initialize_distributed()
    if argv[1:2] == ["verify"]:
        if len(argv) != 3:
            raise app.UsageError("kdjax teacher-cache verify DIR: one directory, the store to verify")
        from kdjax.training.cache_verify import verify
        print("\n" + verify(argv[2], rows=FLAGS.rows, student=FLAGS.student, sizes=FLAGS.k)["table"], flush=True)
        return
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; `verify DIR`, or only --flags to build a cache")
    cfg = FLAGS.config
    out = FLAGS.out or cfg.kd.teacher_cache
    if not out:
        raise app.UsageError("where to? --out=DIR (or --config.kd.teacher_cache=DIR)")
    cfg.mode = "distill"
    cfg.kd.hidden_weight = 0.0  # the student's loss: no part of the store (KD from it runs on the outputs alone)
    from kdjax.training.teacher_cache import build
    build(cfg, out, overwrite=FLAGS.overwrite)
