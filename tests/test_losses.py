"""kdjax.losses against a float64 numpy reference (values and analytic gradients).

The reference is written independently here: per-token divergences and their gradients w.r.t.
the student log-probs derived by hand, chained through log_softmax and (for the chunked path)
through the output head. One test checks the hand-derived gradients by finite differences.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses
from kdjax.sharding import make_mesh

# (public function name, kwargs) for every divergence setting under test.
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("generalized_jsd", {"beta": 0.0}),
    ("generalized_jsd", {"beta": 0.3}),
    ("generalized_jsd", {"beta": 1.0}),
    ("generalized_jsd", {"beta": 0.3, "scaled": True}),
    ("skew_kl", {"alpha": 0.1}),
    ("skew_kl", {"alpha": 0.5}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("total_variation", {}),
]
CASE_IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for n, kw in CASES]


# ---------------------------------------------------------------- float64 numpy reference

def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def ref_per_token(name, s, t, beta=0.5, alpha=0.1, scaled=False):
    """Per-token divergence [N] and its gradient w.r.t. the student log-probs s [N, V]."""
    p, q = np.exp(t), np.exp(s)
    if name == "generalized_jsd" and beta == 0:
        name = "forward_kl"
    if name == "generalized_jsd" and beta == 1:
        name = "reverse_kl"
    if name == "forward_kl":
        return (p * (t - s)).sum(-1), -p
    if name == "reverse_kl":
        return (q * (s - t)).sum(-1), q * (s - t + 1)
    if name == "generalized_jsd":
        log_m = np.log(beta * p + (1 - beta) * q + 1e-300)
        d = beta * (p * (t - log_m)).sum(-1) + (1 - beta) * (q * (s - log_m)).sum(-1)
        g = (1 - beta) * q * (s - log_m)
        c = beta * (1 - beta) if scaled else 1.0
        return d / c, g / c
    if name == "skew_kl":
        m = alpha * p + (1 - alpha) * q
        log_m = np.log(m + 1e-300)
        return (p * (t - log_m)).sum(-1), -p * (1 - alpha) * q / np.maximum(m, 1e-300)
    if name == "skew_reverse_kl":
        m = alpha * q + (1 - alpha) * p
        log_m = np.log(m + 1e-300)
        g = q * (s - log_m) + q - alpha * q * q / np.maximum(m, 1e-300)
        return (q * (s - log_m)).sum(-1), g
    if name == "total_variation":
        return 0.5 * np.abs(p - q).sum(-1), -0.5 * np.sign(p - q) * q
    raise ValueError(name)


def ref_loss(name, zs, zt, mask, temperature=1.0, targets=None, kd_ratio=1.0, **kw):
    """Masked-mean loss and d loss / d student logits [B, T, V], all float64."""
    zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
    s, t = np_log_softmax(zs / temperature), np_log_softmax(zt / temperature)
    d, g = ref_per_token(name, s, t, **kw)
    dz = (g - np.exp(s) * g.sum(-1, keepdims=True)) / temperature
    m = np.ones(zs.shape[:-1]) if mask is None else np.asarray(mask, np.float64)
    n = max(m.sum(), 1.0)
    kd, dkd = (m * d).sum() / n, m[..., None] * dz / n
    if targets is None:
        return kd, dkd
    s1 = np_log_softmax(zs)
    onehot = np.eye(zs.shape[-1])[targets]
    ce = (m * -(s1 * onehot).sum(-1)).sum() / n
    dce = m[..., None] * (np.exp(s1) - onehot) / n
    return (kd_ratio * kd + (1 - kd_ratio) * ce, kd_ratio * dkd + (1 - kd_ratio) * dce, kd, ce)


def assert_close(actual, expected, rtol, what=""):
    """max |a - e| <= rtol * max |e| (+ tiny), and everything finite."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    err, scale = np.max(np.abs(actual - expected)), np.max(np.abs(expected))
    assert err <= rtol * scale + 1e-9, f"{what}: max err {err:.3e} vs scale {scale:.3e}"


