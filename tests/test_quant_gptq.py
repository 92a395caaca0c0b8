"""GPTQ in JAX against a float64 numpy transcription of the reference (AutoGPTQ / gptqmodel
`GPTQ.quantize`, torch layout W [out, in]), and against RTN on reconstruction error."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.quant import grid
from kdjax.quant.gptq import gptq_layer, hessian_finalize, hessian_init, hessian_update, reconstruction_error


# ---- the reference, float64 numpy, torch orientation ---------------------------------------------
def ref_find_params(x, bits, sym, mse=0.0, grid=100, maxshrink=0.8):
    """Quantizer.find_params(x, weight=True) on x [out, cols]: per-row scale/zero [out, 1]; with
    mse > 0 its range search (gptqmodel's loop over p = 1 - i / grid)."""
    maxq = 2 ** bits - 1
    xmin = np.minimum(x.min(1), 0)
    xmax = np.maximum(x.max(1), 0)
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        neg = xmin < 0
        xmin[neg] = -xmax[neg]
    both = (xmin == 0) & (xmax == 0)
    xmin[both], xmax[both] = -1, 1
    scale = (xmax - xmin) / maxq
    zero = np.full_like(scale, (maxq + 1) / 2) if sym else np.round(-xmin / scale)
    if mse > 0:
        best = np.full(x.shape[0], np.inf)
        for i in range(int(maxshrink * grid)):
            p = 1 - i / grid
            xmin1, xmax1 = p * xmin, p * xmax
            scale1 = (xmax1 - xmin1) / maxq
            zero1 = np.round(-xmin1 / scale1) if not sym else zero
            deq, _ = ref_quantize(x, scale1[:, None], zero1[:, None], maxq)
            err = np.sum(np.abs(deq - x) ** mse, 1)
            better = err < best
            best[better], scale[better], zero[better] = err[better], scale1[better], zero1[better]
    return scale[:, None], zero[:, None]


def ref_quantize(x, scale, zero, maxq):
    q = np.clip(np.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero), q


def ref_gptq(W, H, bits=4, group_size=128, sym=True, desc_act=False, static_groups=False,
             percdamp=0.01, blocksize=128, mse=0.0):
    """Returns integer codes [out, in], scale [out, G], zero [out, G], g_idx [in]."""
    W, H = W.astype(np.float64).copy(), H.astype(np.float64).copy()
    rows, columns = W.shape
    maxq = 2 ** bits - 1
    scale_q, zero_q = ref_find_params(W, bits, sym, mse)
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    scale, zero, groups = [], [], []
    if static_groups:
        for i in range(0, columns, group_size):
            s, z = ref_find_params(W[:, i:i + group_size], bits, sym, mse)
            scale.append(s), zero.append(z), groups.append((s, z))
    if desc_act:
        perm = np.argsort(-np.diag(H), kind="stable")
        W, H = W[:, perm], H[perm][:, perm]
        invperm = np.argsort(perm)
    damp = percdamp * np.mean(np.diag(H))
    H[np.arange(columns), np.arange(columns)] += damp
    L = np.linalg.cholesky(H)
    Hinv = np.linalg.cholesky(np.linalg.inv(L @ L.T)).T  # cholesky_inverse, then upper Cholesky
    Q = np.zeros_like(W)
    now_idx = 1
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if group_size != -1:
                if not static_groups:
                    if (i1 + i) % group_size == 0:
                        scale_q, zero_q = ref_find_params(W[:, i1 + i:i1 + i + group_size], bits, sym, mse)
                    if ((i1 + i) // group_size) - now_idx == -1:
                        scale.append(scale_q), zero.append(zero_q)
                        now_idx += 1
                else:
                    idx = perm[i1 + i] if desc_act else i1 + i
                    scale_q, zero_q = groups[idx // group_size]
            deq, q = ref_quantize(w[:, None], scale_q, zero_q, maxq)
            Q1[:, i] = q[:, 0]
            err1 = (w - deq[:, 0]) / d
            W1[:, i:] -= err1[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    gsz = group_size if group_size != -1 else columns
    if static_groups and desc_act:
        g_idx = np.array([perm[i] // gsz for i in range(columns)])
    else:
        g_idx = np.array([i // gsz for i in range(columns)])
    if desc_act:
        Q, g_idx = Q[:, invperm], g_idx[invperm]
    if not scale:
        scale.append(scale_q), zero.append(zero_q)
    return Q, np.concatenate(scale, 1), np.concatenate(zero, 1), g_idx


# ---- fixtures ------------------------------------------------------------------------------------
def layer(n_in, n_out, n_tok, seed, dead=()):
    """A random layer whose inputs are correlated like LLM activations (low rank plus noise, uneven
    feature scales), so that GPTQ's error feedback has something to work with."""
    rng = np.random.default_rng(seed)
    rank = n_in // 4
    x = rng.standard_normal((n_tok, rank)) @ rng.standard_normal((rank, n_in)) / np.sqrt(rank)
    x = (x + 0.1 * rng.standard_normal((n_tok, n_in))) * rng.uniform(0.2, 3.0, n_in)
    x[:, list(dead)] = 0
    w = rng.standard_normal((n_in, n_out)) * 0.05
    return x, w


def hessian(x):
    return np.asarray(hessian_finalize(hessian_update(hessian_init(x.shape[1]), jnp.asarray(x, jnp.float32))))


def enable_x64():
    return jax.enable_x64(True) if hasattr(jax, "enable_x64") else jax.experimental.enable_x64()


CASES = [  # each compiles once: one case per code path
    dict(group_size=128),  # groups = blocks
    dict(group_size=32, desc_act=True),  # several groups per block, act-order
    dict(group_size=256, blocksize=64),  # a group spans blocks
    dict(group_size=-1),  # one group per column, found before dead rows are zeroed
    dict(group_size=32, desc_act=True, static_groups=True),
    dict(group_size=32, sym=False, bits=8),
    dict(group_size=64, desc_act=True, mse=2.4),  # each group's range searched (gptqmodel's `mse`)
    dict(group_size=32, sym=False, mse=2.0),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_gptq_equals_float64_reference(kw):
    x, w = layer(320, 48, 600, seed=len(str(kw)), dead=(5, 77))
    h = 2 * x.T @ x / x.shape[0]
    codes, scale, zero, g_idx = ref_gptq(w.T, h, **kw)
    with enable_x64():
        q = gptq_layer(jnp.asarray(w, jnp.float64), jnp.asarray(h, jnp.float64), **kw)
    assert np.array_equal(q.g_idx, g_idx)
    assert np.array_equal(q.zeros.T, zero.astype(np.uint8))
    np.testing.assert_array_equal(q.scales.T, scale.astype(np.float16))
    # float64 on both sides: the same codes (a tie would be the only excuse, and none occurs here)
    mismatch = np.mean(q.codes.T != codes)
    assert mismatch == 0, f"{mismatch:.4%} of codes differ"


def test_gptq_float32_close_to_reference_and_beats_rtn():
    x, w = layer(256, 64, 2000, seed=3)
    h = hessian(x)  # the float32 JAX Hessian
    codes, _, _, _ = ref_gptq(w.T, 2 * x.T @ x / len(x), group_size=64)
    q = gptq_layer(w, h, group_size=64)
    # float32 vs float64: codes only flip where a value sits within rounding noise of a .5 boundary,
    # and a flip feeds back into later rows; still almost all agree.
    assert np.mean(q.codes.T != codes) < 0.01
    r = grid.rtn(w, group_size=64)
    e_gptq, e_rtn = reconstruction_error(w, q, x), reconstruction_error(w, r, x)
    assert e_gptq < 0.6 * e_rtn, (e_gptq, e_rtn)


def test_gptq_with_identity_hessian_is_rtn():
    _, w = layer(256, 64, 10, seed=4)
    q = gptq_layer(w.astype(np.float32), np.eye(256, dtype=np.float32), group_size=64)
    r = grid.rtn(w, group_size=64)
    assert np.array_equal(q.codes, r.codes) and np.array_equal(q.scales, r.scales)


def test_hessian_is_two_xtx_over_n_with_mask():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 8)).astype(np.float32)
    mask = rng.random((3, 5)) > 0.3
    st = hessian_update(hessian_init(8), x[:2], mask[:2])
    st = hessian_update(st, x[2:], mask[2:])
    keep = x[mask]
    np.testing.assert_allclose(hessian_finalize(st), 2 * keep.T @ keep / len(keep), rtol=1e-5, atol=1e-6)


def test_bad_group_and_block_sizes_are_named():
    with pytest.raises(ValueError, match="group_size=48 and blocksize=128"):
        gptq_layer(np.zeros((96, 8), np.float32), np.eye(96, dtype=np.float32), group_size=48)


def test_dampening_grows_until_the_hessian_factors(caplog):
    rng = np.random.default_rng(6)
    v = rng.standard_normal(64)
    v /= np.linalg.norm(v)
    h = (np.eye(64) - 1.025 * np.outer(v, v)).astype(np.float32)  # one eigenvalue -0.025
    w = rng.standard_normal((64, 64)).astype(np.float32)
    q = gptq_layer(w, h, group_size=64)  # percdamp 0.01, 0.02 fail; 0.03 works
    assert "percdamp=0.030" in caplog.text and "percdamp=0.040" not in caplog.text
    assert q.codes.shape == (64, 64)
    with pytest.raises(ValueError, match="stays singular"):
        gptq_layer(w, -np.eye(64, dtype=np.float32), group_size=64, max_damp=0.05)


@pytest.mark.parametrize("sym", [True, False])
def test_range_search_equals_gptqmodels_quantizer(sym):
    """find_params(mse=2.4) against gptqmodel's own Quantizer (torch, float32) on groups of 64 rows."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace
    from gptqmodel.quantization.quantizer import Quantizer
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((64, 96)) * rng.uniform(0.01, 0.1, 96) + (0 if sym else 0.02)).astype(np.float32)
    w[rng.integers(0, 64, 96), np.arange(96)] *= 6  # an outlier a column: what the search clips
    ref = Quantizer(SimpleNamespace(bits=4, sym=sym, mse=2.4))
    ref.configure(perchannel=True)
    ref.find_params(torch.from_numpy(w.T.copy()), weight=True)  # torch's [out, in]
    scale, zero = grid.find_params(jnp.asarray(w), 4, sym, mse=2.4)
    # torch multiplies by the Python float p unrounded, JAX by p in float32: an ulp apart at most
    np.testing.assert_allclose(np.asarray(scale), ref.scale.numpy()[:, 0], rtol=2e-7, atol=0)
    np.testing.assert_array_equal(np.asarray(zero), ref.zero.numpy()[:, 0])
    full, _ = grid.find_params(jnp.asarray(w), 4, sym)
    assert np.mean(np.asarray(scale) < np.asarray(full)) > 0.5  # most columns clipped their outlier
    # and the search lowers RTN's weight error in the norm it minimises
    err = [(np.abs(grid.rtn(w, group_size=64, sym=sym, mse=m).dequantize() - w) ** 2.4).sum() for m in (0.0, 2.4)]
    assert err[1] < 0.97 * err[0], err  # sym 0.82, asym 0.955 here
