"""The AQT pass: int4 weights in memory, bit-identical to an independent numpy dequantizer of the
packed GPTQ tensors; and model-level sequential GPTQ."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax.config import ModelConfig
from kdjax.model import Qwen2
from kdjax.quant import grid
from kdjax.quant.aqt_pass import Int4Linear, aqt_dot_general_reference, dequantized_model, to_int4_model
from kdjax.quant.gptq import gptq_layer, hessian_finalize, hessian_init, hessian_update
from kdjax.quant.quantize import linear_paths, quantize_model
from test_quant_common import logits, tiny_gptq


def numpy_dequant_packed(qweight, qzeros, scales, g_idx):
    """Independent reading of GPTQ v1 tensors: nibble j of a word is (w >> 4j) & 15; qzeros words
    hold packed(zero) - 0x11111111. Returns float32 [in, out]."""
    u = qweight.astype(np.int64) & 0xFFFFFFFF
    codes = np.concatenate([(u >> (4 * j)) & 15 for j in range(8)], axis=0)  # [8*R, out], j-major
    codes = codes.reshape(8, -1, u.shape[1]).transpose(1, 0, 2).reshape(-1, u.shape[1])  # row 8r+j
    zw = (qzeros.astype(np.int64) + 0x11111111) & 0xFFFFFFFF
    zeros = np.stack([(zw >> (4 * j)) & 15 for j in range(8)], axis=-1).reshape(qzeros.shape[0], -1)
    s = scales.astype(np.float64)[g_idx]
    return (s * (codes - zeros[g_idx])).astype(np.float32)


def random_quantized(n_in, n_out, gs, sym, permuted, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_in, n_out)).astype(np.float32) * 0.05
    q = grid.rtn(w, group_size=gs, sym=sym)
    if permuted:  # act-order style: groups scattered over the input rows
        perm = rng.permutation(n_in)
        q = grid.QuantizedLinear(codes=q.codes[perm], scales=q.scales, zeros=q.zeros, g_idx=q.g_idx[perm],
                                 bits=4, group_size=gs, sym=sym)
    return q


def via_aqt_or_skip(lin, x):
    """AQT's own dot_general on the layer's QTensor, where this JAX still lets aqtp 0.9 run it."""
    try:
        return aqt_dot_general_reference(lin, jnp.asarray(x))
    except TypeError as e:  # jnp.promote_types(array, array) inside aqtp, an error in newer JAX
        pytest.skip(f"aqt.jax.v2 dot_general fails on this JAX: {e}")


@pytest.mark.parametrize("sym,permuted", [(True, False), (False, True)])
def test_aqt_weights_equal_numpy_dequantizer_of_packed_tensors(sym, permuted):
    q = random_quantized(128, 48, 32, sym, permuted, seed=int(sym) + 2 * int(permuted))
    t = grid.pack(q)
    ref = numpy_dequant_packed(t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
    layer = Int4Linear(q, dtype=jnp.float32)
    assert layer.qvalue[...].dtype == jnp.int4 and layer.scale[...].dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(layer.dequantized_kernel()), ref)
    np.testing.assert_array_equal(q.dequantize(), ref)
    # bf16 compute: AQT dequantizes in float32 and rounds once, like numpy's cast
    bf = Int4Linear(q, dtype=jnp.bfloat16).dequantized_kernel()
    np.testing.assert_array_equal(np.asarray(bf.astype(jnp.float32)),
                                  ref.astype(jnp.bfloat16).astype(np.float32))
    # the forward: x @ W + b through AQT's dot_general, eager and under jit
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 128)).astype(np.float32)
    b = rng.standard_normal(48).astype(np.float32)
    lin = Int4Linear(q, bias=b, dtype=jnp.float32)
    want = x.astype(np.float64) @ ref + b
    np.testing.assert_allclose(lin(x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(lin, x), want, rtol=1e-5, atol=1e-5)
    # ... and AQT's own dot_general on the same QTensor
    np.testing.assert_allclose(via_aqt_or_skip(lin, x) + b, want, rtol=1e-5, atol=1e-5)


def test_int4_layer_short_last_group_and_bad_g_idx():
    q = random_quantized(96, 16, 64, False, True, seed=5)  # groups of 64 and 32, rows scattered
    lin = Int4Linear(q)
    assert lin.qvalue.shape == (2, 64, 16)
    t = grid.pack(q)
    np.testing.assert_array_equal(np.asarray(lin.dequantized_kernel()),
                                  numpy_dequant_packed(t["qweight"], t["qzeros"], t["scales"], t["g_idx"]))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 96)), jnp.float32)
    np.testing.assert_allclose(via_aqt_or_skip(lin, x), lin(x), rtol=1e-5, atol=1e-5)
    bad = grid.QuantizedLinear(codes=q.codes, scales=q.scales, zeros=q.zeros, g_idx=np.zeros(96, np.int32),
                               bits=4, group_size=64, sym=False)
    with pytest.raises(ValueError, match="96 rows in a group of 64"):
        Int4Linear(bad)


@pytest.fixture(scope="module")
def tiny():
    return tiny_gptq()


def test_quantize_model_covers_every_linear_and_leaves_model_unchanged(tiny):
    model, ids, qm = tiny
    assert sorted(qm.linears) == sorted(linear_paths(2)) and len(qm.linears) == 14
    fresh = Qwen2(model.config, seed=2)
    for p in linear_paths(2):
        a, b = p.split(".")[1:3], p.split(".")[3]
        lin = getattr(getattr(model.layers[int(a[0])], a[1]), b)
        ref = getattr(getattr(fresh.layers[int(a[0])], a[1]), b)
        np.testing.assert_array_equal(lin.kernel[...], ref.kernel[...])
    q4 = to_int4_model(model, qm)
    params = nnx.state(q4, nnx.Param)
    names = {".".join(map(str, k)) for k, _ in nnx.to_flat_state(params)}
    assert not any(n.endswith("proj.kernel") for n in names)  # no float kernels left in the int4 model
    assert "embed_tokens.embedding" in names  # embeddings stay float
    np.testing.assert_allclose(logits(q4, ids), logits(dequantized_model(model, qm), ids), rtol=1e-5, atol=1e-5)
    down = q4.layers[0].mlp.down_proj  # int4 layers keep the kernel's logical axes for sharding
    assert down.qvalue.get_metadata()["axes"] == ("mlp", None, "embed")
    assert q4.layers[0].self_attn.q_proj.bias.get_metadata()["axes"] == ("heads",)


def test_gptq_is_sequential_over_quantized_layers(tiny):
    """Layer 1's Hessians come from the output of the already-quantized layer 0."""
    model, ids, qm = tiny
    deq = dequantized_model(model, qm)
    x = model.embed_tokens(ids)
    t = ids.shape[1]
    pos = jnp.broadcast_to(jnp.arange(t), ids.shape)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (ids.shape[0], t, t))

    def q_proj_codes(layer_in):
        h_in = deq.layers[1].input_layernorm(layer_in)
        h = hessian_finalize(hessian_update(hessian_init(h_in.shape[-1]), h_in))
        return gptq_layer(model.layers[1].self_attn.q_proj.kernel[...], h, group_size=32, desc_act=True).codes

    got = qm.linears["layers.1.self_attn.q_proj"].codes
    np.testing.assert_array_equal(q_proj_codes(deq.layers[0](x, pos, mask)[0]), got)
    assert not np.array_equal(q_proj_codes(model.layers[0](x, pos, mask)[0]), got)