def random_logits(rng, shape, scale=3.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def random_mask(rng, b, t):
    mask = rng.random((b, t)) > 0.3
    mask[0] = False  # a fully masked row (prompt only)
    mask[1, 0] = True
    return mask


def plain_fn(name, kw):
    fn = getattr(losses, name)
    return lambda s, t, mask=None, temperature=1.0: fn(s, t, mask, temperature, **kw)


# ---------------------------------------------------------------- the reference itself

@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_reference_gradient_matches_finite_differences(name, kw):
    rng = np.random.default_rng(0)
    zs, zt = rng.standard_normal((2, 7)) * 2, rng.standard_normal((2, 7)) * 2
    mask = np.array([True, True])
    _, dz = ref_loss(name, zs, zt, mask, temperature=1.7, **kw)
    h, fd = 1e-6, np.zeros_like(zs)
    for i in np.ndindex(zs.shape):
        e = np.zeros_like(zs)
        e[i] = h
        fd[i] = (ref_loss(name, zs + e, zt, mask, 1.7, **kw)[0]
                 - ref_loss(name, zs - e, zt, mask, 1.7, **kw)[0]) / (2 * h)
    np.testing.assert_allclose(dz, fd, atol=1e-7)


# ---------------------------------------------------------------- plain-logits API

@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_plain_value_and_grad_match_numpy(name, kw, temperature):
    rng = np.random.default_rng(1)
    b, t, v = 3, 5, 1000
    zs, zt = random_logits(rng, (b, t, v)), random_logits(rng, (b, t, v))
    mask = random_mask(rng, b, t)
    fn = plain_fn(name, kw)
    val, grad = jax.value_and_grad(lambda s: fn(s, zt, mask, temperature))(jnp.asarray(zs))
    ref_val, ref_grad = ref_loss(name, zs, zt, mask, temperature, **kw)
    assert_close(val, ref_val, 1e-5, "value")
    assert_close(grad, ref_grad, 1e-4, "grad")
    assert np.all(np.asarray(grad)[0] == 0)  # the fully masked row gets no gradient


@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_divergence_is_zero_for_equal_and_positive_otherwise(name, kw):
    rng = np.random.default_rng(2)
    zs, zt = random_logits(rng, (2, 4, 50)), random_logits(rng, (2, 4, 50))
    fn = plain_fn(name, kw)
    assert abs(float(fn(zs, zs))) < 1e-6
    assert float(fn(zs, zt)) > 1e-2


def test_unmasked_mean_and_fully_masked_batch():
    rng = np.random.default_rng(3)
    zs, zt = random_logits(rng, (2, 4, 30)), random_logits(rng, (2, 4, 30))
    np.testing.assert_allclose(losses.forward_kl(zs, zt), losses.forward_kl(zs, zt, np.ones((2, 4))),
                               rtol=1e-6)
    for name, kw in CASES:
        fn = plain_fn(name, kw)
        val, grad = jax.value_and_grad(lambda s: fn(s, zt, np.zeros((2, 4), bool), 2.0))(zs)
        assert float(val) == 0.0 and np.all(np.asarray(grad) == 0), name


@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_extreme_logits(name, kw):
    rng = np.random.default_rng(4)
    shape = (2, 3, 64)
    zs = (1e4 * rng.choice([-1.0, 0.0, 1.0], size=shape) + rng.standard_normal(shape))
    zt = (1e4 * rng.choice([-1.0, 0.0, 1.0], size=shape) + rng.standard_normal(shape))
    zs[0, 0], zt[0, 0] = 1e4, -1e4  # constant rows: uniform distributions
    zs, zt = zs.astype(np.float32), zt.astype(np.float32)
    mask = np.ones(shape[:2], bool)
    val, grad = jax.value_and_grad(lambda s: plain_fn(name, kw)(s, zt, mask))(jnp.asarray(zs))
    ref_val, ref_grad = ref_loss(name, zs, zt, mask, **kw)
    assert_close(val, ref_val, 1e-4, "value")
    assert_close(grad, ref_grad, 1e-3, "grad")


def test_jsd_beta_ends_and_scaled_limits():
    rng = np.random.default_rng(5)
    zs, zt = random_logits(rng, (2, 6, 40), 1.0), random_logits(rng, (2, 6, 40), 1.0)
    fkl, rkl = float(losses.forward_kl(zs, zt)), float(losses.reverse_kl(zs, zt))
    jsd = lambda beta, scaled=False: float(losses.generalized_jsd(zs, zt, beta=beta, scaled=scaled))
    # TRL's ends: beta = 0 is forward KL, beta = 1 reverse KL.
    assert jsd(0.0) == pytest.approx(fkl, rel=1e-6)
    assert jsd(1.0) == pytest.approx(rkl, rel=1e-6)
    # The unscaled value jumps there: it tends to 0 next to the ends.
    assert jsd(1e-5) < 1e-3 * fkl and jsd(1 - 1e-5) < 1e-3 * rkl
    # Scaled: continuous, tends to forward KL as beta -> 0 and reverse KL as beta -> 1.
    assert jsd(0.0, True) == pytest.approx(fkl, rel=1e-6)
    assert jsd(1.0, True) == pytest.approx(rkl, rel=1e-6)
    for near_fkl, near_rkl, tol in [(1e-2, 1 - 1e-2, 5e-2), (1e-3, 1 - 1e-3, 5e-3)]:
        assert jsd(near_fkl, True) == pytest.approx(fkl, rel=tol)
        assert jsd(near_rkl, True) == pytest.approx(rkl, rel=tol)
    # In between it is symmetric under swapping (p, q) with beta -> 1 - beta.
    swapped = float(losses.generalized_jsd(zt, zs, beta=0.7))
    assert jsd(0.3) == pytest.approx(swapped, rel=1e-5)


def test_skew_ends():
    rng = np.random.default_rng(6)
    zs, zt = random_logits(rng, (2, 3, 40)), random_logits(rng, (2, 3, 40))
    assert float(losses.skew_kl(zs, zt, alpha=0.0)) == pytest.approx(float(losses.forward_kl(zs, zt)))
    assert float(losses.skew_reverse_kl(zs, zt, alpha=0.0)) == pytest.approx(
        float(losses.reverse_kl(zs, zt)))
    assert abs(float(losses.skew_kl(zs, zt, alpha=1.0))) < 1e-6


def test_cross_entropy_and_kd_ratio_mixture():
    rng = np.random.default_rng(7)
    b, t, v = 3, 5, 200
    zs, zt = random_logits(rng, (b, t, v)), random_logits(rng, (b, t, v))
    targets, mask = rng.integers(0, v, (b, t)), random_mask(rng, b, t)
    f = lambda s: losses.distill_loss(s, zt, targets, mask, divergence="reverse_kl",
                                      temperature=2.0, kd_ratio=0.25)
    (val, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(zs))
    ref_val, ref_grad, ref_kd, ref_ce = ref_loss("reverse_kl", zs, zt, mask, 2.0, targets, 0.25)
    assert_close(val, ref_val, 1e-5, "loss")
    assert_close(grad, ref_grad, 1e-4, "grad")
    assert_close(metrics["kd_loss"], ref_kd, 1e-5, "kd")
    assert_close(metrics["ce_loss"], ref_ce, 1e-5, "ce")
    assert_close(losses.cross_entropy(zs, targets, mask), ref_ce, 1e-5, "cross_entropy")
    assert int(metrics["num_tokens"]) == mask.sum()


def test_bad_arguments_are_named():
    z = np.zeros((1, 2, 5), np.float32)
    with pytest.raises(ValueError, match="divergence='kl'"):
        losses.per_token_divergence("kl")
    with pytest.raises(ValueError, match="beta=1.5"):
        losses.generalized_jsd(z, z, beta=1.5)
    with pytest.raises(ValueError, match="temperature=0"):
        losses.forward_kl(z, z, temperature=0)
    with pytest.raises(ValueError, match="teacher_logits"):
        losses.forward_kl(z, np.zeros((1, 2, 6), np.float32))


# ---------------------------------------------------------------- chunked, sharded path

B, T, DS, DT = 3, 7, 32, 48          # B*T = 21 tokens: divides neither chunk 4 nor 8 shards
VOCAB, VS, VT = 997, 1003, 1010      # shared vocab (prime) < padded student / teacher tables
# Vocabulary-sharded meshes run every divergence; the others a few.
FEW = [CASES[0], CASES[3], CASES[-1]]
MESHES = [(None, FEW), ((1, 1, 1), FEW), ((1, 1, 8), CASES), ((2, 2, 2), CASES), ((8, 1, 1), FEW)]
# Compile time dominates these tests; cheaper CPU codegen, same program (memory test: defaults).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def chunked_inputs(seed=8):
    rng = np.random.default_rng(seed)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
    return dict(student_hidden=f32(B, T, DS), student_head=f32(DS, VS) * 0.5,
                teacher_hidden=f32(B, T, DT), teacher_head=f32(DT, VT) * 0.5,
                targets=rng.integers(0, VOCAB, (B, T)), mask=random_mask(rng, B, T))


def ref_chunked(name, x, temperature, kd_ratio, **kw):
    """Reference loss and gradients w.r.t. student hidden [B, T, Ds] and head [Ds, Vs]."""
    h, w = x["student_hidden"].astype(np.float64), x["student_head"].astype(np.float64)
    zs = h @ w[:, :VOCAB]
    zt = x["teacher_hidden"].astype(np.float64) @ x["teacher_head"][:, :VOCAB].astype(np.float64)
    val, dz, kd, ce = ref_loss(name, zs, zt, x["mask"], temperature, x["targets"], kd_ratio, **kw)
    dh = dz @ w[:, :VOCAB].T
    dw = np.zeros_like(w)
    dw[:, :VOCAB] = h.reshape(-1, DS).T @ dz.reshape(-1, VOCAB)
    return val, dh, dw, kd, ce


def run_chunked(x, mesh_shape, settings):
    """[(loss, metrics, d hidden, d head)] for each settings dict, from one compiled program."""
    mesh = None if mesh_shape is None else make_mesh(
        *mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])

    def all_settings(h, w):
        out = []
        for kw in settings:
            def f(h, w):
                args = dict(x, student_hidden=h, student_head=w)
                return losses.chunked_distill_loss(**args, vocab_size=VOCAB, chunk_size=4,
                                                   mesh=mesh, **kw)
            (val, metrics), (dh, dw) = jax.value_and_grad(f, (0, 1), has_aux=True)(h, w)
            out.append((val, metrics, dh, dw))
        return out

    args = (x["student_hidden"], x["student_head"])
    return jax.jit(all_settings).lower(*args).compile(FAST_COMPILE)(*args)


