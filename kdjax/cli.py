"""The `kdjax` command: one entry point, a subcommand each, absl flags (`kdjax CMD --help`)."""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import re
import sys

from absl import app, flags

# subcommand -> (module under kdjax.commands, one-line summary)
COMMANDS = {
    "convert": ("convert", "convert a checkpoint (HF dir, .gguf, kdjax, preset) to HF safetensors or kdjax"),
    "generate": ("generate", "generate text with the chat template applied"),
    "plan": ("plan", "compile a command's programs for a TPU slice on this CPU: fits?, GiB a chip, roofline MFU"),
    "sft": ("sft", "fine-tune the teacher on the data (--config=configs/NAME.py)"),
    "distill": ("distill", "distil the teacher into a student; no flags runs the default job"),
    "minillm": ("minillm", "MiniLLM: on-policy sequence-level reverse KL (teacher-mixed sampling, policy gradient)"),
    "grpo": ("grpo", "GRPO on code problems with tests (think format, steps, tests, length rewards)"),
    "eval": ("eval", "Rouge-L over sampling seeds, validation loss, teacher retention; report + plots"),
    "quantize": ("quantize", "int4 (RTN or GPTQ) of every decoder linear -> GPTQ checkpoint; size/perplexity report"),
    "export": ("export", "export to bf16 HF safetensors (--format=hf) or an int4 GPTQ checkpoint (--format=gptq)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "usage: kdjax COMMAND [--flags]  (kdjax COMMAND --help for its flags)\n\ncommands:\n" + "\n".join(lines)


def _fail(cmd: str, msg: str):
    print(f"kdjax {cmd}: {msg}\nkdjax {cmd} --help lists the flags.", file=sys.stderr)
    sys.exit(2)


def _config_error(e: BaseException, argv) -> str:
    """One line for an error ml_collections raised while reading --config=FILE or a --config.x=y."""
    chain = [e]
    while chain[-1].__context__ is not None:
        chain.append(chain[-1].__context__)
    keys = [x for x in chain if isinstance(x, KeyError) and x.args]
    if isinstance(e, (AttributeError, KeyError)) and keys:
        key = str(keys[-1].args[0])  # the innermost: the bare field name
        hint = next((str(x.args[0]).split("\n")[-1] for x in keys if "Did you mean" in str(x.args[0])), "")
        given = [a for a in argv if re.match(rf"--config(\.\w+)*\.{re.escape(key)}(\.|=|$)", a)]
        return f"{given[0].split('=')[0] if given else '--config'}: the config has no field {key!r}. {hint}".strip()
    last = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"--config: {type(e).__name__}: {last[-1] if last else e}"


def _parser(cmd: str):
    def parse(argv):
        try:
            rest = flags.FLAGS(argv)
        except flags.Error as e:
            _fail(cmd, str(e))
        except (AttributeError, KeyError) as e:  # a --config.x=y naming no field of --config=FILE
            _fail(cmd, _config_error(e, argv))
        if "config" in flags.FLAGS:
            try:  # ml_collections reads --config=FILE and applies --config.x=y only when first used
                flags.FLAGS.config.get("mode")
            except Exception as e:  # noqa: BLE001 (a config file can raise anything)
                _fail(cmd, _config_error(e, argv))
        return rest
    return parse


def skip_tpu_probe_off_tpu(environ=os.environ) -> None:
    """With libtpu installed (`kdjax plan` needs it) but no TPU on this machine, JAX would still try
    to start a TPU backend in every process (slow, noisy, and holding libtpu's host lockfile where
    it gets that far): run on the GPU or the CPU instead, unless JAX_PLATFORMS says otherwise. On a
    TPU VM (/dev/accel*, /dev/vfio/*) nothing changes."""
    if "JAX_PLATFORMS" in environ or importlib.util.find_spec("libtpu") is None:
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    environ["JAX_PLATFORMS"] = "cuda,cpu"  # JAX takes the first that starts
    if "jax" in sys.modules:  # imported already (by the kdjax package): no backend has started yet
        sys.modules["jax"].config.update("jax_platforms", environ["JAX_PLATFORMS"])


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    skip_tpu_probe_off_tpu()
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        return 0 if len(argv) >= 2 else 2
    cmd = argv[1]
    if cmd not in COMMANDS:
        print(f"kdjax: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:  # ml_collections checks --config.x=y names against the default config as the flag is defined
        module = importlib.import_module(f"kdjax.commands.{COMMANDS[cmd][0]}")
    except (AttributeError, KeyError) as e:
        if not any(a.startswith("--config.") for a in argv):
            raise
        _fail(cmd, _config_error(e, argv))
    rest = argv[2:]
    if any(a in ("-h", "--help", "--helpshort") for a in rest):
        print(f"kdjax {cmd}: {(module.__doc__ or '').strip()}\n")
        for m in (module, *getattr(module, "FLAG_MODULES", ())):  # flags shared with other commands
            print(flags.FLAGS.module_help(m))
        return 0
    # Library INFO logs (orbax, jax backends) drown the progress lines; --verbosity=0 brings them back.
    app.run(module.main, argv=[f"kdjax {cmd}", "--verbosity=-1"] + rest, flags_parser=_parser(cmd))


if __name__ == "__main__":
    sys.exit(main())
