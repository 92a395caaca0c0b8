"""Kernel-enforced limits for the sandbox's candidate process: Linux, no root, no extra service.

The judge (kdjax/sandbox_judge.py, run as `python -I -S` outside the kdjax package, so this module
imports nothing from kdjax) forks a keeper process, which forks the candidate:

    applied = enter_namespaces(run_dir, ...)        # in the keeper: namespaces for its children
    pid = os.fork()                                 # the candidate: PID 1 of a new PID namespace
    applied += confine(run_dir, readable, limits)   # in the candidate, before any of its code runs

Each returns the names (LAYERS) of what it applied; a layer the kernel refuses is left out and the
judge decides whether to go on (`strict`). What each layer blocks:
  user-ns         an unprivileged caller gets the other namespaces (and tmpfs) through it
  uid-drop        started as root, the candidate runs as uid/gid 65534 (nobody): no root powers
  no-caps         no capabilities, even inside its own user namespace
  pid-ns          the candidate is PID 1 of its own PID namespace: it sees no other process, and
                  when it dies the kernel kills everything it started (nothing outlives the call)
  net-ns          an empty network namespace: no interface but a loopback that is down
  mount-ns        mounts made here (tmpfs) are invisible outside and vanish with the candidate
  ipc-ns, uts-ns  no System V IPC or hostname shared with the machine
  tmpfs           the run directory is a private tmpfs of `tmpfs_mb`: writes cannot fill the disk
  rlimits         RLIMIT_AS (memory), CPU, FSIZE, NPROC (threads), NOFILE, CORE=0
  landlock-fs     opens only: reads of the standard library and the system's shared libraries,
                  reads and writes of the run directory; everything else is refused (site-packages
                  under the standard library is also covered by an empty tmpfs in the mount namespace)
  landlock-net    no TCP bind or connect
  landlock-scope  signals and abstract Unix sockets reach only processes inside the sandbox
  seccomp         refused: fork/vfork/clone without CLONE_THREAD (threads still work), exec,
                  ptrace and process_vm_*, socket/socketpair, unshare/setns/mount and friends,
                  io_uring, bpf, perf_event_open, userfaultfd, keyctl
"""
from __future__ import annotations

import ctypes
import os
import resource
import signal
import stat

LAYERS = ("user-ns", "uid-drop", "no-caps", "pid-ns", "net-ns", "mount-ns", "ipc-ns", "uts-ns", "tmpfs",
          "rlimits", "landlock-fs", "landlock-net", "landlock-scope", "seccomp")
# Without these, strict mode refuses to run the code (uid-drop is required only when started as root):
# they keep it from writing or reading files outside, creating processes, opening sockets and
# outliving the call. The rest narrows what is left (documented in docs/sandbox.md).
REQUIRED = ("no-caps", "pid-ns", "net-ns", "mount-ns", "rlimits", "landlock-fs", "seccomp")
NOBODY = 65534

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_THREAD = 0x10000000, 0x20000000, 0x40000000, 0x00010000
_NAMESPACES = {"pid-ns": CLONE_NEWPID, "net-ns": CLONE_NEWNET, "mount-ns": CLONE_NEWNS,
               "ipc-ns": CLONE_NEWIPC, "uts-ns": CLONE_NEWUTS}
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def die_with_parent() -> None:
    """SIGKILL this process when the process (thread) that forked it exits."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def adopt_orphans() -> None:
    """Make this process the parent of its descendants' orphans (PR_SET_CHILD_SUBREAPER), to reap them."""
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


# ---- namespaces, in the keeper -----------------------------------------------------------------
def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _reachable_by_nobody(path: str) -> bool:
    """Whether uid/gid 65534 may search every directory on the way to `path` (and read it)."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(1, len(parts) + 1):
        st = os.stat(os.sep.join(parts[:i]) or os.sep)
        if not st.st_mode & (stat.S_IXOTH | (stat.S_IROTH if i == len(parts) else 0)):
            return False
    return True


def _make_reachable(paths: list[str]) -> None:
    """As root in a new mount namespace: for each directory nobody cannot reach (pyenv installs
    Python under /root, mode 0700), cover its closed ancestor with a tmpfs holding only a read-only
    bind of the directory. Also hides the rest of that ancestor (root's home) from the candidate."""
    for path in paths:
        if _reachable_by_nobody(path):
            continue
        parts = os.path.abspath(path).split(os.sep)
        closed = next(os.sep.join(parts[:i]) for i in range(2, len(parts) + 1)
                      if not os.stat(os.sep.join(parts[:i])).st_mode & stat.S_IXOTH)
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY)
        try:
            _mount("tmpfs", closed, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
            os.makedirs(path, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            _mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        finally:
            os.close(fd)


def _map_ids(uid: int, gid: int) -> None:
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def _hide(paths: list[str]) -> None:
    """Cover each existing directory with an empty read-only tmpfs (site-packages under the standard
    library: it may hold the datasets' packages, whose reference answers the code could copy)."""
    for path in paths:
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555")


def enter_namespaces(run_dir: str, reach: list[str], hide: list[str], tmpfs_mb: int) -> list[str]:
    """In the keeper (single-threaded, forked): put the children it forks next into new namespaces,
    mount a private tmpfs on run_dir, and drop root, keeping the directories `reach` (the standard
    library) within nobody's reach and hiding the directories `hide`. Returns the layers applied."""
    applied: list[str] = []
    all_ns = sum(_NAMESPACES.values())
    if os.geteuid() == 0:  # root: namespaces and mounts first, then become nobody
        if _libc.unshare(all_ns) == 0:
            applied += _NAMESPACES
            _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here shows outside
            _mount("tmpfs", run_dir, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                   f"size={tmpfs_mb}m,mode=0700,uid={NOBODY},gid={NOBODY}")
            applied.append("tmpfs")
            _make_reachable(reach)
            _hide(hide)
        else:
            os.chown(run_dir, NOBODY, NOBODY)
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)  # from 0 to non-zero: every capability is cleared
        _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # the uid change made /proc/self root's; own it again
        applied.append("uid-drop")
        if _libc.unshare(CLONE_NEWUSER) == 0:
            _map_ids(NOBODY, NOBODY)
            applied.append("user-ns")
        return applied
    uid, gid = os.getuid(), os.getgid()
    if _libc.unshare(CLONE_NEWUSER | all_ns) == 0:
        _map_ids(uid, gid)
        applied += ["user-ns", *_NAMESPACES]
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        _mount("tmpfs", run_dir, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"size={tmpfs_mb}m,mode=0700")
        applied.append("tmpfs")
        _hide(hide)
    return applied


# ---- limits on the candidate itself --------------------------------------------------------------
class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_capabilities() -> bool:
    """Clear every capability (a user namespace's creator holds all of them inside it)."""
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if _libc.capset(ctypes.byref(header), data) != 0:
        return False
    _libc.capget(ctypes.byref(header), data)
    return not any(d.effective or d.permitted or d.inheritable for d in data)


def _set_rlimits(limits: dict) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file over RLIMIT_FSIZE raises OSError instead of killing
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value + 1 if name == "RLIMIT_CPU" else value))


