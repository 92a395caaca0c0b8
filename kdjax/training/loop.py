"""The one training loop. Every trainer (SFT, KD, GKD, MiniLLM, GRPO) is a `Task`: a loss for one
gradient update and a batch source; the loop owns the rest.

    for step in range(start, steps):
        batch = task.batches(step, model)                    # host arrays (sampled on-policy or read)
        state, metrics = update(state, place(batch), frozen)  # one jit: grad accumulation + AdamW
        finite check · progress line · periodic evaluation · best model · checkpoint

A step is a pure function of (state, batch): data order and sampling keys are functions of the
step, so SIGKILL + `--resume` ends bit-identical to an uninterrupted run. On several processes
(`--distributed`) every process runs this same loop; each places only its own rows of the batch on
its devices, and process 0 writes the logs.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import jax
from flax import nnx

from kdjax.errors import ConfigError
from kdjax.sharding import call_compiled, place_rows
from kdjax.training.progress import Progress
from kdjax.training.rundir import RunDir, RunError
from kdjax.training.state import Loss, Totals, batch_sharding, init_state, make_optimizer, update

# train.select_best: the metric and which way is better
SELECT = {"rougeL": max, "rougeL_unicode": max, "val_loss": min, "pass_at_1": max, "tests": max}


class TrainingDiverged(RunError):
    """The loss, the gradient or the weights became inf / NaN."""


@dataclasses.dataclass
class Batch:
    """What a batch source gives the loop for one step."""
    arrays: dict  # the global batch: {name: np.ndarray [rows, ...]} (nested dicts allowed)
    tokens: int  # tokens it trains on (for tokens/s)
    metrics: dict = dataclasses.field(default_factory=dict)  # host-side metrics (rewards, sampling time)


class BatchSource(Protocol):
    examples: int  # what one epoch counts (rows, prompts), for train.epochs
    rows: int  # rows of one batch (train.batch_size x what one example makes)

    def __call__(self, step: int, model: nnx.Module) -> Batch: ...


@dataclasses.dataclass
class Task:
    """A training method, as the loop runs it."""
    name: str  # "sft", "distill", "gkd", "minillm", "grpo"
    model: nnx.Module  # the model to train, on `mesh`
    mesh: Any
    tokenizer: Any
    loss: Loss  # (params, micro_batch, frozen, totals) -> (loss, metrics); see kdjax.training.state
    totals: Totals  # (batch) -> global normalisers
    batches: BatchSource
    frozen: Any = None  # params of frozen models (teacher, reference), the loss's third argument
    evaluate: Callable[[nnx.Module], dict] | None = None  # validation metrics of a model


def check_train_config(cfg, eval_metrics: tuple[str, ...], *, has_validation: bool):
    """The train.* fields every trainer honours, checked before anything is loaded."""
    tc = cfg.train
    for name in ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints"):
        if int(tc[name]) < (0 if name == "steps" else 1):
            raise ConfigError(f"train.{name}", f"={tc[name]}: must be >= {0 if name == 'steps' else 1}")
    if tc.epochs < 0 or tc.eval_every < 0:
        raise ConfigError("train.epochs" if tc.epochs < 0 else "train.eval_every", "must be >= 0")
    if tc.batch_size % tc.grad_accum:
        raise ConfigError("train.batch_size", f"={tc.batch_size} must divide by train.grad_accum={tc.grad_accum}")
    if not tc.lr > 0:
        raise ConfigError("train.lr", f"={tc.lr}: must be > 0")
    if tc.eval_every and not has_validation:
        raise ConfigError("train.eval_every", f"={tc.eval_every} needs validation data (--config.data.valid > 0)")
    if tc.select_best:
        if tc.select_best not in eval_metrics:
            raise ConfigError("train.select_best", f"={tc.select_best!r}: expected '' (keep the last step) or a "
                                                   f"metric of this trainer's evaluation: {', '.join(eval_metrics)}")
        if not tc.eval_every:
            raise ConfigError("train.select_best", f"={tc.select_best!r} needs validation evals: set "
                                                   f"--config.train.eval_every")


def resolve_steps(cfg, examples: int) -> int:
    """train.epochs > 0 replaces train.steps: ceil(epochs * examples / batch_size)."""
    tc = cfg.train
    if tc.epochs:
        tc.steps = max(1, math.ceil(tc.epochs * examples / tc.batch_size))
        print(f"train.epochs={tc.epochs}: {tc.steps} steps of {tc.batch_size}", flush=True)
    if tc.steps < 1:
        raise ConfigError("train.steps", f"={tc.steps}: must be >= 1 (or set train.epochs)")
    return tc.steps


def check_finite(metrics: dict, step: int, run: RunDir, last_good: int):
    if not all(math.isfinite(metrics[k]) for k in ("loss", "grad_norm", "param_norm")):
        run.wait()
        raise TrainingDiverged(
            f"loss {metrics['loss']}, grad norm {metrics['grad_norm']}, parameter norm {metrics['param_norm']} "
            f"at step {step}: not finite, stopped. The last good checkpoint is step {last_good} in "
            f"{run.ckpt_dir} (--resume continues from it; lower --config.train.lr?)")


def jit_update(tx, loss, totals, accum: int, state_sh, frozen, mesh):
    """The step every trainer runs, compiled once: state.update with the trainer's loss, state
    and its shardings in and out (donated), the batch split over the data-parallel devices, the
    frozen models' params as they are placed. (kdjax.programs compiles this same function for
    `kdjax plan`.)"""
    frozen_sh = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
    return jax.jit(partial(update, tx=tx, loss=loss, totals=totals, accum=accum),
                   in_shardings=(state_sh, batch_sharding(mesh), frozen_sh), out_shardings=(state_sh, None),
                   donate_argnums=0)


def fit(cfg, task: Task, run: RunDir) -> dict:
    """Trains `task` for cfg.train.steps (resuming from `run` with cfg.resume); returns {"model":
    the model to keep (the best validation one with train.select_best, else the last), "last":
    the last step's model, "best": best.json or None, "start_step"}."""
    tc, mesh = cfg.train, task.mesh
    tx = make_optimizer(tc)
    graphdef, state, state_sh = init_state(task.model, tx, mesh)
    step_fn = jit_update(tx, task.loss, task.totals, tc.grad_accum, state_sh, task.frozen, mesh)
    run.open_checkpoints(tc.keep_checkpoints)
    start = 0
    if cfg.resume:
        restored, start = run.restore(state)
        if restored is None:
            print(f"resume: no checkpoint in {run.ckpt_dir}, starting at step 0", flush=True)
        else:
            state = restored
            print(f"resumed from {run.ckpt_dir} step {start}", flush=True)
    select = tc.select_best
    best = run.read_best() if select and cfg.resume else None
    if select and not cfg.resume:
        run.drop_best()  # a fresh run's own best only
    progress = Progress(cfg.out_dir, tc.steps, start, tc.log_every)
    model_of = lambda s: nnx.merge(graphdef, s["params"])
    last_good = start
    try:
        with jax.set_mesh(mesh):  # activations are constrained through the rule table on this mesh
            for step in range(start, tc.steps):
                batch = task.batches(step, model_of(state))
                new_state, metrics = call_compiled(step_fn, state, place_rows(batch.arrays, mesh), task.frozen)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                done = step + 1
                if tc.check_finite:
                    check_finite(metrics, done, run, last_good)
                state = new_state
                progress.step(done, {**metrics, **batch.metrics}, batch.tokens)
                if tc.eval_every and done % tc.eval_every == 0:
                    ev = task.evaluate(model_of(state))
                    progress.write(done, ev)
                    if select and (best is None or SELECT[select](ev[select], best["value"]) != best["value"]):
                        best = run.save_best(model_of(state), task.tokenizer,
                                             dict(step=done, metric=select, value=ev[select]))
                        print(f"best so far: step {done}, validation {select} {ev[select]:.4g} -> "
                              f"{run.path}/best", flush=True)
                if done % tc.checkpoint_every == 0 or done == tc.steps:
                    run.save(state, done)
                    last_good = done
                else:
                    run.check()
            run.wait()
    finally:
        progress.close()
    last = model_of(state)
    model = last
    if best is not None:
        from kdjax.checkpoint import load
        model = load(f"{run.path}/best", dtype=cfg.dtype, param_dtype=cfg.param_dtype, mesh=mesh)[0]
        print(f"selected step {best['step']} of {tc.steps} (validation {best['metric']} {best['value']:.4g})",
              flush=True)
    return dict(model=model, last=last, best=best, start_step=start)


def sample_seed(cfg, step: int) -> int:
    """The sampling key of a step: a function of train.seed and the step only, so a resumed run
    samples what an uninterrupted one would have."""
    return cfg.train.seed * 1_000_003 + step

