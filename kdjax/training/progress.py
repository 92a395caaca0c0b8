"""Progress of a run: one line per log step (step, loss, tokens/s, ETA), metrics.jsonl, TensorBoard."""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np


def hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Train metrics are averaged over the `log_every` steps since the last line; evaluation rows
    are written as they come. Process 0 writes; a resumed run first drops the rows logged after
    its checkpoint, so the log continues without duplicated steps."""

    def __init__(self, out_dir: str, total_steps: int, start_step: int, log_every: int):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.total, self.start, self.log_every = total_steps, start_step, max(1, log_every)
        self.t0, self.tokens, self.window = time.time(), 0, []
        self.writer = jax.process_index() == 0
        self.tb = None
        if not self.writer:
            return
        if os.path.exists(self.path):
            rows = [json.loads(line) for line in open(self.path) if line.strip()]
            with open(self.path, "w") as f:
                for r in rows:
                    if r.get("step", 0) <= start_step:
                        f.write(json.dumps(r) + "\n")
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        except ImportError:  # TensorBoard logging is optional
            pass

    def step(self, step: int, metrics: dict, tokens: int):
        """Record one finished step; prints and writes the window's mean every log_every steps
        and at the last step."""
        self.tokens += tokens
        self.window.append(metrics)
        if step % self.log_every == 0 or step == self.total:
            keys = [k for k in metrics if all(k in w for w in self.window)]
            self.write(step, {k: float(np.mean([w[k] for w in self.window])) for k in keys})
            self.window = []

    def write(self, step: int, metrics: dict, echo: bool = True):
        if not self.writer:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, step)
        if echo:
            elapsed = time.time() - self.t0
            rate = self.tokens / max(elapsed, 1e-9)
            eta = elapsed / max(step - self.start, 1) * (self.total - step)
            parts = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            print(f"step {step}/{self.total} {parts} | {rate:,.0f} tok/s | ETA {hms(eta)}", flush=True)

    def close(self):
        if self.tb is not None:
            self.tb.close()
            self.tb = None