# Landlock (linux/landlock.h): syscalls 444-446 on every architecture.
_LL_CREATE, _LL_ADD_RULE, _LL_RESTRICT = 444, 445, 446
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR, _FS_TRUNCATE = 1, 2, 4, 8, 1 << 14
_FS_ALL_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
_NET_BIND_TCP, _NET_CONNECT_TCP = 1, 2
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1, 2


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The Landlock ABI version the kernel offers (0: none)."""
    return max(0, _libc.syscall(_LL_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1)))


def _landlock(run_dir: str, readable: list[str]) -> list[str]:
    abi = landlock_abi()
    if abi < 1:
        return []
    fs_all = _FS_ALL_BY_ABI[max(a for a in _FS_ALL_BY_ABI if a <= abi)]
    attr = _RulesetAttr(fs_all, _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0,
                        _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _check(_libc.syscall(_LL_CREATE, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)),
                     "landlock_create_ruleset")
    read_dir, read_file = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR, _FS_EXECUTE | _FS_READ_FILE
    rules = [(run_dir, fs_all)] + [(p, read_dir if os.path.isdir(p) else read_file) for p in readable]
    rules.append(("/dev/null", (_FS_READ_FILE | _FS_WRITE_FILE | _FS_TRUNCATE) & fs_all))
    try:
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # a library directory this machine does not have
            try:
                rule = _PathBeneathAttr(access, fd)
                _check(_libc.syscall(_LL_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0), f"landlock rule {path}")
            finally:
                os.close(fd)
        _check(_libc.syscall(_LL_RESTRICT, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return ["landlock-fs"] + (["landlock-net"] if abi >= 4 else []) + (["landlock-scope"] if abi >= 6 else [])


# seccomp through libseccomp (installed with most distributions; without it, no "seccomp" layer).
_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_ACT_ERRNO = lambda errno: 0x00050000 | errno
_SCMP_CMP_MASKED_EQ = 7
_EPERM, _ENOSYS = 1, 38
REFUSED_SYSCALLS = (
    "fork", "vfork", "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "pidfd_open", "pidfd_getfd", "socket", "socketpair", "unshare", "setns", "mount", "umount2",
    "pivot_root", "chroot", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
    "mount_setattr", "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf", "perf_event_open",
    "userfaultfd", "keyctl", "add_key", "request_key", "open_by_handle_at", "name_to_handle_at")


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def load_libseccomp():
    """libseccomp.so.2, or None where the machine does not have it."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = (ctypes.c_uint32,)
    lib.seccomp_rule_add_array.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp))
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_load.argtypes = lib.seccomp_release.argtypes = (ctypes.c_void_p,)
    return lib


def _seccomp(lib) -> list[str]:
    if lib is None:
        return []
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)  # also sets no_new_privs; other architectures are killed
    if not ctx:
        return []
    try:
        def refuse(name: str, errno: int = _EPERM, *cmp: _ArgCmp) -> None:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr >= 0:
                args = (_ArgCmp * len(cmp))(*cmp)
                _check(lib.seccomp_rule_add_array(ctx, _SCMP_ACT_ERRNO(errno), nr, len(cmp), args), f"seccomp {name}")
        for name in REFUSED_SYSCALLS:
            refuse(name)
        refuse("clone", _EPERM, _ArgCmp(0, _SCMP_CMP_MASKED_EQ, CLONE_THREAD, 0))  # a process, not a thread
        refuse("clone3", _ENOSYS)  # its flags sit behind a pointer; glibc then falls back to clone
        _check(lib.seccomp_load(ctx), "seccomp_load")
    finally:
        lib.seccomp_release(ctx)
    return ["seccomp"]


def confine(run_dir: str, readable: list[str], limits: dict, libseccomp) -> list[str]:
    """In the candidate, before its code runs: capabilities, rlimits, no_new_privs, Landlock,
    seccomp. readable: files and directories it may read (directories: everything beneath);
    limits: {"RLIMIT_AS": bytes, ...}; libseccomp: from load_libseccomp() (loaded before the
    fork). Returns the names of the layers applied."""
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # no other process of its uid may ptrace it or read its /proc
    applied = ["no-caps"] if _drop_capabilities() else []
    _set_rlimits(limits)
    applied.append("rlimits")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    applied += _landlock(run_dir, readable)
    applied += _seccomp(libseccomp)
    return applied
