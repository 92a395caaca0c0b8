"""MiniLLM (Gu et al., 2024): on-policy distillation that minimises the sequence-level reverse KL
KL(q || p) of the student q from the teacher p.

One step, for `train.batch_size` training prompts:
  1. a completion per prompt sampled from the mixture alpha * p + (1 - alpha) * q (teacher-mixed
     sampling, `minillm.alpha`), the student and the teacher decoding side by side in one jit;
  2. per completion token t: the exact reverse KL over the vocabulary KL_t = sum_v q log(q / p)
     (the single-step part of MiniLLM's decomposed gradient), the log-probabilities l_t = log q(y_t),
     r_t = log p(y_t) - l_t, the importance weight w_t = q(y_t) / p~(y_t) of the mixed sampling,
     and the length-normalised future reward R_t = mean of r_t' over the completion's tokens t' > t;
  3. loss = sum_t w_t [KL_t - sg(R_t) l_t] / (completion tokens of the batch): its gradient is
     MiniLLM's single-step decomposition of the reverse-KL policy gradient with teacher-mixed
     sampling and length normalisation (w and R carry no gradient).
One optimizer step per sample batch, so PPO's ratio is 1 and its clip inactive (omitted). In
place of the paper's language-modelling loss on pre-training data, `minillm.ce_weight` adds the
cross-entropy of a batch of the training data's responses each step. Vocabulary terms come chunk
by chunk from the hidden states, vocabulary-sharded (`losses.token_reverse_kl`). Sampling is seeded
by the step: a resumed run continues exactly.
"""
from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import data as kdata
from kdjax import losses
from kdjax.errors import ConfigError
from kdjax.training import distill
from kdjax.training.loop import Batch, Task, fit, resolve_steps, sample_seed
from kdjax.training.models import hidden_and_head, load_frozen, load_student, shared_vocab
from kdjax.training.rollout import Prompts, completion_rows, picks, sample
from kdjax.training.rundir import RunDir


# ---- the objective -------------------------------------------------------------------------
def future_reward(r, mask):
    """R_t = mean of r_t' over the masked tokens t' > t of the same row (0 where none): [N, T]."""
    r = r * mask
    after = jnp.cumsum(r[:, ::-1], axis=1)[:, ::-1] - r  # sum over t' > t
    count = jnp.cumsum(mask[:, ::-1], axis=1)[:, ::-1] - mask
    return jnp.where(count > 0, after / jnp.maximum(count, 1.0), 0.0)


def minillm_objective(rkl, logq, logp, mask, alpha: float, *, tokens=None, rows=None):
    """sum_t w_t [KL_t - sg(R_t) log q(y_t)] / tokens, and metrics. rkl, logq: [N, T] with gradients;
    logp [N, T] the teacher's (constant); mask [N, T] the completion tokens. tokens / rows: what to
    divide by (default: this batch's; under gradient accumulation, the whole batch's)."""
    mask = mask.astype(jnp.float32)
    lq = jax.lax.stop_gradient(logq)
    w = jnp.exp(lq - jnp.logaddexp(jnp.log(alpha) + logp, jnp.log1p(-alpha) + lq)) if alpha > 0 else jnp.ones_like(lq)
    reward = future_reward(logp - lq, mask)
    tokens = jnp.maximum(mask.sum(), 1.0) if tokens is None else tokens
    rows = mask.shape[0] if rows is None else rows
    loss = jnp.sum(w * (rkl - reward * logq) * mask) / tokens
    metrics = dict(token_rkl=jnp.sum(rkl * mask) / tokens, seq_rkl=jnp.sum((lq - logp) * mask) / rows,
                   weight=jnp.sum(w * mask) / tokens)
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def minillm_loss(params, batch, teacher_params, totals, *, graphdef, teacher_graphdef, vocab_size, chunk_size,
                 alpha, ce_weight, mesh, packed=False, layer_map=None, hidden_weight=0.0):
    """MiniLLM's loss on the sampled rows (batch["samples"]) plus ce_weight x the cross-entropy
    of the data rows (batch["data"]), each normalised by the whole batch's tokens. With layer_map
    (the teacher layer of each student layer): + hidden_weight x `losses.hidden_state_loss` of the
    student's layers to the teacher's on the sampled rows, over every token (as kdjax distill's)."""
    samples = batch["samples"]
    hidden = bool(layer_map)
    out = hidden_and_head(graphdef, params, samples, layers=hidden)
    tout = jax.tree.map(jax.lax.stop_gradient, hidden_and_head(teacher_graphdef, teacher_params, samples, layers=hidden))
    (h, head), (th, thead) = (out[0], out[-1]), (tout[0], tout[-1])
    rkl, logq, logp = losses.token_reverse_kl(h, head, th, thead, samples["targets"], vocab_size=vocab_size,
                                              chunk_size=chunk_size, mesh=mesh)
    loss, metrics = minillm_objective(rkl, logq, jax.lax.stop_gradient(logp), samples["loss_mask"], alpha,
                                      tokens=totals["tokens"], rows=totals["rows"])
    if hidden:
        hl = losses.hidden_state_loss(out[1], [tout[1][j] for j in layer_map], samples["segment_ids"] > 0,
                                      totals["all_tokens"])
        loss = loss + hidden_weight * hl
        metrics["hidden_loss"] = jax.lax.stop_gradient(hl)
    if ce_weight:
        rows = batch["data"]
        dh, dhead = hidden_and_head(graphdef, params, rows, packed=packed)
        ce, _ = losses.chunked_cross_entropy(dh, dhead, rows["targets"], rows["loss_mask"], vocab_size=vocab_size,
                                             chunk_size=chunk_size, mesh=mesh, normalizer=totals["data_tokens"])
        loss = loss + ce_weight * ce
        metrics["ce_loss"] = jax.lax.stop_gradient(ce)
    return loss, metrics


