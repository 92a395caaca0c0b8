"""The `kdjax` command: one entry point, a subcommand each, absl flags (`kdjax CMD --help`)."""
from __future__ import annotations

import errno
import glob
import importlib
import importlib.util
import os
import re
import sys
import traceback

from absl import app, flags

# subcommand -> (module under kdjax.commands, one-line summary)
COMMANDS = {
    "convert": ("convert", "convert a checkpoint (HF dir, .gguf, kdjax, preset) to HF safetensors or kdjax"),
    "generate": ("generate", "generate text with the chat template applied"),
    "plan": ("plan", "compile a command's programs for a TPU slice on this CPU: fits?, GiB a chip, roofline MFU"),
    "sft": ("sft", "fine-tune the teacher on the data (--config=configs/NAME.py)"),
    "teacher-cache": ("teacher_cache", "run the teacher once: store its top-K log-probs + tail mass for KD runs "
                                       "(tensorstore); `verify DIR`"),
    "distill": ("distill", "distil the teacher into a student; no flags runs the default job"),
    "gkd": ("gkd", "on-policy KD (GKD): a share of the batches sampled from the student, scored by the teacher"),
    "minillm": ("minillm", "MiniLLM: on-policy sequence-level reverse KL (teacher-mixed sampling, policy gradient)"),
    "grpo": ("grpo", "GRPO on code problems with tests (think format, steps, tests, length rewards)"),
    "qad": ("qad", "quantization-aware distillation: int4 (GPTQ grid) training from the float model -> GPTQ checkpoint"),
    "study": ("study", "KD over a grid of config values x seeds: one table (mean, spread) and one plot"),
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
    where = _config_file_line(chain, argv)
    keys = [x for x in chain if isinstance(x, KeyError) and x.args]
    if isinstance(e, (AttributeError, KeyError)) and keys:
        key = str(keys[-1].args[0])  # the innermost: the bare field name
        if "cannot be added since the config is locked" in key:  # set inside a config file
            key = key.split('"')[1] if '"' in key else key
        hint = next((str(x.args[0]).split("\n")[-1] for x in keys if "Did you mean" in str(x.args[0])), "")
        given = [a for a in argv if re.match(rf"--config(\.\w+)*\.{re.escape(key)}(\.|=|$)", a)]
        flag = given[0].split("=")[0] if given else where or "--config"
        return f"{flag}: the config has no field {key!r}. {hint}".strip()
    last = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{where or '--config'}: {type(e).__name__}: {last[-1] if last else e}"


def _config_file_line(chain, argv) -> str:
    """"configs/x.py, line 12" when the error was raised by the --config file itself, else ""."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if not spec:
        return ""
    given = spec if os.path.exists(spec) else spec.rsplit(":", 1)[0]
    path = os.path.abspath(given)
    for x in reversed(chain):
        frames = [f for f in traceback.extract_tb(x.__traceback__) if os.path.abspath(f.filename) == path]
        if frames:
            return f"{given}, line {frames[-1].lineno}"
    return ""


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


def _compilation_cache():
    """XLA's persistent compilation cache in ~/.cache/kdjax/xla (KDJAX_XLA_CACHE names another
    folder, KDJAX_XLA_CACHE=0 turns it off): a resumed run, the runs of a sweep and the stages of a
    pipeline compile each program once. JAX's own JAX_COMPILATION_CACHE_DIR wins when set."""
    where = os.environ.get("KDJAX_XLA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "kdjax", "xla"))
    if where == "0" or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    try:
        os.makedirs(where, exist_ok=True)
    except OSError:  # a read-only home: run without the cache
        return
    os.environ["JAX_COMPILATION_CACHE_DIR"] = where


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
    _compilation_cache()
    try:  # ml_collections checks --config.x=y names against the default config as the flag is defined
        module = importlib.import_module(f"kdjax.commands.{COMMANDS[cmd][0]}")
    except (AttributeError, KeyError) as e:
        if not any(a.startswith("--config.") for a in argv):
            raise
        _fail(cmd, _config_error(e, argv))
    rest = argv[2:]
    if any(a in ("-h", "--help", "--helpshort") for a in rest):
        print(f"kdjax {cmd}: {(module.__doc__ or '').strip()}\n")
        print("--verbose: print the traceback of an error too (every command)\n")
        for m in (module, *getattr(module, "FLAG_MODULES", ())):  # flags shared with other commands
            print(flags.FLAGS.module_help(m))
        return 0
    verbose = "--verbose" in rest
    rest = [a for a in rest if a != "--verbose"]
    # Library logs (orbax, jax backends) drown the progress lines and repeat an error's traceback
    # after kdjax has said it in one line: only fatal ones show, all of them with --verbose.
    app.run(_guarded(cmd, module.main, verbose), argv=[f"kdjax {cmd}", f"--verbosity={0 if verbose else -3}"] + rest,
            flags_parser=_parser(cmd))


def _user_error(e: BaseException) -> str | None:
    """The one line a user error gets (None: a bug, which keeps its traceback)."""
    from kdjax.errors import UserError, disk_failure
    if isinstance(e, (UserError, app.UsageError)):
        return str(e)
    disk = disk_failure(e)
    if disk:
        return disk
    if isinstance(e, (FileNotFoundError, PermissionError)) and e.errno is None:
        return str(e)  # raised by kdjax with its own message
    if isinstance(e, OSError) and e.errno is not None:
        cause = {errno.ENOSPC: "the disk is full", errno.EACCES: "permission denied",
                 errno.EROFS: "the file system is read-only", errno.EDQUOT: "the disk quota is exceeded"}
        if e.errno in cause:
            return f"{e.filename or ''}: {cause[e.errno]}".lstrip(": ")
        return str(e) if isinstance(e, FileNotFoundError) and not e.filename else \
            (f"{e.filename}: {e.strerror}" if e.filename else str(e))
    if isinstance(e, ValueError):
        return str(e)
    return None


class _MainThreadStderr:
    """sys.stderr that writes the main thread's output at once and holds what other threads write
    (a library's background thread dying after the disk filled, orbax's savers): that is reported
    by the main thread's error; the held text is shown when the run ends well or with a bug, or
    with --verbose."""

    def __init__(self, real):
        self.real, self.held = real, []

    def write(self, text):
        import threading
        if threading.current_thread() is threading.main_thread():
            return self.real.write(text)
        self.held.append(text)
        return len(text)

    def flush(self):
        self.real.flush()

    def release(self):
        self.real.write("".join(self.held))
        self.held = []

    def __getattr__(self, name):
        return getattr(self.real, name)


def _guarded(cmd: str, main_fn, verbose: bool):
    """main_fn with kdjax's exits: a user error is one line on stderr and exit 2 (the traceback
    with --verbose); a bug prints its traceback and exits 1. Exits with os._exit after flushing,
    so threads a library left running (orbax's savers) can never keep the process alive."""
    def run(argv):
        stderr = sys.stderr = _MainThreadStderr(sys.stderr)
        try:
            main_fn(argv)
        except SystemExit:
            raise
        except KeyboardInterrupt:
            print(f"kdjax {cmd}: interrupted", file=sys.stderr, flush=True)
            _exit(130)
        except BaseException as e:  # noqa: BLE001 (every failure ends the process, never hangs it)
            line = _user_error(e)
            if line is None or verbose:
                stderr.release()
                traceback.print_exc()
            if line is not None:
                print(f"kdjax {cmd}: {line}", file=sys.stderr, flush=True)
            _exit(2 if line is not None else 1)
        stderr.release()  # a run that succeeded still shows what went wrong beside it
        _exit(0)
    return run


def _exit(code: int):
    sys.stdout.flush()
    sys.__stderr__.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
