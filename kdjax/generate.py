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


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p"))
def decode(graphdef, state, ids, mask, key, stop, pad_id, *, max_new_tokens, temperature, top_k, top_p):
    """The compiled decoding loop of `generate`: prefill, then up to `max_new_tokens` sampled tokens.

    (graphdef, state) = nnx.split(model); ids, mask: [B, P] left-padded prompts and their mask;
    stop: [S] stop token ids; pad_id fills rows that have stopped. Returns [B, max_new_tokens] int32.
    """
    model = nnx.merge(graphdef, state)
    b, p = ids.shape
    cache = model.init_cache(b, p + max_new_tokens)
    h, cache = model.hidden_states(ids, attention_mask=mask, cache=cache)
    last = model.logits(h[:, -1])  # only the last position: no [B, P, V] prefill logits
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    done = jnp.zeros((b,), bool)

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, last, out, done, key = carry
        key, sub = jax.random.split(key)
        tok = jnp.where(done, pad_id, sample_logits(last, sub, temperature, top_k, top_p))
        out = out.at[:, i].set(tok)
        done = done | jnp.isin(tok, stop)
        logits, cache = model(tok[:, None], attention_mask=jnp.ones((b, 1), jnp.int32), cache=cache)
        return i + 1, cache, logits[:, -1], out, done, key

    carry = (jnp.zeros((), jnp.int32), cache, last, out, done, key)
    return jax.lax.while_loop(cond, body, carry)[3]


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop_tokens: Sequence[int] = (), seed: int = 0,
             pad_id: int = 0, bucket: int = 32, keep_stop: bool = False) -> list[list[int]]:
    """Generates up to `max_new_tokens` after each prompt (lists of token ids).

    Returns the new tokens of each row, cut before the first stop token (after it with
    `keep_stop`: a policy gradient scores the stop token the model chose). Prompt lengths are padded
    up to a multiple of `bucket` so that batches of similar prompts share one compilation.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    ctx = model.config.max_position_embeddings
    if longest + max_new_tokens > ctx:
        raise ValueError(f"generate: a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                         f"model's context of {ctx} tokens; shorten the prompt or lower --max_new_tokens")
    width = min(-(-longest // bucket) * bucket, ctx - max_new_tokens)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = p
        mask[r, width - len(p):] = 1
    stop = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)
    graphdef, state = nnx.split(model)
    out = decode(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(seed), stop,
                  jnp.int32(pad_id), max_new_tokens=max_new_tokens, temperature=float(temperature),
                  top_k=int(top_k), top_p=float(top_p))
    result = []
    stops = set(stop_tokens)
    for row in np.asarray(out).tolist():
        cut = next((i + keep_stop for i, t in enumerate(row) if t in stops), len(row))
        result.append(row[:cut])
    return result


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
    kw.setdefault("pad_id", tokenizer.pad_token_id or 0)
    outs = generate(model, encoded, **kw)
    return [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
