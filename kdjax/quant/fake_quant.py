"""Fake int4 quantization on the GPTQ grid: the forward that quantization-aware training runs
through, and the int4 layers it stands for.

A QAD student (kdjax/training/qad.py) keeps, for every decoder linear that int4 touches, the grid
of its int4 start (RTN or GPTQ, kdjax/quant/grid.py): g_idx [in] (act-order groups too), scale
[G, out] and zero [G, out]; and its latent weights in *grid coordinates*, u = W / s [in, out]: the
signed position of each weight on its group's grid, in grid steps. Its weights are

    s     = float16(scale)[g_idx]                          what the GPTQ checkpoint stores
    codes = clip(round(u) + z[g_idx], 0, 2**bits - 1)      the int4 codes
    W_q   = QTensor(codes - 2**(bits-1), s, bias=s * (z - 2**(bits-1))).dequant()   AQT

which is, bit for bit, `QuantizedLinear.dequantize()` of the layer `quantized_model` exports, and
so the weight the AQT int4 layer (`Int4Linear`) and a GPTQ loader compute from that checkpoint.
The codes move only through u (one grid step is one unit, whatever the group's scale: a learning
rate means the same in every group); a scale rescales its group. At the start u = W / s of the
float weights (RTN: round(u) are RTN's codes) or codes - z exactly (GPTQ, whose codes are not
round(W / s)), `grid_coordinates`.

Why AQT does only the dequantization here: AQT's quantization step (`QTensor.quant`) computes
`(x + bias) * reciprocal(scale)` and its integer numerics are symmetric (levels [-7, 7], or
half-integers), while GPTQ's grid has the 16 levels [-8, 7] or a zero point per group, codes
from a correctly rounded `round(w / scale) + zero` (a multiplied reciprocal or an added zero
moves the ties, which grid.exact_div says matter), and act-order groups that are not contiguous
rows. qwix's QAT calibrates its scale from the weights at every step (abs-max / min-max over
contiguous tiles), so it cannot hold GPTQ's scales either. So the codes and their
straight-through gradient are written here; the dequantization of the codes is AQT's QTensor,
the same call the served int4 layer makes.

Gradients (straight-through, as LSQ and EfficientQAT): with G = dLoss/dW_q and
inside = [0 <= round(u) + z <= maxq] (the code was not clipped),

    du     = G * s * inside
    dscale = sum over the group's rows of G * (codes - z)
    dzero  = sum over the group's rows of -G * s * (1 - inside)

the rounding of the scale to float16 and of the zero to an integer pass gradients straight through.

Trees: `u`, `scale`, `zero` and `g_idx` are nested dicts keyed like the model's parameters
({"layers": {3: {"mlp": {"down_proj": array}}}}), so they sit beside the model in a train state.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from aqt.jax.v2 import aqt_tensor

from kdjax.quant.grid import QuantizedLinear, exact_div, make_quantized_linear
from kdjax.quant.quantize import QuantizedModel

stop = jax.lax.stop_gradient
SMALLEST_SCALE = 2.0 ** -24  # float16's smallest subnormal: a trained scale never reaches 0


def straight_through(x, forward):
    """forward(x) in the forward pass with the gradient of the identity. Exact: the value is
    forward(x) + (x - x) = forward(x)."""
    return stop(forward(x)) + (x - stop(x))


def grid_scale(scale):
    """The scale the grid uses: float16-rounded as the checkpoint stores it (kept > 0), in float32;
    gradient straight through."""
    return straight_through(scale, lambda s: jnp.maximum(s, SMALLEST_SCALE).astype(jnp.float16).astype(jnp.float32))


def grid_zero(zero, bits: int):
    """The zero point the grid uses: an integer in [0, 2**bits - 1]; gradient straight through."""
    return straight_through(zero, lambda z: jnp.clip(jnp.round(z), 0, 2 ** bits - 1))


def ste_codes(u, z, bits: int):
    """Codes [in, out] (floats) = clip(round(u) + z, 0, maxq), with the clipped straight-through
    gradient: 1 where the code is not clipped, 0 where it is (for u; z's is 1 - that via W_q)."""
    v = straight_through(u, jnp.round) + z
    inside = stop((v >= 0) & (v <= 2 ** bits - 1))
    return jnp.where(inside, v, stop(jnp.clip(v, 0, 2 ** bits - 1)))


def dequantize(codes, s, z, bits: int):
    """s * (codes - z) [in, out] float32 through AQT's QTensor, laid out as `Int4Linear` lays it
    (qvalue = codes - 2**(bits-1), bias = s * (z - 2**(bits-1))); every product is exact in float32."""
    half = 2 ** (bits - 1)
    qt = aqt_tensor.QTensor(qvalue=codes - half, scale=[s], scale_t=None, bias=[s * (z - half)],
                            dequant_dtype=jnp.dtype(jnp.float32))
    return qt.dequant()


def fake_quantize(u, scale, zero, g_idx, *, bits: int = 4):
    """The int4 weights W_q [in, out] float32 of grid coordinates u [in, out] on the grid
    scale / zero [G, out], g_idx [in]."""
    z = grid_zero(zero, bits)[g_idx]
    return dequantize(ste_codes(u.astype(jnp.float32), z, bits), grid_scale(scale)[g_idx], z, bits)


def grid_coordinates(kernel, q: QuantizedLinear):
    """u [in, out] float32 of a float kernel [in, out] on the grid of `q`: W / s where round(W / s)
    + z are q's codes (RTN), else codes - z exactly (GPTQ's error-compensated codes)."""
    s = q.scales.astype(np.float32)[q.g_idx]
    z = q.zeros.astype(np.float32)[q.g_idx]
    u = exact_div(jnp.asarray(kernel, jnp.float32), s)
    rounds_to_codes = jnp.clip(jnp.round(u) + z, 0, 2 ** q.bits - 1) == q.codes
    return jnp.where(rounds_to_codes, u, jnp.asarray(q.codes, jnp.float32) - z)


# ---- trees keyed like the model's parameters ---------------------------------------------------
def _split(path: str) -> tuple[int, str, str]:
    _, i, mod, name = path.split(".")
    return int(i), mod, name


def linear_tree(values: dict[str, object]) -> dict:
    """{"layers.3.mlp.down_proj": x} -> {"layers": {3: {"mlp": {"down_proj": x}}}}."""
    tree: dict = {"layers": {}}
    for path, x in values.items():
        i, mod, name = _split(path)
        tree["layers"].setdefault(i, {}).setdefault(mod, {})[name] = x
    return tree


def linear_items(tree: dict):
    """(path, value) of a `linear_tree`, in layer order."""
    for i in sorted(tree["layers"]):
        for mod, names in tree["layers"][i].items():
            for name, x in names.items():
                yield f"layers.{i}.{mod}.{name}", x


def map_linears(fn, tree: dict, *others: dict) -> dict:
    """A `linear_tree` of fn(x, *the same linear's values in `others`)."""
    rest = [dict(linear_items(t)) for t in others]
    return linear_tree({p: fn(x, *(r[p] for r in rest)) for p, x in linear_items(tree)})


def grid_trees(qm: QuantizedModel, kernels: dict[str, object]) -> dict[str, dict]:
    """The grid of a QuantizedModel as trees: {"u": float32 [in, out] (`grid_coordinates` of
    `kernels`, path -> float kernel), "scale": float32 [G, out] (the float16 scales), "zero":
    float32 [G, out], "g_idx": int32 [in]}."""
    return {
        "u": linear_tree({p: grid_coordinates(kernels[p], q) for p, q in qm.linears.items()}),
        "scale": linear_tree({p: q.scales.astype(np.float32) for p, q in qm.linears.items()}),
        "zero": linear_tree({p: q.zeros.astype(np.float32) for p, q in qm.linears.items()}),
        "g_idx": linear_tree({p: q.g_idx.astype(np.int32) for p, q in qm.linears.items()}),
    }


def quantized_params(latent: dict, u: dict, scale: dict, zero: dict, g_idx: dict, *, bits: int = 4) -> dict:
    """The model's parameters (a pure dict, as `nnx.to_pure_dict` gives) with the kernel of every
    linear in `g_idx` set to its fake-quantized weights (`latent` may lack those kernels)."""
    layers = dict(latent["layers"])
    # recomputed in the backward pass: keeps the [in, out] temporaries of every kernel out of memory
    quantize = jax.checkpoint(partial(fake_quantize, bits=bits))
    for path, gi in linear_items(g_idx):
        i, mod, name = _split(path)
        layer = layers[i] = dict(layers[i])
        module = layer[mod] = dict(layer[mod])
        module[name] = dict(module[name], kernel=quantize(u["layers"][i][mod][name], scale["layers"][i][mod][name],
                                                          zero["layers"][i][mod][name], gi))
    return dict(latent, layers=layers)


def quantized_model(u: dict, scale: dict, zero: dict, g_idx: dict, *, bits: int, group_size: int, sym: bool,
                    desc_act: bool, method: str = "qad", **info) -> QuantizedModel:
    """The int4 layers the fake-quantized forward stands for: codes clip(round(u) + z) on the
    float16 scales and integer zeros, exactly as `fake_quantize` computes them."""
    linears: dict[str, QuantizedLinear] = {}
    for path, gi in linear_items(g_idx):
        i, mod, name = _split(path)
        z = grid_zero(jnp.asarray(zero["layers"][i][mod][name]), bits)
        codes = jnp.clip(jnp.round(jnp.asarray(u["layers"][i][mod][name], jnp.float32)) + z[gi], 0, 2 ** bits - 1)
        linears[path] = make_quantized_linear(codes, grid_scale(jnp.asarray(scale["layers"][i][mod][name])), z, gi,
                                              bits=bits, group_size=group_size, sym=sym)
    return QuantizedModel(linears, method, bits, group_size, sym, desc_act, **info)
