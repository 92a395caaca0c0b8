"""Evaluation: sampled generations scored with Rouge-L, validation loss.

  generate_responses(model, tokenizer, records)   -> [str]   one decoded response per record
  rouge_eval(model, tokenizer, records, seeds=)   -> dict    MiniLLM's protocol, both Rouge-L variants
  validation_loss(model, rows)                    -> dict    per-token loss and perplexity on data rows
  evaluate(model, tokenizer, records, ...)        -> dict    both of the above, one row of a report
(kdjax.report turns these rows into tables and plots.)

MiniLLM's protocol (LMOps/minillm, evaluate_main.py and rouge_metric.py): each test prompt is
answered once per sampling seed (10, 20, 30, 40, 50; temperature 1, top-p 1, no top-k), the
generations are scored with Rouge-L against the reference response, averaged over prompts, and the
mean and standard deviation over seeds are reported. Temperature 0 (greedy) makes every seed give
the same generations, so one seed is used then. Scores are in [0, 100].
"""
from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import data
from kdjax.data import DataError, Record
from kdjax.generate import generate, stop_tokens_of
from kdjax.losses import chunked_cross_entropy
from kdjax.rouge import corpus_rouge_l, rouge_l
from kdjax.sharding import call_compiled

MINILLM_SEEDS = (10, 20, 30, 40, 50)
# Rouge-L result key -> kdjax.rouge variant.
ROUGE_KEYS = {"rougeL": "minillm", "rougeL_unicode": "unicode"}


# ---------------------------------------------------------------------------------------------
# Generations
# ---------------------------------------------------------------------------------------------

def _batch_seed(seed: int, batch_index: int) -> int:
    """A seed per (seed, batch) pair; seed + batch_index would make seed 10's batch 10 equal seed
    20's batch 0."""
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1)[0] & 0x7FFFFFFF)


def encode_for_generation(records: Sequence[Record], tokenizer, *, template: str = "minillm",
                          max_prompt_length: int, system: str | None = None) -> list[list[int]]:
    """The prompt token ids of each record, as training sees them (render_prompt, no special
    tokens added). A prompt over `max_prompt_length` tokens is a DataError naming the record."""
    encoded = data.prompt_ids(records, tokenizer, template=template, system=system)
    for record, ids in zip(records, encoded):
        if not ids:
            raise DataError("the prompt encodes to no tokens; generation needs at least one",
                            path=record.source or "record")
        if len(ids) > max_prompt_length:
            raise DataError(f"the prompt is {len(ids)} tokens, longer than the {max_prompt_length} the model's "
                            f"context leaves for it (context minus max_new_tokens); lower max_new_tokens, "
                            f"shorten the prompt or leave the record out", path=record.source or "record")
    return encoded


