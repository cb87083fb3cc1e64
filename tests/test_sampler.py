"""The batched sampler: greedy exactness, per-row reproducibility, distributions, filters,
penalties and logprobs, each checked against an independent definition."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from shardlm.engine.sampler import SamplingRow, apply_penalties, sample
from shardlm.engine.sampling_params import SamplingParams


def make_row(
    params: SamplingParams,
    generator: torch.Generator | None = None,
    prompt: tuple[int, ...] | list[int] = (),
    output: tuple[int, ...] | list[int] = (),
) -> SamplingRow:
    if generator is None:
        generator = torch.Generator().manual_seed(params.seed if params.seed is not None else 0)
    return SamplingRow(params, generator, list(prompt), list(output))


def test_greedy_is_argmax_and_top_k_one_is_greedy():
    torch.manual_seed(0)
    logits = torch.randn(16, 500) * 3
    shared = torch.Generator().manual_seed(1)
    kinds = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.5, top_k=1, top_p=0.3, min_p=0.2),
        SamplingParams(temperature=0.0, top_p=0.1),
    ]
    rows = [make_row(kinds[i % len(kinds)], shared) for i in range(16)]
    out = sample(logits, rows)
    assert out.token_ids.dtype == torch.int64
    assert out.token_ids.shape == (16,)
    assert torch.equal(out.token_ids, torch.argmax(logits, dim=-1))
    assert out.logprobs == [None] * 16
    # Exact ties too: top_k=1 is argmax (first maximal id), not "draw among the tied".
    tied = torch.tensor([1.0, 1.0, 0.0]).expand(200, -1)
    out = sample(tied, [make_row(SamplingParams(temperature=1.0, top_k=1), shared)] * 200)
    assert torch.equal(out.token_ids, torch.argmax(tied, dim=-1))
    one = sample(logits[3:4], [make_row(SamplingParams(temperature=1.0, top_k=1))])
    assert torch.equal(one.token_ids, torch.argmax(logits[3:4], dim=-1))


def test_greedy_rows_in_a_sampling_batch_stay_argmax():
    torch.manual_seed(1)
    logits = torch.randn(9, 300)
    shared = torch.Generator().manual_seed(0)
    rows = [
        make_row(SamplingParams(temperature=0.0 if i % 3 == 0 else 1.0, top_p=0.9), shared)
        for i in range(9)
    ]
    out = sample(logits, rows)
    assert torch.equal(out.token_ids[::3], logits[::3].argmax(dim=-1))


def test_input_logits_are_not_modified():
    torch.manual_seed(2)
    logits = torch.randn(4, 100)
    before = logits.clone()
    params = SamplingParams(
        temperature=0.7,
        top_k=10,
        top_p=0.8,
        min_p=0.1,
        repetition_penalty=1.3,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logprobs=3,
    )
    sample(logits, [make_row(params, prompt=[1, 2, 3], output=[4, 4, 5]) for _ in range(4)])
    assert torch.equal(logits, before)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="logits"):
        sample(torch.zeros(3, 10), [make_row(SamplingParams())])


TARGETS = {
    "plain": SamplingParams(temperature=0.8, seed=7),
    "filtered-penalised": SamplingParams(
        temperature=1.1,
        top_k=50,
        top_p=0.9,
        min_p=0.02,
        repetition_penalty=1.2,
        presence_penalty=0.3,
        frequency_penalty=0.2,
        seed=7,
    ),
}


@pytest.mark.parametrize("target", TARGETS.values(), ids=TARGETS.keys())
def test_seeded_row_is_independent_of_its_batch(target: SamplingParams):
    vocab, steps = 2000, 20
    gen = torch.Generator().manual_seed(123)
    target_logits = [torch.randn(vocab, generator=gen) * 2 for _ in range(steps)]
    prompt = [5, 6, 7, 8]

    alone_gen = torch.Generator().manual_seed(7)
    alone: list[int] = []
    for step in range(steps):
        row = make_row(target, alone_gen, prompt, alone)
        alone.append(int(sample(target_logits[step].unsqueeze(0), [row]).token_ids[0]))
    assert len(set(alone)) > 5  # really sampling, or the comparison below proves nothing

    # Same request, now among neighbours of every kind, at a different position each step.
    batch_gen = torch.Generator().manual_seed(7)
    other_seeded = torch.Generator().manual_seed(99)
    shared = torch.Generator().manual_seed(0)
    neighbours = [
        lambda out: make_row(SamplingParams(temperature=1.0, seed=99), other_seeded),
        lambda out: make_row(SamplingParams(temperature=0.0), shared),
        lambda out: make_row(SamplingParams(temperature=0.9, top_p=0.5), shared),
        lambda out: make_row(
            SamplingParams(temperature=1.3, top_k=5, repetition_penalty=1.5, frequency_penalty=1.0),
            shared,
            prompt=[1, 2],
            output=out,
        ),
        lambda out: make_row(SamplingParams(temperature=0.6, min_p=0.3, logprobs=2), shared),
    ]
    batched: list[int] = []
    noise = torch.Generator().manual_seed(555)
    for step in range(steps):
        n = 2 + step % 5
        pos = step % n
        logits = torch.randn(n, vocab, generator=noise) * 3
        logits[pos] = target_logits[step]
        rows = [neighbours[(step + j) % len(neighbours)](batched) for j in range(n)]
        rows[pos] = make_row(target, batch_gen, prompt, batched)
        batched.append(int(sample(logits, rows).token_ids[pos]))
    assert batched == alone


def test_rows_sharing_a_generator_get_different_draws():
    shared = torch.Generator().manual_seed(3)
    logits = torch.zeros(64, 1000)
    rows = [make_row(SamplingParams(temperature=1.0), shared) for _ in range(64)]
    first = sample(logits, rows).token_ids
    second = sample(logits, rows).token_ids
    assert len(set(first.tolist())) > 50
    assert not torch.equal(first, second)  # the shared generator advanced


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("own_generators", [False, True])
def test_empirical_distribution_matches_softmax(temperature: float, own_generators: bool):
    draws = 4000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    expected = torch.softmax(logits / temperature, dim=-1)
    params = SamplingParams(temperature=temperature)
    if own_generators:
        rows = [make_row(params, torch.Generator().manual_seed(i)) for i in range(draws)]
    else:
        shared = torch.Generator().manual_seed(11)
        rows = [make_row(params, shared) for _ in range(draws)]
    tokens = sample(logits.expand(draws, -1), rows).token_ids
    freq = torch.bincount(tokens, minlength=5).double() / draws
    # Within 4 standard deviations of a binomial proportion (the seed is fixed, so no flakes).
    tol = 4 * torch.sqrt(expected.double() * (1 - expected.double()) / draws) + 1e-3
    assert torch.all((freq - expected.double()).abs() <= tol), (freq, expected)


# Probabilities deliberately not sorted by id, so a sort/scatter mix-up shows.
# By probability: id 1 0.40, id 3 0.25, id 5 0.15, id 2 0.10, id 0 0.06, id 4 0.04.
PROBS = [0.06, 0.40, 0.10, 0.25, 0.04, 0.15]
FILTER_CASES = [
    (SamplingParams(), {0, 1, 2, 3, 4, 5}),
    (SamplingParams(top_k=3), {1, 3, 5}),
    (SamplingParams(top_p=0.75), {1, 3, 5}),  # mass before id 2 is 0.8
    (SamplingParams(top_p=0.5), {1, 3}),  # mass before id 5 is 0.65
    (SamplingParams(top_p=0.3), {1}),  # the top token is always kept
    (SamplingParams(min_p=0.3), {1, 3, 5}),  # threshold 0.12
    (SamplingParams(min_p=0.2), {1, 3, 5, 2}),  # threshold 0.08
    # top_k renormalises first: 0.4, 0.25, 0.15, 0.1 over 0.9 → mass before id 5 is 0.72.
    (SamplingParams(top_k=4, top_p=0.7), {1, 3}),
    (SamplingParams(top_p=0.7), {1, 3, 5}),  # without top_k that mass is 0.65
    # Temperature comes first: at T=2 probs ∝ √p, mass before id 5 is 0.50, before id 2 0.67.
    (SamplingParams(temperature=2.0, top_p=0.6), {1, 3, 5}),
    (SamplingParams(top_p=0.6), {1, 3}),
    # At T=2 the threshold is 0.45 × 0.277 = 0.125 (id 2 has 0.139); at T=1 it is 0.18.
    (SamplingParams(temperature=2.0, min_p=0.45), {1, 3, 5, 2}),
    (SamplingParams(min_p=0.45), {1, 3}),
]


def test_filters_remove_exactly_the_right_tokens():
    per_case = 1500
    logits = torch.log(torch.tensor(PROBS))
    shared = torch.Generator().manual_seed(5)
    # All cases interleaved in one batch: each row must use its own settings.
    rows = [
        make_row(FILTER_CASES[i % len(FILTER_CASES)][0], shared)
        for i in range(per_case * len(FILTER_CASES))
    ]
    tokens = sample(logits.expand(len(rows), -1), rows).token_ids
    for c, (params, kept) in enumerate(FILTER_CASES):
        drawn = set(tokens[c :: len(FILTER_CASES)].tolist())
        assert drawn == kept, (params, drawn, kept)


def test_top_k_keeps_tokens_tied_with_the_kth():
    logits = torch.tensor([1.0, 0.0, 1.0, 1.0, -1.0])
    shared = torch.Generator().manual_seed(0)
    rows = [make_row(SamplingParams(top_k=2), shared) for _ in range(600)]
    assert set(sample(logits.expand(600, -1), rows).token_ids.tolist()) == {0, 2, 3}


def naive_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    out = logits.clone()
    for i, row in enumerate(rows):
        p = row.params
        for t in set(row.prompt_ids) | set(row.output_ids):
            v = out[i, t].item()
            out[i, t] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
        for t, count in Counter(row.output_ids).items():
            out[i, t] -= p.presence_penalty + p.frequency_penalty * count
    return out


def test_apply_penalties_matches_naive_definition():
    vocab = 50
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(7, vocab, generator=gen) * 3
    ids = lambda n: torch.randint(0, vocab, (n,), generator=gen).tolist()  # noqa: E731
    settings = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(),  # no penalties: must come back untouched
        SamplingParams(presence_penalty=0.7),
        SamplingParams(frequency_penalty=-0.4, temperature=0.0),
        SamplingParams(repetition_penalty=0.8, presence_penalty=-1.0, frequency_penalty=1.5),
        SamplingParams(repetition_penalty=1.7, frequency_penalty=0.3),
        SamplingParams(repetition_penalty=2.0),
    ]
    rows = [make_row(p, prompt=ids(30), output=ids(40)) for p in settings]
    rows[-1].output_ids = []  # a penalised row with nothing generated yet
    before = logits.clone()
    got = apply_penalties(logits, rows)
    torch.testing.assert_close(got, naive_penalties(logits, rows), rtol=1e-6, atol=1e-6)
    assert torch.equal(got[1], logits[1])
    assert torch.equal(logits, before)
    assert not torch.equal(got[0], logits[0])

    plain = [make_row(SamplingParams(), output=ids(5)) for _ in range(7)]
    assert apply_penalties(logits, plain) is logits


def test_penalties_change_greedy_picks_as_defined():
    greedy = dict(temperature=0.0)
    cases = [
        # (logits, params, prompt, output, expected token)
        ([3.0, 2.5, 0.0], dict(repetition_penalty=1.5), [0], [], 1),  # 3 / 1.5 = 2 < 2.5
        ([3.0, 2.5, 0.0], dict(repetition_penalty=1.1), [0], [], 0),  # 2.73 > 2.5
        ([-1.0, -1.2, -5.0], dict(repetition_penalty=1.5), [], [0], 1),  # negative: × 1.5
        ([2.0, 1.9, 0.0], dict(presence_penalty=0.2), [], [0, 0, 0], 1),
        ([2.0, 1.9, 0.0], dict(presence_penalty=0.05), [], [0, 0, 0], 0),  # once, not per count
        ([2.0, 1.9, 0.0], dict(presence_penalty=2.0), [0], [], 0),  # the prompt does not count
        ([2.0, 1.5, 0.0], dict(frequency_penalty=0.2), [], [0, 0, 0], 1),  # 2 - 0.6
        ([2.0, 1.5, 0.0], dict(frequency_penalty=0.2), [], [0], 0),  # 2 - 0.2
        ([2.0, 1.5, 0.0], dict(frequency_penalty=0.2), [0, 0, 0, 0], [], 0),
        ([1.0, 1.5, 0.0], dict(presence_penalty=-1.0), [], [0], 0),  # negative rewards
    ]
    logits = torch.tensor([c[0] for c in cases])
    rows = [make_row(SamplingParams(**greedy, **c[1]), prompt=c[2], output=c[3]) for c in cases]
    assert sample(logits, rows).token_ids.tolist() == [c[4] for c in cases]


def test_penalties_apply_to_sampled_rows():
    shared = torch.Generator().manual_seed(4)
    params = SamplingParams(temperature=1.0, frequency_penalty=2.0)
    rows = [make_row(params, shared, output=[0] * 10 + [1] * 10) for _ in range(1000)]
    tokens = sample(torch.zeros(1000, 4), rows).token_ids
    assert set(tokens.tolist()) == {2, 3}


def test_logprobs_are_raw_top_k_and_ranked():
    vocab = 200
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(7, vocab, generator=gen) * 2
    logits[3, 7], logits[3, 8] = 10.0, 9.0  # the penalty below moves the argmax from 7 to 8
    shared = torch.Generator().manual_seed(0)
    settings = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=1.0, logprobs=0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0, repetition_penalty=2.0, logprobs=3),
        SamplingParams(temperature=1.0, top_k=3, logprobs=20),
        SamplingParams(temperature=0.0, logprobs=1),
        SamplingParams(temperature=2.0, presence_penalty=1.0, logprobs=2),
    ]
    rows = [make_row(p, shared, prompt=[7], output=[1, 2]) for p in settings]
    out = sample(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    tokens = out.token_ids.tolist()
    assert tokens[3] == 8
    assert out.logprobs[2] is None

    for i, params in enumerate(settings):
        entry = out.logprobs[i]
        if params.logprobs is None:
            continue
        assert entry is not None
        top = set(torch.topk(raw[i], params.logprobs).indices.tolist())
        assert set(entry) == top | {tokens[i]}
        assert next(iter(entry)) == tokens[i]  # the sampled token comes first
        for tok, lp in entry.items():
            assert isinstance(lp.logprob, float)
            assert isinstance(lp.rank, int)
            assert abs(lp.logprob - raw[i, tok].item()) <= 1e-6
            assert lp.rank == int((raw[i] > raw[i, tok]).sum()) + 1
            assert lp.decoded_token is None
    assert out.logprobs[3][8].rank == 2
    assert out.logprobs[0][tokens[0]].rank == 1
    assert len(out.logprobs[1]) == 1


def test_logprob_ranks_with_ties():
    # Tied tokens share the rank "1 + how many are strictly more likely", in and out of the top k.
    logits = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, -1.0]])
    out = sample(logits, [make_row(SamplingParams(temperature=0.0, logprobs=5))])
    entry = out.logprobs[0]
    assert {t: lp.rank for t, lp in entry.items()} == {0: 1, 1: 1, 2: 3, 3: 3, 4: 3}
    assert math.isclose(entry[0].logprob, entry[1].logprob)
    out = sample(logits, [make_row(SamplingParams(temperature=0.0, logprobs=1))])
    entry = out.logprobs[0]
    assert 0 in entry and set(entry) <= {0, 1}  # which of a tie top-k picks is unspecified
    assert all(lp.rank == 1 for lp in entry.values())


@pytest.mark.parametrize("n", [1, 64])
def test_full_size_batches(n: int):
    vocab = 32000
    gen = torch.Generator().manual_seed(n)
    logits = torch.randn(n, vocab, generator=gen) * 4
    shared = torch.Generator().manual_seed(1)
    kinds = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=0.8, top_p=0.95, top_k=40),
        SamplingParams(temperature=1.0, min_p=0.05, seed=3, logprobs=0),
        SamplingParams(temperature=0.7, repetition_penalty=1.1, presence_penalty=0.5),
        SamplingParams(temperature=1.2),
    ]
    rows = []
    for i in range(n):
        params = kinds[i % len(kinds)]
        g = torch.Generator().manual_seed(params.seed) if params.seed is not None else shared
        prompt = torch.randint(0, vocab, (300,), generator=gen).tolist()
        output = torch.randint(0, vocab, (100,), generator=gen).tolist()
        rows.append(make_row(params, g, prompt, output))
    out = sample(logits, rows)
    assert out.token_ids.shape == (n,)
    assert out.token_ids.dtype == torch.int64
    assert int(out.token_ids.min()) >= 0 and int(out.token_ids.max()) < vocab
    assert torch.equal(out.token_ids[:: len(kinds)], logits[:: len(kinds)].argmax(dim=-1))
    for i, row in enumerate(rows):
        assert (out.logprobs[i] is None) == (row.params.logprobs is None)
        if row.params.top_k:
            # A top-k row's token is among its k largest (temperature keeps the order).
            assert int(out.token_ids[i]) in set(torch.topk(logits[i], 40).indices.tolist())
