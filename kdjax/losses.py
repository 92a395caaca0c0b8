"""Token-level distillation losses: divergences, cross-entropy, and the chunked training path.

Conventions (DESIGN.md): p = teacher, q = student, both softmax(logits / temperature) over the
vocabulary at one position. Forward KL = KL(p||q), reverse KL = KL(q||p). Generalized
JSD(beta) = beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q; beta=0 is forward KL and
beta=1 reverse KL (as TRL defines them); `scaled=True` divides by beta(1-beta), which tends
continuously to those ends. Skew KL = KL(p || alpha p + (1-alpha) q), skew reverse KL =
KL(q || alpha q + (1-alpha) p), total variation = 1/2 sum |p - q|. All are true divergences
(>= 0, 0 when p = q). The temperature divides both logits; there is no T^2 factor here.

Normalisation: every loss is a mean over the unmasked tokens of the whole (global) batch it is
given: sum_{b,t} mask[b,t] * loss[b,t] / sum_{b,t} mask[b,t]; a fully masked batch gives 0.
Masks are [B, T], true (or nonzero) on response tokens; prompt and padding are false.

Three layers, one source of truth:
1. per-token divergences `(s_logp [..., V], t_logp [..., V]) -> [...]` on log-probabilities.
   Each is a sum over the vocabulary of an elementwise term, so on a vocabulary shard it gives
   that shard's partial sum (the chunked path psums them across the "tensor" axis);
2. plain-logits functions (`forward_kl(student_logits, teacher_logits, mask, temperature)`...)
   for users who hold [B, T, V] logits;
3. `chunked_distill_loss` / `chunked_cross_entropy` for training: from hidden states and the
   output head, token chunks under `lax.scan`, the gradient of each chunk taken right away
   (custom_vjp, nothing recomputed), vocabulary sharded over the mesh's "tensor" axis.
   [B, T, V] logits are never built.
Everything is in log space (log_softmax, logaddexp mixtures) and accumulated in fp32.

A sparse teacher (the offline cache, kdjax.training.teacher_cache) is K token ids a position with
their log-probs and the log of the teacher's mass outside them (the tail). Every divergence then
runs on K + 1 bins: the support, and one tail bucket that holds the student's mass outside the
support against the teacher's tail mass (`coarse_student`, `coarse_teacher`). The same per-token
functions apply, so these are true divergences (>= 0, 0 when student = teacher) and with K = V
(an empty tail) they are the dense ones. `sparse_distill_loss` on plain logits is the reference of
`chunked_sparse_distill_loss`, which is chunked and vocabulary-sharded like the dense path.
When the cache also holds a low-rank approximation of the teacher's logits (its tail's shape),
`completed_teacher` spreads the tail mass over the tokens outside the support in proportion to it,
and the divergence is the dense one to that whole-vocabulary teacher (exact on the support).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from kdjax.sharding import LOGICAL_RULES, MESH_AXES, constrain

try:  # jax >= 0.6
    from jax import shard_map as _shard_map
    _SHARD_MAP_CHECK = "check_vma"
except ImportError:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map as _shard_map
    _SHARD_MAP_CHECK = "check_rep"

PerToken = Callable[[jax.Array, jax.Array], jax.Array]

# A padded vocabulary column gets this log-probability in both student and teacher: exp() is
# exactly 0, so every divergence term there is exactly 0, and no -inf - -inf = NaN can appear.
_PAD_LOGP = -1e30


# ---------------------------------------------------------------- per-token divergences

def _log_mix(w: float, log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """log(w a + (1-w) b) for a static weight 0 <= w <= 1, without log(0)."""
    if w == 0:
        return log_b
    if w == 1:
        return log_a
    return jnp.logaddexp(math.log(w) + log_a, math.log1p(-w) + log_b)


def _kl(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """KL(a||b) = sum_v a (log a - log b) over the last axis."""
    return jnp.sum(jnp.exp(log_a) * (log_a - log_b), axis=-1)


def forward_kl_per_token(s_logp, t_logp):
    """KL(p||q) per position: [..., V] log-probs -> [...]."""
    return _kl(t_logp, s_logp)


def reverse_kl_per_token(s_logp, t_logp):
    """KL(q||p) per position: [..., V] log-probs -> [...]."""
    return _kl(s_logp, t_logp)


def generalized_jsd_per_token(s_logp, t_logp, beta: float = 0.5, scaled: bool = False):
    """beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q; beta=0/1 -> forward/reverse KL.

    scaled=True divides by beta (1-beta) (continuous in beta, ends are forward / reverse KL).
    """
    if beta == 0:
        return forward_kl_per_token(s_logp, t_logp)
    if beta == 1:
        return reverse_kl_per_token(s_logp, t_logp)
    log_m = _log_mix(beta, t_logp, s_logp)
    jsd = beta * _kl(t_logp, log_m) + (1 - beta) * _kl(s_logp, log_m)
    return jsd / (beta * (1 - beta)) if scaled else jsd


def skew_kl_per_token(s_logp, t_logp, alpha: float = 0.1):
    """KL(p || alpha p + (1-alpha) q) per position (DistiLLM skew KL)."""
    return _kl(t_logp, _log_mix(alpha, t_logp, s_logp))


def skew_reverse_kl_per_token(s_logp, t_logp, alpha: float = 0.1):
    """KL(q || alpha q + (1-alpha) p) per position (DistiLLM skew reverse KL)."""
    return _kl(s_logp, _log_mix(alpha, s_logp, t_logp))


def total_variation_per_token(s_logp, t_logp):
    """1/2 sum_v |p - q| per position."""
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(t_logp) - jnp.exp(s_logp)), axis=-1)


DIVERGENCES = ("forward_kl", "reverse_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl",
               "total_variation")


def per_token_divergence(divergence: str, *, beta: float = 0.5, alpha: float = 0.1,
                         scaled: bool = False) -> PerToken:
    """The per-token function `(s_logp, t_logp) -> [...]` for a divergence name."""
    if not 0 <= beta <= 1:
        raise ValueError(f"beta={beta}: the generalized JSD weight must be in [0, 1]")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha}: the skew weight must be in [0, 1]")
    table = {
        "forward_kl": forward_kl_per_token,
        "reverse_kl": reverse_kl_per_token,
        "generalized_jsd": functools.partial(generalized_jsd_per_token, beta=beta, scaled=scaled),
        "skew_kl": functools.partial(skew_kl_per_token, alpha=alpha),
        "skew_reverse_kl": functools.partial(skew_reverse_kl_per_token, alpha=alpha),
        "total_variation": total_variation_per_token,
    }
    if divergence not in table:
        raise ValueError(f"divergence={divergence!r} is unknown; choose one of {DIVERGENCES}")
    return table[divergence]


# ---------------------------------------------------------------- plain [B, T, V] logits

def _check_temperature(temperature):
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0")


def _log_probs(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def _masked_mean(per_token: jax.Array, mask) -> jax.Array:
    """sum(mask * x) / max(sum(mask), 1) over all tokens; masked values never leak (even NaN)."""
    if mask is None:
        mask = jnp.ones(per_token.shape, bool)
    mask = jnp.asarray(mask).astype(bool)
    if mask.shape != per_token.shape:
        raise ValueError(f"mask has shape {mask.shape}, expected {per_token.shape} ([B, T])")
    total = jnp.sum(jnp.where(mask, per_token, 0.0))
    return total / jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)


def _plain(per_token: PerToken, student_logits, teacher_logits, mask, temperature):
    _check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {student_logits.shape} and teacher_logits "
                         f"{teacher_logits.shape} differ; cut both to the shared vocabulary "
                         "first (logits[..., :vocab_size])")
    s_logp = _log_probs(student_logits, temperature)
    t_logp = _log_probs(teacher_logits, temperature)
    return _masked_mean(per_token(s_logp, t_logp), mask)


def forward_kl(student_logits, teacher_logits, mask=None, temperature=1.0):
    """Mean KL(p||q) over unmasked tokens. Logits [B, T, V], mask [B, T] -> scalar."""
    return _plain(forward_kl_per_token, student_logits, teacher_logits, mask, temperature)


def reverse_kl(student_logits, teacher_logits, mask=None, temperature=1.0):
    """Mean KL(q||p) over unmasked tokens. Logits [B, T, V], mask [B, T] -> scalar."""
    return _plain(reverse_kl_per_token, student_logits, teacher_logits, mask, temperature)


def generalized_jsd(student_logits, teacher_logits, mask=None, temperature=1.0, *,
                    beta=0.5, scaled=False):
    """Mean generalized JSD(beta) over unmasked tokens (see module docstring for beta ends)."""
    fn = per_token_divergence("generalized_jsd", beta=beta, scaled=scaled)
    return _plain(fn, student_logits, teacher_logits, mask, temperature)


def skew_kl(student_logits, teacher_logits, mask=None, temperature=1.0, *, alpha=0.1):
    """Mean KL(p || alpha p + (1-alpha) q) over unmasked tokens."""
    fn = per_token_divergence("skew_kl", alpha=alpha)
    return _plain(fn, student_logits, teacher_logits, mask, temperature)


def skew_reverse_kl(student_logits, teacher_logits, mask=None, temperature=1.0, *, alpha=0.1):
    """Mean KL(q || alpha q + (1-alpha) p) over unmasked tokens."""
    fn = per_token_divergence("skew_reverse_kl", alpha=alpha)
    return _plain(fn, student_logits, teacher_logits, mask, temperature)


def total_variation(student_logits, teacher_logits, mask=None, temperature=1.0):
    """Mean 1/2 sum |p - q| over unmasked tokens."""
    return _plain(total_variation_per_token, student_logits, teacher_logits, mask, temperature)


def hidden_state_loss(student_states, teacher_states, mask, normalizer=None):
    """Intermediate-state distillation: the squared error of each student layer's residual stream
    to its teacher layer's, relative to the teacher's (||s - t||^2 / ||t||^2 a token), averaged over
    the layers; summed over the mask's tokens / normalizer (default: their count).
    student_states, teacher_states: lists of [B, T, D], paired in order; mask: [B, T]."""
    m = mask.astype(jnp.float32)
    per_token = 0.0
    for s, t in zip(student_states, teacher_states, strict=True):
        s, t = s.astype(jnp.float32), t.astype(jnp.float32)
        per_token = per_token + jnp.sum(jnp.square(s - t), -1) / jnp.maximum(jnp.sum(jnp.square(t), -1), 1e-6)
    total = jnp.sum(per_token * m) / len(student_states)
    return total / (jnp.maximum(jnp.sum(m), 1.0) if normalizer is None else normalizer)


def cross_entropy(logits, targets, mask=None):
    """Mean -log q(target) over unmasked tokens (temperature 1). Logits [B, T, V], targets [B, T]."""
    logp = _log_probs(logits)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return _masked_mean(nll, mask)


def distill_loss(student_logits, teacher_logits, targets, mask=None, *, divergence="forward_kl",
                 temperature=1.0, kd_ratio=1.0, beta=0.5, alpha=0.1, scaled=False):
    """kd_ratio * divergence(T) + (1 - kd_ratio) * cross_entropy on plain logits -> (loss, metrics).

    The reference for `chunked_distill_loss` (same arguments, same metrics); CE is at T = 1.
    """
    _check_kd_ratio(kd_ratio)
    fn = per_token_divergence(divergence, beta=beta, alpha=alpha, scaled=scaled)
    kd = _plain(fn, student_logits, teacher_logits, mask, temperature)
    ce = cross_entropy(student_logits, targets, mask)
    n = jnp.sum(jnp.ones(targets.shape, bool) if mask is None else jnp.asarray(mask).astype(bool))
    loss = kd_ratio * kd + (1 - kd_ratio) * ce
    return loss, {"loss": loss, "kd_loss": kd, "ce_loss": ce, "num_tokens": n}


def _check_kd_ratio(kd_ratio):
    if not 0 <= kd_ratio <= 1:
        raise ValueError(f"kd_ratio={kd_ratio}: must be in [0, 1] "
                         "(loss = kd_ratio * divergence + (1 - kd_ratio) * cross-entropy)")


# ---------------------------------------------------------------- sparse teacher: support + tail

def _logsumexp_where(x, keep, tensor_axis=None):
    """log sum exp(x) over the last axis where `keep`, across the vocabulary shards of
    `tensor_axis`; _PAD_LOGP where nothing is kept. Gradients stay finite (no log(0), no inf - inf)."""
    x = jnp.where(keep, x, -jnp.inf)
    m = jnp.max(lax.stop_gradient(x), axis=-1)
    if tensor_axis is not None:
        m = lax.pmax(m, tensor_axis)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    s = jnp.sum(jnp.exp(x - m[..., None]), axis=-1)
    if tensor_axis is not None:
        s = lax.psum(s, tensor_axis)
    return jnp.where(s > 0, m + jnp.log(jnp.where(s > 0, s, 1.0)), _PAD_LOGP)


def support_mask(ids, v: int, offset=0):
    """[..., v] booleans: true at the columns offset .. offset + v - 1 that `ids` [..., K] name."""
    flat = ids.reshape(-1, ids.shape[-1]) - offset
    cols = jnp.where((flat >= 0) & (flat < v), flat, v)  # v is out of bounds: dropped
    mask = jnp.zeros((flat.shape[0], v), bool).at[jnp.arange(flat.shape[0])[:, None], cols].set(True, mode="drop")
    return mask.reshape(*ids.shape[:-1], v)


def top_k_teacher(t_logp, k: int):
    """The sparse teacher of full log-probs t_logp [..., V]: (ids [..., k] int32, their log-probs
    [..., k] in descending order, log of the mass outside them [...] (_PAD_LOGP when none is
    left)). The tail is summed over the columns left out, not taken as 1 - sum(top k), so a tail of
    1e-9 keeps its digits."""
    v = t_logp.shape[-1]
    if not 0 <= k <= v:
        raise ValueError(f"k={k}: the support size must be in [0, {v}] (the vocabulary)")
    t_logp = t_logp.astype(jnp.float32)
    if k == 0:
        ids, logp = jnp.zeros((*t_logp.shape[:-1], 0), jnp.int32), t_logp[..., :0]
    else:
        logp, ids = lax.top_k(t_logp, k)
    return ids.astype(jnp.int32), logp, _logsumexp_where(t_logp, ~support_mask(ids, v))


def _coarse_student(s_logp, ids, *, offset=0, valid=None, tensor_axis=None):
    """coarse_student on this shard's columns offset .. offset + v - 1 of the vocabulary."""
    v = s_logp.shape[-1]
    local = ids - offset
    here = (ids >= 0) & (local >= 0) & (local < v)
    picked = jnp.where(here, jnp.take_along_axis(s_logp, jnp.where(here, local, 0), axis=-1), 0.0)
    if tensor_axis is not None:
        picked = lax.psum(picked, tensor_axis)  # each id lives on one shard
    picked = jnp.where(ids >= 0, picked, _PAD_LOGP)
    outside = ~support_mask(ids, v, offset)
    if valid is not None:
        outside = outside & valid
    tail = _logsumexp_where(s_logp, outside, tensor_axis)
    return jnp.concatenate([picked, tail[..., None]], axis=-1)


