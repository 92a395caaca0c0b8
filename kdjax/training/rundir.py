"""A training run's out_dir: one run at a time, checkpoints that never mix runs, the best model.

    out_dir/.lock          held (flock) by the run writing here; a second run is refused
    out_dir/checkpoints/   orbax, asynchronous: state (params, optimizer, step) + meta (the config)
    out_dir/best/          the best validation model so far (train.select_best), kill-safe
    out_dir/metrics.jsonl  progress rows (kdjax.training.progress)

A run into an out_dir that already holds checkpoints must say what it wants: `--resume` continues
(and is refused if the stored config differs from this one in anything that changes the result),
`--overwrite` starts over. Failures of the disk (unwritable, full) are `RunError`s that name the
path and the cause; the last good checkpoint is kept.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil

import jax

from kdjax.errors import UserError, disk_failure

# Fields that change how a run is watched or laid out, not what it computes: they may differ
# between a run and its --resume. Everything else (models, data, optimizer, loss, steps) must not.
RUNTIME_FIELDS = ("out_dir", "resume", "train.log_every", "train.eval_every", "train.checkpoint_every",
                  "train.keep_checkpoints", "mesh.", "remat", "remat_policy", "attention", "eval.",
                  "cache.chunk_rows", "cache.batch_size")
BEST = "best"
_RUN_FILES = ("checkpoints", BEST, BEST + ".new", "metrics.jsonl", "tensorboard", "report.md", "report.json",
              "curves.png", "done.json", "teacher_answers.json")


class RunError(UserError):
    """The out_dir cannot be used as asked (locked, holds another run, unwritable, disk full)."""


def flat_config(cfg) -> dict:
    """{"train.lr": 1e-4, ...}: a config (ConfigDict or dict) as dotted leaves."""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    out = {}

    def walk(prefix, node):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                out[prefix + k] = v
    walk("", d)
    return out


def config_differences(stored: dict, current: dict) -> list[str]:
    """The dotted fields (runtime-only ones left out) whose values differ: ["train.lr: 0.001 -> 0.002"]."""
    a, b = flat_config(stored), flat_config(current)
    runtime = lambda k: any(k == f or (f.endswith(".") and k.startswith(f)) for f in RUNTIME_FIELDS)
    out = []
    for k in sorted(set(a) | set(b)):
        if not runtime(k) and a.get(k, "<absent>") != b.get(k, "<absent>"):
            out.append(f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}")
    return out


def disk_error(e: OSError, path: str) -> RunError:
    cause = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
             errno.EACCES: "permission denied", errno.EPERM: "permission denied",
             errno.EROFS: "the file system is read-only"}.get(e.errno, e.strerror or type(e).__name__)
    return RunError(f"{path}: {cause}")


class RunDir:
    """The out_dir of one run, locked for it (see the module docstring).

    resume: continue from the latest checkpoint (refused when the stored config differs in a
    result field); overwrite: delete an earlier run's files first. Neither, with checkpoints
    present: a RunError that says to choose.
    """

    def __init__(self, cfg, *, overwrite: bool = False):
        self.path = cfg.out_dir
        self.ckpt_dir = os.path.abspath(os.path.join(self.path, "checkpoints"))
        self.config = flat_config(cfg)
        self.writer = jax.process_index() == 0
        self._lock = None
        try:
            os.makedirs(self.path, exist_ok=True)
            if self.writer:
                self._take_lock()
            existing = self._checkpoint_steps()
            if existing and not cfg.resume and not overwrite:
                raise RunError(f"{self.ckpt_dir} holds checkpoints of an earlier run (steps {existing[-3:]}): "
                               f"continue it with --resume, or start over with --overwrite")
            if overwrite and not cfg.resume and self.writer:
                for name in _RUN_FILES:
                    p = os.path.join(self.path, name)
                    shutil.rmtree(p) if os.path.isdir(p) else os.path.exists(p) and os.remove(p)
            os.makedirs(self.ckpt_dir, exist_ok=True)
            self._probe(self.ckpt_dir)
        except OSError as e:
            self.close()
            raise disk_error(e, getattr(e, "filename", None) or self.path) from None
        except BaseException:
            self.close()
            raise
        self.manager = None

    def _take_lock(self):
        path = os.path.join(self.path, ".lock")
        self._lock = open(path, "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            self._lock = None
            raise RunError(f"{self.path} is in use by another run ({holder}); wait for it to finish, or give "
                           f"this run its own --config.out_dir") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        self._lock.flush()

    def _probe(self, directory):
        probe = os.path.join(directory, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)

    def _checkpoint_steps(self) -> list[int]:
        if not os.path.isdir(self.ckpt_dir):
            return []
        return sorted(int(d) for d in os.listdir(self.ckpt_dir) if d.isdigit())

    # ---- checkpoints --------------------------------------------------------------------------
    def open_checkpoints(self, keep: int):
        import orbax.checkpoint as ocp
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(self.ckpt_dir, options=opts)
        return self.manager

    def restore(self, state):
        """(restored state, its step), or (None, 0) when there is no checkpoint. The state is read
        onto `state`'s shardings (any mesh, any process count: orbax reshards). Refuses a
        checkpoint whose config differs in a result field."""
        import orbax.checkpoint as ocp
        step = self.manager.latest_step()
        if step is None:
            return None, 0
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        diff = config_differences(meta.get("config", {}), self.config)
        if diff:
            raise RunError(f"--resume: {self.ckpt_dir} step {step} was written by a run with another config; "
                           f"these fields differ: {'; '.join(diff)}. Resume with the same values, or start "
                           f"a new run (--overwrite, or another --config.out_dir)")
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return out["state"], step

    def save(self, state, step: int):
        import orbax.checkpoint as ocp
        self.check()
        try:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave({"config": self.config,
                                                                                    "step": step})))
        except OSError as e:
            raise disk_error(e, self.ckpt_dir) from None

    def check(self):
        """Raises the error of a failed asynchronous save (as a RunError naming the path)."""
        if self.manager is None:
            return
        try:
            self.manager.check_for_errors()
        except BaseException as e:  # orbax re-raises the background thread's exception
            raise self._as_run_error(e) from None

    def wait(self):
        if self.manager is None:
            return
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except BaseException as e:
            raise self._as_run_error(e) from None

    def _as_run_error(self, e: BaseException) -> BaseException:
        disk = disk_failure(e)
        if disk is not None:
            return RunError(f"{self.ckpt_dir}: saving a checkpoint failed, {disk}")
        return RunError(f"{self.ckpt_dir}: saving a checkpoint failed ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})")

    # ---- the best model on the validation split --------------------------------------------------
    def read_best(self) -> dict | None:
        """{"step", "metric", "value"} of out_dir/best, or None. A save killed before its final
        rename left a complete best.new (best.json is written last): that one is taken."""
        path, new = os.path.join(self.path, BEST), os.path.join(self.path, BEST + ".new")
        if self.writer and not os.path.exists(os.path.join(path, "best.json")) \
                and os.path.exists(os.path.join(new, "best.json")):
            shutil.rmtree(path, ignore_errors=True)
            os.replace(new, path)
        try:
            with open(os.path.join(path, "best.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def save_best(self, model, tokenizer, info: dict) -> dict:
        """Writes `model` to out_dir/best (via best.new, so a kill never leaves a half-written best)."""
        from kdjax.checkpoint import save
        path, new = os.path.join(self.path, BEST), os.path.join(self.path, BEST + ".new")
        if self.writer:
            shutil.rmtree(new, ignore_errors=True)
        save(model, new, format="kdjax", tokenizer=tokenizer)
        if self.writer:
            with open(os.path.join(new, "best.json"), "w") as f:
                json.dump(info, f)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(new, path)
        return info

    def drop_best(self):
        if self.writer:
            shutil.rmtree(os.path.join(self.path, BEST), ignore_errors=True)

    def close(self):
        if getattr(self, "manager", None) is not None:
            try:
                self.manager.close()
            except BaseException:  # a failed save was already reported; never hang on close
                pass
            self.manager = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None
