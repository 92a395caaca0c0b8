"""The one loop under every trainer (SFT, KD, GKD, MiniLLM, GRPO): each honours grad_accum, eval_every,
select_best, epochs and resume the same way, on tiny models."""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from kdjax import grpo_config, train_config
from kdjax.training import distill, gkd, grpo, minillm
from helpers import Crash, crash_at, set_fields, write_tiny_run

TRAINERS = {"sft": distill, "distill": distill, "gkd": gkd, "minillm": minillm, "grpo": grpo}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("loop"))


def config(setup, mode, out, **kw):
    c = grpo_config.get_config() if mode == "grpo" else train_config.get_config()
    c.mode, c.teacher, c.out_dir = mode, str(setup / "teacher"), str(out)
    c.student_layers = "every_other"
    c.data.source = str(setup / ("problems.jsonl" if mode == "grpo" else "p.jsonl"))
    c.data.layout, c.data.template, c.data.max_length = "records", "plain", 32
    c.data.valid, c.data.test = (2, 2) if mode == "grpo" else (4, 4)
    c.train.steps, c.train.batch_size, c.train.lr, c.train.warmup_steps = 4, 4, 1e-2, 0
    c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 1, 0, 2
    c.kd.chunk_size, c.eval.curve_samples, c.eval.max_new_tokens, c.eval.num_samples = 48, 2, 4, 0
    c.minillm.max_new_tokens, c.gkd.max_new_tokens, c.gkd.lmbda = 6, 6, 0.5
    c.grpo.system, c.grpo.max_new_tokens, c.grpo.num_generations = "", 6, 2
    c.mesh.num_devices = 1
    return set_fields(c, **kw)


def train(setup, mode, out, *, reward=True, **kw):
    cfg = config(setup, mode, out, **kw)
    if mode == "grpo":
        share_of_e = lambda texts, rec: {"total": [t.count("e") / max(len(t), 1) for t in texts]}
        return grpo.train(cfg, reward_fn=share_of_e)["policy"]
    return TRAINERS[mode].train(cfg)["student"]


def params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def metric_rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.parametrize("mode", list(TRAINERS))
def test_every_trainer_honours_the_loop(setup, tmp_path, mode, monkeypatch):
    module = TRAINERS[mode]
    metric = "tests" if mode == "grpo" else "val_loss"
    # eval_every + select_best: evaluations at steps 2 and 4, the best one kept and returned
    full = train(setup, mode, tmp_path / "full", **{"train.eval_every": 2, "train.select_best": metric})
    evals = [r for r in metric_rows(tmp_path / "full") if metric in r]
    assert [r["step"] for r in evals] == [2, 4]
    best = json.load(open(tmp_path / "full" / "best" / "best.json"))
    pick = (max if metric == "tests" else min)(evals, key=lambda r: r[metric])
    assert best["step"] == pick["step"] and best["value"] == pytest.approx(pick[metric])
    assert len([r for r in metric_rows(tmp_path / "full") if "grad_norm" in r]) == 4

    # resume: a run that dies after its step-2 checkpoint, resumed, ends bit-identical
    real_fit = crash_at(monkeypatch, module, 3)
    kw = {"train.eval_every": 2, "train.select_best": metric}
    with pytest.raises(Crash):
        train(setup, mode, tmp_path / "cut", **kw)
    resumed = train(setup, mode, tmp_path / "cut", resume=True, **kw)
    for a, b in zip(params(full), params(resumed)):
        np.testing.assert_array_equal(a, b)
    assert [r["step"] for r in metric_rows(tmp_path / "cut") if "grad_norm" in r] == [1, 2, 3, 4]
    monkeypatch.setattr(module, "fit", real_fit)

    # grad_accum: 2 micro-batches of 2 rows make the update of one batch of 4; epochs sets the steps
    rows = {"grpo": 12, "gkd": 32}.get(mode, 32)  # train examples: 16 - 2 - 2 problems, 40 - 4 - 4 records
    # (AdamW's eps = 1 makes its first update ~ lr * gradient, so the weights compare the gradients)
    kw = {"train.epochs": 4 / rows, "train.steps": 99, "train.eps": 1.0}
    one = train(setup, mode, tmp_path / "a1", **kw)
    two = train(setup, mode, tmp_path / "a2", **kw, **{"train.grad_accum": 2})
    (m1,), (m2,) = metric_rows(tmp_path / "a1"), metric_rows(tmp_path / "a2")
    assert m1["step"] == 1 and m1["grad_norm"] > 1e-3
    for k in ("loss", "grad_norm"):  # scale-sensitive (AdamW's first update is not)
        assert m2[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-7), k
    for a, b in zip(params(one), params(two)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)
    assert any(not np.array_equal(a, b) for a, b in zip(params(one), params(full)))  # one step is not four