def coarse_student(s_logp, ids):
    """The student on a sparse teacher's bins: [..., K + 1] log-probs, s_logp at the K ids
    (_PAD_LOGP in an empty slot, id < 0), then the log of the student's mass outside them (the
    tail bucket). s_logp [..., V] log-probs; ids [..., K] distinct token ids."""
    return _coarse_student(s_logp, ids)


def coarse_teacher(logp, log_tail, ids):
    """A sparse teacher as [..., K + 1] log-probs: its log-probs on the K ids (any float dtype; an
    empty slot, id < 0, gets none), then the log of its tail mass [...]. Renormalised to sum to 1
    (bf16 / fp16 storage rounds each value), so every divergence on the bins stays >= 0."""
    logp = jnp.where(ids >= 0, logp.astype(jnp.float32), _PAD_LOGP)
    tail = jnp.maximum(jnp.asarray(log_tail, jnp.float32), _PAD_LOGP)[..., None]
    x = jnp.concatenate([jnp.maximum(logp, _PAD_LOGP), tail], axis=-1)
    return x - jax.nn.logsumexp(x, axis=-1, keepdims=True)


def _completed_teacher(logp, log_tail, ids, z, *, offset=0, valid=None, tensor_axis=None):
    """completed_teacher on this shard's columns offset .. offset + v - 1 (z [..., v] its logits)."""
    v = z.shape[-1]
    bins = coarse_teacher(logp, log_tail, ids)
    flat_ids = ids.reshape(-1, ids.shape[-1]) - offset
    cols = jnp.where((flat_ids >= 0) & (flat_ids < v), flat_ids, v)  # v: not on this shard, dropped
    rows = jnp.arange(flat_ids.shape[0])[:, None]
    # one scatter gives both the support (log-probs are finite, <= 0) and its values: +inf elsewhere
    exact = jnp.full((flat_ids.shape[0], v), jnp.inf, jnp.float32).at[rows, cols].set(
        bins[..., :-1].reshape(flat_ids.shape), mode="drop").reshape(z.shape)
    inside = exact < jnp.inf
    outside = ~inside if valid is None else ~inside & valid
    tail = bins[..., -1:] + z - _logsumexp_where(z, outside, tensor_axis)[..., None]
    return jnp.where(inside, exact, jnp.where(outside, tail, _PAD_LOGP))


