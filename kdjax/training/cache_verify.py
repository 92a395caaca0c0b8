"""`kdjax teacher-cache verify DIR`: what a teacher cache loses, measured against the teacher itself.

On `rows` rows of the store (its first batches; with a low-rank tail the rows after those its
basis was fitted on, when the store has them), for each support size K' it holds (the
powers of two below its K, and K; a top-K store holds every smaller top K' as its prefix, whose
tail is the stored tail plus the dropped ids' mass), and for its drawn tokens when it has them:

  KL(full || cached)  mean over response tokens of KL(teacher || cached teacher), in nats, where
                      the cached teacher is the stored log-probs (rounded to the storage dtype and
                      renormalised, as training reads them) with the tail mass spread over the
                      other V - K' tokens as training spreads it: by the store's low-rank tail
                      logits (cache.tail_rank > 0), else evenly, the most even completion (the
                      loss then needs none: it keeps the tail as one bucket);
  KL even tail        the same with the tail spread evenly, beside it for a store with a low-rank tail;
  tail mass           the teacher's mean mass outside the K' ids;
  KD loss             the run's divergence (kd_ratio 1) of the run's student to the live teacher
                      (dense) and to the cache (sparse), and their gap;
  gradient            of that loss over every student parameter, sparse against dense: the relative
                      L2 error |g_s - g_d| / |g_d| and the cosine.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import losses, train_config
from kdjax.sharding import make_mesh
from kdjax.training import distill, teacher_cache
from kdjax.training.models import hidden_and_head, load_frozen, load_student


def config_of(path: str):
    """The training config a store was built with (its attributes' "config"), reading from it."""
    attrs = teacher_cache.read_attrs(path)
    if attrs is None:
        raise teacher_cache.CacheError(f"{path}: no teacher cache here")
    cfg = train_config.get_config()
    for key, value in attrs["config"].items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = type(node[last])(value) if isinstance(node[last], (int, float)) and value is not None else value
    cfg.mode, cfg.kd.teacher_cache, cfg.resume = "distill", path, False
    return cfg


def support_sizes(top_k: int) -> list[int]:
    """The top K' a store of K holds as prefixes, reported: powers of two from 8 below K, and K."""
    return [k for k in (8, 16, 32, 64, 128, 256, 512) if k < top_k] + ([top_k] if top_k else [])


def prefix(sparse: dict, k: int, top_k: int) -> dict:
    """The top-k' part of a top-K store's rows: the first k ids, the tail grown by the ids dropped."""
    logp = sparse["logp"].astype(np.float32)
    dropped = jax.nn.logsumexp(jnp.asarray(logp[..., k:top_k]), axis=-1) if k < top_k else -jnp.inf
    tail = np.asarray(jnp.logaddexp(jnp.asarray(sparse["log_tail"]), dropped), np.float32)
    return dict(sparse, ids=sparse["ids"][..., :k], logp=sparse["logp"][..., :k], log_tail=tail)


def kl_full_cached(t_logp: np.ndarray, sparse: dict, mask: np.ndarray, tail_logits=None) -> tuple[float, float]:
    """(mean KL(teacher || cached teacher), mean tail mass) over the masked tokens, float64.
    t_logp [N, V] the teacher's log-probs of the N tokens; sparse: their cached ids / logp / log_tail;
    tail_logits [N, V] (at the cache's temperature): the tail spread by them, else evenly."""
    if tail_logits is not None:
        full = np.asarray(losses.completed_teacher(jnp.asarray(sparse["logp"])[mask],
                                                   jnp.asarray(sparse["log_tail"])[mask],
                                                   jnp.asarray(sparse["ids"])[mask], jnp.asarray(tail_logits)),
                          np.float64)
        p = np.exp(t_logp)
        kl = np.sum(np.where(p > 0, p * (t_logp - full), 0.0), axis=-1)
        outside = ~np.asarray(losses.support_mask(jnp.asarray(sparse["ids"])[mask], t_logp.shape[-1]))
        return float(np.mean(kl)), float(np.mean(np.sum(p * outside, axis=-1)))
    ids = np.asarray(sparse["ids"])[mask]
    cached = np.asarray(losses.coarse_teacher(jnp.asarray(sparse["logp"])[mask], jnp.asarray(sparse["log_tail"])[mask],
                                              jnp.asarray(ids)), np.float64)
    kls, tails = [], []
    for t, i, c in zip(t_logp, ids, cached):
        keep = i >= 0
        outside = np.ones(len(t), bool)
        outside[i[keep]] = False
        p = np.exp(t)
        spread = c[-1] - np.log(max(outside.sum(), 1))
        kls.append(np.sum(p[i[keep]] * (t[i[keep]] - c[:-1][keep])) + np.sum(p[outside] * (t[outside] - spread)))
        tails.append(p[outside].sum())
    return float(np.mean(kls)), float(np.mean(tails))


def verify(path: str, *, rows: int = 8, student: str | None = None, sizes=None, log=print) -> dict:
    """The table of the module docstring for the store at `path` (checked against its own config and
    data first), for the top-K' prefixes `sizes` (default: support_sizes of its K); returns
    {"rows": [{"support", "k", "bytes", "kl", "tail", "dense", "sparse", "grad_rel_err", "grad_cos"}],
    "table": markdown}."""
    cfg = config_of(path)
    if student:
        cfg.student = student
    _, tokenizer, data_rows, _ = distill.prepare(cfg)
    train = data_rows["train"]
    cache = teacher_cache.open_for(cfg, tokenizer, train)
    sizes = support_sizes(cache.top_k) if sizes is None else [int(k) for k in sizes]
    if any(not 0 < k <= cache.top_k for k in sizes):
        raise teacher_cache.CacheError(f"--k={','.join(map(str, sizes))}: {path} holds the top {cache.top_k}; "
                                       f"measure K' in 1 .. {cache.top_k}")
    fitted = cache.attrs.get("tail_fit_rows", 0) if cache.tail_rank else 0
    first = fitted if fitted + rows <= len(cache.order) else 0
    idx = cache.order[first:first + rows]
    batch = {k: jnp.asarray(train[k][idx]) for k in ("input_ids", "targets", "loss_mask", "segment_ids", "positions")}
    stored = cache.read(idx)
    mask = np.asarray(train["loss_mask"][idx]) > 0
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    teacher = load_frozen(cfg.teacher, cfg, mesh)[0]
    model = load_student(cfg, teacher, tokenizer, mesh)
    packed, v = bool(cfg.data.packing), cache.vocab_size
    th, tw = hidden_and_head(nnx.graphdef(teacher), nnx.state(teacher), batch, packed=packed)
    logits = jnp.dot(jnp.asarray(th)[mask], tw[:, :v], preferred_element_type=jnp.float32)  # as the loss sums them
    t_logp = np.asarray(jax.nn.log_softmax(logits / cfg.kd.temperature, axis=-1), np.float64)
    kd = cfg.kd.copy_and_resolve_references()
    kd.kd_ratio = 1.0
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model))
    totals = distill.token_totals(batch)
    loss = partial(distill.kd_loss, graphdef=graphdef, kd=kd, vocab_size=v, mesh=None, packed=packed)
    grad = jax.jit(jax.value_and_grad(lambda p, b, tp, tg: loss(p, b, tp, totals, teacher_graphdef=tg)[0]),
                   static_argnums=3)
    dense, g_dense = grad(params, batch, nnx.to_pure_dict(nnx.state(teacher)), nnx.graphdef(teacher))
    g_dense = jnp.concatenate([x.ravel() for x in jax.tree.leaves(g_dense)])
    supports = [(f"top {k}", prefix(stored, k, cache.top_k)) for k in sizes]
    tail_logits, frozen = None, None
    if cache.tail_rank:
        basis = jnp.asarray(cache.tail_basis)[:, :v]
        tail_logits = np.asarray(jnp.asarray(stored["tail_coef"], jnp.float32)[mask] @ basis) / cfg.kd.temperature
        frozen = {"tail_basis": basis}
    if cache.samples:
        supports.append((f"top {cache.top_k} + {cache.samples} drawn", stored))
    out = []
    for name, sparse in supports:
        kl, tail = kl_full_cached(t_logp, sparse, mask, tail_logits)
        even = kl_full_cached(t_logp, sparse, mask)[0] if tail_logits is not None else kl
        value, g = grad(params, dict(batch, teacher={k: jnp.asarray(x) for k, x in sparse.items()}), frozen, None)
        g = jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)])
        err = float(jnp.linalg.norm(g - g_dense) / jnp.linalg.norm(g_dense))
        cos = float(jnp.dot(g, g_dense) / (jnp.linalg.norm(g) * jnp.linalg.norm(g_dense)))
        k = sparse["ids"].shape[-1]
        out.append(dict(support=name, k=k, bytes=teacher_cache.token_bytes(dict(cache.attrs, top_k=k, samples=0)),
                        kl=kl, kl_even=even, tail=tail, dense=float(dense), sparse=float(value), grad_rel_err=err,
                        grad_cos=cos))
        log(f"{name}: KL(full || cached) {kl:.4g} nats, loss gap {float(value) - float(dense):+.3g}")
    lines = [f"teacher cache {path}: {cache.attrs['cached_rows']} rows, K = {cache.top_k}"
             + (f" + {cache.samples} drawn" if cache.samples else "")
             + (f", a tail of rank {cache.tail_rank}" if cache.tail_rank else "")
             + f", {cache.attrs['dtype']}; stored: {cache.attrs['bytes_per_token']:.0f} bytes a response token on disk. "
               f"Measured on {len(idx)} rows ({int(mask.sum())} response tokens"
               + (f"; store rows {first}-{first + len(idx) - 1}, after the {fitted} its tail was fitted on" if first
                  else "; rows the tail was fitted on" if fitted else "")
               + f"), divergence {cfg.kd.divergence}, "
               f"student {cfg.student or 'the teacher layers ' + cfg.student_layers}.", "",
             "| support | bytes a token (uncompressed) | KL(full ‖ cached) nats | KL even tail | tail mass | "
             "KD loss dense | KD loss sparse | gap | gradient rel. error | gradient cosine |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in out:
        lines.append(f"| {r['support']} | {r['bytes']} | {r['kl']:.4g} | {r['kl_even']:.4g} | {r['tail']:.4g} | "
                     f"{r['dense']:.5g} | "
                     f"{r['sparse']:.5g} | {r['sparse'] - r['dense']:+.3g} | {r['grad_rel_err']:.3g} | "
                     f"{r['grad_cos']:.5f} |")
    return dict(rows=out, table="\n".join(lines) + "\n")
