"""The sandbox's processes: the trusted judge, which runs the tests and decides, and the candidate,
which runs the code under kernel limits. kdjax.sandbox starts the judge as `python -I -S -c
"import sandbox_judge; sandbox_judge.main()" PARAMS` (no site-packages, nothing of kdjax imported):

    judge (trusted)                       keeper               candidate (confined, PID 1)
      forks the keeper ------------------> enter_namespaces
                                           forks ---------------> confine; reports its layers
      reads the job (tests, code) only now: the candidate's memory never held the tests
      sends the code ----------------------------------------------> exec(code), then setup_code
      runs each test in fresh globals, with its own builtins;
      a name the test takes from the code
      is a Remote, whose calls go ---------------------------------> f(*args, **kwargs)
      <------------------------------------------------------------- the result, as plain data
      compares and decides; reports each outcome to kdjax.sandbox on its own pipe

Plain data: None, bool, int, float, complex, str, bytes and list, tuple, set, frozenset, dict of
them, checked by exact type (a subclass may override __eq__); also builtin classes (`int`, passed as
an argument), and the standard library's Counter, OrderedDict, defaultdict and deque, which honest
MBPP answers return. It travels as JSON, containers and bytes as tagged lists, and the judge
rebuilds every value from its own builtins and collections. Any other value the code returns
reaches the test as a Ref, which the test can only pass back to the code: comparing, testing the
truth of, hashing or reading it raises NotPlainData, so the test fails.
"""
import builtins
import collections
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sandbox_confine as confine  # noqa: E402  (beside this file, imported as kdjax.sandbox_judge or not)

del sys.path[0]

_MAPPINGS = {"dict": dict, "Counter": collections.Counter, "OrderedDict": collections.OrderedDict,
             "defaultdict": lambda pairs: collections.defaultdict(None, pairs)}
_SEQUENCES = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset, "deque": collections.deque}
MAX_DEPTH = 100
MAX_REPLY_BYTES = 64 << 20
_INT_TAG_FROM = 1 << 256  # larger ints travel as hex: decimal parsing is quadratic


# ---- plain data on the wire ----------------------------------------------------------------------
def encode(value, other, depth=0):
    """`value` as JSON-able data; `other(value)` encodes what is not plain data (or raises)."""
    kind = type(value)
    if value is None or kind in (bool, float, str):
        return value
    if kind is int:
        return value if -_INT_TAG_FROM < value < _INT_TAG_FROM else ["int", format(value, "x")]
    if depth >= MAX_DEPTH:
        raise ValueError(f"the value is nested more than {MAX_DEPTH} deep")
    name = kind.__name__
    if kind is _SEQUENCES.get(name):
        return [name, [encode(x, other, depth + 1) for x in value]]
    if kind is _MAPPINGS.get(name) or kind is collections.defaultdict:
        return [name, [[encode(k, other, depth + 1), encode(x, other, depth + 1)] for k, x in value.items()]]
    if kind is bytes:
        return ["bytes", value.hex()]
    if kind is complex:
        return ["complex", [value.real, value.imag]]
    if kind is type and getattr(builtins, value.__name__, None) is value:
        return ["builtin", value.__name__]
    return other(value)


def decode(data, other, depth=0):
    """The value `data` encodes, rebuilt from this process's builtins and collections; `other(data)`
    decodes the "ref" and "global" tags. Raises ValueError (TypeError: an unhashable key) else."""
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is not list or len(data) < 2 or type(data[0]) is not str or depth >= MAX_DEPTH:
        raise ValueError("malformed plain data")
    tag, body = data[0], data[1]
    if tag in _SEQUENCES and type(body) is list:
        return _SEQUENCES[tag](decode(x, other, depth + 1) for x in body)
    if tag in _MAPPINGS and type(body) is list and all(type(p) is list and len(p) == 2 for p in body):
        return _MAPPINGS[tag]({decode(k, other, depth + 1): decode(x, other, depth + 1) for k, x in body})
    if tag == "bytes" and type(body) is str:
        return bytes.fromhex(body)
    if tag == "int" and type(body) is str:
        return int(body, 16)
    if tag == "complex" and type(body) is list and len(body) == 2 and all(type(x) in (int, float) for x in body):
        return complex(*body)
    if tag == "builtin" and isinstance(getattr(builtins, str(body), None), type):
        return getattr(builtins, body)
    if tag in ("ref", "global"):
        return other(data)
    raise ValueError(f"malformed plain data (tag {tag!r})")


def describe(e: BaseException) -> str:
    """'Type: message', at most 500 characters."""
    try:
        text = str(e)
    except BaseException:
        text = "<unprintable>"
    if not isinstance(e, Verdict):
        text = type(e).__name__ + (": " + text if text else "")
    return text if len(text) <= 500 else text[:500] + "..."


