"""The AQT pass: decoder linears that hold int4 weights in memory and run through aqt.jax.v2.

Each `Int4Linear` keeps the GPTQ grid as an AQT `QTensor`: `qvalue` int4 [G, group, out] holding
`code - 2**(bits-1)` (GPTQ's unsigned codes shifted onto the signed int4 range), `scale` [G, 1, out]
(the checkpoint's fp16 scales) and, for asymmetric grids, the QTensor bias `scale * (zero - 8)`,
so that AQT's `dequant = qvalue * scale - bias` equals `scale * (code - zero)`. Both products
are exact in float32 (an fp16 scale times an integer below 16), so the weights AQT sees are
bit-identical to `QuantizedLinear.dequantize()` and to what a GPTQ loader computes from the
exported checkpoint.

Why not AQT's own calibration: aqt's int4 numerics are symmetric abs-max with the levels
[-7, 7] (no -8), one scale per calibration slice and round-to-nearest; GPTQ's grid has 16 levels
[-8, 7] (or a zero point), its own range rule, and codes that are not the nearest level at all
(error feedback). So the codes and scales are handed to AQT as a ready QTensor: AQT's serving
path (`rhs_qt`) in its fake-quant mode (`DequantMode.THIS_INPUT`), which dequantizes the QTensor
and runs a plain dot_general in the compute dtype. The layer does exactly those two steps itself
(`QTensor.dequant()`, then the matmul) instead of calling `DotGeneral.dg_core`: aqtp 0.9's
dg_core calls `jnp.promote_types(array, array)`, which JAX deprecates (an error for numpy inputs
already, and for all inputs in a future JAX). `aqt_dot_general_reference` runs AQT's own
dot_general on the same QTensor; the tests check both agree wherever it still runs.

Act-order (`desc_act`) groups are not contiguous along the input dim, and the last group may be
short (576 inputs in groups of 128): the QTensor holds G full groups, each input row at a slot of
its group (unused slots hold the zero point, so they dequantize to 0), and the layer gathers the
rows back into input order after dequantizing.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from aqt.jax.v2 import aqt_dot_general, aqt_tensor, config as aqt_config
from flax import nnx

from kdjax.model import matmul
from kdjax.quant.grid import QuantizedLinear
from kdjax.quant.quantize import QuantizedModel, get_linear


class QuantWeight(nnx.Variable):
    """Quantized weight data (never trained by an optimizer that filters on nnx.Param)."""


def aqt_weight_only_config(bits: int = 4):
    """aqt.jax.v2 DotGeneral: activations unquantized, weights `bits`-bit, dequantized in the input."""
    cfg = aqt_config.config_v4(fwd_bits=None, dlhs_bits=None, drhs_bits=None)
    aqt_config.set_bits(cfg, None, bits, None, None, None, None)
    aqt_config.set_fwd_dequant_mode(cfg, rhs_dequant_mode=aqt_dot_general.DequantMode.THIS_INPUT)
    return cfg


def _container(bits: int):
    return jnp.int4 if bits <= 4 else jnp.int8


class Int4Linear(nnx.Module):
    """y = x @ W + b with W on the GPTQ grid, stored as int4 codes + fp16 scales (+ zeros).

    axes: the float kernel's logical axes (in, out), e.g. ("embed", "mlp"); the [G, group, out]
    tensors carry (in, None, out) so `kdjax.sharding` shards them like the kernel they replace.
    """

    def __init__(self, q: QuantizedLinear, bias=None, dtype=jnp.float32, axes=(None, None)):
        n_in, n_out = q.shape
        gs = n_in if q.group_size == -1 else q.group_size
        g = q.scales.shape[0]
        counts = np.bincount(q.g_idx, minlength=g)
        if len(counts) != g or counts.max() > gs:
            raise ValueError(f"Int4Linear: g_idx puts up to {counts.max()} rows in a group of {gs} "
                             f"(or names a group past {g}): not a GPTQ layout")
        # Row i sits at slot (g_idx[i], rank within its group) of the [G, group, out] QTensor.
        order = np.argsort(q.g_idx, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        slot = np.empty(n_in, np.int64)
        slot[order] = np.arange(n_in) - starts[q.g_idx[order]]
        pos = q.g_idx.astype(np.int64) * gs + slot
        half = 2 ** (q.bits - 1)
        # Unused slots (a short last group) hold the zero point, so they dequantize to exactly 0.
        codes = np.repeat(q.zeros.astype(np.int16), gs, axis=0)
        codes[pos] = q.codes
        grouped = (axes[0], None, axes[1])
        self.qvalue = QuantWeight(jnp.asarray((codes - half).reshape(g, gs, n_out), _container(q.bits)),
                                  axes=grouped)
        self.scale = QuantWeight(jnp.asarray(q.scales[:, None, :], jnp.float16), axes=grouped)
        zeros = q.zeros.astype(np.int16) - half
        self.zero = None if q.sym else QuantWeight(jnp.asarray(zeros[:, None, :], _container(q.bits)), axes=grouped)
        plain = np.array_equal(pos, np.arange(n_in))
        self.rows = None if plain else QuantWeight(jnp.asarray(pos, jnp.int32), axes=(None,))
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias), axes=(axes[1],))
        self.bits, self.dtype, self.shape = q.bits, dtype, (n_in, n_out)

    def qtensor(self) -> aqt_tensor.QTensor:
        """The weight as an AQT QTensor [G, group, out]; `.dequant()` gives the float weights."""
        scale = self.scale[...].astype(jnp.float32)
        bias = [] if self.zero is None else [scale * self.zero[...].astype(jnp.float32)]
        return aqt_tensor.QTensor(qvalue=self.qvalue[...], scale=[scale], scale_t=None, bias=bias,
                                  dequant_dtype=jnp.dtype(self.dtype))

    def dequantized_kernel(self):
        """[in, out] weights in the original row order, in the compute dtype."""
        w = self.qtensor().dequant()
        w = w.reshape(-1, w.shape[-1])
        return w[: self.shape[0]] if self.rows is None else jnp.take(w, self.rows[...], axis=0)

    def __call__(self, x):
        """x: [..., in] -> [..., out] in the compute dtype."""
        y = matmul(x.astype(self.dtype), self.dequantized_kernel())
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def aqt_dot_general_reference(layer: Int4Linear, x):
    """The same product through aqt.jax.v2's DotGeneral.dg_core with the layer's QTensor as rhs_qt
    (no bias). x: [..., in] jax array in the layer's dtype."""
    g, gs, n_out = layer.qvalue.shape
    x = jnp.asarray(x, layer.dtype)
    # scatter activations into the QTensor's [G, group] row slots (empty slots see 0)
    slots = jnp.arange(layer.shape[0]) if layer.rows is None else layer.rows[...]
    x = jnp.zeros((*x.shape[:-1], g * gs), x.dtype).at[..., slots].set(x).reshape(*x.shape[:-1], g, gs)
    k = x.ndim
    dims = (((k - 2, k - 1), (0, 1)), ((), ()))
    rhs = jnp.zeros((g, gs, n_out), layer.dtype)  # AQT calibrates this argument; unused with rhs_qt
    y, _ = aqt_weight_only_config(layer.bits).dg_core(lhs=x, rhs=rhs, lhs_qt=None, rhs_qt=layer.qtensor(),
                                                      dimension_numbers=dims)
    return y


