"""Flags shared by the training commands: --config=FILE, --config.x=y overrides, --resume,
--overwrite, and the multi-process flags."""
import os

from absl import flags
from ml_collections import config_flags

import kdjax.train_config
from kdjax.errors import UserError

DEFAULT_CONFIG = os.path.abspath(kdjax.train_config.__file__)
FLAGS = flags.FLAGS


def define_flags(default_config: str = DEFAULT_CONFIG):
    """--config (default: `default_config`), --resume, --overwrite, --distributed (+ its coordinator
    flags); one training command a process."""
    config_flags.DEFINE_config_file(
        "config", default_config, "experiment config file (configs/NAME.py); override fields with --config.x=y")
    flags.DEFINE_bool("resume", False, "continue from the latest checkpoint in the config's out_dir (refused when "
                      "the stored config differs in a field that changes the result)")
    flags.DEFINE_bool("overwrite", False, "start over in an out_dir that holds an earlier run's checkpoints "
                      "(deletes them, its best model, metrics and report)")
    flags.DEFINE_bool("distributed", False, "several processes (a TPU pod slice, GPU hosts, or CPU processes): "
                      "jax.distributed.initialize() first; every process runs the same command. On TPU VMs "
                      "the coordinator is found alone; elsewhere give --coordinator, --num_processes, "
                      "--process_id")
    flags.DEFINE_string("coordinator", None, "with --distributed: HOST:PORT of process 0")
    flags.DEFINE_integer("num_processes", None, "with --distributed: how many processes take part")
    flags.DEFINE_integer("process_id", None, "with --distributed: this process's index, 0 .. num_processes - 1")


def initialize_distributed():
    """jax.distributed.initialize from the flags (or the environment of a TPU VM / SLURM job)."""
    given = {"coordinator": FLAGS.coordinator, "num_processes": FLAGS.num_processes, "process_id": FLAGS.process_id}
    if not FLAGS.distributed:
        if any(v is not None for v in given.values()):
            raise UserError(f"--{next(k for k, v in given.items() if v is not None)} needs --distributed")
        return
    import jax
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise UserError(f"--distributed with --coordinator/--num_processes/--process_id: give all three "
                            f"(missing: {', '.join('--' + m for m in missing)})")
        if not 0 <= FLAGS.process_id < FLAGS.num_processes:
            raise UserError(f"--process_id={FLAGS.process_id}: must be in [0, --num_processes={FLAGS.num_processes})")
    if jax.config.jax_platforms and "cpu" in jax.config.jax_platforms.split(","):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over TCP
        # Processes that compile the same step at different speeds (a loaded machine) meet at its
        # first collective minutes apart, not XLA's default 30 s.
        if "xla_cpu_collective_timeout_seconds" not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_collective_timeout_seconds=1800"
                                       ).strip()
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator, num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)


def run(mode: str):
    if FLAGS.resume and FLAGS.overwrite:
        raise UserError("--resume and --overwrite contradict each other: continue the run, or start it over")
    initialize_distributed()
    cfg = FLAGS.config
    cfg.mode = mode
    if FLAGS.resume:
        cfg.resume = True
    from kdjax.training.run import run as run_training
    return run_training(cfg, mode, overwrite=FLAGS.overwrite)


def command(mode: str, default_config: str = DEFAULT_CONFIG):
    """(main, FLAG_MODULES) of the training command `kdjax MODE`: its module defines nothing else."""
    import sys
    define_flags(default_config)

    def main(argv):
        from absl import app
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
        run(mode)
    return main, (sys.modules[__name__],)
