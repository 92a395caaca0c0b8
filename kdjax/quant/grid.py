"""The int4 grid shared by RTN, GPTQ and the AQT pass, and the GPTQ v1 packed layout.

Conventions (kernels are kdjax's `[in, out]`; torch's `weight` is its transpose):
- A weight column (one output channel) is split along the input dim into groups of `group_size`
  rows (`-1` = one group over all rows). Group `g` of column `c` has a float `scale[g, c]` and an
  integer `zero[g, c]`; a code `q` in `[0, 2**bits - 1]` stands for `scale * (q - zero)`.
- `g_idx[i]` is the group of input row `i` (`i // group_size` unless act-order reorders it).
- Scales and zeros are chosen exactly as GPTQ's reference `Quantizer.find_params`
  (AutoGPTQ / gptqmodel): the range always contains 0; symmetric puts `zero = 2**(bits-1)` and
  `scale = 2*max|w| / maxq` (so codes cover `[-8, 7] * scale` at 4 bits); a group whose min and
  max are both 0 gets the range [-1, 1]. Codes are `clip(round_half_even(w / scale) + zero, 0, maxq)`.
- Stored scales are float16 (what GPTQ checkpoints hold): `QuantizedLinear.dequantize` and every
  consumer (the AQT layer, the exporter) use those fp16 values, so all agree bit for bit.

Packed layout (GPTQ "v1", what AutoGPTQ wrote and gptqmodel / transformers read):
- qweight int32 `[in * bits / 32, out]`: row `r` holds input rows `r*k .. r*k+k-1` (k = 32/bits),
  row `r*k + j` in bits `[bits*j, bits*(j+1))`.
- qzeros int32 `[n_groups, out * bits / 32]`: the same along the output dim, and v1 stores
  `zero - 1`: the packed word minus `0x11111111` (4 bits) as a 32-bit wrap-around, which is the
  exact inverse of the `+ 0x11111111` gptqmodel applies when it loads a v1 checkpoint
  (`convert_gptq_v1_to_v2_format_module`). For symmetric quantization (zero = 8) every nibble is 7.
- scales float16 `[n_groups, out]`, g_idx int32 `[in]`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (2, 4, 8)


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits}: GPTQ packing here supports {SUPPORTED_BITS} (3-bit words are not)")
    return bits


def exact_div(a, b):
    """a / b, correctly rounded like torch's and numpy's division.

    XLA's CPU simplifier turns division by a constant or a broadcast into multiplication by a
    reciprocal, which is off by one ulp now and then. That matters here: the extreme value of every
    symmetric group sits exactly on a .5 rounding tie (w / scale = -7.5), so the last bit decides
    its code. The barrier hides the broadcast from the simplifier.
    """
    a = jnp.asarray(a)
    return a / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, a.dtype), a.shape))


MSE_GRID, MSE_MAXSHRINK = 100, 0.8  # gptqmodel's `Quantizer.configure` defaults


def find_params(w, bits: int = 4, sym: bool = True, mse: float = 0.0):
    """GPTQ's `Quantizer.find_params` per output column of a group of rows.

    w: [..., rows, out] (float). Returns (scale [..., out], zero [..., out] float holding an integer).
    mse > 0 searches, as gptqmodel's `mse` option does, the shrunk ranges p * [min, max] for p = 1,
    0.99, ..., 0.21 and keeps per column the first with the smallest sum over the rows of
    |dequantized - w| ** mse (gptqmodel suggests 2.4): the range clipped where that loses less than
    the coarser steps of the full range.
    Written without vmap: under vmap the unbatched divisor would be broadcast again (see exact_div).
    """
    maxq = 2 ** bits - 1
    xmin = jnp.minimum(w.min(axis=-2), 0)
    xmax = jnp.maximum(w.max(axis=-2), 0)
    if sym:
        xmax = jnp.maximum(jnp.abs(xmin), xmax)
        xmin = jnp.where(xmin < 0, -xmax, xmin)
    both0 = (xmin == 0) & (xmax == 0)
    xmin = jnp.where(both0, -1, xmin)
    xmax = jnp.where(both0, 1, xmax)

    def params(lo, hi):
        scale = exact_div(hi - lo, maxq)
        zero = jnp.full_like(scale, (maxq + 1) / 2) if sym else jnp.round(exact_div(-lo, scale))
        return scale, zero

    scale, zero = params(xmin, xmax)
    if mse <= 0:
        return scale, zero

    def shrink(i, carry):
        best, s_best, z_best = carry
        p = (1 - i / MSE_GRID).astype(w.dtype)
        s, z = params(p * xmin, p * xmax)
        s_r, z_r = s[..., None, :], z[..., None, :]
        err = (jnp.abs(s_r * (quantize_codes(w, s_r, z_r, bits) - z_r) - w) ** mse).sum(axis=-2)
        better = err < best
        return jnp.where(better, err, best), jnp.where(better, s, s_best), jnp.where(better, z, z_best)

    best = jnp.full(scale.shape, jnp.inf, w.dtype)
    _, scale, zero = jax.lax.fori_loop(0, int(MSE_MAXSHRINK * MSE_GRID), shrink, (best, scale, zero))
    return scale, zero


def quantize_codes(w, scale, zero, bits: int = 4):
    """Integer codes of `w` on the grid: clip(round(w / scale) + zero, 0, maxq), as floats."""
    return jnp.clip(jnp.round(exact_div(w, scale)) + zero, 0, 2 ** bits - 1)


@dataclasses.dataclass(frozen=True)
class QuantizedLinear:
    """One quantized linear layer on the grid above (host numpy arrays).

    codes: [in, out] uint8 in [0, 2**bits - 1]; scales: [G, out] float16; zeros: [G, out] uint8;
    g_idx: [in] int32; group_size: rows per group (-1 = one group per column).
    """

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    g_idx: np.ndarray
    bits: int = 4
    group_size: int = 128
    sym: bool = True

    def __post_init__(self):
        n_in, n_out = self.codes.shape
        g = self.scales.shape[0]
        if self.scales.shape != (g, n_out) or self.zeros.shape != (g, n_out) or self.g_idx.shape != (n_in,):
            raise ValueError(f"QuantizedLinear: inconsistent shapes codes {self.codes.shape}, scales "
                             f"{self.scales.shape}, zeros {self.zeros.shape}, g_idx {self.g_idx.shape}")

    @property
    def shape(self):
        return self.codes.shape

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        """[in, out] weights `scale[g_idx] * (codes - zero[g_idx])`, computed in float32.

        Exact in float32: an fp16 scale times an integer below 2**bits needs at most 11 + bits bits.
        """
        s = self.scales.astype(np.float32)[self.g_idx]
        z = self.zeros.astype(np.float32)[self.g_idx]
        return (s * (self.codes.astype(np.float32) - z)).astype(dtype)


def make_quantized_linear(codes, scale, zero, g_idx, *, bits, group_size, sym) -> QuantizedLinear:
    """Host QuantizedLinear from device results (scale -> float16, codes/zeros -> uint8)."""
    scale = np.asarray(jax.device_get(scale), np.float32)
    s16 = scale.astype(np.float16)
    if not np.all(np.isfinite(s16)):
        raise ValueError("quantization scale overflows float16 (|w| > 65504 * maxq / 2?)")
    return QuantizedLinear(codes=np.asarray(jax.device_get(codes)).astype(np.uint8), scales=s16,
                           zeros=np.asarray(jax.device_get(zero)).astype(np.uint8),
                           g_idx=np.asarray(jax.device_get(g_idx)).astype(np.int32),
                           bits=bits, group_size=group_size, sym=sym)


def _groups(n_in: int, group_size: int) -> int:
    gs = n_in if group_size == -1 else group_size
    if gs <= 0:
        raise ValueError(f"group_size={group_size}: expected a positive size or -1 (one group per column)")
    return gs


def rtn(kernel, *, bits: int = 4, group_size: int = 128, sym: bool = True, mse: float = 0.0) -> QuantizedLinear:
    """Round-to-nearest on the GPTQ grid (each group's range searched with `mse` > 0, see
    find_params). kernel: [in, out]."""
    check_bits(bits)
    w = jnp.asarray(kernel, jnp.float32)
    n_in = w.shape[0]
    gs = _groups(n_in, group_size)
    n_groups = -(-n_in // gs)
    pad = n_groups * gs - n_in  # zero rows never move min/max (the range always holds 0)
    wp = jnp.pad(w, ((0, pad), (0, 0))).reshape(n_groups, gs, -1)
    scale, zero = find_params(wp, bits, sym, mse)
    g_idx = jnp.arange(n_in) // gs
    codes = quantize_codes(w, scale[g_idx], zero[g_idx], bits)
    return make_quantized_linear(codes, scale, zero, g_idx, bits=bits, group_size=group_size, sym=sym)


# ---- GPTQ v1 packing ----------------------------------------------------------------------------
def _pack_rows(v: np.ndarray, bits: int) -> np.ndarray:
    """[n, m] small unsigned ints -> [n * bits / 32, m] int32, row n*k+j in bits [bits*j, ...)."""
    k = 32 // bits
    n, m = v.shape
    if n % k:
        raise ValueError(f"cannot pack {n} rows into int32 words of {k} {bits}-bit values: "
                         f"the packed dim must be a multiple of {k}")
    v = v.astype(np.uint32).reshape(n // k, k, m)
    shifts = (bits * np.arange(k, dtype=np.uint32))[None, :, None]
    return np.bitwise_or.reduce(v << shifts, axis=1).view(np.int32)


def _unpack_rows(p: np.ndarray, bits: int) -> np.ndarray:
    k = 32 // bits
    u = p.view(np.uint32)[:, None, :]
    shifts = (bits * np.arange(k, dtype=np.uint32))[None, :, None]
    v = (u >> shifts) & np.uint32(2 ** bits - 1)
    return v.reshape(-1, p.shape[1]).astype(np.uint8)


def _v1_offset(bits: int) -> np.uint32:
    return np.uint32(sum(1 << (bits * j) for j in range(32 // bits)))


def pack_qweight(codes: np.ndarray, bits: int = 4) -> np.ndarray:
    """codes [in, out] -> qweight int32 [in * bits / 32, out]."""
    return _pack_rows(np.asarray(codes), check_bits(bits))


def unpack_qweight(qweight: np.ndarray, bits: int = 4) -> np.ndarray:
    return _unpack_rows(np.asarray(qweight, np.int32), check_bits(bits))


def pack_qzeros(zeros: np.ndarray, bits: int = 4) -> np.ndarray:
    """zeros [G, out] -> v1 qzeros int32 [G, out * bits / 32] (packed word minus 0x11111111)."""
    packed = _pack_rows(np.asarray(zeros).T, check_bits(bits)).T.view(np.uint32)
    return (packed - _v1_offset(bits)).view(np.int32)  # uint32 arithmetic wraps mod 2**32


def unpack_qzeros(qzeros: np.ndarray, bits: int = 4) -> np.ndarray:
    """v1 qzeros [G, out * bits / 32] -> zeros [G, out] (adds 0x11111111 back, as gptqmodel does)."""
    words = (np.asarray(qzeros, np.int32).view(np.uint32) + _v1_offset(check_bits(bits))).view(np.int32)
    return _unpack_rows(np.ascontiguousarray(words.T), bits).T


def pack(q: QuantizedLinear) -> dict[str, np.ndarray]:
    """The four GPTQ tensors of one layer (torch layout): qweight, qzeros, scales, g_idx."""
    return {"qweight": pack_qweight(q.codes, q.bits), "qzeros": pack_qzeros(q.zeros, q.bits),
            "scales": np.ascontiguousarray(q.scales, np.float16), "g_idx": q.g_idx.astype(np.int32)}


def unpack(t: dict[str, np.ndarray], *, bits: int = 4, group_size: int = 128, sym: bool = True) -> QuantizedLinear:
    """Inverse of `pack`."""
    return QuantizedLinear(codes=unpack_qweight(t["qweight"], bits), scales=np.asarray(t["scales"], np.float16),
                           zeros=unpack_qzeros(t["qzeros"], bits), g_idx=np.asarray(t["g_idx"], np.int32),
                           bits=bits, group_size=group_size, sym=sym)