# ---- the candidate: serves the judge's requests ---------------------------------------------------
def serve(requests, replies, layers) -> None:
    """In the confined candidate: answer each JSON-line request. Everything here is the code's to
    tamper with; the judge trusts nothing it sends beyond plain data."""
    scope = {"__name__": "__main__", "__builtins__": builtins}
    refs = []

    def keep(value):  # not plain data: keep it here, send a reference
        refs.append(value)
        return ["ref", len(refs) - 1, type(value).__name__[:100]]

    def resolve(data):
        if data[0] == "ref":
            return refs[data[1]]
        if data[1] not in scope:
            raise NameError(f"name {data[1]!r} is not defined")
        return scope[data[1]]

    def reply(message):
        replies.write(json.dumps(message).encode() + b"\n")
        replies.flush()

    reply({"ready": layers})
    for line in requests:
        request = json.loads(line)
        op, answer = request["op"], {"id": request["id"]}
        try:
            if op == "load":
                exec(compile(request["code"], "<solution>", "exec"), scope)
                if request["setup"]:
                    exec(compile(request["setup"], "<test_setup>", "exec"), scope)
            elif op == "lookup":
                answer["values"] = [["missing"] if name not in scope else ["callable"] if callable(scope[name])
                                    else encode(scope[name], keep) for name in request["names"]]
            elif op == "call":
                fn = resolve(request["fn"])
                args = decode(request["args"], resolve)
                kwargs = decode(request["kwargs"], resolve)
                answer["value"] = encode(fn(*args, **kwargs), keep)
        except BaseException as e:
            answer = {"id": request["id"], "raised": type(e).__name__[:100], "message": describe(e)}
        reply(answer)


def readable_paths() -> tuple[list[str], list[str], list[str]]:
    """(readable, reach, hide) for this interpreter: the candidate reads the standard library
    (minus site-packages, hidden under an empty tmpfs) and the system's shared libraries."""
    stdlib = os.path.dirname(os.__file__)
    readable = [stdlib, "/lib", "/lib64", "/usr/lib", "/usr/lib64", "/etc/ld.so.cache"]
    return readable, [stdlib], [os.path.join(stdlib, "site-packages"), os.path.join(stdlib, "dist-packages")]


def start_candidate(params: dict):
    """Fork the keeper, which forks the confined candidate. Returns (keeper pid, request file,
    reply file, status fd): the keeper writes the candidate's wait status on the status fd."""
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    status_r, status_w = os.pipe()
    libseccomp = confine.load_libseccomp()  # dlopen before Landlock closes the library directories
    judge = os.getpid()
    keeper = os.fork()
    if keeper == 0:
        _keeper(params, judge, req_r, rep_w, status_w, libseccomp)
    for fd in (req_r, rep_w, status_w):
        os.close(fd)
    return keeper, os.fdopen(req_w, "wb"), os.fdopen(rep_r, "rb"), status_r


def _keeper(params: dict, judge: int, req_r: int, rep_w: int, status_w: int, libseccomp) -> None:
    """The keeper process: namespaces, then fork the candidate and report its wait status."""
    try:
        confine.die_with_parent()
        if os.getppid() != judge:
            os._exit(1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the judge's handler is the judge's
        keep = {req_r, rep_w, status_w}
        for fd in map(int, os.listdir("/proc/self/fd")):
            if fd > 2 and fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass  # the listing's own descriptor
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        readable, reach, hide = readable_paths()
        layers = confine.enter_namespaces(params["run_dir"], reach, hide, params["tmpfs_mb"])
        candidate = os.fork()
        if candidate == 0:
            os.close(status_w)
            _candidate(params["run_dir"], readable, params["limits"], libseccomp, layers, req_r, rep_w)
        os.close(req_r)
        os.close(rep_w)
        _, status = os.waitpid(candidate, 0)
        os.write(status_w, str(status).encode())
    except BaseException as e:
        os.write(status_w, ("the sandbox could not start: " + describe(e)).encode())
    finally:
        os._exit(0)


def _candidate(run_dir, readable, limits, libseccomp, layers, req_r, rep_w) -> None:
    replies = os.fdopen(rep_w, "wb")
    try:
        confine.die_with_parent()
        layers += confine.confine(run_dir, readable, limits, libseccomp)
        os.chdir(run_dir)
    except BaseException as e:
        replies.write(json.dumps({"error": "the sandbox could not start: " + describe(e)}).encode() + b"\n")
        replies.flush()
        os._exit(1)
    serve(os.fdopen(req_r, "rb"), replies, layers)
    os._exit(0)


# ---- the judge ----------------------------------------------------------------------------------
class Verdict(BaseException):
    """Raised into a test by the judge (not catchable by the test's `except Exception`)."""


class NotPlainData(Verdict):
    """A value the code returned, or an argument the test passes to it, is not plain data."""


class CodeRaised(Verdict):
    """The code raised an exception that the judge does not rebuild (not a builtin Exception)."""


class CodeDied(Verdict):
    """The candidate process ended or broke the protocol; the tests after this one need a new one."""


def rebuild(name: str, message: str) -> BaseException:
    """The code's exception as the judge's: a builtin Exception class of that name (not
    StopIteration, which would end the test's loops early), else CodeRaised."""
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, (StopIteration,
                                                                                     StopAsyncIteration)):
        text = message.split(": ", 1)[1] if message.startswith(name + ": ") else ""
        try:
            return cls(text) if text else cls()
        except Exception:
            pass
    return CodeRaised(message)


