"""Speculative decoding's pure pieces (engine/speculative.py): n-gram proposals, and
verification that keeps greedy tokens identical and the sampled distribution the target's.

The distribution tests are chi-square goodness-of-fit tests over a 6-token vocabulary with
fixed seeds: the statistic is compared with the 0.999 quantile of the chi-square law, so a
correct implementation fails about once in a thousand seeds, and a wrong one (e.g. emitting
the draft's distribution, or forgetting the residual) fails by orders of magnitude.
"""

from __future__ import annotations

import pytest
import torch

from shardlm.engine.speculative import ngram_propose, verify_greedy, verify_random

V = 6
SAMPLES = 20_000
# 0.999 quantile of the chi-square distribution with V − 1 = 5 degrees of freedom.
CHI2_5_999 = 20.515


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token with probability 0 came out"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_ngram_proposes_what_followed_the_latest_earlier_occurrence():
    tokens = [1, 2, 3, 4, 9, 1, 2, 3, 5, 7, 1, 2, 3]
    # Suffix [1, 2, 3] occurred at 0 and 5; the latest is followed by 5, 7, 1.
    assert ngram_propose(tokens, k=3, max_n=3) == [5, 7, 1]
    assert ngram_propose(tokens, k=10, max_n=3) == [5, 7, 1, 2, 3]  # up to the end
    # Longer suffixes first: [9, 1, 2, 3] does not recur, so n = 3 decides.
    assert ngram_propose(tokens, k=2, max_n=4, min_n=2) == [5, 7]
    assert ngram_propose([4, 5, 6], k=2, max_n=2) == []  # nothing recurs
    assert ngram_propose([8], k=2, max_n=2) == []
    assert ngram_propose([3, 3], k=2, max_n=2) == [3]  # n = 1: the first 3 is followed by 3
    with pytest.raises(ValueError, match="min_n"):
        ngram_propose(tokens, k=2, max_n=1, min_n=2)


def test_greedy_verification_gives_the_tokens_of_plain_greedy_decoding():
    argmax = torch.tensor([[4, 2, 7, 1], [4, 2, 7, 1], [0, 0, 0, 0], [5, 5, 5, 5]])
    drafts = [[4, 2, 7], [4, 3, 7], [1, 1, 1], [5]]
    got = verify_greedy(argmax, drafts)
    assert got.tokens == [[4, 2, 7, 1], [4, 2], [0], [5, 5]]
    assert got.accepted == [3, 1, 0, 1]


def random_probs(g: torch.Generator, *shape: int) -> torch.Tensor:
    x = torch.rand(*shape, V, generator=g) ** 3  # uneven, some tokens nearly impossible
    return x / x.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("draft", ["model", "ngram"])
def test_random_verification_samples_the_target_distribution(draft):
    """First emitted token ~ p_1 whatever the draft; the second, among samples whose first
    token is the first draft (so p_2 is the right conditional), ~ p_2."""
    g = torch.Generator().manual_seed(11)
    k = 2
    p = random_probs(g, k + 1)  # the target at draft positions 1, 2 and the bonus
    q = random_probs(g, k)
    # n-gram drafts: a likely first token (so the second position is reached often enough
    # for its test) and an unlikely second one (mostly rejected: the residual at work).
    fixed = [int(p[0].argmax()), int(p[1].argmin())]
    first, second = torch.zeros(V), torch.zeros(V)
    gen = torch.Generator().manual_seed(5)
    accepted = 0
    for _ in range(SAMPLES):
        if draft == "model":
            x = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(k)]
            out = verify_random(p[None], [x], [gen], q[None])
        else:
            x = fixed
            out = verify_random(p[None], [x], [gen])
        tokens = out.tokens[0]
        assert tokens[: out.accepted[0]] == x[: out.accepted[0]]
        assert len(tokens) == out.accepted[0] + 1
        first[tokens[0]] += 1
        if tokens[0] == x[0] and len(tokens) > 1:
            second[tokens[1]] += 1
        accepted += out.accepted[0]
    assert chi_square(first, p[0]) < CHI2_5_999
    assert chi_square(second, p[1]) < CHI2_5_999
    assert accepted > 0


def test_emitting_the_drafts_distribution_would_fail_the_check():
    """The test can fail: samples of q instead of p are far off."""
    g = torch.Generator().manual_seed(11)
    p, q = random_probs(g, 1)[0], random_probs(g, 1)[0]
    counts = torch.bincount(
        torch.multinomial(q, SAMPLES, replacement=True, generator=g), minlength=V
    ).float()
    assert chi_square(counts, p) > 10 * CHI2_5_999


def test_seeded_rows_are_reproducible_and_independent_of_their_neighbours():
    g = torch.Generator().manual_seed(2)
    p = random_probs(g, 3, 4)
    drafts = [[1, 2, 3], [0, 0, 0], [5, 4, 3]]

    def run(order):
        gens = [torch.Generator().manual_seed(100 + i) for i in order]
        out = verify_random(p[order], [drafts[i] for i in order], gens)
        return dict(zip(order, out.tokens, strict=True))

    assert run([0, 1, 2]) == run([2, 0, 1]) == run([0, 1, 2])


def test_a_certain_draft_is_always_accepted_and_an_impossible_one_never():
    p = torch.zeros(1, 3, V)
    p[0, 0, 2] = 1.0  # position 1: token 2 for sure
    p[0, 1, :] = 1.0 / V
    p[0, 1, 4] = 0.0  # position 2: token 4 impossible
    p[0, 2, :] = 1.0 / V
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        out = verify_random(p, [[2, 4]], [gen])
        assert out.accepted == [1] and out.tokens[0][0] == 2 and out.tokens[0][1] != 4