def completed_teacher(logp, log_tail, ids, z):
    """A sparse teacher completed over the whole vocabulary: [..., V] log-probs, exactly its
    (renormalised) log-probs at the K ids, and its tail mass spread over the other tokens in
    proportion to exp(z), z [..., V] an approximation of its logits (a cache's low-rank tail,
    kdjax.training.teacher_cache). Every divergence to it is a dense one."""
    return _completed_teacher(logp, log_tail, ids, z.astype(jnp.float32))


def sparse_distill_loss(student_logits, ids, logp, log_tail, targets, mask=None, *, divergence="forward_kl",
                        temperature=1.0, kd_ratio=1.0, beta=0.5, alpha=0.1, scaled=False, tail_logits=None):
    """KD from a sparse teacher on plain logits -> (loss, metrics), the reference of
    `chunked_sparse_distill_loss`: kd_ratio * divergence on the K + 1 bins (coarse_student of the
    student at `temperature`, coarse_teacher) + (1 - kd_ratio) * cross-entropy (T = 1), each a
    mean over unmasked tokens. student_logits [B, T, V]; ids, logp [B, T, K] (the teacher at the
    temperature it was cached at); log_tail [B, T]; targets, mask [B, T]. tail_logits [B, T, V]
    (at temperature 1): the divergence is the dense one to completed_teacher(..., tail_logits / T)."""
    _check_temperature(temperature)
    _check_kd_ratio(kd_ratio)
    fn = per_token_divergence(divergence, beta=beta, alpha=alpha, scaled=scaled)
    s_logp = _log_probs(student_logits, temperature)
    if tail_logits is None:
        kd = _masked_mean(fn(coarse_student(s_logp, ids), coarse_teacher(logp, log_tail, ids)), mask)
    else:
        kd = _masked_mean(fn(s_logp, completed_teacher(logp, log_tail, ids, tail_logits / temperature)), mask)
    ce = cross_entropy(student_logits, targets, mask)
    n = jnp.sum(jnp.ones(targets.shape, bool) if mask is None else jnp.asarray(mask).astype(bool))
    loss = kd_ratio * kd + (1 - kd_ratio) * ce
    return loss, {"loss": loss, "kd_loss": kd, "ce_loss": ce, "num_tokens": n}


