"""One step's attention over 4 layers, before/after the bucketed attention (CPU).

    python -m mistral_serve.bench.attention_bench [--json out.json] [--repeats 7]

Shapes are the embedded tiny model's (8 heads, 2 KV heads, head_dim 32, 16-token blocks,
float32). Cases: (a) the shared workload's decode batch, 64 sequences with 100-400 tokens of
context; (b) one 8K sequence + 63 of 256 tokens, decode; (c) a 2K prefill chunk at position 0
and at 6K context. Variants:

* ``before``: the previous layout, kept here for comparison: one decode call padded to the
  longest sequence, additive float masks, every prefill chunk gathered from the cache.
* ``after``: ``model.attention`` as shipped (decode buckets, causal prefill, boolean masks).
* ``after_one_bucket``: the same, decode buckets never split (padded to the longest, bool mask).
* ``after_split_all``: buckets split at every 2x in block count (``min_split_blocks=0``).
* ``per_sequence``: decode gathering only each sequence's own blocks, one SDPA call per sequence.

Times are the fastest of ``--repeats`` runs (ms; the box is shared, min is the least noisy) of one step: metadata build once + 4 layers of attention.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

import torch
import torch.nn.functional as F

from mistral_serve.model.attention import build_attention_metadata, paged_attention

H, KVH, D, BS, LAYERS = 8, 2, 32, 16, 4


# --- the previous implementation (engine/attention.py before the move), for "before" ----------
def _old_group(token_start, q_start, q_len, table, offset, bs, window, g, dtype):
    s = q_start.shape[0]
    lq = int(q_len.max())
    ctx_end = q_start + q_len
    k_start = torch.zeros_like(q_start) if window is None else (q_start - window + 1).clamp_min(0)
    first = k_start // bs
    nblk = (ctx_end - 1) // bs - first + 1
    nb = int(nblk.max())
    lk = nb * bs
    ar = torch.arange(nb)[None, :]
    col = (first[:, None] + ar - offset[:, None]).clamp(0, table.shape[1] - 1)
    blocks = torch.where(ar < nblk[:, None], torch.gather(table, 1, col), 0).flatten()
    key_pos = first[:, None] * bs + torch.arange(lk)[None, :]
    q_pos = q_start[:, None] + torch.arange(lq)[None, :]
    allowed = (key_pos < ctx_end[:, None])[:, None, :] & (key_pos[:, None, :] <= q_pos[:, :, None])
    if window is not None:
        allowed &= key_pos[:, None, :] > q_pos[:, :, None] - window
    if lq == 1:
        folded = allowed[:, None]
    else:
        folded = allowed[:, None, None].expand(s, 1, g, lq, lk).reshape(s, 1, g * lq, lk)
    mask = torch.zeros(folded.shape, dtype=dtype).masked_fill_(~folded, float("-inf"))
    return (token_start, token_start + int(q_len.sum()), s, lq, lk, blocks, mask)


def _old_meta(q_start, q_len, offsets, tables, bs, window):
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
    starts, lens = torch.tensor(q_start), torch.tensor(q_len)
    off = torch.tensor(offsets)
    tok_off = torch.cumsum(lens, 0) - lens
    nd = sum(1 for n in q_len if n == 1)
    spans = [(0, nd)] + [(i, i + 1) for i in range(nd, len(q_start))]
    return [_old_group(int(tok_off[lo]), starts[lo:hi], lens[lo:hi], table[lo:hi], off[lo:hi], bs, window, H // KVH,
                       torch.float32) for lo, hi in spans if hi > lo]


def _old_attention(q, k_cache, v_cache, groups, bs, scale):
    row = bs * KVH * D
    rows_k, rows_v = k_cache.view(-1, row), v_cache.view(-1, row)
    g = H // KVH
    out = torch.empty_like(q)
    for t0, t1, s, lq, lk, blocks, mask in groups:
        qg = q[t0:t1].view(s, lq, KVH, g, D).permute(0, 2, 3, 1, 4).reshape(s, KVH, g * lq, D)
        k = rows_k.index_select(0, blocks).view(s, lk, KVH, D).transpose(1, 2)
        v = rows_v.index_select(0, blocks).view(s, lk, KVH, D).transpose(1, 2)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
        out[t0:t1] = o.view(s, KVH, g, lq, D).permute(0, 3, 1, 2, 4).reshape(s * lq, H, D)
    return out


def _per_sequence_decode(q, k_cache, v_cache, tables, ctx, bs, scale):
    """Decode only: each sequence's own blocks, one SDPA call per sequence, no padding at all."""
    row = bs * KVH * D
    rows_k, rows_v = k_cache.view(-1, row), v_cache.view(-1, row)
    out = torch.empty_like(q)
    for i, (blocks, n) in enumerate(zip(tables, ctx)):
        k = rows_k.index_select(0, blocks).view(-1, KVH, D)[:n].transpose(0, 1)[None]
        v = rows_v.index_select(0, blocks).view(-1, KVH, D)[:n].transpose(0, 1)[None]
        out[i] = F.scaled_dot_product_attention(q[i].view(1, KVH, H // KVH, D), k, v, scale=scale).reshape(H, D)
    return out


def _best_ms(fns: dict, repeats: int) -> dict:
    """Fastest run (ms) of each variant, the variants interleaved round by round so that load
    from other processes on a shared box hits them alike."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - t) * 1e3)
    return {name: round(ms, 3) for name, ms in best.items()}


def run_case(name, seqs, repeats, window=None):
    """seqs: [(q_start, q_len)], no sliding window."""
    torch.manual_seed(0)
    rng = random.Random(0)
    need = [-(-(s + n) // BS) for s, n in seqs]
    ids = list(range(1, sum(need) + 1))
    rng.shuffle(ids)
    tables, k = [], 0
    for nb in need:
        tables.append(ids[k : k + nb])
        k += nb
    slots = (sum(need) + 1) * BS
    caches = [(torch.randn(slots, KVH, D), torch.randn(slots, KVH, D)) for _ in range(LAYERS)]
    q_start, q_len = [s for s, _ in seqs], [n for _, n in seqs]
    t = sum(q_len)
    q = torch.randn(t, H, D)
    kv_new = torch.randn(t, KVH, D), torch.randn(t, KVH, D)
    offsets = [0] * len(seqs)
    scale = D**-0.5
    real_kv_mib = sum(s + n for s, n in seqs) * KVH * D * 4 * 2 * LAYERS / 2**20

    def before():
        groups = _old_meta(q_start, q_len, offsets, tables, BS, window)
        for kc, vc in caches:
            _old_attention(q, kc, vc, groups, BS, scale)

    def after(**kw):
        def step():
            meta = build_attention_metadata(q_start, q_len, offsets, tables, BS, window, **kw).meta
            for kc, vc in caches:
                paged_attention(q, kv_new[0], kv_new[1], kc, vc, meta, scale)
        return step

    result = {"case": name, "sequences": len(seqs), "tokens": t, "real_kv_read_mib": round(real_kv_mib, 1)}
    fns = {"before_ms": before, "after_ms": after()}
    decode_only = all(n == 1 for n in q_len)
    if decode_only:
        blocks = [torch.tensor(tb) for tb in tables]
        ctx = [s + 1 for s in q_start]

        def per_seq():
            for kc, vc in caches:
                _per_sequence_decode(q, kc, vc, blocks, ctx, BS, scale)
        fns.update({
            "after_one_bucket_ms": after(min_split_blocks=1 << 30),
            "after_min_split_16_ms": after(min_split_blocks=16),
            "after_split_all_ms": after(min_split_blocks=0),
            "per_sequence_ms": per_seq,
        })
    fns["after_metadata_only_ms"] = lambda: build_attention_metadata(q_start, q_len, offsets, tables, BS, window)
    result.update(_best_ms(fns, repeats))
    if decode_only:
        result["before_padded_kv_rows"] = len(seqs) * max(need) * BS
        meta = build_attention_metadata(q_start, q_len, offsets, tables, BS, window).meta
        result["after_padded_kv_rows"] = sum(g.num_seqs * g.k_len for g in meta.groups)
        result["after_buckets"] = [[g.num_seqs, g.k_len] for g in meta.groups]
    result["speedup"] = round(result["before_ms"] / result["after_ms"], 2)
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write results here")
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args(argv)
    rng = random.Random(64)
    cases = [
        ("a: decode 64 x 100-400 ctx", [(rng.randint(100, 400), 1) for _ in range(64)]),
        ("b: decode 1 x 8K + 63 x 256", [(8192, 1)] + [(256, 1)] * 63),
        ("c1: prefill 2K chunk at 0", [(0, 2048)]),
        ("c2: prefill 2K chunk at 6K context", [(6144, 2048)]),
    ]
    results = []
    with torch.inference_mode():
        for name, seqs in cases:
            r = run_case(name, seqs, a.repeats)
            print(json.dumps(r))
            results.append(r)
    report = {
        "what": "one step's attention, 4 layers, tiny-model shapes (8 heads, 2 KV heads, head_dim 32, "
                "block 16, float32); min ms of N runs incl. metadata build",
        "machine": {"cpu": _cpu_name(), "cores": torch.get_num_threads(), "torch": torch.__version__},
        "results": results,
    }
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
