"""A study: KD over a grid of config values and seeds, one table and one plot (study.md, study.png).

    kdjax study --seeds=0,1,2 --config.out_dir=runs/study
                --grid="teacher_sft.steps=0,40 kd.divergence=forward_kl,reverse_kl kd.kd_ratio=0,0.5,1"

Each cell is `kdjax distill` with those values (the SFT baseline is the cell with kd.kd_ratio=0),
trained for the config's steps once per seed (train.seed: the data order), scored on the test
prompts; cells that run the same training are merged (kd fields at kd_ratio 0). --resume skips
the runs that finished. A scored run's checkpoints are removed (--keep_checkpoints keeps them).
kdjax/training/study.py says the rest.
"""
import os

from absl import flags

import kdjax.distill_config
from kdjax.commands import train_flags

train_flags.define_flags(os.path.abspath(kdjax.distill_config.__file__))  # the default job, as `kdjax distill`
flags.DEFINE_string("grid", "kd.kd_ratio=0,1", "space-separated FIELD=V1,V2,... of config fields to vary")
flags.DEFINE_list("seeds", ["0", "1", "2"], "train.seed values: each cell runs once per seed")
flags.DEFINE_bool("keep_checkpoints", False, "keep each scored run's checkpoints (its trained student); by "
                  "default they are removed once the run is scored (about 2 GB a run of the default job)")
FLAG_MODULES = (train_flags, __import__(__name__))
FLAGS = flags.FLAGS


def main(argv):
    from absl import app
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    from kdjax.errors import UserError
    from kdjax.training.study import parse_grid, run_study
    try:
        seeds = [int(s) for s in FLAGS.seeds]
    except ValueError:
        raise UserError(f"--seeds={','.join(FLAGS.seeds)}: expected integers, e.g. 0,1,2") from None
    if FLAGS.resume and FLAGS.overwrite:
        raise UserError("--resume and --overwrite contradict each other")
    train_flags.initialize_distributed()
    cfg = FLAGS.config
    cfg.resume = FLAGS.resume
    run_study(cfg, parse_grid(FLAGS.grid, cfg), seeds, overwrite=FLAGS.overwrite,
              keep_checkpoints=FLAGS.keep_checkpoints)