def loss_of(cfg, student, teacher, mesh, tokenizer=None):
    """MiniLLM's loss of these models, as the step takes it."""
    m = cfg.minillm
    return partial(minillm_loss, graphdef=nnx.graphdef(student), teacher_graphdef=nnx.graphdef(teacher),
                   vocab_size=shared_vocab(student, teacher, tokenizer), chunk_size=cfg.kd.chunk_size,
                   alpha=float(m.alpha), ce_weight=float(m.ce_weight), mesh=mesh if mesh.size > 1 else None,
                   packed=bool(cfg.data.packing), layer_map=distill.layer_map_of(cfg, student, teacher),
                   hidden_weight=float(cfg.kd.hidden_weight))


def minillm_totals(batch) -> dict:
    out = {"tokens": jnp.maximum(jnp.sum(batch["samples"]["loss_mask"]), 1.0),
           "rows": jnp.asarray(batch["samples"]["loss_mask"].shape[0], jnp.float32),
           "all_tokens": jnp.maximum(jnp.sum(batch["samples"]["segment_ids"] > 0), 1.0)}
    if "data" in batch:
        out["data_tokens"] = jnp.maximum(jnp.sum(batch["data"]["loss_mask"]), 1.0)
    return out


# ---- the batch source ------------------------------------------------------------------------
class MixedSamples:
    """The batch of step s: a completion per training prompt (a seeded shuffle taken in passes)
    from the teacher-mixed distribution, and, with ce_weight, the data rows of step s."""

    def __init__(self, cfg, prompts: Prompts, teacher, tokenizer, data_rows):
        self.cfg, self.prompts, self.teacher, self.tokenizer = cfg, prompts, teacher, tokenizer
        self.order = kdata.shuffle_order(prompts.records, seed=cfg.train.seed)
        self.data = distill.RowBatches(data_rows, cfg.train.batch_size, cfg.train.seed) \
            if cfg.minillm.ce_weight else None
        self.examples = len(prompts)
        self.rows = cfg.train.batch_size

    def __call__(self, step, model) -> Batch:
        m, t0 = self.cfg.minillm, time.time()
        prompts = [self.prompts.ids[i] for i in picks(self.order, step, self.cfg.train.batch_size)]
        completions = sample(model, prompts, tokenizer=self.tokenizer, max_new_tokens=m.max_new_tokens,
                             seed=sample_seed(self.cfg, step), width=self.prompts.width, teacher=self.teacher,
                             mix=m.alpha)
        sample_s = time.time() - t0
        arrays = {"samples": completion_rows(prompts, completions, pad_id=kdata.pad_id(self.tokenizer),
                                             width=self.prompts.width + m.max_new_tokens)}
        if self.data is not None:
            arrays["data"] = self.data(step).arrays
        return Batch(arrays, tokens=int(arrays["samples"]["loss_mask"].sum()),
                     metrics=dict(completion_tokens=float(np.mean([len(c) for c in completions])),
                                  sample_s=sample_s))


