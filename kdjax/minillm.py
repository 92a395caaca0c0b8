"""MiniLLM (Gu et al., 2024): on-policy distillation that minimises the sequence-level reverse KL,
KL(q_student || p_teacher), by policy gradient on the student's own samples.

One step, for `train.batch_size` prompts of the training split:
  1. a completion per prompt, sampled from the teacher-mixed distribution
     p~ = alpha p + (1 - alpha) q (`minillm.alpha`, 0.2 in the paper) over the shared vocabulary;
  2. per completion token t: the exact reverse KL of the position, KL_t = KL(q(.|y<t) || p(.|y<t))
     over the vocabulary (the single-step term), the token's log-probabilities l_t = log q(y_t),
     r_t = log p(y_t) - l_t, the importance weight w_t = q(y_t) / p~(y_t) of the mixed sampling,
     and the length-normalised future reward R_t = mean of r_t' over the completion's tokens t' > t;
  3. loss = sum_t w_t [KL_t - sg(R_t) l_t] / (completion tokens of the batch): its gradient is
     MiniLLM's single-step decomposition of the reverse-KL policy gradient with teacher-mixed
     sampling and length normalisation (w and R carry no gradient).
One optimizer step per sample batch, so PPO's ratio is 1 and its clip inactive (omitted). In
place of the paper's language-modelling loss on pre-training data, `minillm.ce_weight` adds the
cross-entropy of a batch of the training data's responses each step. The vocabulary terms
come chunk by chunk from the hidden states (`losses.token_reverse_kl`): no [rows, length, vocab]
tensor. Sampling is seeded by the step: a resumed run continues exactly.

`kdjax minillm` takes the distillation configs (teacher, student, data, train, eval): the same
report (Rouge-L of teacher, student before, student after) follows the training.
"""
from __future__ import annotations

import functools
import math
import os
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kdjax import data as kdata
from kdjax import grpo, losses, train
from kdjax.generate import sample_logits, stop_tokens_of


# ---- teacher-mixed sampling ----------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("sgraph", "tgraph", "vocab", "max_new_tokens"))
def _decode_mixed(sgraph, sstate, tgraph, tstate, ids, mask, key, stop, pad_id, alpha, *, vocab, max_new_tokens):
    student, teacher = nnx.merge(sgraph, sstate), nnx.merge(tgraph, tstate)
    b, p = ids.shape
    caches = [m.init_cache(b, p + max_new_tokens) for m in (student, teacher)]

    def last_logits(model, tok, cache, m):
        h, cache = model.hidden_states(tok, attention_mask=m, cache=cache)
        return model.logits(h[:, -1])[:, :vocab].astype(jnp.float32), cache

    ls, cs = last_logits(student, ids, caches[0], mask)
    lt, ct = last_logits(teacher, ids, caches[1], mask)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    done = jnp.zeros((b,), bool)

    def cond(carry):
        return (carry[0] < max_new_tokens) & ~jnp.all(carry[-2])

    def body(carry):
        i, cs, ct, ls, lt, out, done, key = carry
        key, sub = jax.random.split(key)
        mixed = jnp.logaddexp(jnp.log(alpha) + jax.nn.log_softmax(lt), jnp.log1p(-alpha) + jax.nn.log_softmax(ls))
        tok = jnp.where(done, pad_id, sample_logits(mixed, sub, 1.0))
        out = out.at[:, i].set(tok)
        done = done | jnp.isin(tok, stop)
        one = jnp.ones((b, 1), jnp.int32)
        ls, cs = last_logits(student, tok[:, None], cs, one)
        lt, ct = last_logits(teacher, tok[:, None], ct, one)
        return i + 1, cs, ct, ls, lt, out, done, key

    carry = (jnp.zeros((), jnp.int32), cs, ct, ls, lt, out, done, key)
    return jax.lax.while_loop(cond, body, carry)[5]


decode_mixed = _decode_mixed  # public: kdjax.programs compiles the sampler for `kdjax plan`


def sample_mixed(student, teacher, prompts, *, alpha: float, max_new_tokens: int, stop_tokens, pad_id: int,
                 seed: int, width: int) -> list[list[int]]:
    """One completion per prompt from alpha * teacher + (1 - alpha) * student (temperature 1), cut
    after the first stop token (kept); prompts left-padded to `width`."""
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = p, 1
    vocab = min(student.config.vocab_size, teacher.config.vocab_size)
    sg, ss = nnx.split(student)
    tg, ts = nnx.split(teacher)
    out = _decode_mixed(sg, ss, tg, ts, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(seed),
                        jnp.asarray(list(stop_tokens) or [-1], jnp.int32), jnp.int32(pad_id),
                        jnp.float32(alpha), vocab=vocab, max_new_tokens=max_new_tokens)
    stops = set(stop_tokens)
    return [row[:next((i + 1 for i, t in enumerate(row) if t in stops), len(row))]
            for row in np.asarray(out).tolist()]


