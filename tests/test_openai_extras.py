"""Issue 11, "the rest": ``n > 1``, ``echo`` with prompt logprobs, ``/detokenize``, ``HEAD`` probes.

Engine-level tests run at the engine API (``LLM`` / ``LLMEngine``), against Hugging Face
transformers where a number can be checked; the HTTP tests use the official ``openai`` client
against the live Ray Serve app (tests/ray_fixtures.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from hf_reference import hf_logits, random_prompts
from mistral_serve import LLM, SamplingParams
from mistral_serve.model.config import ModelConfig


def hf_prompt_logprobs(model_dir, prompt: list[int]) -> torch.Tensor:
    """HF's log-softmax at every prompt position but the last: row j predicts prompt token j + 1."""
    return torch.log_softmax(hf_logits(model_dir, prompt)[:-1], dim=-1)


def assert_prompt_logprobs_match_hf(model_dir, prompt: list[int], entries: list, k: int) -> None:
    assert len(entries) == len(prompt) and entries[0] is None
    ref = hf_prompt_logprobs(model_dir, prompt)
    for j in range(1, len(prompt)):
        entry, row = entries[j], ref[j - 1]
        assert entry[prompt[j]] == pytest.approx(row[prompt[j]].item(), abs=1e-4), f"position {j}"
        top = row.topk(k)
        others = {t: v for t, v in entry.items() if t != prompt[j] or t in top.indices.tolist()}
        assert sorted(others) == sorted(top.indices.tolist()), f"top-{k} at position {j}"
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert entry[t] == pytest.approx(v, abs=1e-4)


def assert_pool_free(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "KV blocks leaked"
    assert not llm.engine.has_unfinished_requests() and not llm.engine.requests and not llm.engine._groups


# ---- prompt logprobs (engine) -------------------------------------------------------------------


def _tiny_pool_bytes(model_dir, blocks: int) -> int:
    return ModelConfig.from_dir(model_dir).kv_bytes_per_token(4) * 8 * blocks


@pytest.mark.parametrize("engine_args", [
    {},
    {"max_num_batched_tokens": 16},  # every prompt prefilled in several chunks, mixed with decodes
    {"block_size": 8, "kv_pool_blocks": 12},  # preemption by recompute: entries must not repeat
], ids=["one-step", "chunked", "preempted"])
def test_prompt_logprobs_match_hf(tiny_model_dir, engine_args):
    engine_args = dict(engine_args)
    if "kv_pool_blocks" in engine_args:
        engine_args["kv_cache_memory_bytes"] = _tiny_pool_bytes(tiny_model_dir, engine_args.pop("kv_pool_blocks"))
    prompts = random_prompts(4, 12, 40, seed=11)
    llm = LLM(str(tiny_model_dir), **engine_args)
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=k) for k in (3, 0, 5)]
    params.append(SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))  # no prompt logprobs
    outs = llm.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, outs):
        if p.prompt_logprobs is None:
            assert out.prompt_logprobs is None
        else:
            assert_prompt_logprobs_match_hf(tiny_model_dir, prompt, out.prompt_logprobs, p.prompt_logprobs)
            if p.prompt_logprobs == 0:
                assert all(len(e) == 1 for e in out.prompt_logprobs[1:])
        # the extra logits rows must not disturb sampling: greedy tokens are HF's argmax
        first = hf_logits(tiny_model_dir, prompt)[-1].argmax().item()
        assert out.outputs[0].token_ids[0] == first
    if "kv_cache_memory_bytes" in engine_args:
        assert llm.engine.stats.num_preemptions > 0
    assert_pool_free(llm)


def test_prompt_logprobs_after_the_prompt_was_cached(tiny_model_dir):
    """A prompt already in the prefix cache: a request for its prompt logprobs must still
    prefill every position (``SamplingParams.needs_all_prompt_positions``), not adopt the
    cached blocks and skip them."""
    prompt = random_prompts(1, 50, 50, seed=14)[0]
    llm = LLM(str(tiny_model_dir), block_size=8)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2))
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2))[0]
    assert_prompt_logprobs_match_hf(tiny_model_dir, prompt, out.prompt_logprobs, 2)
    assert out.num_cached_tokens == 0
    assert_pool_free(llm)


