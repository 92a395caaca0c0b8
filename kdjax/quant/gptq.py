"""GPTQ for one linear layer, in JAX (Frantar et al. 2022; the AutoGPTQ / gptqmodel algorithm).

Given a kernel W [in, out] and the Hessian H = 2 X^T X / n of its inputs X [n, in], GPTQ quantizes
the input rows one after another (the reference's "columns" of torch's [out, in] weight) and
spreads each row's rounding error over the rows not yet quantized, weighted by the upper Cholesky
factor U of H^-1:

    H += percdamp * mean(diag H) * I;  U = chol(H^-1, upper)
    for row i:  q_i = grid(w_i);  e_i = (w_i - q_i) / U_ii;  w_j -= U_ij e_i  (j > i)

Rows go in blocks of `blocksize` (128): inside a block updates are immediate, the rest of W gets
one matmul per block (the lazy batch update). Groups of `group_size` rows get their scale/zero
from the partly-updated W when the group's first row is reached: exactly, from W as it stands at
the start of the block holding that row (the reference's `find_params(W[:, i:i+gs])` sees the
lazy W). Dead inputs (H_ii = 0) are zeroed. Act-order (`desc_act`) processes rows by decreasing
H_ii; `static_groups` fixes all group parameters up front from the unquantized W.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.quant.grid import QuantizedLinear, check_bits, exact_div, find_params, make_quantized_linear, quantize_codes

log = logging.getLogger(__name__)


def _full_precision():
    """Matmul precision for float32 Hessians and updates: XLA CPU's default is already full float32
    (and HIGHEST takes a slower path there); TPU and GPU defaults would round to bf16 / tf32."""
    return None if jax.default_backend() == "cpu" else jax.lax.Precision.HIGHEST


# ---- Hessians -----------------------------------------------------------------------------------
def hessian_init(n_in: int):
    """Running state (sum of x x^T [in, in] float32, token count) for `hessian_update`."""
    return jnp.zeros((n_in, n_in), jnp.float32), jnp.zeros((), jnp.float32)


@jax.jit
def hessian_update(state, x, mask=None):
    """Adds inputs x [..., in] (tokens where mask [...] is true) to the running X^T X."""
    xtx, count = state
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if mask is not None:
        m = mask.reshape(-1).astype(jnp.float32)
        x = x * m[:, None]
        n = m.sum()
    else:
        n = jnp.float32(x.shape[0])
    return xtx + jnp.matmul(x.T, x, precision=_full_precision()), count + n


def hessian_finalize(state):
    """H = 2 X^T X / n [in, in] (the reference's scaling; GPTQ itself is invariant to it)."""
    xtx, count = state
    return 2.0 * xtx / jnp.maximum(count, 1.0)


# ---- the layer algorithm ------------------------------------------------------------------------
def _upper_inverse_cholesky(h, percdamp):
    """Damped H -> U upper triangular with U^T U = (H + damp I)^-1: the reference's
    chol(cholesky_inverse(chol(H)), upper), computed with one Cholesky and one triangular solve.

    With J the reversal, J H J = M M^T (M lower) gives H = V V^T with V = J M J upper, so
    H^-1 = V^-T V^-1 and U = V^-1 (upper, positive diagonal: the unique Cholesky factor).
    """
    n = h.shape[0]
    damp = percdamp * jnp.mean(jnp.diag(h))
    h = h + damp * jnp.eye(n, dtype=h.dtype)
    v = jnp.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1]
    return jax.scipy.linalg.solve_triangular(v, jnp.eye(n, dtype=h.dtype), lower=False)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "sym", "desc_act", "static_groups", "blocksize",
                                             "mse"))
