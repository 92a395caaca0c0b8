"""GRPO's rewards for a code model's chain of thought (open-r1's, plus tests passed in the sandbox),
and group-relative advantages.

    format  1 if the completion is one `<think>...</think>` block with content, then an answer
    steps   open-r1's reasoning_steps_reward: min(1, (matches of "Step k:", "1.", "- ", "First,",
            ...) / 3)
    tests   the fraction of the problem's tests that the answer's last fenced code block (or the
            text after </think>) passes in `kdjax.sandbox` (the verdict is reached outside the code's
            process; strict: refused rather than run without the kernel's limits)
    length  open-r1's len_reward (Kimi 1.5), within the group: lam = 0.5 - (len - min) / (max -
            min) in characters; lam for an answer that passes every test, min(0, lam) otherwise
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial

import numpy as np

from kdjax import data as kdata
from kdjax.sandbox import parallel_map

REWARDS = ("format", "steps", "tests", "length")
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


def group_rewards(texts: Sequence[str], record: kdata.Record, weights: dict, *, timeout_s: float = 5.0
                  ) -> dict[str, np.ndarray]:
    """Each reward of REWARDS for the G completions of one prompt, and their weighted "total"."""
    out = {"format": np.array([format_reward(t) for t in texts]),
           "steps": np.array([steps_reward(t) for t in texts])}
    need_tests = weights.get("tests", 0) or weights.get("length", 0)
    out["tests"] = np.array(parallel_map(partial(tests_reward, record=record, timeout_s=timeout_s), texts)) \
        if need_tests else np.zeros(len(texts))
    out["length"] = np.array(length_rewards([len(t) for t in texts], [x == 1.0 for x in out["tests"]]))
    out["total"] = sum(float(weights.get(k, 0.0)) * out[k] for k in REWARDS)
    return out


def group_advantages(rewards: np.ndarray, group: int) -> np.ndarray:
    """(r - group mean) / (group std + 1e-4) for rewards laid out prompt by prompt, G each."""
    r = np.asarray(rewards, np.float64).reshape(-1, group)
    return ((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-4)).reshape(-1)