class Candidate:
    """The judge's side of the candidate: requests out, replies in, nothing else shared."""

    def __init__(self, params: dict):
        self.keeper, self.requests, self.replies, self.status_fd = start_candidate(params)
        self.next_id = 0
        self.dead = ""

    def _read(self) -> dict:
        line = self.replies.readline(MAX_REPLY_BYTES + 1)
        if not line:
            raise CodeDied(self.stop())
        if not line.endswith(b"\n"):
            raise CodeDied(self.stop(f"the code sent a reply over {MAX_REPLY_BYTES >> 20} MiB"))
        try:
            reply = json.loads(line)
        except (ValueError, RecursionError):
            reply = None
        if type(reply) is not dict:
            raise CodeDied(self.stop("the code corrupted the sandbox's reply channel"))
        return reply

    def ready(self) -> list:
        reply = self._read()
        layers = reply.get("ready")
        if type(layers) is not list or not all(type(x) is str for x in layers):
            raise CodeDied(self.stop(str(reply.get("error", "the sandbox did not start"))))
        return layers

    def request(self, **message) -> dict:
        if self.dead:
            raise CodeDied(self.dead)
        message["id"] = self.next_id = self.next_id + 1
        try:
            self.requests.write(json.dumps(message).encode() + b"\n")
            self.requests.flush()
        except OSError:
            pass  # it died: the read below says how
        reply = self._read()
        if reply.get("id") != message["id"]:
            raise CodeDied(self.stop("the code corrupted the sandbox's reply channel"))
        if "raised" in reply:
            raise rebuild(str(reply["raised"]), str(reply.get("message", "")))
        return reply

    def call(self, fn: list, args: tuple, kwargs: dict):
        try:
            args_data, kwargs_data = encode(args, Remote.encode), encode(kwargs, Remote.encode)
        except ValueError as e:
            raise NotPlainData(f"an argument for the code is not plain data ({e})") from None
        value = self.request(op="call", fn=fn, args=args_data, kwargs=kwargs_data).get("value")
        return self.decode(value)

    def decode(self, data):
        try:
            return decode(data, lambda d: Ref(self, d))
        except (ValueError, TypeError, RecursionError) as e:
            raise NotPlainData(f"the code returned a value that is not plain data ({e})") from None

    def stop(self, why: str = "") -> str:
        """Kill the candidate (if alive) and return how it ended, e.g. 'the process crashed (SIGSEGV)'."""
        if self.dead:
            return self.dead
        if why:
            os.kill(self.keeper, signal.SIGKILL)  # the candidate follows (PR_SET_PDEATHSIG)
        os.waitpid(self.keeper, 0)
        status = os.read(self.status_fd, 600).decode()
        if why:
            self.dead = why
        elif not status.isdigit():
            self.dead = status or "the sandbox's keeper process died"
        else:
            code = os.waitstatus_to_exitcode(int(status))
            if code == -signal.SIGXCPU:
                self.dead = "CPU time limit exceeded (SIGXCPU)"
            elif code < 0:
                try:
                    name = signal.Signals(-code).name
                except ValueError:
                    name = f"signal {-code}"
                self.dead = f"the process crashed ({name})"
            else:
                self.dead = f"the process exited with code {code} (sys.exit or os._exit in the code?)"
        return self.dead

    def end(self) -> None:
        """Let the candidate exit (it reads EOF), SIGKILL its keeper if it has not after a second,
        and reap every process left of it: the judge adopts the orphans (sandbox_confine.adopt_orphans)."""
        if not self.dead:
            self.dead = "ended"
            try:
                self.requests.close()
            except OSError:
                pass
            for _ in range(1000):
                if os.waitpid(self.keeper, os.WNOHANG)[0]:
                    break
                time.sleep(0.001)
            else:
                os.kill(self.keeper, signal.SIGKILL)
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return