def on_policy_rkl(student, teacher, prompts, *, max_new_tokens: int, stop_tokens, pad_id: int, seed: int,
                  width: int, chunk_size: int = 1024) -> float:
    """What MiniLLM lowers, measured: the exact reverse KL(q || p) per token, over the vocabulary,
    at the positions of the student's own samples (alpha = 0) of the prompts."""
    completions = sample_mixed(student, teacher, prompts, alpha=0.0, max_new_tokens=max_new_tokens,
                               stop_tokens=stop_tokens, pad_id=pad_id, seed=seed, width=width)
    batch = {k: jnp.asarray(v) for k, v in grpo.completion_rows(prompts, completions, pad_id=pad_id,
                                                                 width=width + max_new_tokens).items()}
    (sg, ss), (tg, ts) = nnx.split(student), nnx.split(teacher)
    h, head = train._forward(sg, nnx.to_pure_dict(ss), batch)
    th, thead = train._forward(tg, nnx.to_pure_dict(ts), batch)
    vocab = min(student.config.vocab_size, teacher.config.vocab_size)
    rkl = losses.token_reverse_kl(h, head, th, thead, batch["targets"], vocab_size=vocab, chunk_size=chunk_size)[0]
    return float(jnp.sum(rkl * batch["loss_mask"]) / jnp.maximum(batch["loss_mask"].sum(), 1.0))


# ---- the objective -------------------------------------------------------------------------
def future_reward(r, mask):
    """R_t = mean of r_t' over the masked tokens t' > t of the same row (0 where none): [N, T]."""
    r = r * mask
    after = jnp.cumsum(r[:, ::-1], axis=1)[:, ::-1] - r  # sum over t' > t
    count = jnp.cumsum(mask[:, ::-1], axis=1)[:, ::-1] - mask
    return jnp.where(count > 0, after / jnp.maximum(count, 1.0), 0.0)


def minillm_objective(rkl, logq, logp, mask, alpha: float):
    """sum_t w_t [KL_t - sg(R_t) log q(y_t)] / tokens, and metrics. rkl, logq: [N, T] with gradients;
    logp [N, T] the teacher's (constant); mask [N, T] the completion tokens."""
    mask = mask.astype(jnp.float32)
    lq = jax.lax.stop_gradient(logq)
    w = jnp.exp(lq - jnp.logaddexp(jnp.log(alpha) + logp, jnp.log1p(-alpha) + lq)) if alpha > 0 else jnp.ones_like(lq)
    reward = future_reward(logp - lq, mask)
    tokens = jnp.maximum(mask.sum(), 1.0)
    loss = jnp.sum(w * (rkl - reward * logq) * mask) / tokens
    metrics = dict(token_rkl=jnp.sum(rkl * mask) / tokens, seq_rkl=jnp.sum((lq - logp) * mask) / mask.shape[0],
                   weight=jnp.sum(w * mask) / tokens)
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def minillm_step(state, batch, teacher_params, data_batch=None, *, tx, graphdef, teacher_graphdef, vocab_size,
                 chunk_size, alpha, ce_weight=0.0):
    """(state, sampled completion rows, teacher, data rows) -> (state, metrics). With ce_weight > 0
    the cross-entropy of the data rows' responses is added (in place of MiniLLM's pre-training LM
    loss: it keeps the student on the data while it follows its own samples)."""
    def loss_fn(params):
        h, head = train._forward(graphdef, params, batch)
        th, thead = jax.tree.map(jax.lax.stop_gradient, train._forward(teacher_graphdef, teacher_params, batch))
        rkl, logq, logp = losses.token_reverse_kl(h, head, th, thead, batch["targets"], vocab_size=vocab_size,
                                                  chunk_size=chunk_size)
        loss, metrics = minillm_objective(rkl, logq, jax.lax.stop_gradient(logp), batch["loss_mask"], alpha)
        if ce_weight and data_batch is not None:
            dh, dhead = train._forward(graphdef, params, data_batch)
            ce, _ = losses.chunked_cross_entropy(dh, dhead, data_batch["targets"], data_batch["loss_mask"],
                                                 vocab_size=vocab_size, chunk_size=chunk_size)
            loss = loss + ce_weight * ce
            metrics["ce_loss"] = jax.lax.stop_gradient(ce)
        return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics.update(loss=loss, grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params))
    return dict(params=params, opt_state=opt_state, step=state["step"] + 1), metrics


