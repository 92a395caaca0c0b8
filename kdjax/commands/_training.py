"""Flags shared by the training commands: --config=FILE, --config.x=y overrides, --resume."""
import os

from absl import flags
from ml_collections import config_flags

import kdjax.train_config

DEFAULT_CONFIG = os.path.abspath(kdjax.train_config.__file__)
FLAGS = flags.FLAGS


def define_flags(default_config: str = DEFAULT_CONFIG):
    """--config (default: `default_config`), --resume, --distributed; one training command a process."""
    config_flags.DEFINE_config_file(
        "config", default_config, "experiment config file (configs/NAME.py); override fields with --config.x=y")
    flags.DEFINE_bool("resume", False, "continue from the latest checkpoint in the config's out_dir")
    flags.DEFINE_bool("distributed", False, "multi-host (TPU pod slice, several GPU hosts): call "
                      "jax.distributed.initialize() first; every host runs the same command")


def run(mode: str):
    if FLAGS.distributed:
        import jax
        jax.distributed.initialize()
    cfg = FLAGS.config
    cfg.mode = mode
    if FLAGS.resume:
        cfg.resume = True
    if mode == "grpo":
        from kdjax.grpo import run as run_grpo
        return run_grpo(cfg)
    if mode == "minillm":
        from kdjax.minillm import run as run_minillm
        return run_minillm(cfg)
    from kdjax.train import run as run_training
    return run_training(cfg)
