"""kdjax.generate.sample_logits against the float64 numpy distribution it must sample from:
temperature, top-k, top-p and both, on two rows with different orders in one batch.

Each case draws N tokens per row (fixed seeds) and accepts only counts consistent with the reference:
no token outside its support, and a total variation within a bound that N draws from the reference
exceed with probability below e^-32. The same counts must be rejected against the distributions
that plausible bugs give (k or the nucleus off by one, temperature after the filter, top-p before
top-k, a filter ignored), so the check can fail for the reason it names.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.generate import sample_logits

N = 40_000  # draws per row
PROBS = np.array([0.30, 0.22, 0.15, 0.10, 0.08, 0.06, 0.04, 0.03, 0.015, 0.005])
# two rows: the same shape in different token orders, the second sharper
ROWS = np.stack([np.log(PROBS)[np.random.default_rng(1).permutation(10)],
                 1.5 * np.log(PROBS)[np.random.default_rng(2).permutation(10)]])


def reference(logits, temperature=1.0, top_k=0, top_p=1.0, *, p_before_k=False, nucleus_extra=0):
    """float64 numpy: softmax(logits / temperature) cut to the top_k tokens, then to the smallest
    most-likely prefix whose (renormalised) mass reaches top_p, renormalised. The keyword-only
    arguments give the distributions of two bugs (top-p on the uncut softmax; one token more)."""
    z = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-z)
    q = np.exp(z - z.max())
    q /= q.sum()

    def cut_k(q):
        keep = np.zeros_like(q, bool)
        keep[order[:top_k] if top_k else order] = True
        return np.where(keep, q, 0.0) / q[keep].sum()

    def cut_p(q):
        mass_before = np.cumsum(q[order]) - q[order]
        n = int(np.sum(mass_before < top_p)) + nucleus_extra
        keep = np.zeros_like(q, bool)
        keep[order[:n]] = True
        return np.where(keep, q, 0.0) / q[keep].sum()

    return cut_k(cut_p(q)) if p_before_k else cut_p(cut_k(q))


def draw(seed, **kw) -> np.ndarray:
    """Counts [2, V] of N draws of sample_logits per row of ROWS (the rows interleaved in one batch)."""
    logits = jnp.asarray(np.tile(ROWS, (N, 1)), jnp.float32)
    tokens = np.asarray(sample_logits(logits, jax.random.key(seed), **kw)).reshape(N, len(ROWS))
    return np.stack([np.bincount(tokens[:, r], minlength=ROWS.shape[1]) for r in range(len(ROWS))])


def consistent(counts, q) -> bool:
    """N draws `counts` [V] could come from q [V]: none outside q's support, and total variation at
    most 0.5*sqrt(|support| / N) (a bound on its mean) + 0.02 (McDiarmid: P(exceeded) < e^-32)."""
    if counts[q == 0].any():
        return False
    tv = 0.5 * np.abs(counts / counts.sum() - q).sum()
    return tv <= 0.5 * np.sqrt((q > 0).sum() / counts.sum()) + 0.02


CASES = {  # name: (sampling settings, {bug: its distribution's settings})
    "temperature": (dict(temperature=0.6), {"no temperature": dict(temperature=1.0)}),
    "top_k": (dict(temperature=0.8, top_k=3),
              {"k + 1": dict(temperature=0.8, top_k=4), "temperature after top-k": dict(temperature=1.0, top_k=3)}),
    "top_p": (dict(temperature=1.4, top_p=0.7),
              {"nucleus + 1": dict(temperature=1.4, top_p=0.7, nucleus_extra=1),
               "nucleus at temperature 1": dict(temperature=1.0, top_p=0.7)}),
    "top_k_then_top_p": (dict(temperature=1.0, top_k=4, top_p=0.6),
                         {"top-p before top-k": dict(temperature=1.0, top_k=4, top_p=0.6, p_before_k=True),
                          "top-k ignored": dict(temperature=1.0, top_p=0.6)}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_samples_follow_the_reference_distribution(case):
    settings, bugs = CASES[case]
    counts = draw(seed=sorted(CASES).index(case), **settings)
    refs = [reference(row, **settings) for row in ROWS]
    for r in range(len(ROWS)):
        assert consistent(counts[r], refs[r]), (case, r, counts[r] / N, refs[r])
    # the check has the power to fail: the bugs' distributions are rejected on the same counts
    for bug, wrong in bugs.items():
        assert not all(consistent(counts[r], reference(ROWS[r], **wrong)) for r in range(len(ROWS))), bug


def test_temperature_zero_is_argmax():
    logits = jnp.asarray(ROWS, jnp.float32)
    np.testing.assert_array_equal(sample_logits(logits, jax.random.key(0), temperature=0.0), ROWS.argmax(-1))
