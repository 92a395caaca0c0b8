"""Run untrusted code against its tests, deciding pass or fail where the code cannot reach; never
raise for what the code does.

    result = run_tests(code, ["assert f(1) == 2", "assert f(2) == 3"], timeout_s=5)   # MBPP
    result = run_tests(problem["prompt"] + completion, problem["test"],
                       entry_point=problem["entry_point"], prompt=problem["prompt"])  # HumanEval
    result.fraction_passed, [(o.status, o.message) for o in result.outcomes], result.isolation

The code is what an RL policy writes to maximise the fraction passed, so it runs in one process
(the candidate) and the tests in another (the judge, kdjax/sandbox_judge.py) that never loads the
code: each name a test takes from the code is a stand-in whose calls send plain-data arguments to
the candidate and get a plain-data result back (None, bool, int, float, complex, str, bytes and
lists, tuples, sets, dicts of them, by exact type: sandbox_judge.encode), which the judge rebuilds
and compares itself. A value that is not plain data fails its test. Each test runs in fresh globals with the judge's builtins;
HumanEval's helpers (poly, encode_cyclic) come from `prompt`, run on the judge's side. For MBPP
asserts, the names taken from the code are the free names of the assert that are not builtins and
not standard-library modules the assert uses (those the judge imports itself).

The candidate runs under kernel limits (kdjax/sandbox_confine.py: namespaces, Landlock, seccomp,
rlimits, uid 65534 when started as root); `SandboxResult.isolation` names the layers applied. When
run_tests returns, every process of the call has exited and been reaped.
Where the kernel offers less, one warning; with `strict=True` the call raises SandboxUnavailable
instead of running the code with a required layer (sandbox_confine.REQUIRED) missing.

Limits: `timeout_s` of wall clock for loading the code and again for each test (a test that runs
over is a "timeout": the sandbox is killed and the tests after it run in a fresh one; RLIMIT_CPU is
a backstop); `memory_mb` of address space (allocations beyond raise MemoryError in the code); the
run directory is a 64 MiB tmpfs, files at most 16 MiB; at most 16 threads, no processes.
Statuses: "passed"; "failed" (the test raised AssertionError); "error" (anything else: an exception,
SyntaxError, a value that is not plain data, sys.exit, os._exit, a crash such as a segfault: the
message says which); "timeout". When the code fails to load, every test gets that error.
"""
from __future__ import annotations

import ast
import builtins
import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from kdjax import sandbox_confine

STATUSES = ("passed", "failed", "error", "timeout")
# The judge runs outside the package (no site-packages, no kdjax import), imported rather than run as
# a script so that its bytecode is cached; its directory leaves sys.path before any test runs.
JUDGE = ("import sys; sys.path.insert(0, {!r}); import sandbox_judge; del sys.path[0]; sandbox_judge.main()"
         .format(os.path.dirname(os.path.abspath(__file__))))
_STARTUP_S = 60.0  # for the interpreter to start and the sandbox to report "ready" on a loaded machine
_MAX_EVENT_BYTES = 1 << 20
_TMPFS_MB, _FILE_MB, _THREADS, _FILES = 64, 16, 16, 256