def _swap(model, qm: QuantizedModel, make):
    missing = [p for p in qm.linears if not _has(model, p)]
    if missing:
        raise ValueError(f"quantized weights for {missing[:3]} do not match the model's layers")
    model = nnx.clone(model)
    for path, q in qm.linears.items():
        lin = get_linear(model, path)
        if tuple(lin.kernel.shape) != tuple(q.shape):
            raise ValueError(f"{path}: kernel {tuple(lin.kernel.shape)} vs quantized {q.shape}")
        make(model, path, lin, q)
    return model


def _has(model, path):
    try:
        get_linear(model, path)
        return True
    except (AttributeError, IndexError):
        return False


def to_int4_model(model, qm: QuantizedModel):
    """A copy of `model` whose decoder linears are `Int4Linear` (AQT, int4 in memory)."""
    def make(m, path, lin, q):
        _, i, mod, name = path.split(".")
        bias = None if lin.bias is None else lin.bias[...]
        axes = lin.kernel.get_metadata().get("axes") or (None, None)
        setattr(getattr(m.layers[int(i)], mod), name, Int4Linear(q, bias, dtype=lin.dtype, axes=axes))
    return _swap(model, qm, make)


def dequantized_model(model, qm: QuantizedModel):
    """A copy of `model` with every quantized kernel replaced by its dequantized float weights."""
    def make(m, path, lin, q):
        lin.kernel.set_value(jnp.asarray(q.dequantize(), lin.kernel[...].dtype))
    return _swap(model, qm, make)