def check_chunked(x, mesh_shape, settings):
    for kw, (val, metrics, dh, dw) in zip(settings, run_chunked(x, mesh_shape, settings)):
        kw = dict(kw)
        name, temperature, kd_ratio = kw.pop("divergence"), kw.pop("temperature"), kw.pop("kd_ratio")
        ref_val, ref_dh, ref_dw, ref_kd, ref_ce = ref_chunked(name, x, temperature, kd_ratio, **kw)
        what = f"{mesh_shape} {name} {kw} T={temperature} kd_ratio={kd_ratio}"
        assert_close(val, ref_val, 1e-5, f"loss {what}")
        assert_close(metrics["kd_loss"], ref_kd, 1e-5, f"kd_loss {what}")
        assert_close(metrics["ce_loss"], ref_ce, 1e-5, f"ce_loss {what}")
        assert int(metrics["num_tokens"]) == x["mask"].sum()
        assert_close(dh, ref_dh, 1e-4, f"d student_hidden {what}")
        assert_close(dw, ref_dw, 1e-4, f"d student_head {what}")
        assert np.all(np.asarray(dh)[0] == 0)  # fully masked row


@pytest.mark.parametrize("mesh_shape,cases", MESHES, ids=[str(m) for m, _ in MESHES])
def test_chunked_matches_numpy_on_meshes(mesh_shape, cases):
    settings = [dict(kw, divergence=name, temperature=2.0, kd_ratio=0.7) for name, kw in cases]
    check_chunked(chunked_inputs(), mesh_shape, settings)


def test_chunked_kd_ratio_ends_and_temperature_one():
    settings = [dict(divergence="reverse_kl", temperature=1.0, kd_ratio=r) for r in (0.0, 1.0)]
    check_chunked(chunked_inputs(13), (1, 2, 4), settings)


def test_chunked_cross_entropy():
    x = chunked_inputs(9)
    mesh = make_mesh(2, 2, 2)
    f = lambda h, w: losses.chunked_cross_entropy(h, w, x["targets"], x["mask"], vocab_size=VOCAB,
                                                  chunk_size=6, mesh=mesh)
    (val, metrics), (dh, dw) = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(
        x["student_hidden"], x["student_head"])
    ref_val, ref_dh, ref_dw, _, _ = ref_chunked("forward_kl", x, 1.0, 0.0)
    assert_close(val, ref_val, 1e-5, "ce")
    assert_close(dh, ref_dh, 1e-4, "d hidden")
    assert_close(dw, ref_dw, 1e-4, "d head")
    assert set(metrics) == {"loss", "ce_loss", "num_tokens"}


