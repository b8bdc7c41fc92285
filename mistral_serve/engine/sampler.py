"""Batched sampling with per-request parameters, without per-row tensor work.

One pass over ``seqs`` gathers every request's parameters into per-row columns; each stage
then runs once for the rows that asked for it (rows that do not use a feature skip it):

* penalties read each request's :class:`~mistral_serve.engine.sequence.PenaltyState`, a
  dense ``seen`` mask (repetition) and output-token counts (presence/frequency) that the
  sequence updates by one scalar write per appended token. Per step the penalised rows are
  stacked into one [N_pen, V] array and applied with a few vectorised ops. Dense beats
  keeping token-id tensors and scatter-adding them every step: that costs O(context) per
  row per step (1M adds at batch 64 with 16K contexts) where the dense form costs O(V)
  with no scatter, and the incremental update is O(1) per token.
* min_tokens: one indexed write of -inf at every (row, stop id) pair still suppressed.
* top-k (without top-p): the k-th largest value of each row from one partial selection
  with the batch's largest k (``torch.topk`` up to 64, else ``np.partition``), no sort;
  tokens below it are masked. top-p: unseeded rows without top-k or min-p (what chat
  clients send) are drawn by rejection on the CPU (``_NumpyBackend.nucleus_draw``), one
  inverse-CDF draw and one masked dot product per round, so no row is cut, sorted or
  masked; ~1.05 rounds on average at p = 0.95. The other top-p rows (and top-k with it)
  get their nucleus cut-off (the last token whose better tokens hold < p, after the row's
  top-k) from 1024 candidates of a partial selection, or a value sort of the rows that
  need it, found in sorted space and applied as a threshold, so no scatter back to vocab
  order. Exact ties with the cut-off value are all kept; rows with top_p == 1 no longer
  pass through the nucleus arithmetic.
* min-p: ``probs < min_p * max(probs)`` zeroed on the rows that set it.
* draws: a seeded request keeps the exponential race ``argmax(p / E)``, ``E ~ Exp(1)``, with
  its V uniforms per token drawn from its own generator (``E = -log(1 - U)``, the log
  vectorised over all seeded rows at once), so its tokens do not depend on the batch or on
  preemptions; the seeded rows' noise is one host buffer, copied to the device once. (The
  previous version called ``exponential_`` per row, ~10x slower per value on the CPU; the
  same seed therefore gives different, equally distributed, tokens than before.) Unseeded rows use one batched draw of one uniform per
  row from torch's global generator and inverse-CDF sampling (a float64 cumulative sum and
  a batched search): exact for the same categorical distribution, and ~V times fewer
  random numbers than the race (exponential draws of [64, 32768] cost ~100 ms on 2 cores).
* structured outputs: the rows with a grammar (engine/structured_output.py) get their
  allowed-token masks from one batched llguidance call and one masked write of -inf, after
  penalties and before any filtering or draw; their grammar, not min_tokens, decides where
  they end. Rows without a grammar are untouched, and a batch without any pays nothing more
  than the row scan.
* logprobs: raw log-probabilities (before penalties, temperature and filters, as vLLM) for
  the rows that asked, the chosen token's and the top-k with the batch's largest k, turned
  into Python once.

On the CPU the stages run in NumPy on zero-copy views: torch's CPU kernels on this kind of
machine (2-core Xeon, torch 2.13 CPU build) are several times slower for these shapes
(sort of [64, 32768]: 370 ms vs 22 ms; ``torch.where``: 90 ms vs 40 ms). The exceptions are
the passes over the whole [N, V] array that every sampled step makes: the softmax (torch's
fused kernel), the CDF's block sums and the repetition penalty run as torch's kernels on the
same memory (vectorised, on the intra-op threads; NumPy's run on one thread). 2-vCPU AMD
EPYC, batch 64, interleaved with the previous sampler
(``python -m mistral_serve.bench.sampler_bench``, ``docs/bench/sampler-rejection-cpu.json``):
temperature 0.8 1.5 -> 1.0 ms per step, + top-p 0.95 7.6 -> 3.1 (14.5 -> 2.9 on the flat
logits of the random-weight model), + repetition and frequency penalties at 16K context
24.0 -> 6.3, top-k 50 5.0 -> 4.0, greedy + 5 logprobs 7.4 -> 3.0.
Other devices run the same stages in torch (``_TorchBackend``; the tests run it on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mistral_serve.engine.sequence import Sequence
from mistral_serve.engine.structured_output import allowed_tokens


@dataclass
class SampleResult:
    token_ids: list[int]
    # Per row: {token id: logprob} for the chosen token and the top-k alternatives, or None.
    logprobs: list[dict[int, float] | None]


@torch.inference_mode()
def sample(logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
    """Choose one token per row of ``logits`` [N, V] (float32) for the matching ``seqs``.

    ``logits`` may be modified in place."""
    n, vocab = logits.shape
    params = [s.params for s in seqs]
    lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    pen_rows = [i for i, p in enumerate(params) if p.uses_penalties]
    min_tok_rows = [i for i, s in enumerate(seqs)
                    if s.num_output_tokens < s.params.min_tokens and s.stop_ids and s.grammar is None]
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    grammar_rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
    if not (lp_rows or pen_rows or min_tok_rows or sampled or grammar_rows):
        return SampleResult(argmax_rows(logits).tolist(), [None] * n)

    be = _backend_for(logits.device)
    x = be.array(logits)

    raw_lp = _raw_logprob_stats(be, x, lp_rows, min(max(params[i].logprobs for i in lp_rows), vocab)) if lp_rows else None
    if pen_rows:
        _apply_penalties(be, x, [seqs[i] for i in pen_rows], pen_rows, vocab)
    if min_tok_rows:
        rows = [r for r in min_tok_rows for _ in seqs[r].stop_ids]
        cols = [t for r in min_tok_rows for t in seqs[r].stop_ids]
        x[be.index(rows), be.index(cols)] = float("-inf")
    if grammar_rows:
        allowed = allowed_tokens([seqs[i].grammar for i in grammar_rows], vocab)
        be.mask_disallowed_(x, be.index(grammar_rows), allowed, len(grammar_rows) == n)

    chosen = be.argmax(x) if len(sampled) < n else None
    if sampled:
        picked = _sample_rows(be, x if len(sampled) == n else x[be.index(sampled)], [seqs[i] for i in sampled])
        if chosen is None:
            chosen = picked
        else:
            chosen[be.index(sampled)] = picked
    token_ids = be.tolist(chosen)

    logprobs: list[dict[int, float] | None] = [None] * n
    if raw_lp is not None:
        raw_rows, shift, top_vals, top_ids = raw_lp
        picked_vals = be.tolist(be.take_rows(raw_rows, be.index([token_ids[r] for r in lp_rows])) - shift[:, 0])
        if top_vals is not None:
            top_vals, top_ids = be.tolist(top_vals), be.tolist(top_ids)
        for j, row in enumerate(lp_rows):
            k = params[row].logprobs
            entry = {token_ids[row]: picked_vals[j]}
            if k:
                entry.update(zip(top_ids[j][:k], top_vals[j][:k]))
            logprobs[row] = entry
    return SampleResult(token_ids, logprobs)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's maximum (first one on ties, as ``torch.argmax``).

    On CPU this goes through NumPy: torch's CPU argmax over a 32K vocabulary is several
    times slower than NumPy's vectorised one (2.6 ms vs 0.45 ms for [64, 32768] float32 on
    2 cores), and greedy decoding runs it on every step."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.from_numpy(x.contiguous().numpy().argmax(axis=-1))
    return x.argmax(dim=-1)


# ---- stages -------------------------------------------------------------------------------


def _raw_logprob_stats(be, x, rows: list[int], kmax: int):
    """From the raw logits, before anything modifies them: the rows' raw logits (a copy),
    their log-sum-exp shift, and the top-``kmax`` raw logprobs (descending) with their ids."""
    raw = x[be.index(rows)]  # a copy: later stages write into x
    shift = be.logsumexp(raw)
    top_vals = top_ids = None
    if kmax:
        top_vals, top_ids = be.topk(raw, kmax)
        top_vals = top_vals - shift
    return raw, shift, top_vals, top_ids


def _apply_penalties(be, x, seqs: list[Sequence], rows: list[int], vocab: int) -> None:
    """OpenAI presence/frequency penalties over generated tokens; HF repetition penalty over
    prompt + generated tokens (positive logits divided, negative multiplied)."""
    states = [s.penalty_state(vocab) for s in seqs]
    rep = [j for j, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
    if rep:
        idx = be.index([rows[j] for j in rep])
        r = be.column([seqs[j].params.repetition_penalty for j in rep])
        seen = be.stack([states[j].seen for j in rep])
        if len(rep) == x.shape[0]:
            be.repetition_(x, seen, r)
        else:
            vals = x[idx]
            be.repetition_(vals, seen, r)
            x[idx] = vals
    pf = [j for j, s in enumerate(seqs)
          if (s.params.presence_penalty or s.params.frequency_penalty) and s.num_output_tokens]
    if pf:
        idx = be.index([rows[j] for j in pf])
        freq = be.column([seqs[j].params.frequency_penalty for j in pf])
        pres = be.column([seqs[j].params.presence_penalty for j in pf])
        counts = be.stack([states[j].output_counts for j in pf])
        penalty = freq * counts
        if any(seqs[j].params.presence_penalty for j in pf):
            penalty += pres * (counts > 0)
        if len(pf) == x.shape[0]:
            x -= penalty
        else:
            x[idx] -= penalty


def _sample_rows(be, x, seqs: list[Sequence]):
    """Temperature, top-k/top-p, min-p and one draw per row of ``x`` (may write into ``x``)."""
    params = [s.params for s in seqs]
    vocab = x.shape[1]
    x = be.div_(x, be.column([p.temperature for p in params]))
    # Unseeded top-p rows without top-k or min-p may be drawn by rejection (``nucleus_draw``),
    # unmasked, where the backend finds that cheaper than their cut.
    rejectable = [s.generator is None and p.min_p == 0 and not 0 < p.top_k < vocab for s, p in zip(seqs, params)]
    deferred = _top_k_top_p_rows(be, x, [p.top_k for p in params], [p.top_p for p in params], rejectable)
    probs = be.softmax(x)
    mp_rows = [j for j, p in enumerate(params) if p.min_p > 0]
    if mp_rows:
        idx = be.index(mp_rows)
        sub = probs[idx]
        thr = be.column([params[j].min_p for j in mp_rows]) * be.amax(sub)
        probs[idx] = be.where(sub < thr, 0.0, sub)

    seeded = [j for j, s in enumerate(seqs) if s.generator is not None]
    if not seeded:
        if not deferred:
            return be.inverse_cdf(probs)
        top_p = [params[j].top_p for j in deferred]
        if len(deferred) == len(seqs):
            return be.nucleus_draw(probs, top_p)
        chosen = be.zeros_long(len(seqs))
        idx = be.index(deferred)
        chosen[idx] = be.nucleus_draw(probs[idx], top_p)
        rest = be.index(sorted(set(range(len(seqs))) - set(deferred)))
        chosen[rest] = be.inverse_cdf(probs[rest])
        return chosen
    # E = -log(1 - U) with U ~ U[0, 1) from the request's own generator: torch.rand is ~10x
    # cheaper per value than exponential_ on the CPU, and the log runs vectorised once.
    uniform = torch.empty(len(seeded), vocab)
    for j, row in enumerate(seeded):
        torch.rand(vocab, generator=seqs[row].generator, out=uniform[j])
    noise = be.exponential_from_uniform(uniform)
    if len(seeded) == len(seqs):
        return be.argmax(probs / noise)
    chosen = be.zeros_long(len(seqs))
    idx = be.index(seeded)
    chosen[idx] = be.argmax(probs[idx] / noise)
    unseeded = be.index([j for j in range(len(seqs)) if seqs[j].generator is None])
    chosen[unseeded] = be.inverse_cdf(probs[unseeded])
    return chosen


def _top_k_top_p_rows(be, x, top_k: list[int], top_p: list[float], rejectable: list[bool]) -> list[int]:
    """Mask to -inf, in place, everything outside each row's top-k and top-p nucleus. Rows
    marked ``rejectable`` whose nucleus the backend could not settle cheaply are left unmasked
    and returned: the caller draws them by rejection."""
    vocab = x.shape[1]
    p_rows = [j for j, p in enumerate(top_p) if p < 1.0]
    k_rows = [j for j, k in enumerate(top_k) if 0 < k < vocab and top_p[j] >= 1.0]
    if k_rows:
        idx = be.index(k_rows)
        ks = [top_k[j] for j in k_rows]
        sub = x if len(k_rows) == x.shape[0] else x[idx]
        top = be.top_values(sub, max(ks))
        cut = be.take_rows(top, be.index([k - 1 for k in ks]))[:, None]
        _mask_below(be, x, idx, len(k_rows), sub, cut)
    if p_rows:
        idx = be.index(p_rows)
        sub = x if len(p_rows) == x.shape[0] else x[idx]
        ks = [top_k[j] if top_k[j] > 0 else vocab for j in p_rows]
        cut, deferred = be.nucleus_cutoff(sub, ks, [top_p[j] for j in p_rows], [rejectable[j] for j in p_rows])
        if len(deferred) < len(p_rows):  # a deferred row's cut is -inf: nothing to mask
            _mask_below(be, x, idx, len(p_rows), sub, cut[:, None])
        return [p_rows[i] for i in deferred]
    return []


def _mask_below(be, x, idx, n_rows: int, sub, cut) -> None:
    """Set x[idx] entries below their row's ``cut`` to -inf (``sub`` is the copy x[idx])."""
    if n_rows == x.shape[0]:
        be.mask_below_(x, cut)
    else:
        be.mask_below_(sub, cut)
        x[idx] = sub