# ---------------------------------------------------------------- chunked, vocabulary-sharded

def _sharded_log_softmax(logits, valid, tensor_axis):
    """log_softmax over a vocabulary split across `tensor_axis`; logits [c, v_local] fp32.

    Padded columns (valid false) come out as _PAD_LOGP. The max is only a shift, so it carries
    no gradient (which also keeps pmax out of autodiff).
    """
    x = jnp.where(valid, logits, -jnp.inf)
    m = jnp.max(lax.stop_gradient(x), axis=-1, keepdims=True)
    if tensor_axis is not None:
        m = lax.pmax(m, tensor_axis)
    s = jnp.sum(jnp.exp(x - m), axis=-1, keepdims=True)
    if tensor_axis is not None:
        s = lax.psum(s, tensor_axis)
    return jnp.where(valid, x - m - jnp.log(s), _PAD_LOGP)


def _varying(x, axes):
    """Type x as varying over mesh `axes` inside shard_map (a scan carry must match its update)."""
    if hasattr(lax, "pcast"):
        return lax.pcast(x, tuple(axes), to="varying")
    if hasattr(lax, "pvary"):  # pragma: no cover - jax 0.6 - 0.8
        return lax.pvary(x, tuple(axes))
    return x  # pragma: no cover - jax without varying-manual-axes types