def test_without_prompt_logprobs_only_sampling_rows_get_logits(tiny_model_dir):
    """The default path asks the decoder for exactly one row per sampling sequence."""
    llm = LLM(str(tiny_model_dir), max_num_batched_tokens=64)
    engine = llm.engine
    prompts = random_prompts(2, 40, 40, seed=12)
    engine.add_request("a", prompts[0], SamplingParams(temperature=0, max_tokens=2))
    engine.add_request("b", prompts[1], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1))
    plan = engine.scheduler.schedule()
    assert [n for _, n in plan.scheduled] == [40, 24]
    inputs = engine.runner.prepare(plan.scheduled)
    # "a" samples (row 39); "b" has a 24-token chunk: positions 0..23 predict tokens 1..24
    assert inputs.logits_index.tolist() == [39] + list(range(40, 64))
    assert [(s.request_id, lo, hi) for s, lo, hi in inputs.prompt_spans] == [("b", 0, 24)]
    engine.abort_request("a")
    engine.abort_request("b")
    assert_pool_free(llm)


# ---- n > 1 (engine) -----------------------------------------------------------------------------


def test_n_choices_differ_and_are_reproducible_with_a_seed(tiny_model_dir):
    llm = LLM(str(tiny_model_dir))
    prompt = random_prompts(1, 12, 12, seed=13)[0]
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, n=4, seed=1234)
    out = llm.generate([prompt], params)[0]
    assert out.finished and [c.index for c in out.outputs] == [0, 1, 2, 3]
    ids = [tuple(c.token_ids) for c in out.outputs]
    assert all(len(t) == 8 for t in ids) and len(set(ids)) > 1, ids
    assert out.metrics.num_generation_tokens == 32 and out.metrics.num_prompt_tokens == len(prompt)
    again = llm.generate([prompt], params)[0]
    assert [tuple(c.token_ids) for c in again.outputs] == ids
    # choice 0 is the n = 1 answer of the same seed; the others come from derived seeds
    single = llm.generate([prompt], SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=1234))[0]
    assert tuple(single.outputs[0].token_ids) == ids[0]
    assert_pool_free(llm)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_n_sequences_share_the_prompt_prefill_through_the_prefix_cache(tiny_model_dir, prefix_caching):
    """Added in one step, the n sequences prefill the prompt's full blocks once (the cache):
    each other choice computes only the tokens past the last full block."""
    llm = LLM(str(tiny_model_dir), block_size=16, enable_prefix_caching=prefix_caching)
    prompt = random_prompts(1, 65, 65, seed=15)[0]  # 4 full blocks + 1 token
    llm.generate([prompt], SamplingParams(temperature=1.0, max_tokens=3, n=4, seed=2))
    assert llm.engine.stats.prompt_tokens == (65 + 3 * 1 if prefix_caching else 4 * 65)
    assert_pool_free(llm)


def test_n_greedy_choices_are_equal_and_texts_per_choice(tiny_model_dir):
    llm = LLM(str(tiny_model_dir))
    out = llm.generate(["Hello there"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, n=3))[0]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 1
    assert len({c.text for c in out.outputs}) == 1 and out.outputs[0].text
    assert_pool_free(llm)


def test_abort_aborts_all_n_sequences(tiny_model_dir):
    llm = LLM(str(tiny_model_dir))
    engine = llm.engine
    engine.add_request("r", [1, 100, 200, 300], SamplingParams(temperature=1.0, max_tokens=50, n=3))
    assert sorted(engine.requests) == ["r#0", "r#1", "r#2"]
    deltas = engine.step()
    assert len(deltas) == 1 and deltas[0].request_id == "r" and sorted(c.index for c in deltas[0].outputs) == [0, 1, 2]
    assert not deltas[0].finished
    final = engine.abort_request("r")
    assert final.finished and [c.finish_reason for c in final.outputs] == ["abort"] * 3
    assert final.metrics.num_generation_tokens == 3
    assert engine.abort_request("r") is None
    assert_pool_free(llm)


