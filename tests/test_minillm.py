"""MiniLLM: the objective and its pieces against float64 numpy, teacher-mixed sampling at its
ends, and a short run that brings a student's reverse KL to a peaked teacher down."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax import data, gguf_io, losses, train_config
from kdjax.training import minillm
from kdjax.config import ModelConfig
from kdjax.generate import generate
from helpers import layer_states_error, run_kdjax, set_fields


def test_future_reward_is_the_mean_over_later_tokens():
    rng = np.random.default_rng(0)
    r, mask = rng.normal(size=(3, 7)), (rng.uniform(size=(3, 7)) < 0.8).astype(np.float32)
    want = np.zeros_like(r)
    for i in range(3):
        for t in range(7):
            later = [r[i, u] for u in range(t + 1, 7) if mask[i, u]]
            want[i, t] = np.mean(later) if later else 0.0
    np.testing.assert_allclose(np.asarray(minillm.future_reward(jnp.asarray(r), jnp.asarray(mask))), want,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_objective_value_and_gradients_match_float64_numpy(alpha):
    rng = np.random.default_rng(1)
    n, t = 4, 6
    rkl, logq, logp = rng.uniform(0, 2, (n, t)), -rng.uniform(0.1, 4, (n, t)), -rng.uniform(0.1, 4, (n, t))
    mask = (rng.uniform(size=(n, t)) < 0.8).astype(np.float64)
    w = np.exp(logq) / (alpha * np.exp(logp) + (1 - alpha) * np.exp(logq))
    big_r = np.asarray(minillm.future_reward(jnp.asarray(logp - logq), jnp.asarray(mask)), np.float64)
    tokens = mask.sum()
    want = np.sum(w * (rkl - big_r * logq) * mask) / tokens
    f = lambda a, b: minillm.minillm_objective(a, b, jnp.asarray(logp, jnp.float32), jnp.asarray(mask), alpha)
    (loss, metrics), (g_rkl, g_logq) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
        jnp.asarray(rkl, jnp.float32), jnp.asarray(logq, jnp.float32))
    assert float(loss) == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(np.asarray(g_rkl), w * mask / tokens, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(np.asarray(g_logq), -w * big_r * mask / tokens, rtol=1e-4, atol=1e-7)
    assert float(metrics["seq_rkl"]) == pytest.approx(np.sum((logq - logp) * mask) / n, rel=1e-5)


def test_token_reverse_kl_matches_float64_numpy():
    rng = np.random.default_rng(2)
    b, t, ds, dt, v = 2, 5, 4, 6, 11
    sh, sw = rng.normal(size=(b, t, ds)), rng.normal(size=(ds, v + 2))  # student head padded by 2
    th, tw = rng.normal(size=(b, t, dt)), rng.normal(size=(dt, v))
    y = rng.integers(0, v, (b, t))

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    ls, lt = log_softmax(sh @ sw[:, :v]), log_softmax(th @ tw)
    want_rkl = (np.exp(ls) * (ls - lt)).sum(-1)
    f = lambda sh, sw: losses.token_reverse_kl(sh, sw, jnp.asarray(th, jnp.float32), jnp.asarray(tw, jnp.float32),
                                               jnp.asarray(y), vocab_size=v, chunk_size=3)
    rkl, lq, lp = f(jnp.asarray(sh, jnp.float32), jnp.asarray(sw, jnp.float32))
    np.testing.assert_allclose(np.asarray(rkl), want_rkl, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lq), np.take_along_axis(ls, y[..., None], -1)[..., 0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(lp), np.take_along_axis(lt, y[..., None], -1)[..., 0], atol=1e-5)
    g = jax.grad(lambda sh: jnp.sum(f(sh, jnp.asarray(sw, jnp.float32))[0]))(jnp.asarray(sh, jnp.float32))
    # d KL(q||p) / d student logits = q * (log q - log p - KL)
    q = np.exp(ls)
    dz = q * (ls - lt - want_rkl[..., None])
    np.testing.assert_allclose(np.asarray(g), dz @ sw[:, :v].T, atol=1e-4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("minillm")
    _, _, tok = gguf_io.read_gguf(gguf_io.preset_path("smollm2-135m-instruct"))
    cfg = ModelConfig.preset("tiny-llama", vocab_size=300, num_layers=4, max_position_embeddings=128)
    teacher = kdjax.Qwen2(cfg, seed=1)
    teacher.lm_head.kernel.set_value(teacher.lm_head.kernel[...] * 30)  # peaked: something to learn
    kdjax.save(teacher, str(root / "teacher"), format="kdjax", tokenizer=tok)
    kdjax.save(kdjax.Qwen2(cfg.replace(num_layers=2), seed=2), str(root / "student"), format="kdjax", tokenizer=tok)
    data.save_records([data.Record(prompt=f"f{i}", response=f"g{i}") for i in range(40)], str(root / "p.jsonl"))
    return root


def test_mixed_sampling_at_alpha_0_is_the_students_own(setup):
    student, _ = kdjax.load(str(setup / "student"))
    teacher, _ = kdjax.load(str(setup / "teacher"))
    prompts = [[86, 35], [86, 36, 37]]
    mixed = lambda prompts, alpha, **kw: generate(student, prompts, teacher=teacher, mix=alpha, temperature=1.0,
                                                  stop_tokens=[2], pad_id=0, bucket=8, keep_stop=True, **kw)
    got = mixed(prompts, 0.0, max_new_tokens=12, seed=5)
    want = generate(student, prompts, max_new_tokens=12, temperature=1.0, stop_tokens=[2], pad_id=0, seed=5,
                    bucket=8, keep_stop=True)
    assert got == want
    # alpha near 1 samples the teacher: its first tokens hit the teacher's argmax about as often as
    # the teacher puts mass there (~0.38 for this peaked teacher), the student's almost never
    first = np.asarray(teacher(jnp.asarray(prompts[:1] * 1))[0, -1]).argmax()
    rate = lambda a: np.mean([c[0] == first for c in mixed(prompts[:1] * 32, a, max_new_tokens=1, seed=7)])
    assert rate(0.999) > 0.2 and rate(0.0) < 0.1, (rate(0.999), rate(0.0))


def config(setup, out, **kw):
    c = train_config.get_config()
    c.mode, c.teacher, c.student, c.out_dir = "minillm", str(setup / "teacher"), str(setup / "student"), str(out)
    c.data.source, c.data.layout, c.data.template = str(setup / "p.jsonl"), "records", "plain"
    c.data.max_length, c.data.valid, c.data.test = 32, 4, 4
    c.train.steps, c.train.batch_size, c.train.lr, c.train.warmup_steps, c.train.log_every = 15, 8, 2e-2, 0, 1
    c.minillm.max_new_tokens = 8
    c.mesh.num_devices = 1
    return set_fields(c, **kw)


def test_minillm_brings_the_reverse_kl_down(setup, tmp_path):
    """The exact per-token KL(q || p) on the student's own samples of 64 held-out prompts."""
    teacher, _ = kdjax.load(str(setup / "teacher"))
    before, _ = kdjax.load(str(setup / "student"))
    prompts = [[86, 33 + i % 10, 33 + i // 10] for i in range(64)]
    teacher, tok = kdjax.load(str(setup / "teacher"))
    rkl = lambda m: minillm.on_policy_rkl(m, teacher, prompts, tokenizer=tok, max_new_tokens=8, seed=11, width=8)
    after = minillm.train(config(setup, tmp_path, **{"minillm.ce_weight": 0.0}))["student"]  # the objective alone
    assert rkl(after) < 0.9 * rkl(before), (rkl(before), rkl(after))


def test_cli_minillm_reports(setup, tmp_path):
    out = tmp_path / "run"
    args = [f"--config.teacher={setup / 'teacher'}", f"--config.student={setup / 'student'}",
            f"--config.data.source={setup / 'p.jsonl'}", "--config.data.layout=records",
            "--config.data.template=plain", "--config.data.max_length=32", "--config.data.valid=4",
            "--config.data.test=4", "--config.train.steps=2", "--config.train.batch_size=4",
            "--config.train.checkpoint_every=2", "--config.minillm.max_new_tokens=4", "--config.eval.num_samples=2",
            "--config.eval.max_new_tokens=4", "--config.eval.curve_samples=0", "--config.mesh.num_devices=1",
            f"--config.out_dir={out}"]
    proc = run_kdjax("minillm", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2/2" in proc.stdout and "token_rkl" in proc.stdout and "ce_loss" in proc.stdout  # + data CE
    report = (out / "report.md").read_text()
    for row in ("| teacher |", "| student before training |", "| student after SFT (baseline) |",
                "| student after MiniLLM |"):
        assert row in report, report
    assert "plain fine-tuning of the same student" in report  # the baseline KD must beat, said either way
    kdjax.load(str(out / "student"))


def test_minillm_adds_the_layer_states_term(setup):
    """kd.hidden_weight in MiniLLM: its loss + w x the mean over student layers of ||s - t||^2 / ||t||^2
    (each against the teacher layer it was made of) on the sampled rows, every real token: float64 numpy."""
    from flax import nnx
    from kdjax.sharding import make_mesh
    from kdjax.training import models
    from kdjax.training.rollout import completion_rows
    teacher, tok = kdjax.load(str(setup / "teacher"))
    student = models.student_from_teacher(teacher, models.parse_layers("every_other", 4))
    rng = np.random.default_rng(3)
    prompts = [[86, 35], [86, 36, 37], [86, 40, 41, 42]]
    completions = [list(rng.integers(3, 290, n)) for n in (5, 3, 6)]
    rows = {k: jnp.asarray(v) for k, v in completion_rows(prompts, completions, pad_id=0, width=12).items()}
    batch = {"samples": rows}
    c = config(setup, "unused", **{"student_layers": "every_other", "minillm.ce_weight": 0.0})
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    params, tparams = (nnx.to_pure_dict(nnx.state(m)) for m in (student, teacher))
    values = {}
    for w in (0.0, 0.7):
        c.kd.hidden_weight = w
        values[w] = minillm.loss_of(c, student, teacher, mesh)(params, batch, tparams, minillm.minillm_totals(batch))
    ref = layer_states_error(student, teacher, rows, models.parse_layers("every_other", 4))
    assert ref > 1e-3  # the student skips layers: its states differ
    assert float(values[0.7][1]["hidden_loss"]) == pytest.approx(ref, rel=1e-4)
    assert float(values[0.7][0]) == pytest.approx(float(values[0.0][0]) + 0.7 * ref, rel=1e-5)
    assert "hidden_loss" not in values[0.0][1]