def generate_responses(model, tokenizer, records: Sequence[Record], *, template: str = "minillm",
                       max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                       seed: int = 0, batch_size: int = 16, max_prompt_length: int | None = None,
                       system: str | None = None) -> list[str]:
    """One decoded response per record, in the order of `records`.

    Prompts are `data.render_prompt(record, template)` encoded without special tokens (exactly as
    in the training rows), sorted by length into batches of `batch_size` (left-padded by
    `generate`; the last batch is filled up with a repeated prompt so every batch has one shape),
    and decoded until an EOS / end-of-turn id (`stop_tokens_of`) or `max_new_tokens`. Responses
    are decoded without special tokens and stripped of surrounding whitespace.
    The result depends on (seed, records, batch_size): batch b samples with its own key.
    max_prompt_length: default and upper bound: the model's context minus max_new_tokens.
    """
    if not records:
        return []
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    room = model.config.max_position_embeddings - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context "
                         f"of {model.config.max_position_embeddings} tokens")
    if max_prompt_length is None or max_prompt_length > room:
        max_prompt_length = room
    prompts = encode_for_generation(records, tokenizer, template=template, max_prompt_length=max_prompt_length,
                                    system=system)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    stop, pad = stop_tokens_of(tokenizer, model.config), data.pad_id(tokenizer)
    out: list[str | None] = [None] * len(prompts)
    for b, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start:start + batch_size]
        batch = [prompts[i] for i in idx]
        if len(prompts) > batch_size:
            batch += [batch[-1]] * (batch_size - len(batch))
        ids = generate(model, batch, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, stop_tokens=stop, seed=_batch_seed(seed, b), pad_id=pad)
        for i, row in zip(idx, ids):
            out[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return out


# ---------------------------------------------------------------------------------------------
# Rouge-L, MiniLLM's protocol
# ---------------------------------------------------------------------------------------------

def rouge_eval(model, tokenizer, records: Sequence[Record], *, seeds: Sequence[int] = MINILLM_SEEDS,
               temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 128,
               template: str = "minillm", batch_size: int = 16, max_prompt_length: int | None = None,
               system: str | None = None, num_examples: int = 3,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Rouge-L of sampled generations against `record.response`, per seed, then mean and std.

    Returns {"rougeL", "rougeL_std", "rougeL_unicode", "rougeL_unicode_std": mean / population std
    (ddof=0) over seeds of the corpus Rouge-L (x100; "rougeL" is MiniLLM's stock scorer,
    "rougeL_unicode" keeps non-ASCII letters and code punctuation, see kdjax.rouge),
    "per_seed": [{"seed", "rougeL", "rougeL_unicode"}], "seeds", "num_samples", "temperature",
    "top_p", "top_k", "max_new_tokens", "template", "samples": the first `num_examples` records with
    the first seed's generation and its scores}. temperature 0 (greedy) uses seeds[0] only.
    """
    if not records:
        raise ValueError("rouge_eval needs at least one record")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("rouge_eval needs at least one seed")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    if temperature == 0:
        seeds = seeds[:1]  # greedy decoding ignores the seed
    references = [r.response for r in records]
    per_seed, first = [], None
    for seed in seeds:
        t0 = time.time()
        generations = generate_responses(model, tokenizer, records, template=template,
                                         max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                         top_k=top_k, seed=seed, batch_size=batch_size,
                                         max_prompt_length=max_prompt_length, system=system)
        row = {"seed": seed}
        for key, variant in ROUGE_KEYS.items():
            row[key] = corpus_rouge_l(generations, references, variant=variant)
        per_seed.append(row)
        first = generations if first is None else first
        if log:
            log(f"seed {seed}: Rouge-L {row['rougeL']:.2f}, unicode {row['rougeL_unicode']:.2f} "
                f"({len(records)} prompts, {time.time() - t0:.1f}s)")
    result: dict[str, Any] = {}
    for key in ROUGE_KEYS:
        values = np.array([r[key] for r in per_seed], np.float64)
        result[key], result[f"{key}_std"] = float(values.mean()), float(values.std())
    samples = []
    for record, generation in list(zip(records, first))[:num_examples]:
        samples.append({"source": record.source, "prompt": data.user_message(record), "reference": record.response,
                        "generation": generation,
                        **{k: rouge_l(generation, record.response, variant=v) for k, v in ROUGE_KEYS.items()}})
    result.update(per_seed=per_seed, seeds=seeds, num_samples=len(records), temperature=float(temperature),
                  top_p=float(top_p), top_k=int(top_k), max_new_tokens=int(max_new_tokens), template=template,
                  samples=samples)
    return result


# ---------------------------------------------------------------------------------------------
# Validation loss
# ---------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size"))
def _nll_sum(state, batch, *, graphdef, chunk_size):
    model = nnx.merge(graphdef, state)
    # segment_ids: each token attends inside its own sequence (packed rows too), padding to nothing
    h = model.hidden_states(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    _, metrics = chunked_cross_entropy(h, model.head_kernel(), batch["targets"], batch["loss_mask"] > 0,
                                       chunk_size=chunk_size, normalizer=1.0)
    return metrics["ce_loss"], metrics["num_tokens"]  # the sum of -log q(target), and the count


def validation_loss(model, rows: data.Rows, *, batch_size: int = 16, chunk_size: int = 1024) -> dict[str, float]:
    """Cross-entropy of the model on `data.make_rows` rows, response tokens only.

    rows: input_ids, targets, loss_mask, segment_ids, positions [N, T] (see kdjax.data); tokens
    attend inside their own segment (packed rows too), `positions` give RoPE positions. loss = sum of -log q(targets) over loss_mask / number of those tokens
    (a per-token mean over all rows, not a mean of row means); perplexity = exp(loss). The
    [B, T, V] logits are never built (chunked_cross_entropy over the hidden states).
    Returns {"loss", "perplexity", "num_tokens"}.
    """
    missing = [k for k in data.ROW_KEYS if k not in rows]
    if missing:
        raise ValueError(f"validation_loss: rows lack {missing}; build them with kdjax.data.make_rows")
    rows = {k: np.asarray(rows[k]) for k in data.ROW_KEYS}
    n = len(rows["input_ids"])
    if n == 0:
        raise ValueError("validation_loss of no rows")
    batch_size = min(batch_size, n)
    graphdef, state = nnx.split(model)
    total, count = 0.0, 0.0
    for start in range(0, n, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in rows.items()}
        short = batch_size - len(batch["input_ids"])
        if short:  # fill the last batch with fully masked rows: one compilation for all batches
            batch = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
        s, c = call_compiled(_nll_sum, state, {k: jnp.asarray(v) for k, v in batch.items()}, graphdef=graphdef,
                             chunk_size=chunk_size)
        total, count = total + float(s), count + float(c)
    if count == 0:
        raise ValueError("validation_loss: no response tokens in the rows (every loss_mask is 0)")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "num_tokens": int(count)}


# ---------------------------------------------------------------------------------------------
# One model on one data set
# ---------------------------------------------------------------------------------------------

def evaluate(model, tokenizer, records: Sequence[Record], *, max_length: int, template: str = "minillm",
             batch_size: int = 16, log: Callable[[str], None] | None = None, **rouge_kw) -> dict[str, Any]:
    """rouge_eval on `records` plus validation_loss on their rows (max_length tokens, prompts that
    do not fit are skipped for the loss, and counted in "loss_rows_skipped"). rouge_kw go to
    rouge_eval (seeds, temperature, top_p, max_new_tokens, ...)."""
    result = rouge_eval(model, tokenizer, records, template=template, batch_size=batch_size, log=log, **rouge_kw)
    examples = data.tokenize(records, tokenizer, max_length=max_length, template=template, on_long_prompt="skip")
    rows = data.pack(examples, max_length, pad_id=data.pad_id(tokenizer))
    result.update(validation_loss(model, rows, batch_size=batch_size))
    result["loss_rows_skipped"] = len(records) - len(examples)
    return result
