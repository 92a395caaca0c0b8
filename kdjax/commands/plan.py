"""Compile every program a command would run (the training step, its sampler, evaluation's generation)
for a TPU slice, on this CPU machine, from abstract inputs: per-chip HBM against the chip's, a
roofline (FLOPs and HBM bytes of the compiled program against the chip's bf16 peak and bandwidth:
tokens/s, MFU, the bound), the ops that move the most bytes, compile time. Nothing is allocated and
no weights are read. Needs libtpu: pip install 'kdjax[tpu]'.

  kdjax plan --config=configs/dolly_en_kd.py --topology=v5e-8
  kdjax plan --config=configs/dolly_en_kd.py --topology=v4:2x2x1 --config.train.batch_size=64 --search
  kdjax plan --config=configs/grpo_mbpp.py --topology=v5p-8 --json > plan.json
"""
import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from kdjax import plan as kplan

kplan.compile_env()  # before JAX starts a backend: CPU for everything, libtpu only to compile

config_flags.DEFINE_config_file("config", os.path.abspath(kplan.__file__.replace("plan.py", "train_config.py")),
                                "experiment config file (configs/NAME.py); override fields with --config.x=y")
flags.DEFINE_string("topology", None, "the TPU slice: CHIP:SHAPE (v5e:4x4, v4:2x2x1, v5p:2x2x2, v6e:2x4) or an "
                    "accelerator type (v4-8, v5e-16, v5p-8, v6e-8)")
flags.DEFINE_enum("command", None, ["distill", "sft", "minillm", "grpo", "gkd"],
                  "the command whose programs to compile (default: the config's mode)")
flags.DEFINE_list("programs", None, "compile only these programs (train_step, sampler, generate, "
                  "\"generate (teacher)\"); default: all the command runs")
flags.DEFINE_bool("search", False, "also try mesh shapes, remat policies, loss chunk sizes and micro-batching "
                  "for the training step, and print the best as --config. overrides")
flags.DEFINE_integer("search_budget", 12, "compiles --search may spend")
flags.DEFINE_bool("json", False, "print the report as one JSON object on stdout (the readable report goes to stderr)")
flags.DEFINE_bool("chips", False, "print the table of TPU chips (HBM, bf16 peak, bandwidth, chips a host, source) "
                  "and exit")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    if FLAGS.chips:
        print(kplan.chip_table())
        return
    if not FLAGS.topology:
        raise app.UsageError("--topology is required (v5e:4x4, v4:2x2x1, v4-8, v5e-16, v5p-8, v6e-8), or --chips")
    import jax
    cfg = FLAGS.config
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if FLAGS.json else (lambda m: print(m, flush=True))
    try:
        sl = kplan.parse_slice(FLAGS.topology)
        command = FLAGS.command or cfg.mode
        say(f"kdjax plan: --command={command} on {sl.name} ({sl.topology}: {sl.chips} chips, {sl.hosts} "
            f"host{'s' if sl.hosts > 1 else ''}), jax {jax.__version__}, libtpu {kplan.libtpu_version()}")
        report = kplan.plan(cfg, FLAGS.topology, command, log=say, only=FLAGS.programs)
        if FLAGS.search:
            say(f"\nsearch (at most {FLAGS.search_budget} compiles of the training step):")
            tried = kplan.search(cfg, FLAGS.topology, command, FLAGS.search_budget, log=say)
            report["search"] = tried
            best = [t for t in tried if t["fits"]][:3]
            say("\nbest settings (roofline tokens/s):" if best else "\nno setting tried fits")
            for t in best:
                say(f"  {t['tokens_per_s']:>12,} tokens/s  MFU {100 * t['mfu']:4.1f}%  peak {t['peak_gib']:5.2f} GiB  "
                    f"{kplan.overrides_text(t['overrides'])}")
    except (ValueError, RuntimeError) as e:
        print(f"kdjax plan: {e}", file=sys.stderr)
        sys.exit(2)
    report.update(jax=jax.__version__, libtpu=kplan.libtpu_version())
    if FLAGS.json:
        print(json.dumps(report))
    if any(not p["fits"] for p in report["programs"]):
        sys.exit(1)
