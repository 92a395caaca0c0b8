"""GRPO: rewards on hand-made completions, advantages and the objective against float64 numpy,
the chunked per-token log-probabilities, a tiny policy that learns a reward, exact resume."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kdjax
from kdjax import data, gguf_io, grpo_config, losses
from kdjax.config import ModelConfig
from kdjax.training import grpo, rollout
from kdjax.training import rewards as R
from helpers import run_kdjax, set_fields

GOOD = ("<think>\nStep 1: add the numbers.\nStep 2: return the sum.\n</think>\n"
        "```python\ndef add(a, b):\n    return a + b\n```")
RECORD = data.Record(prompt="Write add(a, b).", response="def add(a, b):\n    return a + b",
                     tests=("assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"))


def test_rewards_on_hand_made_completions():
    assert R.format_reward(GOOD) == 1.0
    assert R.format_reward("def add(a, b): return a + b") == 0.0  # no thinking
    assert R.format_reward("<think>\n\n</think>\nanswer") == 0.0  # empty thinking
    assert R.format_reward("<think>x</think>") == 0.0  # no answer after it
    assert R.format_reward("<think>a</think><think>b</think> c") == 0.0  # two blocks
    assert R.steps_reward(GOOD) == pytest.approx(2 / 3)
    assert R.steps_reward("First, x\nStep 1: y\nStep 2: z\nFinally, w") == 1.0
    assert R.steps_reward("no steps") == 0.0
    assert R.tests_reward(GOOD, RECORD) == 1.0
    wrong = GOOD.replace("a + b", "a * b")  # passes add(2, 2) only
    assert R.tests_reward(wrong, RECORD) == pytest.approx(1 / 3)
    assert R.tests_reward("<think>no code</think> sorry", RECORD) == 0.0
    # HumanEval's check(candidate) program, from the pip package
    he = data.load_records(data.humaneval_path(), "humaneval")[0]
    answer = f"<think>Step 1: read it.</think>\n```python\n{he.prompt}{he.response}\n```"
    assert R.tests_reward(answer, he) == 1.0
    assert R.tests_reward(answer.replace("return", "return not", 1), he) == 0.0
    # an answer that leaves out the prompt's `from typing import List` still runs
    bare = f"<think>Step 1: read it.</think>\n```python\n{he.prompt.split('from typing import List')[1]}{he.response}\n```"
    assert "List[" in bare and "import" not in bare.split("```python")[1].split("def")[0]
    assert R.tests_reward(bare, he) == 1.0


def test_length_rewards_and_advantages_match_their_definitions():
    # open-r1 len_reward: lam = 0.5 - (len - min) / (max - min); wrong answers get min(0, lam)
    got = R.length_rewards([10, 20, 30, 20], [True, True, False, False])
    np.testing.assert_allclose(got, [0.5, 0.0, -0.5, 0.0])
    assert R.length_rewards([7, 7], [True, False]) == [0.0, 0.0]
    r = np.random.default_rng(0).normal(size=12)
    ref = np.concatenate([(g - g.mean()) / (g.std() + 1e-4) for g in r.reshape(3, 4)])
    np.testing.assert_allclose(R.group_advantages(r, 4), ref, rtol=1e-12)
    texts = [GOOD, "nothing"]
    out = R.group_rewards(texts, RECORD, dict(format=1.0, steps=0.5, tests=2.0, length=0.5))
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
    rows = rollout.completion_rows([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0, width=6)
    assert rows["input_ids"].shape == (2, 6)
    np.testing.assert_array_equal(rows["input_ids"][0], [5, 6, 7, 1, 2, 0])
    np.testing.assert_array_equal(rows["targets"][0], [6, 7, 1, 2, 0, 0])
    np.testing.assert_array_equal(rows["loss_mask"][0], [0, 0, 1, 1, 0, 0])  # targets 1, 2 are the completion
    np.testing.assert_array_equal(rows["targets"][1], [3, 4, 9, 0, 0, 0])
    np.testing.assert_array_equal(rows["loss_mask"][1], [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(rows["positions"][1], [0, 1, 2, 3, 0, 0])


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
    grpo.train(config(setup, tmp_path, **{"train.lr": 1e-2}), reward_fn=share_of_e)
    r = [json.loads(l)["reward_total"] for l in open(tmp_path / "metrics.jsonl")]
    assert len(r) == 12 and np.mean(r[-4:]) > np.mean(r[:4]) + 0.05, r


def test_bad_grpo_config_is_named(setup, tmp_path):
    with pytest.raises(ValueError, match="num_generations=1"):
        grpo.train(config(setup, tmp_path, **{"grpo.num_generations": 1}))
    c = config(setup, tmp_path)
    c.grpo.weights.unlock() if hasattr(c.grpo.weights, "unlock") else None
    c.grpo.weights["speed"] = 1.0
    with pytest.raises(ValueError, match="unknown reward"):
        grpo.train(c)


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
    """GRPO's and MiniLLM's updates on a 2x2x2 mesh (8 simulated devices, parameters sharded over
    fsdp and tensor, the log-prob objectives' vocabulary over tensor) give the 1-device loss,
    metrics and updated weights."""
    from functools import partial
    from kdjax.sharding import make_mesh, place_rows
    from kdjax.training import minillm, state as S
    policy_src, rng = str(setup / "policy"), np.random.default_rng(4)
    prompts = [list(rng.integers(1, 300, 5)) for _ in range(8)]
    completions = [list(rng.integers(1, 300, rng.integers(2, 9))) for _ in range(8)]
    rows = rollout.completion_rows(prompts, completions, pad_id=0, width=16)
    rows["adv"] = R.group_advantages(rng.normal(size=8), 4).astype(np.float32)
    tc = grpo_config.get_config().train
    results = []
    for n, shape in ((1, (1, 1, 1)), (8, (2, 2, 2))):
        mesh = make_mesh(*shape, devices=jax.devices()[:n])
        loss_mesh = mesh if n > 1 else None
        teacher = kdjax.load(str(setup / "other"), mesh=mesh)[0]
        tparams = nnx.to_pure_dict(nnx.state(teacher))
        out = []
        for loss, totals, batch in (
                (partial(grpo.grpo_loss, ref_graphdef=nnx.graphdef(teacher), beta=0.04, chunk_size=24, mesh=loss_mesh),
                 grpo.completion_totals, rows),
                (partial(minillm.minillm_loss, teacher_graphdef=nnx.graphdef(teacher), vocab_size=300, chunk_size=24,
                         alpha=0.2, ce_weight=0.5, mesh=loss_mesh),
                 minillm.minillm_totals, {"samples": {k: v for k, v in rows.items() if k != "adv"}, "data": rows})):
            tx = S.make_optimizer(tc)
            graphdef, state, state_sh = S.init_state(kdjax.load(policy_src, mesh=mesh)[0], tx, mesh)
            step = jax.jit(partial(S.update, tx=tx, loss=partial(loss, graphdef=graphdef), totals=totals),
                           out_shardings=(state_sh, None))
            new_state, metrics = step(state, place_rows(batch, mesh), tparams)
            out.append(jax.device_get((metrics, new_state["params"])))
        assert out[1][0]["token_rkl"] > 0.01 and out[0][0]["grad_norm"] > 0.01  # not vacuous
        results.append(out)
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


def test_a_policy_that_writes_the_answer_scores_pass_at_1():
    """evaluate_policy end to end (greedy decoding, detokenizing, extracting the code, its tests in
    the sandbox): a hand-built model that can only say "f=lambda:1" after the prompt "Q" passes
    the problem that wants f() == 1 and fails the one that wants 2. (A random policy scoring 0
    cannot tell a working scorer from a broken one.)"""
    _, _, tok = gguf_io.read_gguf(gguf_io.preset_path("smollm2-135m-instruct"))
    chain = tok.encode("Q", add_special_tokens=False)[-1:] + tok.encode("f=lambda:1", add_special_tokens=False)
    chain.append(tok.eos_token_id)
    assert len(set(chain)) == len(chain)  # a bigram model: each token has one successor
    cfg = ModelConfig.preset("tiny-llama", vocab_size=len(tok), num_layers=1, tie_word_embeddings=False)
    model = kdjax.Qwen2(cfg, seed=0)
    graphdef, state = nnx.split(model)
    params = jax.tree.map(jnp.zeros_like, nnx.to_pure_dict(state))  # layers add nothing to the residual
    params["norm"]["scale"] = jnp.ones_like(params["norm"]["scale"])
    emb, head = np.zeros((len(tok), cfg.hidden_size), np.float32), np.zeros((cfg.hidden_size, len(tok)), np.float32)
    for i, (tok_now, tok_next) in enumerate(zip(chain, chain[1:])):
        emb[tok_now, i] = 1.0  # token -> its own direction -> its successor's logit
        head[i, tok_next] = 10.0
    params["embed_tokens"]["embedding"], params["lm_head"]["kernel"] = jnp.asarray(emb), jnp.asarray(head)
    nnx.replace_by_pure_dict(state, params)
    policy = nnx.merge(graphdef, state)
    c = grpo_config.get_config()
    c.data.template, c.grpo.system, c.grpo.max_new_tokens = "plain", "", 12
    problems = [data.Record(prompt="Q", response="", tests=("assert f() == 1",), source="one"),
                data.Record(prompt="Q", response="", tests=("assert f() == 2", "assert f() == 1"), source="two")]
    got = grpo.evaluate_policy(policy, tok, problems, c, log=lambda m: None)
    assert [s["completion"] for s in got["samples"]] == ["f=lambda:1", "f=lambda:1"]
    assert got["pass_at_1"] == 0.5 and got["tests"] == pytest.approx(0.75)