class SandboxUnavailable(RuntimeError):
    """strict=True and the kernel refused a required layer: the code was not run."""


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The outcome of one test: status in STATUSES, and a short message when not passed."""
    test: str
    status: str
    message: str = ""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    outcomes: tuple[Outcome, ...]
    isolation: tuple[str, ...] = ()  # the layers of sandbox_confine.LAYERS applied (() if never started)

    @property
    def num_passed(self) -> int:
        return sum(o.status == "passed" for o in self.outcomes)

    @property
    def fraction_passed(self) -> float:
        """Passed tests / tests; 0.0 when there are no tests."""
        return self.num_passed / len(self.outcomes) if self.outcomes else 0.0

    @property
    def all_passed(self) -> bool:
        return bool(self.outcomes) and self.num_passed == len(self.outcomes)


def required_layers() -> tuple[str, ...]:
    """The layers strict mode insists on: sandbox_confine.REQUIRED, and uid-drop when run as root."""
    return sandbox_confine.REQUIRED + (("uid-drop",) if os.geteuid() == 0 else ())


def names_from_code(test: str, trusted: str = "") -> tuple[list[str], list[str]]:
    """(remote, modules) for an MBPP assert: the free names it takes from the code, and the
    standard-library modules it uses (imported by the judge; `sys.getsizeof(...)`). Builtins and
    the names `trusted` code defines are neither. A test that does not parse gives ([], [])."""
    try:
        tree = ast.parse(test)
        defined = set(_bound_names(ast.parse(trusted))) if trusted else set()
    except SyntaxError:
        return [], []
    bound = set(_bound_names(tree)) | defined | set(dir(builtins))
    loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    free = sorted(loaded - bound)
    modules = [n for n in free if n in sys.stdlib_module_names and n not in called]
    return [n for n in free if n not in modules], modules


def _imported_modules(trusted: str) -> list[str]:
    """The standard-library modules `trusted` code imports (HumanEval's prompt: typing, math)."""
    try:
        tree = ast.parse(trusted)
    except SyntaxError:
        return []
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    return sorted(names & sys.stdlib_module_names)


def _bound_names(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            yield node.id
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name
        elif isinstance(node, ast.arg):
            yield node.arg
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            yield from ((a.asname or a.name).split(".")[0] for a in node.names)


# ---- one judge process ---------------------------------------------------------------------------
class _Events:
    """JSON-line events from the judge's pipe, with deadlines; returns "timeout" or "eof" instead."""

    def __init__(self, fd: int):
        self.fd, self.buf = fd, b""

    def next(self, timeout_s: float) -> dict | str:
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
                return "timeout"
            chunk = os.read(self.fd, 65536)
            if not chunk or len(self.buf) > _MAX_EVENT_BYTES:
                return "eof"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


_warned: set[tuple[str, ...]] = set()
_warn_lock = threading.Lock()


def _warn_once(missing: list[str], layers: list[str]) -> None:
    with _warn_lock:
        if tuple(missing) in _warned:
            return
        _warned.add(tuple(missing))
    warnings.warn(f"kdjax.sandbox: this kernel did not apply {', '.join(missing)}; untrusted code runs with only "
                  f"{', '.join(layers) or 'nothing'} (strict=True refuses to run it instead)", RuntimeWarning,
                  stacklevel=4)


def _judge_stderr(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = f.read().strip().splitlines()
    except OSError:
        return ""
    return f": {lines[-1][:300]}" if lines else ""


def _end_judge(proc: subprocess.Popen) -> None:
    """SIGTERM: the judge kills its candidate, reaps every process of it and exits, so that nothing
    outlives the call, not even a zombie. SIGKILL to its process group only if it does not."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _run_judge(job: dict, start: int, timeout_s: float, memory_mb: int, strict: bool
               ) -> tuple[list[tuple[str, str]], int | None, tuple[str, ...]]:
    """Run tests[start:] in one judge (and its candidate). Returns ((status, message) per test
    reported, restart_at, layers): restart_at is where to go on in a fresh sandbox after the
    candidate died or a test timed out, or None when done."""
    tests = job["tests"]
    outcomes: list[tuple[str, str]] = []

    def rest(status: str, message: str) -> list[tuple[str, str]]:
        return outcomes + [(status, message)] * (len(tests) - start - len(outcomes))

    read_fd, write_fd = os.pipe()
    layers: tuple[str, ...] = ()
    with tempfile.TemporaryDirectory(prefix="kdjax-sandbox-") as base:
        run_dir, job_path, stderr_path = (os.path.join(base, n) for n in ("run", "job.json", "judge.stderr"))
        os.mkdir(run_dir, 0o700)
        os.chmod(base, 0o711)  # uid 65534 passes through to run/, and reads nothing here
        with open(os.open(job_path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            json.dump(dict(job, start=start), f)
        params = {"events_fd": write_fd, "job": job_path, "run_dir": run_dir, "strict": strict,
                  "preload": _imported_modules(job["prompt"]),
                  "required": list(required_layers()), "tmpfs_mb": _TMPFS_MB,
                  "limits": {"RLIMIT_AS": int(memory_mb) << 20, "RLIMIT_FSIZE": _FILE_MB << 20, "RLIMIT_CORE": 0,
                             "RLIMIT_CPU": int((len(tests) - start + 1) * timeout_s) + 2,
                             "RLIMIT_NPROC": _THREADS, "RLIMIT_NOFILE": _FILES}}
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "HOME": run_dir, "TMPDIR": run_dir,
               "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}  # a thread's own malloc arena: 64 MiB of RLIMIT_AS
        try:
            with open(stderr_path, "wb") as stderr:
                proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", JUDGE, json.dumps(params)], cwd=base,
                                        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                        pass_fds=(write_fd,), start_new_session=True)
        except OSError as e:
            os.close(read_fd)
            os.close(write_fd)
            return rest("error", f"the sandbox could not start: {e}"), None, layers
        os.close(write_fd)
        events = _Events(read_fd)

        def broken(event) -> tuple[str, str]:
            if event == "timeout":
                return "error", "the sandbox did not start in time"
            proc.wait()
            why = event.get("message") if isinstance(event, dict) else f"the sandbox failed{_judge_stderr(stderr_path)}"
            return "error", why

        try:
            event = events.next(_STARTUP_S)
            if not isinstance(event, dict) or event.get("event") != "ready":
                return rest(*broken(event)), None, layers
            layers, missing = tuple(event["layers"]), event["missing"]
            if missing:
                if strict:
                    raise SandboxUnavailable(
                        f"kdjax.sandbox: the kernel did not apply {', '.join(missing)} (applied: {', '.join(layers)}); "
                        f"strict=True refuses to run untrusted code without them. See docs/sandbox.md.")
                _warn_once(missing, list(layers))
            event = events.next(timeout_s)
            if event == "timeout":
                return rest("timeout", f"loading the code took more than {timeout_s}s"), None, layers
            if not isinstance(event, dict) or event.get("event") != "load":
                return rest(*broken(event)), None, layers
            if not event["ok"]:
                return rest("error", event["message"]), None, layers
            for i in range(start, len(tests)):
                event = events.next(timeout_s)
                if isinstance(event, dict) and event.get("event") == "test":
                    outcomes.append((event["status"], event["message"]))
                    continue
                if event == "timeout":
                    outcomes.append(("timeout", f"the test ran longer than {timeout_s}s"))
                elif outcomes:  # the judge ends after a test in which the candidate died
                    break
                else:
                    outcomes.append(broken(event))
                break
            restart_at = start + len(outcomes)
            return outcomes, restart_at if restart_at < len(tests) else None, layers
        finally:
            _end_judge(proc)
            os.close(read_fd)


def run_tests(code: str, tests: str | Sequence[str], timeout_s: float = 5.0, *, entry_point: str | None = None,
              setup_code: str = "", prompt: str = "", memory_mb: int = 1024, strict: bool = False) -> SandboxResult:
    """Run `code`, then each test, in the sandbox (see the module docstring).

    tests: a list of statements (MBPP's asserts), each its own test; or, with `entry_point`, a
        HumanEval test program (a string, or a one-element list) that defines `check(candidate)`,
        run as the single test `check(<entry_point>)`; a lone string without entry_point is one test.
    timeout_s: wall-clock seconds for loading the code, and again for each test.
    entry_point: HumanEval's function name: the one name the test program takes from the code.
    setup_code: run in the candidate after the code (MBPP's test_setup_code, which builds inputs
        from the code's classes); the tests reach what it defines as they reach the code's names.
    prompt: trusted code run in each test's globals on the judge's side before the test (HumanEval's
        prompt: the helpers it defines are the prompt's, whatever the code redefines).
    memory_mb: the address-space limit of the candidate.
    strict: raise SandboxUnavailable rather than run the code without a required kernel layer.
    Returns a SandboxResult; raises only for bad arguments or SandboxUnavailable, never for anything
    the code does.
    """
    if entry_point is not None:
        if not entry_point.isidentifier():
            raise ValueError(f"entry_point={entry_point!r} is not a Python identifier")
        test_list = [tests if isinstance(tests, str) else "\n".join(tests)]
        labels = [f"check({entry_point})"]
    else:
        test_list = [tests] if isinstance(tests, str) else list(tests)
        labels = test_list
    if not all(isinstance(t, str) for t in test_list + [code, setup_code, prompt]):
        raise TypeError("code, tests, setup_code and prompt must be strings")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s}: must be > 0")
    job = {"code": code, "setup": setup_code, "prompt": prompt, "entry_point": entry_point, "tests": test_list}
    if entry_point is None:
        names = [names_from_code(t, prompt) for t in test_list]
        job.update(remote=[r for r, _ in names], modules=[m for _, m in names])
    outcomes: list[tuple[str, str]] = []
    layers: tuple[str, ...] = ()
    start = 0
    while start < len(test_list):
        got, restart_at, got_layers = _run_judge(job, start, timeout_s, memory_mb, strict)
        layers = layers or got_layers
        outcomes.extend(got)
        if restart_at is None:
            break
        start = restart_at
    return SandboxResult(tuple(Outcome(label, status, message) for label, (status, message) in zip(labels, outcomes)),
                         layers)


def probe(strict: bool = False) -> tuple[str, ...]:
    """The layers this machine applies (a sandbox started with no code). strict=True raises
    SandboxUnavailable where a required one is missing: for a GRPO run to fail before its model loads."""
    return run_tests("", ["pass"], strict=strict).isolation


def workers() -> int:
    """How many sandboxes to run at once: the cores this process may use."""
    return len(os.sched_getaffinity(0))


def parallel_map(fn: Callable, items: Sequence) -> list:
    """[fn(item) for item in items], at most workers() at a time: for fn that run sandboxes (each
    call's work is in its own processes, so threads suffice). Used to score a GRPO group at once."""
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(min(len(items), workers())) as pool:
        return list(pool.map(fn, items))
