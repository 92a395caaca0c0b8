"""On-policy distillation (GKD: Agarwal et al., 2024, "On-Policy Distillation of Language Models";
what TRL's GKDTrainer offers): token-level KD where a share `gkd.lmbda` of the batches has its
responses sampled from the student itself, so the student learns where its own generations go.

It is KD's step (kdjax.training.distill: the teacher scores every position over the whole
vocabulary with `kd.divergence`, generalized JSD(`kd.beta`) as in the paper, mixed with the data's
cross-entropy by `kd.kd_ratio`) on another batch source: at step s, with probability lmbda (a
function of train.seed and s), the step's prompts get a completion sampled from the current
student (temperature `gkd.temperature`, `gkd.max_new_tokens`, cut to data.max_length); otherwise
the data's responses. At lmbda = 0 it is `kdjax distill`.
"""
from __future__ import annotations

import time

import numpy as np

from kdjax import data as kdata
from kdjax.errors import ConfigError
from kdjax.training import distill
from kdjax.training.loop import Batch, fit, resolve_steps, sample_seed
from kdjax.training.models import load_frozen, load_student
from kdjax.training.rollout import bucket_width, completion_rows, sample
from kdjax.training.rundir import RunDir


def on_policy(cfg, step: int) -> bool:
    """Whether step `step` samples its responses from the student (probability gkd.lmbda)."""
    return bool(np.random.default_rng([cfg.train.seed, step, 0x9D]).uniform() < cfg.gkd.lmbda)


class OnPolicyBatches:
    """The data rows of step s (as `distill.RowBatches`), or, on an on-policy step, the same
    prompts with completions of the student: both [batch_size, data.max_length]."""

    def __init__(self, cfg, examples: list[kdata.Example], tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.pad = kdata.pad_id(tokenizer)
        self.pool = examples
        self.examples, self.rows = len(examples), cfg.train.batch_size
        kdata.batch_indices(len(examples), 0, batch_size=cfg.train.batch_size, seed=0)  # one batch fills?

    def __call__(self, step, model) -> Batch:
        cfg, width = self.cfg, self.cfg.data.max_length
        idx = kdata.batch_indices(len(self.pool), step, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
        picked = [self.pool[i] for i in idx]
        if not on_policy(cfg, step):
            rows = kdata.pack(picked, width, pad_id=self.pad)
            return Batch(rows, tokens=rows["input_ids"].size, metrics={"on_policy": 0.0})
        t0 = time.time()
        prompts = [list(e.prompt_ids) for e in picked]
        room = width - max(map(len, prompts))
        completions = sample(model, prompts, tokenizer=self.tokenizer, max_new_tokens=min(cfg.gkd.max_new_tokens, room),
                             temperature=cfg.gkd.temperature, seed=sample_seed(cfg, step),
                             width=bucket_width(prompts))
        rows = completion_rows(prompts, completions, pad_id=self.pad, width=width)  # fit: completions <= room
        return Batch(rows, tokens=rows["input_ids"].size,
                     metrics={"on_policy": 1.0, "sample_s": time.time() - t0,
                              "completion_tokens": float(np.mean([len(c) for c in completions]))})


def check_config(cfg):
    g = cfg.gkd
    if not 0 <= g.lmbda <= 1:
        raise ConfigError("gkd.lmbda", f"={g.lmbda}: the share of on-policy batches, in [0, 1]")
    if not g.temperature > 0:
        raise ConfigError("gkd.temperature", f"={g.temperature}: must be > 0")
    if g.max_new_tokens < 1:
        raise ConfigError("gkd.max_new_tokens", f"={g.max_new_tokens}: must be >= 1")
    if cfg.data.packing:
        raise ConfigError("data.packing", "GKD samples a response per prompt, one a row; packing is for "
                                          "kdjax distill / sft")
    distill.check_config(cfg)


def train(cfg, *, overwrite: bool = False) -> dict:
    """GKD as configured; returns what `distill.train` returns (the report is KD's)."""
    check_config(cfg)
    splits, tokenizer, rows, mesh = distill.prepare(cfg)
    examples = kdata.tokenize(splits["train"], tokenizer, max_length=cfg.data.max_length,
                              template=cfg.data.template, on_long_prompt="skip")
    resolve_steps(cfg, len(examples))
    run = RunDir(cfg, overwrite=overwrite)
    try:
        teacher = load_frozen(cfg.teacher, cfg, mesh)[0]
        student = load_student(cfg, teacher, tokenizer, mesh)
        evaluate = distill.validation(cfg, tokenizer, splits, rows) if cfg.train.eval_every else None
        task = distill.kd_task(cfg, student, teacher, tokenizer, mesh, rows, evaluate,
                               batches=OnPolicyBatches(cfg, examples, tokenizer))
        result = fit(cfg, task, run)
    finally:
        run.close()
    return dict(student=result["model"], last=result["last"], teacher=teacher, tokenizer=tokenizer, splits=splits,
                rows=rows, mesh=mesh, best=result["best"], start_step=result["start_step"])