def _device_pass(s_h, s_w, targets, mask, teacher, *, with_grad, per_token, temperature,
                 kd_ratio, vocab_size, chunk, tensor_axis, token_axes, sparse=False):
    """One device's pass over its tokens, `chunk` at a time.

    s_h [n, Ds], s_w [Ds, v] (this device's vocabulary columns), targets/mask [n] with n a
    multiple of `chunk`, teacher () or (t_h [n, Dt], t_w [Dt, v]) or, sparse, ((ids [n, K], logp
    [n, K], log_tail [n][, tail_coef [n, r]]) of every token, (tail_basis [r, v],) or ()). Returns
    the sums over all devices (loss_sum, kd_sum, ce_sum, count); with_grad also (d loss_sum / d s_h
    [n, Ds], d loss_sum / d s_w [Ds, v] fp32) for this device's shard.

    With gradients, each chunk's logit gradient comes from autodiff of the same per-token
    functions and goes straight into the two head matmuls (the fused-linear pattern): nothing
    is recomputed in the backward pass and only one chunk of [c, v] logits is alive at a time.
    """
    n, v = s_h.shape[0], s_w.shape[1]
    offset = lax.axis_index(tensor_axis) * v if tensor_axis is not None else 0
    cols = offset + jnp.arange(v)
    valid = cols < vocab_size
    t_w = teacher[1] if teacher and not sparse else None
    basis = teacher[1][0] if sparse and teacher[1] else None

    def vsum(x):  # sum of per-shard partial sums over the vocabulary
        return lax.psum(x, tensor_axis) if tensor_axis is not None else x

    def kd_per_token(s_logp, t):
        """The divergence of each token of the chunk [c], whole on every vocabulary shard."""
        if sparse and basis is not None:  # the whole vocabulary: the cached tail spread by its logits
            ids, logp, log_tail, coef = t
            z = jnp.dot(coef, basis, preferred_element_type=jnp.float32) / temperature
            return vsum(per_token(s_logp, _completed_teacher(logp, log_tail, ids, z, offset=offset, valid=valid,
                                                             tensor_axis=tensor_axis)))
        if sparse:  # on the K + 1 bins; the student's support and tail are gathered across shards
            ids, logp, log_tail = t
            return per_token(_coarse_student(s_logp, ids, offset=offset, valid=valid, tensor_axis=tensor_axis),
                             coarse_teacher(logp, log_tail, ids))
        return vsum(per_token(s_logp, _sharded_log_softmax(t / temperature, valid, tensor_axis)))

    def chunk_sums(s_logits, t, tg, m):
        """(loss_sum, (kd_sum, ce_sum)) of one chunk from its fp32 logits [c, v] and its teacher
        (fp32 logits [c, v], or the sparse teacher's rows)."""
        s_logp1 = _sharded_log_softmax(s_logits, valid, tensor_axis)
        hit = cols[None, :] == tg[:, None]
        ce = -vsum(jnp.sum(jnp.where(hit, s_logp1, 0.0), axis=-1))
        ce_sum = jnp.sum(jnp.where(m, ce, 0.0))
        if t is None:
            return ce_sum, (jnp.zeros_like(ce_sum), ce_sum)
        s_logp = (s_logp1 if temperature == 1 else
                  _sharded_log_softmax(s_logits / temperature, valid, tensor_axis))
        kd_sum = jnp.sum(jnp.where(m, kd_per_token(s_logp, t), 0.0))
        # Static ends: no backward through a term whose weight is 0.
        loss = (kd_sum if kd_ratio == 1 else ce_sum if kd_ratio == 0 else
                kd_ratio * kd_sum + (1 - kd_ratio) * ce_sum)
        return loss, (kd_sum, ce_sum)

    def body(dw, xs):
        sh, tg, m, tx = xs
        s_logits = jnp.dot(sh, s_w, preferred_element_type=jnp.float32)
        t = tx if sparse or t_w is None else jnp.dot(tx, t_w, preferred_element_type=jnp.float32)
        if not with_grad:
            loss, (kd, ce) = chunk_sums(s_logits, t, tg, m)
            return dw, (loss, kd, ce)
        loss, vjp, (kd, ce) = jax.vjp(lambda z: chunk_sums(z, t, tg, m), s_logits, has_aux=True)
        (dz,) = vjp(jnp.ones_like(loss))
        dz = dz.astype(s_w.dtype)
        dsh = vsum(jnp.dot(dz, s_w.T, preferred_element_type=jnp.float32))
        dw = dw + jnp.dot(sh.T, dz, preferred_element_type=jnp.float32)
        return dw, (loss, kd, ce, dsh.astype(s_h.dtype))

    def chunks(x):
        return x.reshape(n // chunk, chunk, *x.shape[1:])

    tx = (tuple(map(chunks, teacher[0])) if sparse else chunks(teacher[0])) if teacher else None
    xs = (chunks(s_h), chunks(targets), chunks(mask), tx)
    dw = None
    if with_grad:
        dw = jnp.zeros(s_w.shape, jnp.float32)
        if tensor_axis is not None:  # accumulate per device; one psum over tokens at the end
            dw = _varying(dw, (*token_axes, tensor_axis))
    dw, ys = lax.scan(body, dw, xs)
    sums = (jnp.sum(ys[0]), jnp.sum(ys[1]), jnp.sum(ys[2]), jnp.sum(mask).astype(jnp.float32))
    if token_axes:
        sums = lax.psum(sums, tuple(token_axes))
        dw = None if dw is None else lax.psum(dw, tuple(token_axes))
    if not with_grad:
        return sums
    return sums, (ys[3].reshape(n, -1), dw)


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


def _shared_vocab(vs: int, vt: int | None, vocab_size: int | None) -> int:
    if vocab_size is None:
        if vt is not None and vs != vt:
            raise ValueError(f"student head has {vs} vocabulary columns and teacher head {vt}: "
                             "pass vocab_size=<the shared tokenizer's vocabulary size> to cut "
                             "both padded tables to it")
        return vs
    if vocab_size < 1 or vocab_size > vs or (vt is not None and vocab_size > vt):
        raise ValueError(f"vocab_size={vocab_size} but the student head has {vs} columns"
                         + ("" if vt is None else f" and the teacher head {vt}")
                         + ": teacher and student do not share this vocabulary (a real "
                         "mismatch, not padding); vocab_size must be <= both")
    return vocab_size


def _check_head(name_h, h, name_w, w):
    if h.ndim != 3 or w.ndim != 2 or h.shape[-1] != w.shape[0]:
        raise ValueError(f"{name_h} {h.shape} must be [B, T, D] and {name_w} {w.shape} [D, V] "
                         "with the same D")


def _layout(n: int, vocab: int, chunk_size: int, mesh):
    """How n tokens and a vocabulary are laid out over the mesh (the rule table's "batch" axes
    for tokens, "vocab" for the vocabulary) and cut into chunks: (token axes, vocabulary axis,
    chunk, tokens(x) -> [n padded, ...] rows, head(w) -> [D, vocab padded] columns). Tokens are
    padded so every token shard holds a whole number of (nearly equal) chunks; the vocabulary is
    cut to the shared size and padded to a multiple of the tensor shards (masked)."""
    if mesh is None:
        token_axes, tensor_axis, n_tok, n_voc = (), None, 1, 1
    else:
        missing = [a for a in MESH_AXES if a not in mesh.shape]
        if missing:
            raise ValueError(f"mesh {dict(mesh.shape)} lacks axes {missing}; build it with kdjax.sharding.make_mesh")
        rule = LOGICAL_RULES["batch"]
        token_axes = (rule,) if isinstance(rule, str) else tuple(rule)
        tensor_axis = LOGICAL_RULES["vocab"]
        n_tok, n_voc = math.prod(mesh.shape[a] for a in token_axes), mesh.shape[tensor_axis]
    local = -(-n // n_tok)
    n_chunks = -(-local // chunk_size)
    chunk = -(-local // n_chunks)
    pad_n = n_tok * n_chunks * chunk - n
    pad_v = -vocab % n_voc

    def tokens(x):
        x = x.reshape(n, *x.shape[2:])
        return jnp.pad(x, [(0, pad_n)] + [(0, 0)] * (x.ndim - 1))

    def head(w):
        return jnp.pad(w[:, :vocab], [(0, 0), (0, pad_v)])
    return token_axes, tensor_axis, chunk, tokens, head


def _chunked(s_h, s_w, teacher, targets, mask, *, per_token, temperature, kd_ratio,
             vocab_size, chunk_size, mesh, normalizer, sparse=False):
    """Shared machinery: flatten, pad, (shard_map), scan over chunks -> (loss, metrics).
    teacher: None (cross-entropy only), (t_h [B, T, Dt], t_w [Dt, Vt]), or with `sparse`
    (ids [B, T, K], logp [B, T, K], log_tail [B, T], tail_coef [B, T, r] | None,
    tail_basis [r, V] | None)."""
    _check_temperature(temperature)
    _check_kd_ratio(kd_ratio)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
    b, t = s_h.shape[:2]
    if targets.shape != (b, t) or mask.shape != (b, t):
        raise ValueError(f"targets {targets.shape} and mask {mask.shape} must be [B, T] = {(b, t)}")
    t_w = None if teacher is None or sparse else teacher[1]
    vocab = _shared_vocab(s_w.shape[1], None if t_w is None else t_w.shape[1], vocab_size)
    token_axes, tensor_axis, chunk, tokens, head = _layout(b * t, vocab, chunk_size, mesh)

    # The teacher is a fixed target: no gradients into it.
    if teacher is None:
        t_args, t_specs = (), ()
    elif sparse:
        ids, logp, log_tail, coef, basis = teacher
        per_tok = (tokens(ids.astype(jnp.int32)), tokens(lax.stop_gradient(logp)),
                   tokens(lax.stop_gradient(jnp.asarray(log_tail, jnp.float32))))
        specs = (P(token_axes, None), P(token_axes, None), P(token_axes))
        if basis is not None:
            per_tok, specs = per_tok + (tokens(lax.stop_gradient(coef)),), specs + (P(token_axes, None),)
        t_args = (per_tok, () if basis is None else (head(lax.stop_gradient(basis).astype(jnp.float32)),))
        t_specs = (specs, () if basis is None else (P(None, tensor_axis),))
    else:
        t_args = (tokens(lax.stop_gradient(teacher[0])), head(lax.stop_gradient(t_w)))
        t_specs = (P(token_axes, None), P(None, tensor_axis))
    args = (tokens(s_h), head(s_w), tokens(targets.astype(jnp.int32)),
            tokens(jnp.asarray(mask).astype(bool)), t_args)

    def run(with_grad, *parts):
        fn = functools.partial(_device_pass, with_grad=with_grad, per_token=per_token,
                               temperature=temperature, kd_ratio=kd_ratio, vocab_size=vocab,
                               chunk=chunk, tensor_axis=tensor_axis, token_axes=token_axes,
                               sparse=sparse)
        if mesh is None:
            return fn(*parts)
        tok, voc = P(token_axes, None), P(None, tensor_axis)
        in_specs = (tok, voc, P(token_axes), P(token_axes), t_specs)
        sums_spec = (P(), P(), P(), P())
        out_specs = (sums_spec, (tok, voc)) if with_grad else sums_spec
        placed = jax.tree.map(lambda x, spec: constrain(x, spec, mesh), parts, in_specs)
        return _shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                          **{_SHARD_MAP_CHECK: True})(*placed)

    # Gradients are computed chunk by chunk in the forward pass (custom_vjp) and only scaled by
    # the incoming cotangent in the backward pass; without differentiation no gradient is made.
    @jax.custom_vjp
    def sums(*parts):
        return run(False, *parts)

    def sums_fwd(*parts):
        return run(True, *parts)

    def sums_bwd(grads, cotangents):
        g = cotangents[0]  # of loss_sum; the other outputs are metrics, stop-gradiented below
        dsh, dw = grads
        return ((g * dsh).astype(args[0].dtype), (g * dw).astype(args[1].dtype),
                *jax.tree.map(_zero_cotangent, args[2:]))

    sums.defvjp(sums_fwd, sums_bwd)
    loss_sum, kd_sum, ce_sum, count = sums(*args)
    kd_sum, ce_sum, count = lax.stop_gradient((kd_sum, ce_sum, count))

    denom = jnp.maximum(count, 1.0) if normalizer is None else jnp.asarray(normalizer, jnp.float32)
    loss, kd, ce = loss_sum / denom, kd_sum / denom, ce_sum / denom
    metrics = {"loss": loss, "ce_loss": ce, "num_tokens": count}
    if teacher is not None:
        metrics["kd_loss"] = kd
    return loss, metrics


def chunked_distill_loss(student_hidden, student_head, teacher_hidden, teacher_head, targets,
                         mask, *, divergence="forward_kl", temperature=1.0, kd_ratio=1.0,
                         beta=0.5, alpha=0.1, scaled=False, vocab_size=None, chunk_size=1024,
                         mesh=None, normalizer=None):
    """KD loss from hidden states and output heads, never building [B, T, V] logits.

    student_hidden [B, T, Ds], student_head [Ds, Vs], teacher_hidden [B, T, Dt],
    teacher_head [Dt, Vt], targets [B, T] int (next-token ids for the CE term), mask [B, T]
    (true on response tokens). Returns (loss, metrics) with
      loss = kd_ratio * divergence(temperature) + (1 - kd_ratio) * cross_entropy(T = 1),
    each the mean over the unmasked tokens of the global batch (or sum / `normalizer` when given,
    e.g. the token count of all micro-batches under gradient accumulation); metrics has "loss",
    "kd_loss", "ce_loss", "num_tokens". Matches `distill_loss` on the full logits.

    The B*T tokens are processed in chunks of at most `chunk_size` by a `lax.scan`. Under
    differentiation (a custom_vjp) each chunk's logit gradient, from autodiff of the same
    per-token divergence, goes at once into d hidden [c, Ds] and an fp32 d head accumulator, so
    the backward pass recomputes nothing and peak memory grows with chunk_size * V, not
    B * T * V. With `mesh` (kdjax.sharding.make_mesh) tokens are split over ("data", "fsdp")
    and the vocabulary over "tensor" with shard_map: max, logsumexp and vocabulary sums are
    reduced across the tensor shards; the head gradient is all-reduced once, not per chunk.
    Heads padded to different sizes are cut to `vocab_size` (required when Vs != Vt). The teacher
    gets no gradients; the metrics carry none either. Token count and vocabulary need not divide
    chunk or shard counts. divergence, temperature, kd_ratio, beta, alpha, scaled, chunk_size
    are static Python values.
    """
    _check_head("student_hidden", student_hidden, "student_head", student_head)
    _check_head("teacher_hidden", teacher_hidden, "teacher_head", teacher_head)
    if teacher_hidden.shape[:2] != student_hidden.shape[:2]:
        raise ValueError(f"teacher_hidden {teacher_hidden.shape} and student_hidden "
                         f"{student_hidden.shape} must share [B, T]")
    per_token = per_token_divergence(divergence, beta=beta, alpha=alpha, scaled=scaled)
    return _chunked(student_hidden, student_head, (teacher_hidden, teacher_head), targets, mask,
                    per_token=per_token, temperature=temperature, kd_ratio=kd_ratio,
                    vocab_size=vocab_size, chunk_size=chunk_size, mesh=mesh,
                    normalizer=normalizer)


def chunked_sparse_distill_loss(student_hidden, student_head, ids, logp, log_tail, targets, mask, *,
                                divergence="forward_kl", temperature=1.0, kd_ratio=1.0, beta=0.5, alpha=0.1,
                                scaled=False, vocab_size=None, chunk_size=1024, mesh=None, normalizer=None,
                                tail_coef=None, tail_basis=None):
    """KD from a sparse teacher (a cache: K ids a token, their log-probs, the log tail mass) from
    hidden states and the output head, chunked over tokens and vocabulary-sharded exactly as
    `chunked_distill_loss`; no teacher model. Matches `sparse_distill_loss` on the full logits.

    student_hidden [B, T, Ds], student_head [Ds, Vs]; ids [B, T, K] int (distinct a token, -1 for
    an empty slot), logp [B, T, K] (bf16 / fp16 / fp32: the teacher at the temperature it was
    cached at, which must be `temperature`), log_tail [B, T]; targets, mask [B, T]. The divergence
    runs on K + 1 bins a token (the support and the tail bucket); on each vocabulary shard the
    student's log-probs at the ids it holds and its mass outside the support are summed across
    the "tensor" axis, so the [c, V] chunk is the only vocabulary-sized array. vocab_size: the
    vocabulary the cache covers (the student's head is cut to it). Returns (loss, metrics) with
    "loss", "kd_loss", "ce_loss", "num_tokens".

    With tail_coef [B, T, r] and tail_basis [r, V] (a cache's low-rank tail: tail_coef @ tail_basis
    approximates the teacher's logits at temperature 1) the divergence is the dense one, over the
    whole vocabulary, to completed_teacher: exact on the K ids, the tail mass spread by those
    logits; each chunk's [c, r] x [r, v] product is computed beside the student's head matmul.
    """
    _check_head("student_hidden", student_hidden, "student_head", student_head)
    b, t = student_hidden.shape[:2]
    if ids.shape[:2] != (b, t) or logp.shape != ids.shape or jnp.shape(log_tail) != (b, t):
        raise ValueError(f"ids {ids.shape}, logp {logp.shape} must be [B, T, K] and log_tail "
                         f"{jnp.shape(log_tail)} [B, T] with [B, T] = {(b, t)}")
    if (tail_coef is None) != (tail_basis is None) or (tail_coef is not None and (
            tail_coef.shape[:2] != (b, t) or tail_basis.ndim != 2 or tail_coef.shape[-1] != tail_basis.shape[0])):
        raise ValueError(f"tail_coef {None if tail_coef is None else tail_coef.shape} and tail_basis "
                         f"{None if tail_basis is None else tail_basis.shape} must both be given, [B, T, r] and [r, V]")
    per_token = per_token_divergence(divergence, beta=beta, alpha=alpha, scaled=scaled)
    teacher = (ids, logp, log_tail, tail_coef, tail_basis)
    return _chunked(student_hidden, student_head, teacher, targets, mask, per_token=per_token,
                    temperature=temperature, kd_ratio=kd_ratio, vocab_size=vocab_size, chunk_size=chunk_size,
                    mesh=mesh, normalizer=normalizer, sparse=True)


def chunked_cross_entropy(hidden, head, targets, mask, *, vocab_size=None, chunk_size=1024,
                          mesh=None, normalizer=None):
    """SFT cross-entropy from hidden [B, T, D] and head [D, V], same machinery as KD.

    Mean -log q(target) over unmasked tokens of the global batch -> (loss, metrics) with
    "loss", "ce_loss", "num_tokens". Matches `cross_entropy` on the full logits.
    """
    _check_head("hidden", hidden, "head", head)
    return _chunked(hidden, head, None, targets, mask, per_token=None, temperature=1.0,
                    kd_ratio=0.0, vocab_size=vocab_size, chunk_size=chunk_size, mesh=mesh,
                    normalizer=normalizer)


# ---- per-token values for the on-policy objectives (GRPO, MiniLLM) ---------------------------
def _per_token(fn, s_h, s_w, t_h, t_w, targets, *, vocab, chunk_size, mesh, temperature, n_out):
    """Per-token values [B, T] (n_out of them) of `fn(s_logp, t_logp, hit, vsum)` over token
    chunks, with tokens split over the mesh's batch axes and the vocabulary over "tensor"
    (shard_map), each chunk under `jax.checkpoint`: its [chunk, V / shards] logits exist only while
    it is computed, forward and (recomputed) backward. s_logp / t_logp: this shard's columns of
    the log-softmax over the whole vocabulary; hit: [chunk, V / shards] target one-hots; vsum: the
    sum over the vocabulary shards. Gradients reach the student's arguments."""
    _check_temperature(temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
    b, t = s_h.shape[:2]
    if targets.shape != (b, t):
        raise ValueError(f"targets {targets.shape} must be [B, T] = {(b, t)}")
    n = b * t
    token_axes, tensor_axis, chunk, tokens, head = _layout(n, vocab, chunk_size, mesh)
    teacher = () if t_w is None else (tokens(t_h), head(t_w))
    args = (tokens(s_h), head(s_w), tokens(jnp.clip(targets.astype(jnp.int32), 0, vocab - 1)), teacher)

    def device(sh_all, sw, tg_all, teacher):
        v = sw.shape[1]
        offset = lax.axis_index(tensor_axis) * v if tensor_axis is not None else 0
        cols = offset + jnp.arange(v)
        valid = cols < vocab
        vsum = (lambda x: lax.psum(x, tensor_axis)) if tensor_axis is not None else (lambda x: x)
        m = sh_all.shape[0]
        chunks = lambda x: x.reshape(m // chunk, chunk, *x.shape[1:])

        @jax.checkpoint
        def one(xs):
            sh, y, th = xs
            s_logp = _sharded_log_softmax(jnp.dot(sh, sw.astype(sh.dtype), preferred_element_type=jnp.float32)
                                          / temperature, valid, tensor_axis)
            t_logp = None if th is None else _sharded_log_softmax(
                jnp.dot(th, teacher[1].astype(th.dtype), preferred_element_type=jnp.float32) / temperature,
                valid, tensor_axis)
            return fn(s_logp, t_logp, cols[None, :] == y[:, None], vsum)

        outs = lax.map(one, (chunks(sh_all), chunks(tg_all), chunks(teacher[0]) if teacher else None))
        return tuple(o.reshape(-1) for o in outs)

    if mesh is None:
        outs = device(*args)
    else:
        tok, voc = P(token_axes, None), P(None, tensor_axis)
        in_specs = (tok, voc, P(token_axes), (tok, voc) if teacher else ())
        placed = jax.tree.map(lambda x, spec: constrain(x, spec, mesh), args, in_specs)
        outs = _shard_map(device, mesh=mesh, in_specs=in_specs, out_specs=(P(token_axes),) * n_out,
                          **{_SHARD_MAP_CHECK: True})(*placed)
    return tuple(o[:n].reshape(b, t) for o in outs)


def _pick(logp, hit, vsum):
    """logp[target] per row, from this shard's columns."""
    return vsum(jnp.sum(jnp.where(hit, logp, 0.0), axis=-1))


def token_logprobs(hidden, head, targets, *, vocab_size: int | None = None, chunk_size: int = 1024,
                   temperature: float = 1.0, mesh=None):
    """log softmax(hidden @ head / temperature)[targets] for every token: [B, T] fp32.

    hidden [B, T, D], head [D, V] (the output head), targets [B, T] int. Chunked over tokens
    and, with `mesh`, split over its batch axes (tokens) and "tensor" (vocabulary) like the KD
    loss; no [B, T, V] tensor, a chunk's logits are recomputed in the backward pass.
    vocab_size: score over the first `vocab_size` head columns only (a padded table).
    """
    _check_head("hidden", hidden, "head", head)
    vocab = _shared_vocab(head.shape[-1], None, vocab_size)
    return _per_token(lambda s, t, hit, vsum: (_pick(s, hit, vsum),), hidden, head, None, None, targets,
                      vocab=vocab, chunk_size=chunk_size, mesh=mesh, temperature=temperature, n_out=1)[0]


def token_reverse_kl(student_hidden, student_head, teacher_hidden, teacher_head, targets, *,
                     vocab_size: int | None = None, chunk_size: int = 1024, mesh=None):
    """Per token (MiniLLM): KL(q || p) over the vocabulary, log q(target) and log p(target), each
    [B, T] fp32, chunked and sharded as `token_logprobs`. Gradients reach the student's
    arguments; stop them on the teacher's."""
    _check_head("student_hidden", student_hidden, "student_head", student_head)
    _check_head("teacher_hidden", teacher_hidden, "teacher_head", teacher_head)
    vocab = _shared_vocab(student_head.shape[-1], teacher_head.shape[-1], vocab_size)

    def fn(s_logp, t_logp, hit, vsum):
        return vsum(reverse_kl_per_token(s_logp, t_logp)), _pick(s_logp, hit, vsum), _pick(t_logp, hit, vsum)

    return _per_token(fn, student_hidden, student_head, teacher_hidden, teacher_head, targets, vocab=vocab,
                      chunk_size=chunk_size, mesh=mesh, temperature=1.0, n_out=3)
