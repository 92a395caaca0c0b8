"""The decoder of every kdjax family in Flax NNX: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

`CausalLM` covers Qwen2 / Qwen2.5 (q/k/v bias), Llama-style SmolLM2 (optional bias on q/k/v/o)
and Qwen3 (RMSNorm on each q and k head); the family record (`cfg.family`, kdjax/families.py)
switches those optional pieces on. Attribute names mirror transformers' so the tensor table in
`families.py` is a plain rename + transpose. Kernels are stored `[in, out]`; every parameter
carries logical `axes` for `sharding.py`.

Decoding uses a slot KV cache (`init_cache`): every row writes its step `t` into slot `t`, keys
are masked by `cache["valid"]`, and RoPE uses per-row positions, so left-padded batches of
prompts of different lengths decode exactly like unpadded ones.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.config import ModelConfig
from kdjax.sharding import shard_constraint

_init = nnx.initializers.normal(0.02)
_NEG = -1e30  # finite "minus infinity": a fully masked row stays NaN-free
# The residual stream's logical axes: laid out by kdjax.sharding's rule table on the mesh set with
# jax.set_mesh (the trainer's), rows over the data-parallel axes; no-op without one.
ACTIVATION = ("batch", "length", "embed")


def _dot(a, b, contract):
    """A dot of two arrays of one dtype, summed in float32, rounded once to that dtype."""
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32).astype(a.dtype)


@jax.custom_vjp
def _low_precision_matmul(x, w):
    return _dot(x, w, ((x.ndim - 1,), (0,)))


def _matmul_fwd(x, w):
    return _low_precision_matmul(x, w), (x, w)


def _matmul_bwd(saved, g):
    x, w = saved
    g = g.astype(x.dtype)
    dx = _dot(g, w, ((g.ndim - 1,), (1,)))
    dw = _dot(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), ((0,), (0,)))
    return dx, dw


_low_precision_matmul.defvjp(_matmul_fwd, _matmul_bwd)


_TARGET = []  # the platform of the programs being traced, when it is not the default backend's


@contextlib.contextmanager
def target_platform(name: str):
    """Trace for platform `name` ("tpu", "gpu", "cpu") rather than for the default backend's:
    kdjax.plan lowers TPU programs on a CPU host."""
    _TARGET.append(name)
    try:
        yield
    finally:
        _TARGET.pop()


def matmul(x, w):
    """x [..., K] @ w [K, N] in their dtype (one dtype). Every low-precision dot sums in float32 and
    is rounded once. On a CPU, a bfloat16 / float16 dot here has a float32 output, cast once, and
    its backward dots take the cotangent in the inputs' dtype (custom_vjp): XLA:CPU runs a dot
    whose *output* is bfloat16 on a slow path (5x the time of the same dot with a float32 output at
    the student's projection shapes), and a float32 cotangent (a cast's transpose) would run the
    backward dots in float32; a KD step of SmolLM2-135M on the 2-core CPU is 1.2-1.35x faster
    (docs/benchmarks.md). On GPU and TPU it is the plain dot: the custom rule would hide the dots
    from jax.checkpoint's dots_* policies and recompute one more under remat."""
    if x.dtype == jnp.float32 or (_TARGET[-1] if _TARGET else jax.default_backend()) != "cpu":
        return x @ w
    return _low_precision_matmul(x, w)


class Linear(nnx.Module):
    def __init__(self, din, dout, axes, *, bias, cfg: ModelConfig, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_init(rngs.params(), (din, dout), cfg.weight_dtype), axes=axes)
        self.bias = nnx.Param(jnp.zeros((dout,), cfg.weight_dtype), axes=axes[1:]) if bias else None
        self.dtype = cfg.compute_dtype

    def __call__(self, x):
        y = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim, cfg: ModelConfig):
        self.scale = nnx.Param(jnp.ones((dim,), cfg.weight_dtype), axes=("norm",))
        self.eps = cfg.rms_norm_eps
        self.dtype = cfg.compute_dtype

    def __call__(self, x):
        # As transformers: normalise in fp32, cast back, then scale.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


