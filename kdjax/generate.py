"""Jit-compiled decoding with the slot KV cache: greedy, temperature, top-k, top-p, stop tokens.

Prompts of different lengths are left-padded into one batch; RoPE positions count real tokens
only, so each row decodes exactly as it would alone.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import data
from kdjax.sharding import batch_spec, call_compiled, data_shards, host_rows, place_rows


def sample_logits(logits, key, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
    """Picks one token per row. logits: [B, V]. temperature 0 = greedy (argmax)."""
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def mixture_logits(logits, mix):
    """The next-token logits to sample from, given each model's [B, V] logits: the model's own
    with one model; with (student, teacher), log(mix * p_teacher + (1 - mix) * q_student) over the
    shared vocabulary (MiniLLM's teacher-mixed sampling; mix = 0 is the student alone)."""
    if len(logits) == 1:
        return logits[0]
    vocab = min(x.shape[-1] for x in logits)
    student, teacher = (jax.nn.log_softmax(x[:, :vocab].astype(jnp.float32)) for x in logits)
    return jnp.logaddexp(jnp.log(mix) + teacher, jnp.log1p(-mix) + student)


@functools.partial(jax.jit, static_argnames=("graphdefs", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "out_sharding"))
def decode(states, ids, mask, key, stop, pad_id, mix, *, graphdefs, max_new_tokens, temperature, top_k, top_p,
           out_sharding=None):
    """Prefill the prompts `ids` [B, P] (left-padded; `mask` 1 on tokens), then sample up to
    `max_new_tokens` a row, each from `mixture_logits` of the models (graphdefs / states: one
    model, or (student, teacher) mixed by `mix`), until every row has produced a token of `stop`.
    Returns the tokens [B, max_new_tokens], `pad_id` after a row's stop. Jit-compiled once per
    (models, shapes, sampling settings); `generate` is the list-of-ids front end."""
    models = [nnx.merge(g, s) for g, s in zip(graphdefs, states)]
    b, p = ids.shape
    caches = []
    last = []
    for model in models:
        h, cache = model.hidden_states(ids, attention_mask=mask, cache=model.init_cache(b, p + max_new_tokens))
        caches.append(cache)
        last.append(model.logits(h[:, -1]))  # only the last position: no [B, P, V] prefill logits
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    done = jnp.zeros((b,), bool)

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, caches, last, out, done, key = carry
        key, sub = jax.random.split(key)
        tok = jnp.where(done, pad_id, sample_logits(mixture_logits(last, mix), sub, temperature, top_k, top_p))
        out = out.at[:, i].set(tok)
        done = done | jnp.isin(tok, stop)
        new_caches, new_last = [], []
        for model, cache in zip(models, caches):
            h, cache = model.hidden_states(tok[:, None], attention_mask=jnp.ones((b, 1), jnp.int32), cache=cache)
            new_caches.append(cache)
            new_last.append(model.logits(h[:, -1]))
        return i + 1, new_caches, new_last, out, done, key

    carry = (jnp.zeros((), jnp.int32), caches, last, out, done, key)
    out = jax.lax.while_loop(cond, body, carry)[3]
    return out if out_sharding is None else jax.lax.with_sharding_constraint(out, out_sharding)


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop_tokens: Sequence[int] = (), seed: int = 0,
             pad_id: int = 0, bucket: int = 32, keep_stop: bool = False, teacher=None,
             mix: float = 0.0) -> list[list[int]]:
    """Generates up to `max_new_tokens` after each prompt (lists of token ids).

    Returns the new tokens of each row, cut before the first stop token (after it with
    `keep_stop`: a policy gradient scores the stop token the model chose). Prompt lengths are padded
    up to a multiple of `bucket` so that batches of similar prompts share one compilation.
    teacher, mix: sample from mix * teacher + (1 - mix) * model instead (`mixture_logits`).
    On a mesh (parameters placed by kdjax.load(mesh=...)), the rows are split over its
    data-parallel devices; every process passes all prompts and gets all completions.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens}; must be >= 1")
    models = (model,) if teacher is None else (model, teacher)
    longest = max(len(p) for p in prompts)
    ctx = min(m.config.max_position_embeddings for m in models)
    if longest + max_new_tokens > ctx:
        raise ValueError(f"generate: a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                         f"model's context of {ctx} tokens; shorten the prompt or lower --max_new_tokens")
    width = min(-(-longest // bucket) * bucket, ctx - max_new_tokens)
    mesh = _mesh_of(model)
    shards = 1 if mesh is None else data_shards(mesh)
    rows = -(-len(prompts) // shards) * shards  # fill up with copies of the last prompt to split evenly
    filled = list(prompts) + [prompts[-1]] * (rows - len(prompts))
    ids = np.full((rows, width), pad_id, np.int32)
    mask = np.zeros((rows, width), np.int32)
    for r, p in enumerate(filled):
        ids[r, width - len(p):] = p
        mask[r, width - len(p):] = 1
    ids, mask, out_sharding = jnp.asarray(ids), jnp.asarray(mask), None
    if mesh is not None:
        ids, mask = place_rows((np.asarray(ids), np.asarray(mask)), mesh)
        out_sharding = jax.sharding.NamedSharding(mesh, batch_spec())
    stop = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)
    graphdefs, states = zip(*(nnx.split(m) for m in models))
    out = call_compiled(decode, tuple(states), ids, mask, jax.random.key(seed), stop, jnp.int32(pad_id),
                        jnp.float32(mix), graphdefs=tuple(graphdefs), max_new_tokens=max_new_tokens,
                        temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                        out_sharding=out_sharding)
    result = []
    stops = set(stop_tokens)
    for row in host_rows(out)[:len(prompts)].tolist():
        cut = next((i + keep_stop for i, t in enumerate(row) if t in stops), len(row))
        result.append(row[:cut])
    return result


def _mesh_of(model):
    """The multi-device mesh the model's parameters are placed on, or None (one device)."""
    leaf = jax.tree.leaves(nnx.state(model))[0]
    sharding = getattr(leaf, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.size == 1 or not isinstance(mesh, jax.sharding.Mesh):
        return None
    return mesh


def stop_tokens_of(tokenizer, config=None) -> list[int]:
    """The end-of-turn / end-of-text ids of a tokenizer (and the model config's eos ids)."""
    ids = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if tokenizer is not None:
        for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                ids.add(tid)
    eos = getattr(config, "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    return sorted(ids)


def chat(model, tokenizer, prompts: Sequence[str], *, system: str | None = None, **kw) -> list[str]:
    """Applies the tokenizer's chat template to each user prompt, generates, and decodes."""
    encoded = []
    for text in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = tokenizer.encode(text)
        encoded.append(list(ids))
    kw.setdefault("stop_tokens", stop_tokens_of(tokenizer, model.config))
    kw.setdefault("pad_id", data.pad_id(tokenizer))
    outs = generate(model, encoded, **kw)
    return [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