def test_n_with_one_choice_ending_early(tiny_model_dir):
    """Choices end independently (a stop token in one); the request finishes with the last."""
    llm = LLM(str(tiny_model_dir))
    prompt = [1, 100, 200, 300]
    free = llm.generate([prompt], SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, n=2, seed=7))[0]
    stop = free.outputs[1].token_ids[2]  # choice 1's third token (may occur earlier in choice 0 too)
    out = llm.generate([prompt], SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, n=2, seed=7,
                                                stop_token_ids=[stop]))[0]
    for ref, got in zip(free.outputs, out.outputs):
        cut = ref.token_ids.index(stop) + 1 if stop in ref.token_ids else 6
        assert got.token_ids == ref.token_ids[:cut]
        assert got.finish_reason == ("stop" if stop in ref.token_ids else "length")
    assert len(out.outputs[1].token_ids) <= 3
    assert out.metrics.num_generation_tokens == sum(len(c.token_ids) for c in out.outputs)
    assert_pool_free(llm)


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"n": 17}, {"prompt_logprobs": 21}, {"prompt_logprobs": -1}])
def test_bad_new_sampling_values_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_best_choices_ranks_by_cumulative_logprob():
    from mistral_serve.serving.openai_protocol import best_choices

    entries = [[("a", -1.0, []), ("b", -1.0, [])], [("c", -0.5, [])], [("d", -3.0, []), ("e", None, [])]]
    assert best_choices(entries, 2) == [1, 0] and best_choices(entries, 3) == [1, 0, 2]


def test_prompt_logprobs_flag_for_the_prefix_cache():
    assert SamplingParams(prompt_logprobs=0).needs_all_prompt_positions
    assert not SamplingParams().needs_all_prompt_positions


# ---- LLMReplica's wire messages, without Serve ----------------------------------------------------


@pytest.mark.timeout(120)
def test_replica_messages_for_n_and_prompt_logprobs(tiny_model_dir):
    """n > 1: one choice per Delta, each choice's end on its last Delta, then a Final with only
    the usage; the prompt logprobs ride on the first message; streaming and not agree."""
    import asyncio

    from mistral_serve.serving.replica import LLMReplica
    from mistral_serve.serving.wire import Delta, Final, GenerateRequest

    # served as "tiny": this in-process replica's metrics reach the session's Ray cluster too, whose
    # labels tests/test_security.py checks
    args = {"model": str(tiny_model_dir), "served_model_name": "tiny",
            "engine": {"device": "cpu", "max_num_seqs": 8, "num_threads": 1,
                                                   "kv_cache_memory_bytes": 32 << 20, "max_model_len": 256},
            "replicas": {"stream_interval_ms": 10}}
    prompt = [1, 1500, 1600, 1700]

    async def collect(r, rid, stream, **sampling):
        params = SamplingParams(max_tokens=5, temperature=1.0, seed=3, ignore_eos=True, **sampling)
        return [m async for m in r.generate(GenerateRequest(rid, prompt, params, stream=stream))]

    async def main():
        cls = LLMReplica.func_or_class
        r = object.__new__(cls)
        await cls.__init__(r, args)
        try:
            results = {}
            for stream in (False, True):
                msgs = await collect(r, f"s{stream}", stream, n=3, logprobs=1, prompt_logprobs=1)
                final = msgs[-1]
                assert isinstance(final, Final) and all(isinstance(m, Delta) for m in msgs[:-1])
                assert (final.text, final.num_tokens, final.finish_reason) == ("", 0, None)
                assert (final.prompt_tokens, final.completion_tokens) == (4, 15) and final.cost_usd > 0
                texts, ends, lps = {}, {}, {}
                for m in msgs[:-1]:
                    texts[m.index] = texts.get(m.index, "") + m.text
                    lps.setdefault(m.index, []).extend(m.logprobs or [])
                    if m.finish_reason:
                        assert m.index not in ends
                        ends[m.index] = m.finish_reason
                assert ends == {0: "length", 1: "length", 2: "length"}
                assert sum(m.num_tokens for m in msgs) == 15 and all(len(v) == 5 for v in lps.values())
                carriers = [m for m in msgs if m.prompt_logprobs is not None]
                assert carriers == [msgs[0]] and len(msgs[0].prompt_logprobs) == 4
                assert msgs[0].prompt_logprobs[0][1] is None and msgs[0].prompt_logprobs[1][1] < 0
                results[stream] = texts
            assert results[False] == results[True]  # seeded choices: the same whichever way sent
            # n == 1 keeps its two-message shape, the Final carrying the finish reason
            one = await collect(r, "one", False)
            assert len(one) == 2 and one[-1].finish_reason == "length" and one[-1].index == 0
        finally:
            r.__del__()

    asyncio.run(main())