class Remote:
    """A name the test takes from the code: calling it calls the code's function in the candidate."""
    __slots__ = ("candidate", "fn", "__name__")

    def __init__(self, candidate: Candidate, fn: list, name: str):
        self.candidate, self.fn, self.__name__ = candidate, fn, name

    def __call__(self, *args, **kwargs):
        return self.candidate.call(self.fn, args, kwargs)

    def __repr__(self):
        return f"<the code's {self.__name__}>"

    @staticmethod
    def encode(value):
        if type(value) in (Remote, Ref):
            return value.fn
        raise ValueError(f"{type(value).__name__} is not plain data")


def _refuse(self, *args):
    raise NotPlainData(f"the code returned a {self.__name__} object, which is not plain data (None, bool, int, "
                       f"float, complex, str, bytes, and lists, tuples, sets, dicts of them)")


class Ref(Remote):
    """A value of the code's that is not plain data: it can be passed back to the code (or called),
    and any other use (==, <, bool, hash, len, iteration, attributes) fails the test."""
    __slots__ = ()

    def __init__(self, candidate: Candidate, data: list):
        super().__init__(candidate, data[:2], str(data[2]) if len(data) > 2 else "object")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __hash__ = __len__ = __iter__ = _refuse
    __contains__ = __getitem__ = __index__ = __int__ = __float__ = __getattr__ = _refuse

    def __repr__(self):
        return f"<the code's {self.__name__} object>"


def run_test(candidate: Candidate, job: dict, i: int) -> tuple[str, str]:
    """Test i of the job in fresh globals: (status, message)."""
    scope = {"__name__": "__main__", "__builtins__": builtins}
    entry = job["entry_point"]
    try:
        if job["prompt"]:
            exec(compile(job["prompt"], "<prompt>", "exec"), scope)
        if entry:  # HumanEval: run the program, then check(candidate); its own uses of the name go there too
            scope[entry] = function = Remote(candidate, ["global", entry], entry)
            exec(compile(job["tests"][i], "<test>", "exec"), scope)
            scope["check"](function)
        else:
            names = job["remote"][i]
            if names:
                for name, data in zip(names, candidate.request(op="lookup", names=names)["values"]):
                    if data == ["callable"]:
                        scope[name] = Remote(candidate, ["global", name], name)
                    elif data != ["missing"]:
                        scope[name] = candidate.decode(data)
            for name in job["modules"][i]:
                scope[name] = __import__(name)
            exec(compile(job["tests"][i], "<test>", "exec"), scope)
        return "passed", ""
    except AssertionError as e:
        return "failed", describe(e)
    except BaseException as e:
        return "error", describe(e)


def main() -> None:
    """The judge: sys.argv[1] holds its parameters (JSON, from kdjax.sandbox._run_judge)."""
    params = json.loads(sys.argv[1])
    events = os.fdopen(params["events_fd"], "w")

    def report(**event):
        events.write(json.dumps(event) + "\n")
        events.flush()

    for name in params["preload"]:  # what the prompt imports, imported once for both processes
        try:
            __import__(name)
        except ImportError:
            pass  # the prompt's own import reports it
    confine.adopt_orphans()
    candidate = None

    def end(*_):  # SIGTERM, from kdjax.sandbox after a timeout (or at the end): leave nothing behind
        if candidate is not None:
            candidate.end()
        os._exit(0)

    signal.signal(signal.SIGTERM, end)
    candidate = Candidate(params)
    try:
        judge(candidate, params, report)
    finally:
        candidate.end()


def judge(candidate: Candidate, params: dict, report) -> None:
    """Check the candidate's layers, read the job, load the code, run the tests, report each."""
    try:
        layers = candidate.ready()
    except CodeDied as e:
        report(event="broken", message=str(e))
        return
    missing = [layer for layer in params["required"] if layer not in layers]
    report(event="ready", layers=layers, missing=missing)
    if missing and params["strict"]:
        return
    with open(params["job"]) as f:
        job = json.load(f)
    try:
        candidate.request(op="load", code=job["code"], setup=job["setup"])
    except BaseException as e:
        report(event="load", ok=False, message=("while loading the code: " if isinstance(e, CodeDied) else "")
               + describe(e))
        return
    report(event="load", ok=True)
    for i in range(job["start"], len(job["tests"])):
        status, message = run_test(candidate, job, i)
        report(event="test", index=i, status=status, message=message)
        if candidate.dead:
            return  # kdjax.sandbox goes on with the next test in a fresh sandbox