# ---- the run -------------------------------------------------------------------------------
def train_minillm(cfg) -> dict:
    """MiniLLM training as configured; returns what `train.train` returns, so `train.run` reports."""
    tc, m = cfg.train, cfg.minillm
    if not 0 <= m.alpha < 1:
        raise ValueError(f"--config.minillm.alpha={m.alpha}: the teacher's share of the sampling, in [0, 1)")
    mesh = train.config_mesh(cfg, tc.batch_size, "a step's prompts (--config.train.batch_size)")
    os.makedirs(cfg.out_dir, exist_ok=True)
    teacher, student, tokenizer = train.load_models(cfg, mesh)
    splits, rows = train.load_data(cfg.data, tokenizer, student.config.max_position_embeddings)
    room = min(cfg.data.max_length, student.config.max_position_embeddings - m.max_new_tokens)
    prompts_of = lambda recs: kdata._encode_all(tokenizer, [kdata.render_prompt(r, cfg.data.template, tokenizer)
                                                            for r in recs])
    records, train_ids = grpo.prompts_that_fit(splits["train"], prompts_of(splits["train"]), room)
    if not records:
        raise ValueError(f"no training prompt fits {room} tokens; raise --config.data.max_length")
    order = kdata.shuffle_order(records, seed=tc.seed)
    width = -(-max(map(len, train_ids)) // 64) * 64  # one shape: one compilation
    print(f"data: {len(records)} train prompts (of at most {room} tokens); mesh {dict(mesh.shape)}", flush=True)

    tx = train.make_optimizer(tc)
    graphdef, state, state_sh = train.init_state(student, tx, mesh)
    tgraph, tparams = nnx.graphdef(teacher), nnx.to_pure_dict(nnx.state(teacher))
    vocab = min(student.config.vocab_size, teacher.config.vocab_size)
    batch_sh = train._batch_sharding(mesh)
    ce_weight = float(m.get("ce_weight", 0.0))
    step_fn = jax.jit(partial(minillm_step, tx=tx, graphdef=graphdef, teacher_graphdef=tgraph, vocab_size=vocab,
                              chunk_size=cfg.kd.chunk_size, alpha=float(m.alpha), ce_weight=ce_weight),
                      in_shardings=(state_sh, batch_sh, jax.tree.map(lambda x: x.sharding, tparams),
                                    batch_sh if ce_weight else None),
                      out_shardings=(state_sh, None), donate_argnums=0)
    mngr, state, start = train.resume(cfg, state)
    last_good = start
    progress = train.Progress(cfg.out_dir, tc.steps, start)
    stop, pad = stop_tokens_of(tokenizer, student.config), tokenizer.pad_token_id or 0
    meta = {"config": cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)}
    for step in range(start, tc.steps):
        t0 = time.time()
        prompts = [train_ids[i] for i in grpo.at_step(order, step, tc.batch_size)]
        completions = sample_mixed(nnx.merge(graphdef, state["params"]), teacher, prompts, alpha=m.alpha,
                                   max_new_tokens=m.max_new_tokens, stop_tokens=stop, pad_id=pad,
                                   seed=tc.seed * 1_000_003 + step, width=width)
        sample_s = time.time() - t0
        batch = grpo.completion_rows(prompts, completions, pad_id=pad, width=width + m.max_new_tokens)
        data_batch = None
        if ce_weight:
            data_batch = kdata.batch_at(rows["train"], step, batch_size=tc.batch_size, seed=tc.seed)
            data_batch = jax.device_put({k: data_batch[k] for k in kdata.ROW_KEYS}, batch_sh)
        new_state, metrics = step_fn(state, jax.device_put(batch, batch_sh), tparams, data_batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        train.check_finite(metrics, step + 1, mngr, cfg.out_dir, last_good)
        state, done = new_state, step + 1
        metrics.update(completion_tokens=float(np.mean([len(c) for c in completions])), sample_s=sample_s)
        if train.end_of_step(progress, mngr, state, done, metrics, int(batch["loss_mask"].sum()), cfg, meta):
            last_good = done
    mngr.wait_until_finished()
    mngr.close()
    progress.close()
    return dict(student=nnx.merge(graphdef, state["params"]), teacher=teacher, tokenizer=tokenizer, splits=splits,
                rows=rows, mesh=mesh, start_step=start, best=None)


def run(cfg) -> str:
    """`kdjax minillm`: MiniLLM training, then the distillation report (train.run's)."""
    return train.run(cfg, trainer=train_minillm)
