"""Rollouts: prompts in, sampled completions out, as training rows (MiniLLM, GRPO, GKD, evaluation).

    prompts = Prompts.of(records, tokenizer, template=..., room=...)   # encoded once, those that fit
    completions = sample(policy, [prompts.ids[i] for i in picked], ...) # kdjax.generate, one shape
    rows = completion_rows(prompt_ids, completions, pad_id=..., width=...)  # kdjax.data.pack
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from kdjax import data
from kdjax.generate import generate, stop_tokens_of

BUCKET = 64  # prompt widths are padded to a multiple of this: one compilation a run


def bucket_width(prompts: Sequence[Sequence[int]]) -> int:
    """The width a batch of these prompts is left-padded to: the longest, rounded up to BUCKET."""
    return -(-max(map(len, prompts), default=1) // BUCKET) * BUCKET


@dataclasses.dataclass
class Prompts:
    """The prompts of a split, encoded once: records and their ids (those of 1 to `room` tokens),
    and the width every batch of them is left-padded to (the longest, rounded up to BUCKET)."""
    records: list
    ids: list[list[int]]
    width: int
    left_out: int

    @classmethod
    def of(cls, records, tokenizer, *, template: str, room: int, system: str | None = None) -> "Prompts":
        ids = data.prompt_ids(records, tokenizer, template=template, system=system)
        kept = [(r, p) for r, p in zip(records, ids) if 0 < len(p) <= room]
        prompts = [p for _, p in kept]
        return cls([r for r, _ in kept], prompts, bucket_width(prompts), len(records) - len(kept))

    def __len__(self):
        return len(self.ids)


def picks(order: Sequence[int], step: int, count: int) -> list[int]:
    """The step's entries of `order` (a seeded shuffle, made once), taken in passes: a pure
    function of the step, so a resumed run sees the same prompts."""
    return [order[(step * count + i) % len(order)] for i in range(count)]


def sample(policy, prompts: Sequence[Sequence[int]], *, tokenizer, max_new_tokens: int, seed: int, width: int,
           temperature: float = 1.0, top_p: float = 1.0, teacher=None, mix: float = 0.0) -> list[list[int]]:
    """One completion per prompt (stop token kept: a policy gradient scores the model's choice to
    stop), from the policy or, with `teacher`, from mix * teacher + (1 - mix) * policy."""
    return generate(policy, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    stop_tokens=stop_tokens_of(tokenizer, policy.config), pad_id=data.pad_id(tokenizer),
                    seed=seed, keep_stop=True, bucket=width, teacher=teacher, mix=mix)


def completion_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *, pad_id: int,
                    width: int) -> dict[str, np.ndarray]:
    """Training rows (kdjax.data's layout, [N, width]) of prompt + completion, right-padded; the
    loss mask covers the completion's tokens (the stop token included)."""
    examples = [data.Example(tuple(p), tuple(c)) for p, c in zip(prompts, completions)]
    return data.pack(examples, width, pad_id=pad_id)
