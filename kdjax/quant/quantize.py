"""Model-level int4 quantization: RTN, or sequential GPTQ over the decoder layers.

Sequential GPTQ (as AutoGPTQ / gptqmodel with true_sequential): calibration hidden states go
through the decoder one layer at a time. Inside a layer the linears are quantized in call order,
in the sets that share an input, as the model's family lists them (`Family.linear_sets`,
kdjax/families.py): (q, k, v), (o), (gate, up), (down). Each set's Hessian comes
from running the layer on its input with the earlier sets already quantized (their kernels
swapped for the dequantized int4 weights); the layer's output, fully quantized, is the next
layer's input. Each pass replays the sets already quantized on the inputs the passes before it
captured, so a layer's passes together cost about one forward of the layer (SmolLM2-135M, 128 x 256
tokens, 2-core CPU: 259 s -> 166 s for the whole GPTQ, the same codes). Embeddings, norms and the
output head stay as they are.

The model is left unchanged (kernels are restored at the end); the result is a `QuantizedModel`
that `to_int4_model`, `dequantized_model` (aqt_pass.py) and `export_gptq.save_gptq` consume.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.families import DECODER_LINEAR_SETS
from kdjax.quant.grid import SUPPORTED_BITS, QuantizedLinear, check_bits, rtn
from kdjax.quant.gptq import gptq_layer, hessian_finalize, hessian_init, hessian_update

log = logging.getLogger(__name__)

METHODS = ("rtn", "gptq")


@dataclasses.dataclass
class QuantizedModel:
    """int4 weights of every decoder linear, keyed by kdjax path ("layers.3.mlp.down_proj")."""

    linears: dict[str, QuantizedLinear]
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    percdamp: float = 0.01
    calib_tokens: int = 0
    seconds: float = 0.0
    mse: float = 0.0  # the range search of grid.find_params (0: the full range)

    def nbytes(self) -> int:
        """Bytes of the packed int4 tensors (qweight + qzeros + scales + g_idx)."""
        total = 0
        for q in self.linears.values():
            n_in, n_out = q.shape
            total += n_in * n_out * q.bits // 8 + q.zeros.size * q.bits // 8 + q.scales.nbytes + q.g_idx.nbytes
        return total


def linear_paths(num_layers: int, linear_sets=DECODER_LINEAR_SETS) -> list[str]:
    """kdjax paths ("layers.3.mlp.down_proj") of the quantized linears of `num_layers` layers."""
    return [f"layers.{i}.{mod}.{name}" for i in range(num_layers) for mod, names in linear_sets for name in names]


def model_linear_paths(model) -> list[str]:
    """The paths of every linear that quantization touches in `model` (its family's linear sets)."""
    return linear_paths(len(model.layers), model.config.family.linear_sets)


def get_linear(model, path: str):
    _, i, mod, name = path.split(".")
    return getattr(getattr(model.layers[int(i)], mod), name)


def check_group_size(model, group_size: int, option: str = "group_size"):
    """Raises ValueError unless `group_size` (-1 = one group) tiles the input dim of every linear
    quantization touches, as GPTQ's GPU kernels (and torch's CPU int4 matmul) need. The message
    calls the setting `option` (a command passes its flag, "--group_size") and names a size that fits."""
    if group_size == -1:
        return
    dims = sorted({int(get_linear(model, p).kernel.shape[0]) for p in model_linear_paths(model)})
    bad = [d for d in dims if d % group_size]
    if bad:
        ok = next((g for g in (128, 64, 32, 16) if g <= group_size and all(d % g == 0 for d in dims)), -1)
        raise ValueError(f"{option}={group_size} does not divide the input size {bad[0]} of this model's linears "
                         f"(inputs {dims}); GPTQ kernels need whole groups: use {option}={ok}")


class _Captured(Exception):
    def __init__(self, x):
        self.x = x


class _Recorder:
    """Stands in for a linear during one forward: stops it at the linear's input."""

    def __call__(self, x):
        raise _Captured(x)


class _Replay:
    """Stands in for a linear during one forward: the linear on the input it was given in an
    earlier pass (whatever it is handed now is ignored, so what only computed that is dead code)."""

    def __init__(self, linear, x):
        self.linear, self.x = linear, x

    def __call__(self, _):
        return self.linear(self.x)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _layer_pass(graphdef, state, x, positions, mask, stop: tuple[str, str] | None,
                replayed: tuple[tuple[str, tuple[str, ...]], ...], inputs: tuple):
    """One pass of a decoder layer (split as graphdef, state) on x [B, T, D]: the input of linear
    `stop` = (mod, name), or the layer's output when stop is None.

    The linear sets in `replayed` take their inputs from `inputs` (one array a set, captured by
    earlier passes) instead of recomputing them, so a pass costs only what lies between the last
    replayed set and `stop`: the sets of a layer are captured in one forward's worth of compute
    rather than one forward each. Every decoder layer has the same graphdef, so each pass compiles once."""
    layer = nnx.merge(graphdef, state)
    for (mod, names), xin in zip(replayed, inputs):
        for name in names:
            setattr(getattr(layer, mod), name, _Replay(getattr(getattr(layer, mod), name), xin))
    if stop is None:
        return layer(x, positions, mask)[0]
    setattr(getattr(layer, stop[0]), stop[1], _Recorder())
    try:
        layer(x, positions, mask)
    except _Captured as c:
        return c.x
    raise RuntimeError(f"decoder layer never called {stop[0]}.{stop[1]}: kdjax/model.py changed its call order?")


@jax.jit
def _positions_and_mask(attention_mask):
    am = attention_mask.astype(bool)
    t = am.shape[1]
    positions = jnp.maximum(jnp.cumsum(am, axis=1) - 1, 0)
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & am[:, None, :]
    return positions, mask


AUTO_MSE = -1.0  # the range search's default: 2.4 for GPTQ, none for RTN (docs/quantization.md)


FLOAT_DTYPES = ("float16", "bfloat16", "float32")  # what a GPTQ checkpoint stores its float parameters in


def grid_problem(bits: int, group_size: int, mse: float, float_dtype: str) -> tuple[str, str] | None:
    """The first bad setting of an int4 grid and its checkpoint as (field, why), or None: what
    `kdjax quantize` and QAD both check, each naming the field by its own flag."""
    if bits not in SUPPORTED_BITS:
        return "bits", f"GPTQ packing supports {SUPPORTED_BITS}"
    if group_size != -1 and group_size < 1:
        return "group_size", "expected a positive size or -1 (one group)"
    if mse < 0 and mse != AUTO_MSE:
        return "mse", f"expected {AUTO_MSE:g} (2.4 for GPTQ, 0 for RTN), 0 (the full range) or a positive norm"
    if float_dtype not in FLOAT_DTYPES:
        return "float_dtype", f"expected one of {', '.join(FLOAT_DTYPES)}"
    return None


def range_search(mse: float, method: str) -> float:
    """The range search's norm (grid.find_params) that `mse` asks for: AUTO_MSE means 2.4 for GPTQ (SmolLM2
    g64: perplexity +9.5% -> +5.7%) and 0 for RTN (the default student: +26% -> +33% with it)."""
    return (2.4 if method == "gptq" else 0.0) if mse == AUTO_MSE else float(mse)


def quantize_model(model, calib_input_ids=None, method: str = "gptq", bits: int = 4, group_size: int = 128,
                   sym: bool = True, desc_act: bool = False, static_groups: bool = False,
                   percdamp: float = 0.01, blocksize: int = 128, attention_mask=None,
                   batch_size: int = 8, mse: float = 0.0) -> QuantizedModel:
    """Quantizes q/k/v/o/gate/up/down of every decoder layer of `model` (a kdjax CausalLM).

    calib_input_ids: [N, T] int token ids (GPTQ only; padding marked 0 in attention_mask [N, T]
    is left out of the Hessians). Runs calibration `batch_size` rows at a time. mse > 0 searches
    each group's range (grid.find_params, gptqmodel's `mse`; 2.4 is what it suggests).
    """
    if method not in METHODS:
        raise ValueError(f"quantize_model: method={method!r}; expected one of {METHODS}")
    check_bits(bits)
    t0 = time.time()
    paths = model_linear_paths(model)
    check_group_size(model, group_size)
    kw = dict(bits=bits, group_size=group_size, sym=sym, mse=mse)
    if method == "rtn":
        linears = {p: rtn(get_linear(model, p).kernel[...], **kw) for p in paths}
        return QuantizedModel(linears, method, bits, group_size, sym, False, False, percdamp, 0, time.time() - t0,
                              mse=mse)

    if calib_input_ids is None:
        raise ValueError("quantize_model: method='gptq' needs calib_input_ids [N, T] (calibration token ids)")
    ids = jnp.asarray(calib_input_ids)
    if ids.ndim != 2:
        raise ValueError(f"quantize_model: calib_input_ids has shape {ids.shape}; expected [N, T]")
    am = jnp.ones(ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    batches = []
    for s in range(0, ids.shape[0], batch_size):
        pos, mask = _positions_and_mask(am[s:s + batch_size])
        batches.append((model.embed_tokens(ids[s:s + batch_size]), am[s:s + batch_size], pos, mask))

    linears, originals = {}, {}
    try:
        for i, layer in enumerate(model.layers):
            done = []  # (linear set, its input in each batch), in call order

            def passes(stop):  # _layer_pass on every batch, the sets in `done` replayed
                graphdef, params = nnx.split(layer)
                replayed = tuple(s for s, _ in done)
                return [_layer_pass(graphdef, params, x, pos, mask, stop, replayed, tuple(ins[b] for _, ins in done))
                        for b, (x, _, pos, mask) in enumerate(batches)]

            for mod, names in model.config.family.linear_sets:
                xs = passes((mod, names[0]))
                state = hessian_init(xs[0].shape[-1])
                for xin, (_, m, _, _) in zip(xs, batches):
                    state = hessian_update(state, xin, m)
                h = hessian_finalize(state)
                for name in names:
                    lin = getattr(getattr(layer, mod), name)
                    path = f"layers.{i}.{mod}.{name}"
                    q = gptq_layer(lin.kernel[...], h, desc_act=desc_act, static_groups=static_groups,
                                   percdamp=percdamp, blocksize=blocksize, **kw)
                    linears[path] = q
                    originals[path] = lin.kernel[...]
                    lin.kernel.set_value(jnp.asarray(q.dequantize(), originals[path].dtype))
                done.append(((mod, names), xs))
            batches = [(out, m, pos, mask) for out, (_, m, pos, mask) in zip(passes(None), batches)]
            log.info("gptq: layer %d/%d done (%.0f s)", i + 1, len(model.layers), time.time() - t0)
    finally:
        for path, k in originals.items():
            get_linear(model, path).kernel.set_value(k)
    return QuantizedModel(linears, method, bits, group_size, sym, desc_act, static_groups, percdamp,
                          int(am.sum()), time.time() - t0, mse=mse)
