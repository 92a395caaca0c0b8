"""GRPO: rewards on hand-made completions, advantages and the objective against float64 numpy,
the chunked per-token log-probabilities, a tiny policy that learns a reward, exact resume."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kdjax
from kdjax import data, gguf_io, grpo, grpo_config, losses
from kdjax.config import ModelConfig
from helpers import run_kdjax, set_fields

GOOD = ("<think>\nStep 1: add the numbers.\nStep 2: return the sum.\n</think>\n"
        "```python\ndef add(a, b):\n    return a + b\n```")
RECORD = data.Record(prompt="Write add(a, b).", response="def add(a, b):\n    return a + b",
                     tests=("assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"))


def test_rewards_on_hand_made_completions():
    assert grpo.format_reward(GOOD) == 1.0
    assert grpo.format_reward("def add(a, b): return a + b") == 0.0  # no thinking
    assert grpo.format_reward("<think>\n\n</think>\nanswer") == 0.0  # empty thinking
    assert grpo.format_reward("<think>x</think>") == 0.0  # no answer after it
    assert grpo.format_reward("<think>a</think><think>b</think> c") == 0.0  # two blocks
    assert grpo.steps_reward(GOOD) == pytest.approx(2 / 3)
    assert grpo.steps_reward("First, x\nStep 1: y\nStep 2: z\nFinally, w") == 1.0
    assert grpo.steps_reward("no steps") == 0.0
    assert grpo.tests_reward(GOOD, RECORD) == 1.0
    wrong = GOOD.replace("a + b", "a * b")  # passes add(2, 2) only
    assert grpo.tests_reward(wrong, RECORD) == pytest.approx(1 / 3)
    assert grpo.tests_reward("<think>no code</think> sorry", RECORD) == 0.0
    # HumanEval's check(candidate) program, from the pip package
    he = data.load_records(data.humaneval_path(), "humaneval")[0]
    answer = f"<think>Step 1: read it.</think>\n```python\n{he.prompt}{he.response}\n```"
    assert grpo.tests_reward(answer, he) == 1.0
    assert grpo.tests_reward(answer.replace("return", "return not", 1), he) == 0.0
    # an answer that leaves out the prompt's `from typing import List` still runs
    bare = f"<think>Step 1: read it.</think>\n```python\n{he.prompt.split('from typing import List')[1]}{he.response}\n```"
    assert "List[" in bare and "import" not in bare.split("```python")[1].split("def")[0]
    assert grpo.tests_reward(bare, he) == 1.0


def test_length_rewards_and_advantages_match_their_definitions():
    # open-r1 len_reward: lam = 0.5 - (len - min) / (max - min); wrong answers get min(0, lam)
    got = grpo.length_rewards([10, 20, 30, 20], [True, True, False, False])
    np.testing.assert_allclose(got, [0.5, 0.0, -0.5, 0.0])
    assert grpo.length_rewards([7, 7], [True, False]) == [0.0, 0.0]
    r = np.random.default_rng(0).normal(size=12)
    ref = np.concatenate([(g - g.mean()) / (g.std() + 1e-4) for g in r.reshape(3, 4)])
    np.testing.assert_allclose(grpo.advantages(r, 4), ref, rtol=1e-12)
    texts = [GOOD, "nothing"]
    out = grpo.group_rewards(texts, RECORD, dict(format=1.0, steps=0.5, tests=2.0, length=0.5))
    # GOOD is the longer (lam -0.5, correct: -0.5); "nothing" the shorter (lam 0.5, wrong: min(0, 0.5))
    np.testing.assert_allclose(out["total"], [1 + 0.5 * 2 / 3 + 2 + 0.5 * -0.5, 0.0])


def test_objective_value_and_gradient_match_float64_numpy():
    rng = np.random.default_rng(1)
    n, t, beta = 5, 9, 0.04
    logp, ref = -rng.uniform(0.1, 5, (n, t)), -rng.uniform(0.1, 5, (n, t))
    adv, mask = rng.normal(size=n), (rng.uniform(size=(n, t)) < 0.7).astype(np.float64)
    mask[2] = 0.0  # an empty completion: contributes 0, no NaN
    lengths = np.maximum(mask.sum(1), 1)
    kl = np.exp(ref - logp) - (ref - logp) - 1
    want = -np.mean(((adv[:, None] - beta * kl) * mask).sum(1) / lengths)
    want_grad = -(adv[:, None] - beta * (1 - np.exp(ref - logp))) * mask / lengths[:, None] / n
    f = lambda l: grpo.grpo_objective(l, jnp.asarray(ref, jnp.float32), jnp.asarray(adv, jnp.float32),
                                      jnp.asarray(mask, jnp.float32), beta)
    (loss, mean_kl), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp, jnp.float32))
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(mean_kl) == pytest.approx((kl * mask).sum() / mask.sum(), rel=1e-5)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-7)


def test_token_logprobs_value_and_gradient_match_float64_numpy():
    rng = np.random.default_rng(2)
    b, t, d, v = 2, 7, 5, 13
    h, w = rng.normal(size=(b, t, d)), rng.normal(size=(d, v + 3))  # a head padded past the vocabulary
    y, g = rng.integers(0, v, (b, t)), rng.normal(size=(b, t))
    logits = h @ w[:, :v] / 0.7
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    want = np.log(np.take_along_axis(p, y[..., None], -1)[..., 0])
    f = lambda h, w: losses.token_logprobs(h, w, jnp.asarray(y), vocab_size=v, chunk_size=4, temperature=0.7)
    out = f(jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5)
    gh, gw = jax.grad(lambda h, w: jnp.sum(f(h, w) * g), (0, 1))(jnp.asarray(h, jnp.float32),
                                                                 jnp.asarray(w, jnp.float32))
    dl = (np.eye(v)[y] - p) * g[..., None] / 0.7
    np.testing.assert_allclose(np.asarray(gh), dl @ w[:, :v].T, atol=2e-5)
    np.testing.assert_allclose(np.asarray(gw)[:, :v], np.einsum("btd,btv->dv", h, dl), atol=2e-5)
    assert not np.asarray(gw)[:, v:].any()


def test_completion_rows_mask_the_completion_only():
    rows = grpo.completion_rows([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0, bucket=4)
    assert rows["input_ids"].shape == (2, 4)
    np.testing.assert_array_equal(rows["input_ids"][0], [5, 6, 7, 1])
    np.testing.assert_array_equal(rows["targets"][0], [6, 7, 1, 2])
    np.testing.assert_array_equal(rows["loss_mask"][0], [0, 0, 1, 1])  # targets 1, 2 are the completion
    np.testing.assert_array_equal(rows["targets"][1], [3, 4, 9, 0])
    np.testing.assert_array_equal(rows["loss_mask"][1], [1, 1, 1, 0])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    _, _, tok = gguf_io.read_gguf(gguf_io.preset_path("smollm2-135m-instruct"))
    # 300 ids: the tokenizer's bytes and first merges ("f3" is [86, 35]), so a few steps can move the policy
    cfg = ModelConfig.preset("tiny-llama", vocab_size=300, num_layers=2, max_position_embeddings=128)
    kdjax.save(kdjax.Qwen2(cfg, seed=1), str(root / "policy"), format="kdjax", tokenizer=tok)
    kdjax.save(kdjax.Qwen2(cfg, seed=3), str(root / "other"), format="kdjax")  # a teacher for MiniLLM's step
    records = [data.Record(prompt=f"f{i}", response=f"def f{i}(): return {i}", tests=(f"assert f{i}() == {i}",)) for i in range(12)]
    data.save_records(records, str(root / "problems.jsonl"))
    return root


def config(setup, out, **kw):
    c = grpo_config.get_config()
    c.teacher, c.out_dir = str(setup / "policy"), str(out)
    c.data.source, c.data.layout, c.data.template, c.data.test = str(setup / "problems.jsonl"), "records", "plain", 2
    c.grpo.system, c.grpo.max_new_tokens, c.grpo.num_generations = "", 8, 4
    c.train.steps, c.train.lr, c.train.checkpoint_every = 12, 3e-3, 4
    c.mesh.num_devices = 1
    return set_fields(c, **kw)


def share_of_e(texts, record):  # a reward the tiny random policy can learn: the letter "e"
    return {"total": [t.count("e") / max(len(t), 1) for t in texts]}


def test_tiny_policy_learns_a_reward(setup, tmp_path):
    grpo.train_grpo(config(setup, tmp_path, **{"train.lr": 1e-2}), reward_fn=share_of_e)
    r = [json.loads(l)["reward_total"] for l in open(tmp_path / "metrics.jsonl")]
    assert len(r) == 12 and np.mean(r[-4:]) > np.mean(r[:4]) + 0.05, r


def test_resume_continues_exactly(setup, tmp_path):
    full = grpo.train_grpo(config(setup, tmp_path / "full", **{"train.steps": 6, "train.checkpoint_every": 3}),
                           reward_fn=share_of_e)
    grpo.train_grpo(config(setup, tmp_path / "cut", **{"train.steps": 3, "train.checkpoint_every": 3}),
                    reward_fn=share_of_e)
    resumed = grpo.train_grpo(config(setup, tmp_path / "cut", resume=True,
                                     **{"train.steps": 6, "train.checkpoint_every": 3}), reward_fn=share_of_e)
    for a, b in zip(jax.tree.leaves(nnx.state(full["policy"])), jax.tree.leaves(nnx.state(resumed["policy"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_grpo_config_is_named(setup, tmp_path):
    with pytest.raises(ValueError, match="num_generations=1"):
        grpo.train_grpo(config(setup, tmp_path, **{"grpo.num_generations": 1}))
    c = config(setup, tmp_path)
    c.grpo.weights.unlock() if hasattr(c.grpo.weights, "unlock") else None
    c.grpo.weights["speed"] = 1.0
    with pytest.raises(ValueError, match="unknown reward"):
        grpo.train_grpo(c)


def test_cli_runs_grpo_and_reports(setup, tmp_path):
    """`kdjax grpo` (the CLI path): a short run, the HF policy, report.md before/after, --help."""
    out = tmp_path / "run"
    args = [f"--config.teacher={setup / 'policy'}", f"--config.data.source={setup / 'problems.jsonl'}",
            "--config.data.layout=records", "--config.data.template=plain", "--config.grpo.system=",
            "--config.data.test=2", "--config.eval.num_samples=2", "--config.train.steps=2",
            "--config.train.checkpoint_every=2", "--config.grpo.max_new_tokens=8", "--config.mesh.num_devices=1",
            f"--config.out_dir={out}"]
    proc = run_kdjax("grpo", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2/2" in proc.stdout and "reward_tests" in proc.stdout
    report = (out / "report.md").read_text()
    assert "| before GRPO |" in report and "| after GRPO |" in report
    assert json.load(open(out / "report.json"))["after GRPO"]["pass_at_1"] == 0.0  # a random tiny policy
    kdjax.load(str(out / "policy"))
    helped = run_kdjax("grpo", "--help", timeout=120)
    assert helped.returncode == 0 and "--config" in helped.stdout and "GRPO" in helped.stdout


def test_one_device_step_equals_eight(setup):
    """grpo_step and minillm_step on a 2x2x2 mesh (8 simulated devices, parameters sharded over
    fsdp and tensor) give the 1-device loss, metrics and updated weights."""
    from kdjax import minillm, train
    from kdjax.sharding import make_mesh
    policy_src, rng = str(setup / "policy"), np.random.default_rng(4)
    prompts = [list(rng.integers(1, 300, 5)) for _ in range(8)]
    completions = [list(rng.integers(1, 300, rng.integers(2, 9))) for _ in range(8)]
    rows = grpo.completion_rows(prompts, completions, pad_id=0, width=16)
    rows["adv"] = grpo.advantages(rng.normal(size=8), 4).astype(np.float32)
    tc = grpo_config.get_config().train
    results = []
    for n, shape in ((1, (1, 1, 1)), (8, (2, 2, 2))):
        mesh = make_mesh(*shape, devices=jax.devices()[:n])
        model = kdjax.load(policy_src, mesh=mesh)[0]
        teacher = kdjax.load(str(setup / "other"), mesh=mesh)[0]
        tx = train.make_optimizer(tc)
        graphdef, state, state_sh = train.init_state(model, tx, mesh)
        batch = jax.device_put(rows, train._batch_sharding(mesh))
        tparams = nnx.to_pure_dict(nnx.state(teacher))
        g_state, g_metrics = jax.jit(lambda s, b, r: grpo.grpo_step(
            s, b, r, tx=tx, graphdef=graphdef, ref_graphdef=nnx.graphdef(teacher), beta=0.04, chunk_size=24),
            out_shardings=(state_sh, None))(state, batch, tparams)
        graphdef, state, _ = train.init_state(kdjax.load(policy_src, mesh=mesh)[0], tx, mesh)
        m_state, m_metrics = jax.jit(lambda s, b, t: minillm.minillm_step(
            s, b, t, tx=tx, graphdef=graphdef, teacher_graphdef=nnx.graphdef(teacher), vocab_size=300,
            chunk_size=24, alpha=0.2), out_shardings=(state_sh, None))(state, batch, tparams)
        assert float(m_metrics["token_rkl"]) > 0.01 and float(g_metrics["grad_norm"]) > 0.01  # not vacuous
        results.append([jax.device_get(x) for x in (g_metrics, g_state["params"], m_metrics, m_state["params"])])
    for one, eight in zip(*results):
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