def _gptq(w, h, percdamp, *, bits, group_size, sym, desc_act, static_groups, blocksize, mse):
    n, m = w.shape
    dt = w.dtype
    gs = n if group_size == -1 else group_size
    n_groups = -(-n // gs)
    bsz = blocksize
    unit = gs if group_size != -1 and gs > bsz else bsz  # whole blocks, and whole groups when longer
    n_pad = -(-n // unit) * unit

    # One group over all rows: the reference finds it before zeroing dead rows.
    s_all, z_all = find_params(w, bits, sym, mse)
    s_all, z_all = s_all[None], z_all[None]

    diag = jnp.diag(h)
    dead = diag == 0
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0).astype(dt))
    w = jnp.where(dead[:, None], 0, w)

    if static_groups and group_size != -1:
        wg = jnp.pad(w, ((0, n_groups * gs - n), (0, 0))).reshape(n_groups, gs, m)
        s_all, z_all = find_params(wg, bits, sym, mse)

    if desc_act:
        perm = jnp.argsort(-jnp.diag(h), stable=True)
        w, h = w[perm], h[perm][:, perm]
    else:
        perm = jnp.arange(n)
    # the group of each processed row (in processing order)
    pos = jnp.arange(n_pad)
    col_group = (jnp.pad(perm, (0, n_pad - n)) if static_groups else pos) // gs
    col_group = jnp.minimum(col_group, n_groups - 1)

    u = _upper_inverse_cholesky(h, percdamp)
    # Padded rows: zero weights, identity factor; they quantize to 0 and move nothing.
    w = jnp.pad(w, ((0, n_pad - n), (0, 0)))
    u = jnp.pad(u, ((0, n_pad - n), (0, n_pad - n))) + jnp.diag((pos >= n).astype(dt))
    dynamic = group_size != -1 and not static_groups
    if dynamic:
        s_all = jnp.zeros((n_groups, m), dt)
        z_all = jnp.zeros((n_groups, m), dt)

    def block(b, carry):
        w, codes, s_all, z_all = carry
        i1 = b * bsz
        w1 = jax.lax.dynamic_slice_in_dim(w, i1, bsz)
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (bsz, bsz))
        if dynamic and gs <= bsz:  # bsz // gs groups start in this block, all from W as it is now
            s_b, z_b = find_params(w1.reshape(bsz // gs, gs, m), bits, sym, mse)
            idx = i1 // gs + jnp.arange(bsz // gs)  # groups past the end (padding) are dropped
            s_all = s_all.at[idx].set(s_b, mode="drop")
            z_all = z_all.at[idx].set(z_b, mode="drop")
        elif dynamic:  # a group spans several blocks: found when its first block starts
            s_b, z_b = find_params(jax.lax.dynamic_slice_in_dim(w, i1, gs), bits, sym, mse)
            g = jnp.minimum(i1 // gs, n_groups - 1)
            start = i1 % gs == 0
            s_all = s_all.at[g].set(jnp.where(start, s_b, s_all[g]))
            z_all = z_all.at[g].set(jnp.where(start, z_b, z_all[g]))
        grp = jax.lax.dynamic_slice_in_dim(col_group, i1, bsz)
        s_cols, z_cols = s_all[grp], z_all[grp]  # [bsz, m]

        def row(i, c):
            w1, err1, q1 = c
            wi = w1[i]
            qi = quantize_codes(wi, s_cols[i], z_cols[i], bits)
            deq = s_cols[i] * (qi - z_cols[i])
            e = exact_div(wi - deq, u1[i, i])
            w1 = w1 - u1[i][:, None] * e[None, :]  # U is upper: rows before i get exact zeros
            return w1, err1.at[i].set(e), q1.at[i].set(qi)

        _, err1, q1 = jax.lax.fori_loop(0, bsz, row, (w1, jnp.zeros_like(w1), jnp.zeros_like(w1)))
        u_rows = jax.lax.dynamic_slice_in_dim(u, i1, bsz)  # [bsz, n_pad]; zero left of the block
        w = w - jnp.matmul(u_rows.T, err1, precision=_full_precision())
        codes = jax.lax.dynamic_update_slice_in_dim(codes, q1, i1, axis=0)
        return w, codes, s_all, z_all

    codes = jnp.zeros((n_pad, m), dt)
    _, codes, s_all, z_all = jax.lax.fori_loop(0, n_pad // bsz, block, (w, codes, s_all, z_all))
    codes = codes[:n]
    g_idx = col_group[:n]
    invperm = jnp.argsort(perm)
    return codes[invperm], s_all, z_all, g_idx[invperm], jnp.isfinite(u).all()


def gptq_layer(kernel, hessian, *, bits: int = 4, group_size: int = 128, sym: bool = True,
               desc_act: bool = False, static_groups: bool = False, percdamp: float = 0.01,
               blocksize: int = 128, max_damp: float = 1.0, mse: float = 0.0) -> QuantizedLinear:
    """GPTQ-quantizes kernel [in, out] given the input Hessian [in, in] (see `hessian_finalize`).

    Computes in the kernel's float dtype (float32, or float64 under `jax.enable_x64`). If the
    damped Hessian is not positive definite, percdamp grows by 0.01 (as gptqmodel's
    damp_auto_increment) up to `max_damp`, then a ValueError asks for more calibration data.
    mse > 0: each group's range is searched as gptqmodel's `mse` option does (grid.find_params).
    """
    check_bits(bits)
    w = jnp.asarray(kernel)
    w = w if w.dtype in (jnp.float32, jnp.float64) else w.astype(jnp.float32)
    h = jnp.asarray(hessian, w.dtype)
    n = w.shape[0]
    if h.shape != (n, n):
        raise ValueError(f"gptq_layer: hessian has shape {h.shape}, the kernel [in, out] {w.shape} needs ({n}, {n})")
    gs = n if group_size == -1 else group_size
    if gs <= 0:
        raise ValueError(f"gptq_layer: group_size={group_size}; expected a positive size or -1")
    if group_size != -1 and blocksize % gs and gs % blocksize:
        raise ValueError(f"gptq_layer: group_size={group_size} and blocksize={blocksize}: one must divide the other")
    damp = percdamp
    while True:
        codes, s, z, g_idx, ok = _gptq(w, h, jnp.asarray(damp, w.dtype), bits=bits, group_size=group_size, sym=sym,
                                       desc_act=desc_act, static_groups=static_groups, blocksize=blocksize,
                                       mse=float(mse))
        if bool(ok):
            break
        damp = round(damp + 0.01, 6)
        if damp >= max_damp:
            raise ValueError("gptq_layer: the Hessian stays singular with dampening up to "
                             f"{max_damp}; give more (or more varied) calibration tokens")
        log.warning("gptq_layer: Hessian not positive definite, retrying with percdamp=%.3f", damp)
    return make_quantized_linear(codes, s, z, g_idx, bits=bits, group_size=group_size, sym=sym)


def reconstruction_error(kernel, q: QuantizedLinear, x) -> float:
    """||X W - X Q||_F / ||X W||_F for inputs x [n, in]."""
    x = np.asarray(x, np.float64)
    w = np.asarray(kernel, np.float64)
    ref = x @ w
    return float(np.linalg.norm(ref - x @ q.dequantize(np.float64)) / np.linalg.norm(ref))