def on_policy_rkl(student, teacher, prompts, *, tokenizer, max_new_tokens: int, seed: int, width: int,
                  chunk_size: int = 1024) -> float:
    """What MiniLLM lowers, measured: the exact reverse KL(q || p) per token, over the vocabulary,
    at the positions of the student's own samples (alpha = 0) of the prompts."""
    completions = sample(student, prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens, seed=seed,
                         width=width, teacher=teacher, mix=0.0)
    batch = {k: jnp.asarray(v) for k, v in completion_rows(prompts, completions, pad_id=kdata.pad_id(tokenizer),
                                                            width=width + max_new_tokens).items()}
    (sg, ss), (tg, ts) = nnx.split(student), nnx.split(teacher)
    h, head = hidden_and_head(sg, nnx.to_pure_dict(ss), batch)
    th, thead = hidden_and_head(tg, nnx.to_pure_dict(ts), batch)
    vocab = shared_vocab(student, teacher, None)
    rkl = losses.token_reverse_kl(h, head, th, thead, batch["targets"], vocab_size=vocab, chunk_size=chunk_size)[0]
    return float(jnp.sum(rkl * batch["loss_mask"]) / jnp.maximum(batch["loss_mask"].sum(), 1.0))


# ---- the run -------------------------------------------------------------------------------
def check_config(cfg):
    m = cfg.minillm
    if not 0 <= m.alpha < 1:
        raise ConfigError("minillm.alpha", f"={m.alpha}: the teacher's share of the sampling, in [0, 1)")
    if m.max_new_tokens < 1:
        raise ConfigError("minillm.max_new_tokens", f"={m.max_new_tokens}: must be >= 1")
    if m.ce_weight < 0:
        raise ConfigError("minillm.ce_weight", f"={m.ce_weight}: must be >= 0")
    distill.check_config(cfg)


def train(cfg, *, overwrite: bool = False) -> dict:
    """MiniLLM training as configured; returns what `distill.train` returns (the report is KD's)."""
    check_config(cfg)
    splits, tokenizer, rows, mesh = distill.prepare(cfg)
    prompts = Prompts.of(splits["train"], tokenizer, template=cfg.data.template, room=cfg.data.max_length)
    if not len(prompts):
        raise ConfigError("data.max_length", f"no training prompt fits {cfg.data.max_length} tokens; raise it")
    resolve_steps(cfg, len(prompts))
    print(f"MiniLLM: {len(prompts)} train prompts (of at most {cfg.data.max_length} tokens)", flush=True)
    run = RunDir(cfg, overwrite=overwrite)
    try:
        teacher = load_frozen(cfg.teacher, cfg, mesh)[0]
        student = load_student(cfg, teacher, tokenizer, mesh)
        context = min(student.config.max_position_embeddings, teacher.config.max_position_embeddings)
        if prompts.width + cfg.minillm.max_new_tokens > context:
            raise ConfigError("minillm.max_new_tokens", f"={cfg.minillm.max_new_tokens} plus prompts of up to "
                                                        f"{prompts.width} tokens exceed the context of {context}")
        loss = loss_of(cfg, student, teacher, mesh, tokenizer)
        evaluate = distill.validation(cfg, tokenizer, splits, rows) if cfg.train.eval_every else None
        task = Task(name="minillm", model=student, mesh=mesh, tokenizer=tokenizer, loss=loss, totals=minillm_totals,
                    batches=MixedSamples(cfg, prompts, teacher, tokenizer, rows["train"]),
                    frozen=nnx.to_pure_dict(nnx.state(teacher)), evaluate=evaluate)
        result = fit(cfg, task, run)
    finally:
        run.close()
    return dict(student=result["model"], last=result["last"], teacher=teacher, tokenizer=tokenizer, splits=splits,
                rows=rows, mesh=mesh, best=result["best"], start_step=result["start_step"])