def test_chunked_extreme_logits():
    x = chunked_inputs(10)
    x["student_hidden"] = x["student_hidden"] * 3e3  # logits ~ +-1e4 and beyond
    x["teacher_hidden"] = x["teacher_hidden"] * 3e3
    cases = [CASES[0], CASES[3], CASES[8], CASES[9]]
    settings = [dict(kw, divergence=name, temperature=1.0, kd_ratio=1.0) for name, kw in cases]
    for (name, kw), (val, _, dh, dw) in zip(cases, run_chunked(x, (1, 1, 8), settings)):
        assert np.isfinite(float(val)) and np.all(np.isfinite(dh)) and np.all(np.isfinite(dw)), name
        assert_close(val, ref_chunked(name, x, 1.0, 1.0, **kw)[0], 1e-4, name)


@pytest.mark.skipif(not hasattr(jax.sharding, "AxisType"), reason="jax without mesh axis types")
def test_chunked_on_an_explicit_axes_mesh():
    x = chunked_inputs(14)
    explicit = jax.sharding.AxisType.Explicit
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(explicit,) * 3)
    f = lambda h: losses.chunked_distill_loss(**dict(x, student_hidden=h), vocab_size=VOCAB,
                                              chunk_size=4, mesh=mesh, divergence="skew_kl")[0]
    with jax.set_mesh(mesh):
        val = jax.jit(f)(x["student_hidden"])
    assert_close(val, ref_chunked("skew_kl", x, 1.0, 1.0)[0], 1e-5, "loss")


def test_chunked_fully_masked_batch():
    x = chunked_inputs(10)
    x["mask"] = np.zeros_like(x["mask"])
    settings = [dict(divergence="generalized_jsd", beta=0.5, kd_ratio=0.5, temperature=2.0)]
    [(val, metrics, dh, dw)] = run_chunked(x, (2, 2, 2), settings)
    assert float(val) == 0.0 and int(metrics["num_tokens"]) == 0
    assert np.all(np.asarray(dh) == 0) and np.all(np.asarray(dw) == 0)


def test_chunked_teacher_gets_no_gradient_and_normalizer():
    x = chunked_inputs(11)
    f = lambda th, tw: losses.chunked_distill_loss(**dict(x, teacher_hidden=th, teacher_head=tw),
                                                   vocab_size=VOCAB, chunk_size=8)[0]
    dth, dtw = jax.grad(f, (0, 1))(x["teacher_hidden"], x["teacher_head"])
    assert not np.any(np.asarray(dth)) and not np.any(np.asarray(dtw))
    loss, metrics = losses.chunked_distill_loss(**x, vocab_size=VOCAB, chunk_size=8)
    halved, _ = losses.chunked_distill_loss(**x, vocab_size=VOCAB, chunk_size=8,
                                            normalizer=2 * metrics["num_tokens"])
    assert float(halved) == pytest.approx(float(loss) / 2, rel=1e-6)


def test_vocab_mismatch_is_a_clear_error():
    x = chunked_inputs()
    with pytest.raises(ValueError, match="pass vocab_size"):
        losses.chunked_distill_loss(**x)
    with pytest.raises(ValueError, match="real mismatch"):
        losses.chunked_distill_loss(**x, vocab_size=VS + 1)
    with pytest.raises(ValueError, match="student_head"):
        losses.chunked_distill_loss(**dict(x, student_head=x["student_head"][:-1]), vocab_size=50)


def test_bf16_hidden_states_accumulate_in_fp32():
    x = chunked_inputs(12)
    ref = losses.chunked_distill_loss(**x, vocab_size=VOCAB, chunk_size=8)[0]
    bf = {k: (v.astype(jnp.bfloat16) if k.endswith(("hidden", "head")) else v) for k, v in x.items()}
    val = losses.chunked_distill_loss(**bf, vocab_size=VOCAB, chunk_size=8)[0]
    assert val.dtype == jnp.float32 and float(val) == pytest.approx(float(ref), rel=5e-2)