def rope(x, positions, theta):
    """Rotary embedding, transformers' rotate-half layout. x: [B, T, H, hd], positions: [B, T]."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    cos = jnp.cos(jnp.concatenate([ang, ang], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([ang, ang], -1))[:, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype)


def attend(q, k, v, mask, impl: str = "xla"):
    """Grouped-query attention. q: [B, T, H, hd]; k, v: [B, S, KVH, hd]; mask: [B, T, S] bool, or
    None for plain causal attention (T == S). Returns [B, T, H * hd].

    impl "xla": kdjax's einsums (fp32 scores, any backend, materialises [B, H, T, S]);
    "cudnn": `jax.nn.dot_product_attention` on cuDNN's fused flash attention (GPU, bf16 or fp16,
    head_dim <= 128), which never stores the [T, S] scores; "jax": the same function's XLA
    implementation (any backend; the reference the cuDNN path is checked against);
    "auto": cudnn for plain causal attention (training, scoring) on a GPU in bf16/fp16, xla for the
    rest (masked prefill and KV-cache decoding, whose one-token [1, S] scores are small).
    """
    b, t, h, hd = q.shape
    if impl == "auto":
        fused = (mask is None and jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
                 and hd <= 128)
        impl = "cudnn" if fused else "xla"
    if impl != "xla":
        out = jax.nn.dot_product_attention(
            q, k.astype(q.dtype), v.astype(q.dtype), mask=None if mask is None else mask[:, None],
            is_causal=mask is None, implementation="cudnn" if impl == "cudnn" else None)
        return out.reshape(b, t, h * hd)
    if mask is None:
        mask = jnp.tril(jnp.ones((t, k.shape[1]), bool))[None]
    kvh = k.shape[2]
    q = q.reshape(b, t, kvh, h // kvh, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(hd)
    # An additive mask: jnp.where would keep its predicate broadcast to [B, KVH, G, T, S] for the
    # backward pass (5.25 GiB at 0.5B, 16 x 1024); an addition keeps nothing.
    scores = scores + jnp.where(mask, 0.0, _NEG).astype(jnp.float32)[:, None, None]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h * hd)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, hd, family = cfg.hidden_size, cfg.head_dim, cfg.family
        self.q_proj = Linear(d, cfg.num_heads * hd, ("embed", "heads"), bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.k_proj = Linear(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.v_proj = Linear(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        # Llama's and Qwen3's attention_bias covers o_proj too; Qwen2 has q/k/v bias only.
        o_bias = cfg.qkv_bias and not family.qkv_bias_only
        self.o_proj = Linear(cfg.num_heads * hd, d, ("heads", "embed"), bias=o_bias, cfg=cfg, rngs=rngs)
        # Qwen3: one RMSNorm over head_dim, shared by all heads, on q and on k before RoPE.
        self.q_norm = RMSNorm(hd, cfg) if family.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg) if family.qk_norm else None
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.theta = cfg.rope_theta
        self.impl = cfg.attention

    def __call__(self, x, positions, mask, kv=None, index=None):
        """x: [B, T, D]. Without a cache `mask` is [B, T, T]; with one, `kv` = (k, v) [B, S, KVH, hd],
        the new keys go to slots index..index+T and `mask` is [B, T, S]."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, positions, self.theta), rope(k, positions, self.theta)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if kv is not None:
            ck, cv = kv
            k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), index, axis=1)
            kv = (k, v)
        return self.o_proj(attend(q, k, v, mask, self.impl)), kv


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, ("embed", "mlp"), bias=False, cfg=cfg, rngs=rngs)
        self.up_proj = Linear(d, f, ("embed", "mlp"), bias=False, cfg=cfg, rngs=rngs)
        self.down_proj = Linear(f, d, ("mlp", "embed"), bias=False, cfg=cfg, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, mask, kv=None, index=None):
        a, kv = self.self_attn(self.input_layernorm(x), positions, mask, kv, index)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Embed(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), cfg.weight_dtype),
                                   axes=("vocab", "embed"))
        self.dtype = cfg.compute_dtype

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


def _layer_call(layer, x, positions, mask, kv, index):
    return layer(x, positions, mask, kv, index)