def _nucleus_cutoff_sorted(be, sub, ks: list[int], ps: list[float]):
    """Each row's smallest kept logit under top-k then top-p, from a full value sort: the
    nucleus is the prefix of tokens whose strictly better tokens hold < p of the mass."""
    vocab = sub.shape[1]
    desc = be.sort_desc(sub)
    kcol = be.column(ks, integer=True)
    probs = be.softmax(be.where(be.arange(vocab)[None, :] >= kcol, float("-inf"), desc))
    keep = _nucleus_size(be, probs, be.column(ps, dtype64=True))
    return be.take_rows(desc, be.minimum(keep, kcol[:, 0]) - 1)


def _nucleus_size(be, desc_probs, limit):
    """Per row of descending probabilities: how many tokens are in the nucleus, those whose
    strictly better tokens hold less than ``limit`` (a column) of the mass."""
    before = be.cumsum64(desc_probs) - desc_probs  # mass of strictly better tokens
    return be.count(before < limit)


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask everything outside each row's top-k and its top-p nucleus to -inf (the reference
    sort-and-scatter form, kept for tests and as documentation of the semantics)."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.tensor([kk if kk > 0 else vocab for kk in top_k], device=logits.device)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
    p = torch.tensor(top_p, dtype=probs.dtype, device=logits.device)[:, None]
    # top_p 1.0 keeps everything: the float32 cumulative sum can reach 1.0 before the tail
    # (it does on AVX2 CPUs), which ``before >= p`` alone would drop.
    drop |= (before >= p) & (p < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


# ---- array backends -----------------------------------------------------------------------


def _backend_for(device: torch.device):
    return _NumpyBackend() if device.type == "cpu" else _TorchBackend(device)


class _NumpyBackend:
    """CPU: NumPy on zero-copy views of the torch tensors."""

    @staticmethod
    def array(t: torch.Tensor) -> np.ndarray:
        return t.contiguous().numpy()

    @staticmethod
    def index(ids: list[int]) -> np.ndarray:
        return np.asarray(ids, dtype=np.int64)

    @staticmethod
    def column(values: list, integer: bool = False, dtype64: bool = False) -> np.ndarray:
        dtype = np.int64 if integer else np.float64 if dtype64 else np.float32
        return np.asarray(values, dtype=dtype)[:, None]

    @staticmethod
    def stack(arrays: list[np.ndarray]) -> np.ndarray:
        return np.stack(arrays)

    @staticmethod
    def tolist(a: np.ndarray) -> list:
        return a.tolist()

    where = staticmethod(np.where)
    minimum = staticmethod(np.minimum)

    @staticmethod
    def arange(n: int) -> np.ndarray:
        return np.arange(n)

    @staticmethod
    def zeros_long(n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.int64)

    @staticmethod
    def argmax(x: np.ndarray) -> np.ndarray:
        return x.argmax(axis=-1)

    @staticmethod
    def amax(x: np.ndarray) -> np.ndarray:
        return x.max(axis=-1, keepdims=True)

    @staticmethod
    def count(mask: np.ndarray) -> np.ndarray:
        return np.count_nonzero(mask, axis=-1)

    @staticmethod
    def take_rows(a: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return a[np.arange(a.shape[0]), cols]

    @staticmethod
    def div_(x: np.ndarray, col: np.ndarray) -> np.ndarray:
        if not x.flags.writeable:
            return x / col
        if (col != 1).any():  # temperature 1 (OpenAI's default) divides by nothing
            np.divide(x, col, out=x)
        return x

    @staticmethod
    def softmax(x: np.ndarray) -> np.ndarray:
        """Row softmax (a new array), by torch's fused kernel: one threaded, vectorised pass
        where NumPy's max/subtract/exp take three on one thread, and fast on -inf entries
        (top-k/top-p-masked rows), where torch's elementwise exp takes its slow path.
        2-vCPU AMD EPYC, [64, 32768]: 0.3 ms; max + subtract + exp in place, 1.0 ms."""
        return torch.softmax(torch.from_numpy(x), dim=-1).numpy()

    @staticmethod
    def mask_below_(x: np.ndarray, cut: np.ndarray) -> None:
        np.copyto(x, np.float32(-np.inf), where=x < cut)

    @staticmethod
    def mask_disallowed_(x: np.ndarray, idx: np.ndarray, allowed: np.ndarray, all_rows: bool) -> None:
        """-inf, in place, where ``allowed`` [len(idx), V] (0/1) is 0 on the rows ``idx``."""
        if all_rows:
            np.copyto(x, np.float32(-np.inf), where=allowed == 0)
        else:
            sub = x[idx]
            np.copyto(sub, np.float32(-np.inf), where=allowed == 0)
            x[idx] = sub

    @staticmethod
    def repetition_(x: np.ndarray, seen: np.ndarray, r: np.ndarray) -> None:
        """HF repetition penalty in place on the ``seen`` entries: positive / r, others * r.

        Branch-free, in torch's threaded kernels on the same memory: ``new`` is
        max(x, 0) / r + min(x, 0) * r (exactly HF's value: one term is 0), then
        x += (new - x) * seen. For 1 < r <= 2 (Sterbenz) new - x is exact, so seen entries
        become new bit for bit and the others stay x; the NaN of an -inf logit's difference
        is zeroed. NumPy's masked ``where=`` ufuncs on a scattered mask took 12.6 ms at
        [64, 32768] on a 2-vCPU AMD EPYC, this 1.8 ms."""
        xt, rt = torch.from_numpy(x), torch.from_numpy(r)
        new = xt.clamp(min=0).div_(rt).add_(xt.clamp(max=0).mul_(rt))
        xt.add_(new.sub_(xt).nan_to_num_(0.0).mul_(torch.from_numpy(seen)))

    @staticmethod
    def exponential_from_uniform(u: torch.Tensor) -> np.ndarray:
        e = np.log1p(-u.numpy())
        np.negative(e, out=e)
        return np.maximum(e, np.float32(1e-30), out=e)  # U == 0: E = 0 would give 0/0 for p == 0

    _NUCLEUS_CANDIDATES = 1024

    def nucleus_cutoff(self, sub: np.ndarray, ks: list[int], ps: list[float],
                       deferrable: list[bool]) -> tuple[np.ndarray, list[int]]:
        """As ``_nucleus_cutoff_sorted`` but without a sort of the vocabulary where it can.
        ``deferrable`` rows get no cut (-inf) and are returned, for ``nucleus_draw``: its
        first round is two vectorised passes whatever the row's shape, where even the
        candidates' partial selection below costs more (2-vCPU AMD EPYC, [64, 32768]: 1.8 ms
        for the selection alone, against ~1 ms for a whole rejection round). The other rows'
        cut comes from the top 1024 candidates of a partial selection (O(V)); rows whose
        nucleus is not settled within them (top-k beyond them, or a flat distribution) take
        the full sort. Each row's cut is the same whichever path the batch takes."""
        deferred = [i for i, d in enumerate(deferrable) if d]
        cut = np.full(sub.shape[0], -np.inf, dtype=sub.dtype)
        rest = [i for i, d in enumerate(deferrable) if not d]
        if rest:
            part = sub if len(rest) == len(ks) else sub[rest]
            cut[rest] = self._candidate_cutoff(part, [ks[i] for i in rest], [ps[i] for i in rest])
        return cut, deferred

    def _candidate_cutoff(self, sub: np.ndarray, ks: list[int], ps: list[float]) -> np.ndarray:
        n, vocab = sub.shape
        c = min(self._NUCLEUS_CANDIDATES, vocab)
        top = self.top_values(sub, c)  # [n, c] descending
        kk = np.minimum(np.asarray(ks), vocab)[:, None]
        m = top[:, :1]
        w = np.exp(top - m, dtype=np.float64)
        ranks = np.arange(c)[None, :]
        w = np.where(ranks < kk, w, 0.0)
        # normaliser: the row's top-k mass (inside the candidates) or the whole row's
        full = torch.from_numpy(sub - m).exp_().sum(dim=-1, keepdim=True).numpy().astype(np.float64)
        z = np.where(kk <= c, w.sum(axis=-1, keepdims=True), full)
        before = np.cumsum(w, axis=-1) - w
        keep = np.count_nonzero(before < np.asarray(ps, dtype=np.float64)[:, None] * z, axis=-1)
        n_keep = np.minimum(keep, kk[:, 0])
        # settled: the cut lies inside the candidates and the normaliser was exact
        settled = (kk[:, 0] <= c) | ((kk[:, 0] >= vocab) & (n_keep < c))
        cut = top[np.arange(n), np.minimum(n_keep, c) - 1]
        unsettled = np.flatnonzero(~settled)
        if unsettled.size:
            cut[unsettled] = _nucleus_cutoff_sorted(self, sub[unsettled], [ks[i] for i in unsettled],
                                                    [ps[i] for i in unsettled])
        return cut

    _REJECTION_ROUNDS = 8

    def nucleus_draw(self, probs: np.ndarray, ps: list[float]) -> np.ndarray:
        """One draw per row from the top-p nucleus of ``probs`` (nothing masked), by
        rejection with a rising pivot: draw from the row's tokens more likely than the
        pivot (at first all), keep the token if the tokens
        strictly more likely than it hold less than p of the mass (the nucleus of
        ``_nucleus_cutoff_sorted``, up to ties and float32 rounding of that mass), else raise
        the pivot to its probability and draw again. No nucleus token is ever below a rejected
        one, so kept draws follow the row's distribution restricted to its nucleus; the first
        round keeps a row with probability >= p, each later one with more (FlashInfer samples
        top-p by rejection too). A round is an inverse-CDF draw and one masked dot product per
        row. Rows still rejected after ``_REJECTION_ROUNDS`` take the sort."""
        n = probs.shape[0]
        limit = np.asarray(ps, dtype=np.float64) * torch.from_numpy(probs).sum(dim=-1).numpy()
        out = np.zeros(n, dtype=np.int64)
        todo = np.arange(n)
        sub = probs
        for _ in range(self._REJECTION_ROUNDS):
            tok = self.inverse_cdf(sub)
            p_tok = sub[np.arange(len(todo)), tok][:, None]
            rows = probs if len(todo) == n else probs[todo]
            above = rows > p_tok
            better = np.einsum("ij,ij->i", rows, above.astype(np.float32))  # vectorised dot
            kept = better < limit[todo]
            out[todo[kept]] = tok[kept]
            todo, sub = todo[~kept], np.where(above[~kept], rows[~kept], np.float32(0))
            if not todo.size:
                return out
        rows = probs[todo]
        desc = self.sort_desc(rows)
        cut = self.take_rows(desc, _nucleus_size(self, desc, limit[todo][:, None]) - 1)[:, None]
        out[todo] = self.inverse_cdf(np.where(rows < cut, np.float32(0), rows))
        return out

    @staticmethod
    def logsumexp(x: np.ndarray) -> np.ndarray:
        return torch.logsumexp(torch.from_numpy(x), dim=-1, keepdim=True).numpy()  # threaded exp

    @staticmethod
    def sort_desc(x: np.ndarray) -> np.ndarray:
        return np.sort(x, axis=-1)[:, ::-1]

    def top_values(self, x: np.ndarray, k: int) -> np.ndarray:
        """The k largest values per row, descending (a partial selection, no sort)."""
        if k <= self._TORCH_TOPK_MAX:
            return self.topk(x, k)[0]
        vocab = x.shape[1]
        return np.sort(np.partition(x, vocab - k, axis=-1)[:, vocab - k:], axis=-1)[:, ::-1]

    _TORCH_TOPK_MAX = 64

    def topk(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k largest values per row, descending, and their ids. Up to 64 (what logprobs
        ask for) torch's topk is the cheaper one ([64, 32768], k 5: 1.5 ms against 4.5 ms
        for the partition below); beyond, it is the slower by far (k 1024: 9-19 ms)."""
        n, vocab = x.shape
        if k <= self._TORCH_TOPK_MAX:
            vals, ids = torch.from_numpy(x).topk(k, dim=-1)
            return vals.numpy(), ids.numpy()
        if k < vocab:
            # the k-th largest value by a value-only partition, then the ids at or above it;
            # exactly k per row unless values tie at the k-th (then argpartition decides)
            kth = np.partition(x, vocab - k, axis=-1)[:, vocab - k]
            rows, cols = np.nonzero(x >= kth[:, None])
            if len(cols) == n * k:
                ids = cols.reshape(n, k)
            else:
                ids = np.argpartition(x, vocab - k, axis=-1)[:, vocab - k:]
        else:
            ids = np.broadcast_to(np.arange(vocab), x.shape)
        vals = np.take_along_axis(x, ids, axis=-1)
        order = np.argsort(-vals, axis=-1, kind="stable")
        return np.take_along_axis(vals, order, axis=-1), np.take_along_axis(ids, order, axis=-1)

    @staticmethod
    def cumsum64(x: np.ndarray) -> np.ndarray:
        return np.cumsum(x, axis=-1, dtype=np.float64)

    _CDF_BLOCK = 128

    def inverse_cdf(self, probs: np.ndarray) -> np.ndarray:
        """One categorical draw per row (weights need not be normalised): one uniform per row
        from torch's global generator, found in a two-level CDF (float64 cumulative sums of
        128-token block sums, then inside the chosen block), so no pass over the
        vocabulary is sequential: one vectorised block reduction does the heavy work."""
        n, vocab = probs.shape
        b = self._CDF_BLOCK
        if vocab % b:
            b = 1
        blocks = probs.reshape(n, vocab // b, b)
        # Block sums by torch's reduction (threaded; a float32 sum of 128 values in [0, 1] is
        # exact to ~1e-7), their cumulative sum in float64.
        sums = torch.from_numpy(blocks).sum(dim=-1).numpy()
        csum = np.cumsum(sums, axis=-1, dtype=np.float64)  # [n, V/b]
        v = torch.rand(n, dtype=torch.float64).numpy() * csum[:, -1]
        blk = np.minimum(np.count_nonzero(csum <= v[:, None], axis=-1), csum.shape[1] - 1)
        rows = np.arange(n)
        v -= np.where(blk > 0, csum[rows, blk - 1], 0.0)
        inner = np.cumsum(blocks[rows, blk], axis=-1, dtype=np.float64)  # [n, b]
        v = np.minimum(v, inner[:, -1] * (1 - 1e-12))  # rounding between the two levels
        within = np.minimum(np.count_nonzero(inner <= v[:, None], axis=-1), b - 1)
        return blk * b + within


class _TorchBackend:
    """Any other device: the same stages in torch."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @staticmethod
    def array(t: torch.Tensor) -> torch.Tensor:
        return t if t.dtype == torch.float32 else t.float()

    def index(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def column(self, values: list, integer: bool = False, dtype64: bool = False) -> torch.Tensor:
        dtype = torch.long if integer else torch.float64 if dtype64 else torch.float32
        return torch.tensor(values, dtype=dtype, device=self.device)[:, None]

    def stack(self, arrays: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(arrays)).to(self.device, non_blocking=True)

    @staticmethod
    def tolist(a: torch.Tensor) -> list:
        return a.tolist()

    where = staticmethod(torch.where)
    minimum = staticmethod(torch.minimum)

    def arange(self, n: int) -> torch.Tensor:
        return torch.arange(n, device=self.device)

    def zeros_long(self, n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.long, device=self.device)

    @staticmethod
    def argmax(x: torch.Tensor) -> torch.Tensor:
        return x.argmax(dim=-1)

    @staticmethod
    def amax(x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=-1, keepdim=True)

    @staticmethod
    def count(mask: torch.Tensor) -> torch.Tensor:
        return mask.sum(dim=-1)

    @staticmethod
    def take_rows(a: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return a.gather(1, cols[:, None])[:, 0]

    @staticmethod
    def div_(x: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        return x.div_(col)

    @staticmethod
    def softmax(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1)

    @staticmethod
    def mask_below_(x: torch.Tensor, cut: torch.Tensor) -> None:
        x.masked_fill_(x < cut, float("-inf"))

    def mask_disallowed_(self, x: torch.Tensor, idx: torch.Tensor, allowed: np.ndarray, all_rows: bool) -> None:
        drop = torch.from_numpy(allowed).to(self.device, non_blocking=True) == 0
        if all_rows:
            x.masked_fill_(drop, float("-inf"))
        else:
            x[idx] = x[idx].masked_fill_(drop, float("-inf"))

    @staticmethod
    def repetition_(x: torch.Tensor, seen: torch.Tensor, r: torch.Tensor) -> None:
        x.copy_(torch.where(seen, torch.where(x > 0, x / r, x * r), x))

    def exponential_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        return (-torch.log1p(-u)).clamp_(min=1e-30).to(self.device, non_blocking=True)

    def nucleus_cutoff(self, sub: torch.Tensor, ks: list[int], ps: list[float],
                       deferrable: list[bool]) -> tuple[torch.Tensor, list[int]]:
        """The exact cut of every row (one device sort); nothing is deferred."""
        return _nucleus_cutoff_sorted(self, sub, ks, ps), []

    @staticmethod
    def logsumexp(x: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(x, dim=-1, keepdim=True)

    @staticmethod
    def sort_desc(x: torch.Tensor) -> torch.Tensor:
        return x.sort(dim=-1, descending=True).values

    @staticmethod
    def top_values(x: torch.Tensor, k: int) -> torch.Tensor:
        return x.topk(k, dim=-1).values

    @staticmethod
    def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return x.topk(k, dim=-1)

    @staticmethod
    def cumsum64(x: torch.Tensor) -> torch.Tensor:
        return x.cumsum(dim=-1, dtype=torch.float64)

    def inverse_cdf(self, probs: torch.Tensor) -> torch.Tensor:
        cdf = probs.cumsum(dim=-1, dtype=torch.float64)
        u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=self.device) * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=probs.shape[1] - 1)