def _temp_bytes(loss_fn, t, v=1000, d=32, b=2):
    spec = lambda *s, dt=jnp.float32: jax.ShapeDtypeStruct(s, dt)
    args = (spec(b, t, d), spec(d, v), spec(b, t, d), spec(d, v), spec(b, t, dt=jnp.int32),
            spec(b, t, dt=jnp.bool_))
    compiled = jax.jit(jax.value_and_grad(loss_fn, (0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_temp_memory_is_flat_in_sequence_length():
    def chunked(sh, sw, th, tw, tg, mk):
        return losses.chunked_distill_loss(sh, sw, th, tw, tg, mk, divergence="generalized_jsd",
                                           kd_ratio=0.5, chunk_size=64)[0]

    def naive(sh, sw, th, tw, tg, mk):
        return losses.distill_loss(sh @ sw, th @ tw, tg, mk, divergence="generalized_jsd",
                                   kd_ratio=0.5)[0]

    b, t, v, d = 2, 256, 1000, 32
    logits_bytes = b * t * v * 4  # one fp32 [B, T, V] tensor for the added tokens
    hidden_bytes = b * t * d * 4  # one fp32 [B, T, D] tensor for the added tokens
    c1, c2 = _temp_bytes(chunked, t), _temp_bytes(chunked, 2 * t)
    n1, n2 = _temp_bytes(naive, t), _temp_bytes(naive, 2 * t)
    assert n2 - n1 >= logits_bytes, (n1, n2)  # the naive loss holds full logits
    # The chunked one grows at most by a few hidden-sized buffers (d hidden), never by logits.
    assert c2 - c1 <= 4 * hidden_bytes < 0.15 * logits_bytes, (c1, c2)
    assert c2 < n1 / 2


# ---------------------------------------------------------------- sparse teacher: support + tail bucket

def ref_sparse(name, zs, ids, t_sup, t_tail, mask, temperature, targets, kd_ratio, **kw):
    """Loss and d loss / d student logits, float64, token by token: the divergence on the bins
    (the valid ids, then the tail), the cached teacher renormalised over them; the gradient chained
    from the bins to the vocabulary (a tail bin's share goes to every token outside the support in
    proportion to the student's mass there) and through the log-softmax."""
    zs = np.asarray(zs, np.float64)
    lead, v = zs.shape[:-1], zs.shape[-1]
    s_all = np_log_softmax(zs / temperature)
    d_tok, dz = np.zeros(lead), np.zeros(zs.shape)
    for i in np.ndindex(lead):
        s, q = s_all[i], np.exp(s_all[i])
        keep = np.asarray(ids[i]) >= 0
        sup = np.asarray(ids[i])[keep]
        outside = np.ones(v, bool)
        outside[sup] = False
        t = np.append(np.asarray(t_sup[i], np.float64)[keep], float(t_tail[i]))
        t = t - np.log(np.exp(t).sum())
        s_bins = np.append(s[sup], np.log(q[outside].sum()))
        d, g = ref_per_token(name, s_bins[None], t[None], **kw)
        grad = np.zeros(v)  # d divergence / d student log-probs
        grad[sup] = g[0, :-1]
        grad[outside] = g[0, -1] * q[outside] / q[outside].sum()
        d_tok[i], dz[i] = d[0], (grad - q * grad.sum()) / temperature
    m = np.asarray(mask, np.float64)
    n = max(m.sum(), 1.0)
    kd, dkd = (m * d_tok).sum() / n, m[..., None] * dz / n
    s1 = np_log_softmax(zs)
    onehot = np.eye(v)[targets]
    ce = (m * -(s1 * onehot).sum(-1)).sum() / n
    dce = m[..., None] * (np.exp(s1) - onehot) / n
    return kd_ratio * kd + (1 - kd_ratio) * ce, kd_ratio * dkd + (1 - kd_ratio) * dce, kd


def random_support(rng, lead, v, k, empty=2):
    """Distinct ids [..., k], not the top of anything, with `empty` slots of -1 in each token."""
    ids = np.stack([rng.permutation(v)[:k] for _ in range(int(np.prod(lead)))]).reshape(*lead, k)
    ids[..., :empty] = -1
    return ids.astype(np.int32)


def sparse_inputs(seed, b=3, t=5, v=120, k=9, temperature=2.0):
    rng = np.random.default_rng(seed)
    zs, zt = random_logits(rng, (b, t, v)), random_logits(rng, (b, t, v))
    t_logp = np_log_softmax(zt.astype(np.float64) / temperature)
    ids = random_support(rng, (b, t), v, k)
    t_sup = np.take_along_axis(t_logp, np.maximum(ids, 0), -1)
    outside = np.ones((b, t, v), bool)
    for i in np.ndindex(b, t):
        outside[i][ids[i][ids[i] >= 0]] = False
    t_tail = np.log((np.exp(t_logp) * outside).sum(-1))
    return dict(zs=zs, zt=zt, ids=ids, logp=t_sup.astype(np.float32), log_tail=t_tail.astype(np.float32),
                targets=rng.integers(0, v, (b, t)), mask=random_mask(rng, b, t))


@pytest.mark.parametrize("name,kw", [CASES[0], CASES[1], CASES[3], CASES[7], CASES[8], CASES[9]],
                         ids=[CASE_IDS[i] for i in (0, 1, 3, 7, 8, 9)])
def test_sparse_reference_gradient_matches_finite_differences(name, kw):
    x = sparse_inputs(20, b=2, t=1, v=9, k=4)
    mask = np.array([[True], [True]])
    args = (x["ids"], x["logp"], x["log_tail"], mask, 1.7, x["targets"], 0.6)
    _, dz, _ = ref_sparse(name, x["zs"], *args, **kw)
    zs = x["zs"].astype(np.float64)
    h, fd = 1e-6, np.zeros_like(zs)
    for i in np.ndindex(zs.shape):
        e = np.zeros_like(zs)
        e[i] = h
        fd[i] = (ref_sparse(name, zs + e, *args, **kw)[0] - ref_sparse(name, zs - e, *args, **kw)[0]) / (2 * h)
    np.testing.assert_allclose(dz, fd, atol=1e-7)


@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_sparse_value_and_grad_match_numpy(name, kw):
    x = sparse_inputs(21)
    f = lambda z: losses.sparse_distill_loss(z, x["ids"], x["logp"], x["log_tail"], x["targets"], x["mask"],
                                             divergence=name, temperature=2.0, kd_ratio=0.7, **kw)
    (val, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(x["zs"]))
    ref_val, ref_grad, ref_kd = ref_sparse(name, x["zs"], x["ids"], x["logp"], x["log_tail"], x["mask"], 2.0,
                                           x["targets"], 0.7, **kw)
    assert_close(val, ref_val, 1e-5, "value")
    assert_close(metrics["kd_loss"], ref_kd, 1e-5, "kd")
    assert_close(grad, ref_grad, 1e-4, "grad")
    assert np.all(np.asarray(grad)[0] == 0)  # the fully masked row


@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_sparse_with_the_whole_vocabulary_is_the_dense_loss(name, kw):
    """K = V, in any order: the tail is empty and every divergence is the dense one."""
    rng = np.random.default_rng(22)
    b, t, v = 2, 5, 150
    zs, zt = random_logits(rng, (b, t, v)), random_logits(rng, (b, t, v))
    targets, mask = rng.integers(0, v, (b, t)), random_mask(rng, b, t)
    ids = np.stack([rng.permutation(v) for _ in range(b * t)]).reshape(b, t, v).astype(np.int32)
    t_logp = jax.nn.log_softmax(jnp.asarray(zt) / 2.0)
    logp = jnp.take_along_axis(t_logp, ids, -1)
    top = losses.top_k_teacher(t_logp, v)
    assert float(jnp.max(top[2])) < -1e29  # nothing left outside: the tail bucket is empty
    common = dict(divergence=name, temperature=2.0, kd_ratio=0.7, **kw)
    dense = jax.value_and_grad(lambda z: losses.distill_loss(z, zt, targets, mask, **common)[0])(zs)
    for support in ((ids, logp, jnp.full((b, t), -jnp.inf)), top):
        sparse = jax.value_and_grad(lambda z: losses.sparse_distill_loss(z, *support, targets, mask, **common)[0])(zs)
        assert_close(sparse[0], dense[0], 1e-6, "value")
        assert_close(sparse[1], dense[1], 1e-6, "grad")


@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_sparse_divergence_is_zero_for_the_teacher_and_positive_otherwise(name, kw):
    rng = np.random.default_rng(23)
    zs, zt = random_logits(rng, (2, 4, 60)), random_logits(rng, (2, 4, 60))
    for k in (1, 8, 59):
        own = losses.top_k_teacher(jax.nn.log_softmax(jnp.asarray(zs)), k)
        other = losses.top_k_teacher(jax.nn.log_softmax(jnp.asarray(zt)), k)
        fn = lambda support: float(losses.sparse_distill_loss(zs, *support, np.zeros((2, 4), int),
                                                              divergence=name, **kw)[0])
        assert abs(fn(own)) < 1e-6, k
        assert fn(other) > 1e-3, k


def test_top_k_teacher_and_the_coarse_bins():
    rng = np.random.default_rng(24)
    t_logp = np_log_softmax(rng.standard_normal((3, 40)) * 4)
    ids, logp, log_tail = losses.top_k_teacher(jnp.asarray(t_logp, jnp.float32), 5)
    order = np.argsort(-t_logp, -1)[:, :5]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_allclose(logp, np.take_along_axis(t_logp, order, -1), rtol=1e-6)
    rest = np.exp(t_logp).sum(-1) - np.exp(np.take_along_axis(t_logp, order, -1)).sum(-1)
    np.testing.assert_allclose(np.exp(log_tail), rest, rtol=1e-5)
    # a tiny tail keeps its digits: summed over the rest, not 1 - sum(top k)
    peaked = np.full((1, 40), -30.0)
    peaked[0, 3] = 0.0
    _, _, tiny = losses.top_k_teacher(jnp.asarray(np_log_softmax(peaked), jnp.float32), 1)
    assert float(tiny[0]) == pytest.approx(-30.0 + np.log(39), abs=1e-4)
    s = jax.nn.log_softmax(jnp.asarray(rng.standard_normal((3, 40)), jnp.float32))
    bins = losses.coarse_student(s, jnp.asarray(np.where(np.arange(5) < 2, -1, order), jnp.int32))
    assert bins.shape == (3, 6) and np.all(np.asarray(bins[:, :2]) < -1e29)
    np.testing.assert_allclose(np.exp(bins[:, 2:]).sum(-1), 1.0, rtol=1e-5)  # the support + the tail: all mass


SPARSE_MESHES = [(None, FEW), ((1, 1, 8), CASES), ((2, 2, 2), CASES)]


def run_sparse_chunked(x, mesh_shape, settings):
    """[(loss, metrics, d hidden, d head)] of the chunked sparse loss for each settings dict."""
    mesh = None if mesh_shape is None else make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])

    def all_settings(h, w):
        out = []
        for kw in settings:
            def f(h, w):
                return losses.chunked_sparse_distill_loss(h, w, x["ids"], x["logp"], x["log_tail"], x["targets"],
                                                          x["mask"], vocab_size=VOCAB, chunk_size=4, mesh=mesh, **kw)
            (val, metrics), (dh, dw) = jax.value_and_grad(f, (0, 1), has_aux=True)(h, w)
            out.append((val, metrics, dh, dw))
        return out

    args = (x["student_hidden"], x["student_head"])
    return jax.jit(all_settings).lower(*args).compile(FAST_COMPILE)(*args)


def sparse_chunked_inputs(seed, k=12, dtype=np.float32):
    """Student hidden / head as the dense chunked tests, a sparse teacher with K ids a token
    (two empty slots) whose log-probs are stored in `dtype`."""
    x = chunked_inputs(seed)
    rng = np.random.default_rng(seed + 100)
    zt = (x["teacher_hidden"].astype(np.float64) @ x["teacher_head"][:, :VOCAB].astype(np.float64))
    t_logp = np_log_softmax(zt / 2.0)
    ids = random_support(rng, (B, T), VOCAB, k)
    ids[0, 0, 2:] = np.argsort(-t_logp[0, 0])[:k - 2]  # one token holds its real top ids
    outside = np.ones(t_logp.shape, bool)
    for i in np.ndindex(B, T):
        outside[i][ids[i][ids[i] >= 0]] = False
    x.update(ids=ids, logp=np.take_along_axis(t_logp, np.maximum(ids, 0), -1).astype(dtype),
             log_tail=np.log((np.exp(t_logp) * outside).sum(-1)).astype(np.float32))
    return x


@pytest.mark.parametrize("mesh_shape,cases", SPARSE_MESHES, ids=[str(m) for m, _ in SPARSE_MESHES])
def test_chunked_sparse_matches_numpy_on_meshes(mesh_shape, cases):
    x = sparse_chunked_inputs(30)
    settings = [dict(kw, divergence=name, temperature=2.0, kd_ratio=0.7) for name, kw in cases]
    h, w = x["student_hidden"].astype(np.float64), x["student_head"].astype(np.float64)
    for kw, (val, metrics, dh, dw) in zip(settings, run_sparse_chunked(x, mesh_shape, settings)):
        kw = dict(kw)
        name, temperature, kd_ratio = kw.pop("divergence"), kw.pop("temperature"), kw.pop("kd_ratio")
        ref_val, dz, ref_kd = ref_sparse(name, h @ w[:, :VOCAB], x["ids"], x["logp"], x["log_tail"], x["mask"],
                                         temperature, x["targets"], kd_ratio, **kw)
        ref_dw = np.zeros_like(w)
        ref_dw[:, :VOCAB] = h.reshape(-1, DS).T @ dz.reshape(-1, VOCAB)
        what = f"{mesh_shape} {name} {kw}"
        assert_close(val, ref_val, 1e-5, f"loss {what}")
        assert_close(metrics["kd_loss"], ref_kd, 1e-5, f"kd_loss {what}")
        assert int(metrics["num_tokens"]) == x["mask"].sum()
        assert_close(dh, dz @ w[:, :VOCAB].T, 1e-4, f"d student_hidden {what}")
        assert_close(dw, ref_dw, 1e-4, f"d student_head {what}")


def test_chunked_sparse_is_a_divergence_on_a_mesh_from_bf16_storage():
    """The student's own top K, stored in bf16: 0 on every shard layout; another teacher: > 0."""
    x = sparse_chunked_inputs(31, dtype=jnp.bfloat16)
    mesh = make_mesh(2, 2, 2)
    h, w = jnp.asarray(x["student_hidden"]), jnp.asarray(x["student_head"])
    own = losses.top_k_teacher(jax.nn.log_softmax((h @ w[:, :VOCAB]) / 2.0), 12)
    rounded = (own[0], own[1].astype(jnp.bfloat16), own[2])
    loss = jax.jit(lambda support, div: losses.chunked_sparse_distill_loss(
        h, w, *support, x["targets"], x["mask"], divergence=div, temperature=2.0, vocab_size=VOCAB, chunk_size=4,
        mesh=mesh)[0], static_argnums=1)
    for div in ("forward_kl", "reverse_kl", "total_variation"):
        assert abs(float(loss(own, div))) < 1e-6, div
        bound = 1e-3 if div == "total_variation" else 1e-4  # bf16 rounding of the stored log-probs
        assert 0 <= float(loss(rounded, div)) < bound, div
        assert float(loss((x["ids"], x["logp"], x["log_tail"]), div)) > 1e-2, div


# ---------------------------------------------------------------- sparse teacher with a low-rank tail

def ref_completed(ids, t_sup, t_tail, zl, temperature):
    """The completed teacher [..., V] log-probs, float64: the valid ids' cached log-probs and the
    tail, renormalised over the K + 1 bins; the tail mass spread over the other tokens in
    proportion to exp(zl / temperature)."""
    zl = np.asarray(zl, np.float64) / temperature
    out = np.zeros(zl.shape)
    for i in np.ndindex(zl.shape[:-1]):
        keep = np.asarray(ids[i]) >= 0
        sup = np.asarray(ids[i])[keep]
        bins = np.append(np.asarray(t_sup[i], np.float64)[keep], float(t_tail[i]))
        bins = bins - np.log(np.exp(bins).sum())
        outside = np.ones(zl.shape[-1], bool)
        outside[sup] = False
        out[i][sup] = bins[:-1]
        out[i][outside] = bins[-1] + np_log_softmax(zl[i][outside])
    return out


def test_completed_teacher_is_exact_on_the_support_and_sums_to_one():
    x = sparse_inputs(40)
    zl = random_logits(np.random.default_rng(41), x["zt"].shape)
    got = np.asarray(losses.completed_teacher(x["logp"], x["log_tail"], x["ids"], jnp.asarray(zl) / 2.0), np.float64)
    np.testing.assert_allclose(got, ref_completed(x["ids"], x["logp"], x["log_tail"], zl, 2.0), atol=2e-5)
    np.testing.assert_allclose(np.exp(got).sum(-1), 1.0, rtol=1e-5)
    # the true teacher's logits complete the cache into the teacher itself
    exact = losses.completed_teacher(x["logp"], x["log_tail"], x["ids"], jnp.asarray(x["zt"]) / 2.0)
    np.testing.assert_allclose(exact, np_log_softmax(x["zt"].astype(np.float64) / 2.0), atol=2e-5)


@pytest.mark.parametrize("name,kw", FEW + [CASES[1], CASES[7]], ids=lambda v: str(v))
def test_completed_sparse_value_and_grad_match_numpy(name, kw):
    x = sparse_inputs(42)
    zl = random_logits(np.random.default_rng(43), x["zt"].shape)
    f = lambda z: losses.sparse_distill_loss(z, x["ids"], x["logp"], x["log_tail"], x["targets"], x["mask"],
                                             divergence=name, temperature=2.0, kd_ratio=0.7, tail_logits=zl, **kw)
    (val, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(x["zs"]))
    t = ref_completed(x["ids"], x["logp"], x["log_tail"], zl, 2.0)
    ref_val, ref_grad, ref_kd, _ = ref_loss(name, x["zs"], 2.0 * t, x["mask"], 2.0, x["targets"], 0.7, **kw)
    assert_close(val, ref_val, 1e-5, "value")
    assert_close(metrics["kd_loss"], ref_kd, 1e-5, "kd")
    assert_close(grad, ref_grad, 1e-4, "grad")


RANK = 6
COMPLETED_MESHES = [(None, FEW), ((2, 2, 2), FEW + [CASES[1]])]


@pytest.mark.parametrize("mesh_shape,cases", COMPLETED_MESHES, ids=[str(m) for m, _ in COMPLETED_MESHES])
def test_chunked_completed_sparse_matches_numpy_on_meshes(mesh_shape, cases):
    """The low-rank tail on vocabulary shards: value and both gradients against float64 numpy; and
    with the teacher's own hidden states and head as the 'low-rank' tail, the dense loss itself."""
    x = sparse_chunked_inputs(44)
    rng = np.random.default_rng(45)
    coef, basis = rng.standard_normal((B, T, RANK)).astype(np.float32), rng.standard_normal((RANK, VT)).astype(
        np.float32)
    mesh = None if mesh_shape is None else make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    settings = [dict(kw, divergence=name, temperature=2.0, kd_ratio=0.7) for name, kw in cases]

    def all_settings(h, w):
        out = []
        for kw in settings:
            for tail in ((coef, basis), (x["teacher_hidden"], x["teacher_head"])):
                f = lambda h, w: losses.chunked_sparse_distill_loss(
                    h, w, x["ids"], x["logp"], x["log_tail"], x["targets"], x["mask"], vocab_size=VOCAB, chunk_size=4,
                    mesh=mesh, tail_coef=tail[0], tail_basis=tail[1], **kw)
                out.append(jax.value_and_grad(f, (0, 1), has_aux=True)(h, w))
            dense = lambda h, w: losses.chunked_distill_loss(h, w, x["teacher_hidden"], x["teacher_head"],
                                                             x["targets"], x["mask"], vocab_size=VOCAB, chunk_size=4,
                                                             mesh=mesh, **kw)
            out.append(jax.value_and_grad(dense, (0, 1), has_aux=True)(h, w))
        return out

    args = (x["student_hidden"], x["student_head"])
    got = jax.jit(all_settings).lower(*args).compile(FAST_COMPILE)(*args)
    h, w = x["student_hidden"].astype(np.float64), x["student_head"].astype(np.float64)
    zl = coef.astype(np.float64) @ basis[:, :VOCAB].astype(np.float64)
    t = ref_completed(x["ids"], x["logp"], x["log_tail"], zl, 2.0)
    for i, kw in enumerate(settings):
        kw = dict(kw)
        name, temperature, kd_ratio = kw.pop("divergence"), kw.pop("temperature"), kw.pop("kd_ratio")
        ((val, metrics), (dh, dw)), exact, dense = got[3 * i], got[3 * i + 1], got[3 * i + 2]
        ref_val, dz, ref_kd, _ = ref_loss(name, h @ w[:, :VOCAB], 2.0 * t, x["mask"], temperature, x["targets"],
                                          kd_ratio, **kw)
        ref_dw = np.zeros_like(w)
        ref_dw[:, :VOCAB] = h.reshape(-1, DS).T @ dz.reshape(-1, VOCAB)
        what = f"{mesh_shape} {name} {kw}"
        assert_close(val, ref_val, 1e-5, f"loss {what}")
        assert_close(metrics["kd_loss"], ref_kd, 1e-5, f"kd_loss {what}")
        assert_close(dh, dz @ w[:, :VOCAB].T, 1e-4, f"d student_hidden {what}")
        assert_close(dw, ref_dw, 1e-4, f"d student_head {what}")
        assert_close(exact[0][0], dense[0][0], 1e-5, f"exact tail = dense loss {what}")
        assert_close(exact[1][1], dense[1][1], 1e-4, f"exact tail = dense d head {what}")


def test_hidden_state_loss_matches_float64_numpy():
    """Intermediate-state KD: mean over layer pairs of ||s - t||^2 / ||t||^2 a token, summed over
    the masked tokens / normalizer; its gradient w.r.t. the student states by hand."""
    rng = np.random.default_rng(7)
    s = [rng.normal(size=(2, 5, 6)).astype(np.float32) for _ in range(3)]
    t = [rng.normal(size=(2, 5, 6)).astype(np.float32) * 2 for _ in range(3)]
    mask = rng.uniform(size=(2, 5)) < 0.7
    norm = 13.0
    s64, t64, m = [x.astype(np.float64) for x in s], [x.astype(np.float64) for x in t], mask.astype(np.float64)
    tt = [np.sum(b * b, -1) for b in t64]
    ref = sum(np.sum(np.sum((a - b) ** 2, -1) / n * m) for a, b, n in zip(s64, t64, tt)) / 3 / norm
    ref_grad = [2 * (a - b) / n[..., None] * m[..., None] / 3 / norm for a, b, n in zip(s64, t64, tt)]
    fn = lambda ss: losses.hidden_state_loss(ss, [jnp.asarray(x) for x in t], jnp.asarray(mask), norm)
    val, grad = jax.value_and_grad(fn)([jnp.asarray(x) for x in s])
    assert_close(val, ref, 1e-5, "loss")
    for g, r in zip(grad, ref_grad):
        assert_close(g, r, 1e-5, "grad")
    assert float(fn(t)) == 0.0  # a student with the teacher's states loses nothing
    assert float(losses.hidden_state_loss(s, t, jnp.asarray(mask))) == pytest.approx(ref * norm / m.sum(), rel=1e-5)