class CausalLM(nnx.Module):
    """Decoder-only LM of any kdjax family. `model(ids)` -> logits [B, T, V]; with `cache=` -> (logits, cache)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None = None, seed: int = 0):
        rngs = rngs or nnx.Rngs(seed)
        self.config = cfg
        self.embed_tokens = Embed(cfg, rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False, cfg=cfg, rngs=rngs)

    def head_kernel(self):
        """The output head as [D, V] (the embedding transposed when tied)."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def hidden_states(self, input_ids, *, positions=None, attention_mask=None, segment_ids=None, cache=None,
                      layers: bool = False):
        """Final-normed hidden states [B, T, D] (and the updated cache when one is given; with
        `layers`, and no cache, also the residual stream after each decoder layer, a list of [B, T, D]).

        input_ids: [B, T] int. attention_mask: [B, T] (1 = token, 0 = padding), default all ones:
        plain causal attention, which is also exact for the real tokens of right-padded rows.
        segment_ids: [B, T] (1, 2, ... for sequences packed in a row, 0 = padding; kdjax.data's
        rows): a token attends only inside its own segment. Not with a cache.
        positions: [B, T]; default counts real tokens only (cumsum of the mask), so left padding
        does not shift RoPE positions.
        """
        b, t = input_ids.shape
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("hidden_states: segment_ids (packed rows) cannot be used with a KV cache")
            if attention_mask is None:
                attention_mask = segment_ids > 0
        am = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(am, axis=1) - 1, 0)
            if cache is not None:
                positions = positions + cache["next_pos"][:, None]
        x = shard_constraint(self.embed_tokens(input_ids), ACTIVATION)
        if cache is None:
            index = mask = None  # None: causal
            if segment_ids is not None:
                same = segment_ids[:, :, None] == segment_ids[:, None, :]
                mask = jnp.tril(jnp.ones((t, t), bool))[None] & same & am[:, None, :]
            elif attention_mask is not None:
                mask = jnp.tril(jnp.ones((t, t), bool))[None] & am[:, None, :]
        else:
            index = cache["index"]
            s = cache["valid"].shape[1]
            valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], am, index, axis=1)
            slot = jnp.arange(s)
            mask = (slot[None, :] <= (index + jnp.arange(t))[:, None])[None] & valid[:, None, :]
        call = _layer_call
        if self.config.remat:
            call = nnx.remat(_layer_call, policy=getattr(jax.checkpoint_policies, self.config.remat_policy))
        new_kv, states = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else cache["kv"][i]
            x, kv = call(layer, x, positions, mask, kv, index)
            x = shard_constraint(x, ACTIVATION)
            new_kv.append(kv)
            states.append(x)
        h = self.norm(x)
        if cache is None:
            return (h, states) if layers else h
        cache = dict(kv=new_kv, valid=valid, index=index + t,
                     next_pos=jnp.where(am.any(1), positions[:, -1] + 1, cache["next_pos"]))
        return h, cache

    def logits(self, h):
        """Output head on hidden states: [..., D] -> [..., V] in the compute dtype."""
        if self.lm_head is None:
            return matmul(h, self.embed_tokens.embedding[...].astype(h.dtype).T)
        return self.lm_head(h)

    def __call__(self, input_ids, *, positions=None, attention_mask=None, segment_ids=None, cache=None):
        out = self.hidden_states(input_ids, positions=positions, attention_mask=attention_mask,
                                 segment_ids=segment_ids, cache=cache)
        if cache is None:
            return self.logits(out)
        h, cache = out
        return self.logits(h), cache

    def init_cache(self, batch: int, max_len: int, dtype=None):
        """An empty slot KV cache for `max_len` tokens per row."""
        cfg = self.config
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"a cache of {max_len} tokens exceeds the model's context of "
                             f"{cfg.max_position_embeddings} (max_position_embeddings)")
        dtype = dtype or cfg.compute_dtype
        shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        kv = [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]
        return dict(kv=kv, valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32),
                    next_pos=jnp.zeros((batch,), jnp.int32))


Qwen2 = CausalLM  # the name kdjax had before it had other families; kept for code that imports it