def test_gptq_is_sequential_inside_a_layer(tiny):
    """o, gate/up and down of layer 0 are quantized on inputs computed with every earlier set of the
    layer already int4 (the dequantized layer run here op by op, not through quantize_model's passes)."""
    model, ids, qm = tiny
    deq = dequantized_model(model, qm).layers[0]
    t = ids.shape[1]
    pos = jnp.broadcast_to(jnp.arange(t), ids.shape)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (ids.shape[0], t, t))
    x = model.embed_tokens(ids)
    seen = []
    deq.self_attn.o_proj, o_proj = (lambda z: seen.append(z) or o_proj(z)), deq.self_attn.o_proj
    h = x + deq.self_attn(deq.input_layernorm(x), pos, mask)[0]
    h2 = deq.post_attention_layernorm(h)
    inputs = {"self_attn.o_proj": seen[0], "mlp.gate_proj": h2, "mlp.up_proj": h2,
              "mlp.down_proj": jax.nn.silu(deq.mlp.gate_proj(h2)) * deq.mlp.up_proj(h2)}
    for path, z in inputs.items():
        hess = hessian_finalize(hessian_update(hessian_init(z.shape[-1]), z))
        mod, name = path.split(".")
        kernel = getattr(getattr(model.layers[0], mod), name).kernel[...]
        np.testing.assert_array_equal(gptq_layer(kernel, hess, group_size=32, desc_act=True).codes,
                                      qm.linears[f"layers.0.{path}"].codes, err_msg=path)


def test_gptq_model_closer_to_float_than_rtn(tiny):
    model, ids, qm = tiny
    rtn = quantize_model(model, method="rtn", group_size=32)
    ref = np.asarray(logits(model, ids))

    def err(q):
        return np.linalg.norm(np.asarray(logits(dequantized_model(model, q), ids)) - ref)
    assert err(qm) < 0.9 * err(rtn), (err(qm), err(rtn))


def test_group_size_must_tile_the_inputs():
    cfg = ModelConfig.preset("tiny-llama", hidden_size=96, num_heads=6, head_dim=16, intermediate_size=160)
    with pytest.raises(ValueError, match="group_size=64 does not divide the input size 96.*use group_size=32"):
        quantize_model(Qwen2(cfg), method="rtn", group_size=64)