# ---- over HTTP: the official openai client against the live Ray Serve app ------------------------


def _client(live):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=live.base_url + "/v1", api_key=live.api_keys["alpha"], max_retries=0, timeout=120)


def _post(live, path: str, body: dict):
    requests = pytest.importorskip("requests")
    return requests.post(live.base_url + path, data=json.dumps(body), headers={"content-type": "application/json"},
                         timeout=120)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_http_n_completions_differ_reproduce_and_sum_usage(live_server):
    client = _client(live_server)
    prompt = "Once upon a time"
    kw = dict(model=live_server.model, prompt=prompt, max_tokens=6, temperature=1.0, seed=42,
              extra_body={"ignore_eos": True})
    out = client.completions.create(n=3, **kw)
    assert [c.index for c in out.choices] == [0, 1, 2]
    texts = [c.text for c in out.choices]
    assert len(set(texts)) > 1 and all(c.finish_reason == "length" for c in out.choices)
    prompt_len = _post(live_server, "/tokenize", {"prompt": prompt}).json()["count"]
    assert out.usage.prompt_tokens == prompt_len  # the prompt once, as OpenAI counts it
    assert out.usage.completion_tokens == 18 and out.usage.total_tokens == prompt_len + 18
    assert out.usage.model_extra["cost_usd"] > 0
    assert [c.text for c in client.completions.create(n=3, **kw).choices] == texts  # seeded: reproducible
    assert client.completions.create(n=1, **kw).choices[0].text == texts[0]  # choice 0 is the n = 1 answer


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_http_n_chat_stream_carries_choice_index_and_matches_full(live_server):
    client = _client(live_server)
    kw = dict(model=live_server.model, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=5,
              temperature=1.0, seed=9, n=2, extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    texts, finishes, roles = {0: "", 1: ""}, {}, set()
    for chunk in chunks:
        for ch in chunk.choices:
            if ch.delta.role:
                roles.add(ch.index)
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                assert ch.index not in finishes
                finishes[ch.index] = ch.finish_reason
    assert roles == {0, 1} and finishes == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices
    full = client.chat.completions.create(**kw)
    assert [c.index for c in full.choices] == [0, 1]
    assert [c.message.content for c in full.choices] == [texts[0], texts[1]]
    assert full.usage.completion_tokens == 10


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_http_echo_logprobs_match_hf(live_server, tiny_model_dir):
    client = _client(live_server)
    prompt = [1, 1500, 1600, 1700, 1800, 1900, 2000]
    out = client.completions.create(model=live_server.model, prompt=prompt, max_tokens=3, temperature=0, logprobs=2,
                                    echo=True, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(prompt) + 3 and len(lp.token_logprobs) == len(prompt) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # as OpenAI: nothing predicts token 0
    ref = hf_prompt_logprobs(tiny_model_dir, prompt)
    for j in range(1, len(prompt)):
        assert lp.token_logprobs[j] == pytest.approx(ref[j - 1, prompt[j]].item(), abs=1e-4), j
        assert max(lp.top_logprobs[j].values()) == pytest.approx(ref[j - 1].max().item(), abs=1e-4), j
    echoed = _post(live_server, "/detokenize", {"tokens": prompt[1:]}).json()["prompt"]
    assert choice.text.startswith(echoed) and len(choice.text) > len(echoed)
    assert lp.text_offset == sorted(lp.text_offset)
    assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == 3


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_http_echo_text_streaming_and_with_n(live_server):
    client = _client(live_server)
    kw = dict(model=live_server.model, prompt="The sky is", max_tokens=4, temperature=0, echo=True,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    assert full.choices[0].text.startswith("The sky is") and full.choices[0].logprobs is None
    chunks = [c for c in client.completions.create(stream=True, **kw) if c.choices]
    assert chunks[0].choices[0].text == "The sky is"
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    both = client.completions.create(n=2, **kw)
    assert [c.text for c in both.choices] == [full.choices[0].text] * 2  # greedy: equal choices


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_http_best_of_returns_the_n_best_by_cumulative_logprob(live_server):
    client = _client(live_server)
    kw = dict(model=live_server.model, prompt="In the beginning", max_tokens=5, temperature=1.0, seed=5,
              extra_body={"ignore_eos": True})
    # the same seeds sample the same sequences: n = 4 shows all of them with their logprobs
    every = client.completions.create(n=4, logprobs=0, **kw).choices
    score = {c.text: sum(c.logprobs.token_logprobs) for c in every}
    assert len(score) == 4
    best = client.completions.create(n=2, best_of=4, **kw)
    assert [c.index for c in best.choices] == [0, 1] and all(c.logprobs is None for c in best.choices)
    assert [c.text for c in best.choices] == sorted(score, key=lambda t: -score[t])[:2]
    assert best.usage.completion_tokens == 20  # all best_of sequences are generated (and billed)
    with_lp = client.completions.create(n=1, best_of=4, logprobs=1, **kw).choices[0]
    assert sum(with_lp.logprobs.token_logprobs) == pytest.approx(max(score.values()), abs=1e-5)


NEW_FIELD_ERRORS = [
    # (id, path, body, param)
    ("n-zero", "/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("n-above-max", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
                                             "n": 17}, "n"),
    ("n-not-int", "/v1/completions", {"prompt": "x", "n": "two"}, "n"),
    ("best-of-below-n", "/v1/completions", {"prompt": "x", "n": 3, "best_of": 2}, "best_of"),
    ("best-of-above-max", "/v1/completions", {"prompt": "x", "best_of": 17}, "best_of"),
    ("best-of-streamed", "/v1/completions", {"prompt": "x", "best_of": 2, "stream": True}, "best_of"),
    ("echo-on-chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo"),
    ("echo-logprobs-21", "/v1/completions", {"prompt": "x", "echo": True, "logprobs": 21}, "logprobs"),
    ("echo-logprobs-negative", "/v1/completions", {"prompt": "x", "echo": True, "logprobs": -1}, "logprobs"),
    ("echo-not-bool", "/v1/completions", {"prompt": "x", "echo": "loud"}, "echo"),
    ("detokenize-out-of-vocab", "/detokenize", {"tokens": [1, 10**9]}, "tokens"),
    ("detokenize-negative", "/detokenize", {"tokens": [-1]}, "tokens"),
    ("detokenize-not-ids", "/detokenize", {"tokens": "hello"}, "tokens"),
    ("detokenize-missing", "/detokenize", {}, "tokens"),
]


@pytest.mark.ray
@pytest.mark.parametrize("row", NEW_FIELD_ERRORS, ids=[r[0] for r in NEW_FIELD_ERRORS])
def test_http_bad_new_fields_are_openai_400s(live_server, row):
    _, path, body, param = row
    if path != "/detokenize":
        body = {"model": live_server.model, **body}
    r = _post(live_server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["message"], err


@pytest.mark.ray
def test_http_detokenize_round_trips_tokenize(live_server):
    for text in ["Hello, world!", "naïve café 東京", " two  spaces"]:
        plain = _post(live_server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()["tokens"]
        r = _post(live_server, "/detokenize", {"model": live_server.model, "tokens": plain})
        assert r.status_code == 200 and r.json() == {"prompt": text}
        with_bos = _post(live_server, "/tokenize", {"prompt": text}).json()["tokens"]
        assert _post(live_server, "/detokenize", {"tokens": with_bos}).json()["prompt"] == "<s>" + text
    assert _post(live_server, "/detokenize", {"tokens": []}).json() == {"prompt": ""}
    r = _post(live_server, "/detokenize", {"model": "gpt-4", "tokens": [1]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def _raw_head(live, path: str) -> tuple[int, bytes]:
    """HEAD over a raw socket, read to EOF: the status and every byte after the headers."""
    import socket
    import urllib.parse

    u = urllib.parse.urlparse(live.base_url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(f"HEAD {u.path}{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while part := s.recv(65536):
            data += part
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest


@pytest.mark.ray
def test_http_head_health_and_ready(live_server):
    requests = pytest.importorskip("requests")
    for path in ("/health", "/ready"):
        assert _raw_head(live_server, path) == (200, b""), path  # was 405
        assert requests.head(live_server.base_url + path, timeout=30).status_code == 200
        assert requests.get(live_server.base_url + path, timeout=30).status_code == 200
