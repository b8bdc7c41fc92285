"""The batched sampler against a straightforward per-row reference (the previous algorithm).

Distribution checks draw many samples from a 16-token vocabulary in one mixed batch (one row
per draw, rows of different configurations interleaved) and bound the L1 distance between
empirical and reference frequencies with the Weissman et al. (2003) inequality
P(||p_hat - p||_1 >= eps) <= (2^V - 2) exp(-n eps^2 / 2): with V = 16, n draws and a false
alarm rate of 1e-9 per configuration, eps = sqrt(2 (V ln 2 + ln 1e9) / n). Tokens the
reference gives probability 0 must never be drawn. Each configuration also checks that its
reference differs from plain softmax sampling by more than 2 eps, so a sampler that ignored
the feature would fail.

Every test runs with the NumPy backend (CPU: unseeded top-p rows without top-k or min-p are
drawn by rejection, raising the pivot round after round), with NumPy and tiny block/candidate
sizes and one rejection round (forcing the two-level CDF, the top-p full-sort fallback of the
candidates and the rejection draw's own sort fallback), and with the torch backend (the path
other devices take), on CPU tensors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mistral_serve.engine import sampler
from mistral_serve.engine.sampler import _top_k_top_p, sample
from mistral_serve.engine.sampling_params import SamplingParams
from mistral_serve.engine.sequence import Sequence

V = 16
DRAWS = 12000
SEEDED_DRAWS = 5000  # one generator each: slower per draw


def l1_bound(n: int) -> float:
    return math.sqrt(2 * (V * math.log(2) + math.log(1e9)) / n)


EPS = l1_bound(DRAWS)  # ~0.073


@pytest.fixture(params=["numpy", "numpy-small-blocks", "torch"])
def backend(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(sampler, "_backend_for", lambda device: sampler._TorchBackend(device))
    elif request.param == "numpy-small-blocks":
        monkeypatch.setattr(sampler._NumpyBackend, "_CDF_BLOCK", 4)
        monkeypatch.setattr(sampler._NumpyBackend, "_NUCLEUS_CANDIDATES", 4)
        monkeypatch.setattr(sampler._NumpyBackend, "_REJECTION_ROUNDS", 1)
    return request.param


def make_seq(params: SamplingParams, prompt: list[int], output: list[int] = (), rid: str = "r") -> Sequence:
    seq = Sequence(rid, list(prompt), params, (0,), None)
    seq.token_ids.extend(output)
    return seq


def reference_distribution(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """The old per-row algorithm, in float64: penalties, min_tokens, temperature, top-k,
    top-p, softmax, min-p. Returns the probabilities of the next token."""
    p = seq.params
    x = logits.double().clone()
    if p.repetition_penalty != 1.0:
        for t in set(seq.token_ids):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
        counts = torch.bincount(torch.tensor(seq.output_token_ids), minlength=len(x)).double()
        x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).double()
    if seq.num_output_tokens < p.min_tokens:
        for t in seq.stop_ids:
            x[t] = float("-inf")
    if p.greedy:
        return torch.nn.functional.one_hot(x.argmax(), len(x)).double()
    x = x / p.temperature
    order = x.argsort(descending=True).tolist()
    kept = order[: p.top_k] if p.top_k > 0 else order
    probs_k = torch.softmax(x[kept], dim=0)
    before = 0.0
    nucleus = []
    for tok, q in zip(kept, probs_k.tolist()):
        if before >= p.top_p:
            break
        assert p.top_p >= 1.0 or abs(before - p.top_p) > 1e-4, "nucleus boundary too close to call; pick other logits"
        nucleus.append(tok)
        before += q
    masked = torch.full_like(x, float("-inf"))
    masked[nucleus] = x[nucleus]
    probs = torch.softmax(masked, dim=0)
    if p.min_p > 0:
        thr = p.min_p * probs.max()
        assert ((probs - thr).abs() > 1e-6).all(), "min_p boundary too close to call"
        probs = torch.where(probs < thr, 0.0, probs)
        probs = probs / probs.sum()
    return probs


def l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().sum())


def plain(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.double(), dim=0)


CONFIGS = {
    "temperature 0.5": dict(temperature=0.5),
    "temperature 1.6 top_k 3": dict(temperature=1.6, top_k=3),
    "top_p 0.6": dict(temperature=1.0, top_p=0.6),
    "temperature 0.8 top_k 6 top_p 0.7": dict(temperature=0.8, top_k=6, top_p=0.7),
    "min_p 0.25": dict(temperature=1.0, min_p=0.25),
    "repetition penalty": dict(temperature=1.0, repetition_penalty=3.0),
    "presence/frequency penalties": dict(temperature=1.0, frequency_penalty=0.6, presence_penalty=0.8),
    "all penalties top_p": dict(temperature=1.0, top_p=0.9, repetition_penalty=1.5, frequency_penalty=0.3,
                                presence_penalty=0.2),
    "min_tokens": dict(temperature=0.9, min_tokens=8, stop_token_ids=[3, 4]),
}
PROMPT = [5, 6, 6, 7, 9]
OUTPUT = [6, 9, 9, 9, 11, 12]


# (stop-id boost, repeated-token boost) where the default (2, 2.5) leaves a feature weak
BOOSTS = {"repetition penalty": (2.0, 3.5), "min_tokens": (3.0, 0.0)}


def config_logits(i: int, name: str = "") -> torch.Tensor:
    x = torch.randn(V, generator=torch.Generator().manual_seed(100 + i)) * 1.5
    stop_boost, repeat_boost = BOOSTS.get(name, (2.0, 2.5))
    x[[3, 4]] += stop_boost  # stop ids likely, so min_tokens matters
    x[[6, 9, 11]] += repeat_boost  # repeated tokens likely, so penalties matter
    return x


def test_distributions_match_reference_in_one_mixed_batch(backend):
    torch.manual_seed(0)
    names = list(CONFIGS)
    seqs_by_cfg = [make_seq(SamplingParams(max_tokens=50, **CONFIGS[n]), PROMPT, OUTPUT, rid=n) for n in names]
    seqs_by_cfg.append(make_seq(SamplingParams(temperature=0, repetition_penalty=1.8), PROMPT, OUTPUT, rid="greedy"))
    rows_logits = [config_logits(i, n) for i, n in enumerate(names + ["greedy"])]
    refs = [reference_distribution(rows_logits[i], s) for i, s in enumerate(seqs_by_cfg)]
    for name, ref, x in zip(names, refs, rows_logits):
        assert l1(ref, plain(x)) > 2 * EPS, f"{name}: the feature barely changes the distribution"

    # rows interleaved: config c at rows c, c + C, c + 2C, ...
    cfg_of_row = np.tile(np.arange(len(seqs_by_cfg)), DRAWS)
    logits = torch.stack([rows_logits[c] for c in cfg_of_row])
    seqs = [seqs_by_cfg[c] for c in cfg_of_row]
    out = np.asarray(sample(logits, seqs).token_ids)
    for c, (name, ref) in enumerate(zip(names + ["greedy"], refs)):
        drawn = out[cfg_of_row == c]
        freq = torch.from_numpy(np.bincount(drawn, minlength=V) / len(drawn))
        assert (freq[ref == 0] == 0).all(), f"{name}: drew a token of probability 0"
        assert l1(freq, ref) < EPS, f"{name}: L1 {l1(freq, ref):.3f} >= {EPS:.3f}"
    assert (out[cfg_of_row == len(names)] == int(refs[-1].argmax())).all()


def test_seeded_draws_follow_the_distribution(backend):
    """One seeded request per row, each its own generator: the exponential race's samples
    over many seeds have the reference distribution."""
    eps = l1_bound(SEEDED_DRAWS)
    params = [SamplingParams(temperature=0.7, top_p=0.9, seed=s) for s in range(SEEDED_DRAWS)]
    x = config_logits(50)
    seqs = [make_seq(p, PROMPT, rid=str(i)) for i, p in enumerate(params)]
    out = np.asarray(sample(x.repeat(SEEDED_DRAWS, 1), seqs).token_ids)
    ref = reference_distribution(x, seqs[0])
    assert l1(ref, plain(x)) > 2 * eps
    freq = torch.from_numpy(np.bincount(out, minlength=V) / SEEDED_DRAWS)
    assert (freq[ref == 0] == 0).all() and l1(freq, ref) < eps


def _run_steps(target: Sequence, others: list[Sequence], position: int, steps: int, vocab: int) -> list[int]:
    gen = torch.Generator().manual_seed(5)
    got = []
    for _ in range(steps):
        batch = others[:position] + [target] + others[position:]
        logits = torch.randn(len(batch), vocab, generator=gen) * 2
        target_logits = torch.randn(vocab, generator=torch.Generator().manual_seed(1000 + len(got))) * 2
        logits[position] = target_logits
        res = sample(logits, batch)
        for s, t in zip(batch, res.token_ids):
            s.token_ids.append(t)
        got.append(res.token_ids[position])
    return got


def test_seeded_request_is_reproducible_across_batch_mixes(backend):
    vocab = 512
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=100, min_p=0.01, repetition_penalty=1.3,
                            frequency_penalty=0.5, seed=1234)
    alone = _run_steps(make_seq(params, [1, 2, 3]), [], 0, 12, vocab)
    mixes = [
        [make_seq(SamplingParams(temperature=0.7), [4], rid="u")] * 5,
        [make_seq(SamplingParams(temperature=0.0, logprobs=3), [4], rid="g"),
         make_seq(SamplingParams(temperature=1.2, seed=9, top_p=0.5), [4], rid="s"),
         make_seq(SamplingParams(temperature=0.9, top_k=7, presence_penalty=1.0), [4, 5], rid="k")],
    ]
    for others in mixes:
        for position in (0, len(others)):
            assert _run_steps(make_seq(params, [1, 2, 3]), others, position, 12, vocab) == alone
    other_seed = SamplingParams(**{**params.__dict__, "seed": 99})
    assert _run_steps(make_seq(other_seed, [1, 2, 3]), [], 0, 12, vocab) != alone


def test_logprobs_are_raw_log_softmax(backend):
    vocab = 300
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(3)) * 2
    params = [
        SamplingParams(temperature=0, logprobs=5),
        SamplingParams(temperature=0.5, top_p=0.8, logprobs=0, repetition_penalty=2.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.3, top_k=4, logprobs=20, frequency_penalty=1.0, seed=3),
        SamplingParams(temperature=0, logprobs=1, min_tokens=3, stop_token_ids=[int(logits[4].argmax())]),
        SamplingParams(temperature=0.8, logprobs=3),
    ]
    seqs = [make_seq(p, [1, 2, 2, 7], [7, 8], rid=str(i)) for i, p in enumerate(params)]
    ref = torch.log_softmax(logits.double(), dim=-1)
    res = sample(logits.clone(), seqs)
    for row, (p, entry) in enumerate(zip(params, res.logprobs)):
        if p.logprobs is None:
            assert entry is None
            continue
        chosen = res.token_ids[row]
        assert next(iter(entry)) == chosen  # the chosen token comes first
        want = {chosen} | set(ref[row].topk(p.logprobs).indices.tolist()) if p.logprobs else {chosen}
        assert set(entry) == want
        for tid, lp in entry.items():
            assert math.isclose(lp, float(ref[row, tid]), abs_tol=1e-5)
    # min_tokens suppressed the raw argmax for the greedy row 4, but its logprob is still raw
    assert res.token_ids[4] != int(logits[4].argmax())


def test_batched_filters_match_the_sort_and_scatter_reference(backend):
    """top-k / top-p masks of the batched path equal the reference mask row by row (random
    logits, no ties), whatever else is in the batch."""
    gen = torch.Generator().manual_seed(4)
    vocab = 2048
    logits = torch.randn(12, vocab, generator=gen) * torch.tensor([0.3, 1, 3, 6] * 3)[:, None]
    top_k = [0, 0, 0, 5, 40, 0, 1, 0, 1500, 0, 2047, 0]
    top_p = [0.9, 0.5, 0.99, 1.0, 0.8, 1.0, 0.3, 0.999, 0.9, 0.2, 1.0, 1.0]
    be = sampler._backend_for(logits.device)
    x = logits.clone()
    arr = be.array(x)
    sampler._top_k_top_p_rows(be, arr, top_k, top_p, [False] * len(top_k))  # exact masks, none deferred
    got = torch.isfinite(torch.as_tensor(np.asarray(arr)) if not isinstance(arr, torch.Tensor) else arr)
    want = torch.isfinite(_top_k_top_p(logits.clone(), top_k, top_p))
    for row in range(len(top_k)):
        if top_p[row] >= 1.0 and top_k[row] == 0:
            assert got[row].all()
        else:
            assert torch.equal(got[row], want[row]), row


def test_penalty_state_tracks_appended_tokens():
    params = SamplingParams(repetition_penalty=1.2, frequency_penalty=0.5)
    seq = make_seq(params, [3, 3, 5, 1, 2, 3, 4, 4, 9, 10], [5])
    st = seq.penalty_state(16)
    rng = np.random.default_rng(0)
    for _ in range(30):
        seq.token_ids.extend(rng.integers(0, 16, rng.integers(1, 3)).tolist())
        st = seq.penalty_state(16)
        assert st.seen.tolist() == [t in set(seq.token_ids) for t in range(16)]
        assert st.output_counts.tolist() == np.bincount(seq.output_token_ids, minlength=16).tolist()
    assert seq.penalty_state(16) is st  # kept, not rebuilt
    assert make_seq(SamplingParams(presence_penalty=1.0), [1]).penalty_state(16).seen is None


def test_flat_rows_are_drawn_by_rejection_from_their_nucleus():
    """A flat distribution over 32K tokens (a random-weight model's), whose top-p cut the
    1,024 candidates could not settle: unseeded rows get no cut (no selection, no sort) and
    are drawn by rejection. Each draw lies in the exact nucleus (the sort-and-scatter
    reference), and the draws cover it as a distribution restricted to the nucleus would
    (mean probability)."""
    vocab, rows = 32768, 64
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(rows, vocab, generator=gen) * 0.5
    be = sampler._NumpyBackend()
    top_p = [0.9] * rows
    cut, deferred = be.nucleus_cutoff(logits.numpy().copy(), [vocab] * rows, top_p, [True] * rows)
    assert deferred == list(range(rows)), "unseeded top-p rows should be deferred to the rejection draw"
    assert np.isneginf(cut).all(), "a deferred row is not cut"
    nucleus = torch.isfinite(_top_k_top_p(logits.clone(), [0] * rows, top_p))
    seqs = [make_seq(SamplingParams(temperature=1.0, top_p=0.9), [1], rid=str(i)) for i in range(rows)]
    inside = 0
    for _ in range(20):
        res = sample(logits.clone(), seqs)
        inside += sum(bool(nucleus[r, t]) for r, t in enumerate(res.token_ids))
    assert inside == 20 * rows, "a draw fell outside its row's nucleus"
    # ~10% of the mass lies outside each nucleus: a draw that skipped the test would have
    # landed outside ~128 times above.
    probs = torch.softmax(logits.double(), dim=-1)
    assert 0.05 < float((probs * ~nucleus).sum(dim=-1).mean()) < 0.15
