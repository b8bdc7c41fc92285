"""The serving layer's pieces without a Ray cluster: app args, OpenAI request mapping, cost
accounting, the request router's ranking, the metric names against docs/metrics.md, and the
LLMReplica class driven directly on an event loop (coalescing, abort on close, health)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from mistral_serve.serving.admission import AdmissionError
from mistral_serve.serving.config import AppArgs
from mistral_serve.serving.cost import BusyIdleMeter, break_even_utilization, request_cost_usd, usd_per_million_tokens
from mistral_serve.serving.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    parse,
)
from mistral_serve.serving.response_format import constraint_from_request

REPO = Path(__file__).resolve().parents[1]


# ---- args ---------------------------------------------------------------------------------------------


def test_app_args_shorthands_and_validation():
    a = AppArgs.model_validate({"model": "tiny", "max_num_seqs": 8, "dtype": "float32",
                                "gpu_price_usd_per_hour": 1.5, "engine": {"max_num_seqs": 4}})
    assert a.engine == {"max_num_seqs": 4, "dtype": "float32"}  # the explicit group wins
    assert a.cost.gpu_price_usd_per_hour == 1.5 and a.max_num_seqs == 4
    assert a.replica_max_ongoing() == 4 + 2 and a.replica_max_queued() == 24
    assert AppArgs.model_validate({"max_num_seqs": 64}).replica_max_ongoing() == 80
    assert a.model_name == "tiny" and AppArgs(served_model_name="m").model_name == "m"
    with pytest.raises(ValidationError):
        AppArgs.model_validate({"engine": {"max_num_seqs": 0}})
    with pytest.raises(ValidationError):
        AppArgs.model_validate({"no_such_field": 1})
    with pytest.raises(ValidationError):
        AppArgs.model_validate({"admission": {"tenants": [{"name": "bad name!"}]}})


def test_served_engine_threads_follow_the_replicas_cpus():
    """A served engine runs on the CPUs Ray reserves for its replica unless told otherwise."""
    assert AppArgs().engine_args("m").num_threads == 1
    assert AppArgs.model_validate({"replicas": {"num_cpus": 4}}).engine_args("m").num_threads == 4
    assert AppArgs.model_validate({"replicas": {"num_cpus": 0}}).engine_args("m").num_threads == 1
    pinned = AppArgs.model_validate({"replicas": {"num_cpus": 4}, "engine": {"num_threads": 2}})
    assert pinned.engine_args("m").num_threads == 2


def test_colocated_engine_takes_the_routers_cpus_too():
    """With the engine in the Router's process, its threads follow the CPUs of that process
    (the replica's share plus the Router's, rounded up), and the Router's actor asks for both."""
    from mistral_serve.serving.app import deployment_options
    from mistral_serve.serving.local import replica_demand

    colocated = AppArgs.model_validate({"router": {"colocate_engine": True},
                                        "replicas": {"num_cpus": 1, "num_gpus": 1, "health_check_period_s": 3}})
    assert colocated.engine_process_cpus == 1.25 and colocated.engine_args("m").num_threads == 2
    _, router = deployment_options(colocated)
    assert router["ray_actor_options"]["num_cpus"] == 1.25 and router["ray_actor_options"]["num_gpus"] == 1
    assert router["health_check_period_s"] == 3
    assert [d for d in replica_demand(colocated) if d[0] != "AdmissionState"] == [
        ("Router holding the engine (replicas.num_cpus 1 + router.num_cpus 0.25)", 1, 1.25, 1.0)]
    separate = AppArgs.model_validate({"replicas": {"num_cpus": 1, "num_gpus": 1}})
    assert [d[0] for d in replica_demand(separate) if d[0] != "AdmissionState"] == ["LLMReplica", "Router"]
    assert deployment_options(separate)[1]["ray_actor_options"] == {
        "num_cpus": 0.25, "runtime_env": {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}}


@pytest.mark.parametrize("args", [{"replicas": {"num_replicas": 2}}, {"replicas": {"num_replicas": "auto"}},
                                  {"router": {"num_replicas": 2}},
                                  {"replicas": {"autoscaling": {"min_replicas": 1, "max_replicas": 2}}}])
def test_colocated_engine_needs_one_router_and_one_fixed_replica(args):
    args = {**args, "router": {**args.get("router", {}), "colocate_engine": True}}
    with pytest.raises(ValidationError, match="colocate_engine"):
        AppArgs.model_validate(args)


def test_serve_colocates_the_engine_with_one_replica_unless_told_not_to():
    from mistral_serve.serving.cli import build_args, parse_args

    def colocated(argv: list[str]) -> bool:
        return AppArgs.model_validate(build_args(parse_args(argv))).router.colocate_engine

    assert colocated([])
    assert not colocated(["--separate-replica"])
    assert not colocated(["--replicas", "2"])
    assert not colocated(["--args", '{"replicas": {"autoscaling": {"min_replicas": 1, "max_replicas": 2}}}'])
    assert not colocated(["--args", '{"router": {"colocate_engine": false}}'])


def test_a_port_left_in_time_wait_is_free_to_restart_on():
    """A server that closed its side of a connection leaves it in TIME_WAIT; a new server binds
    the port anyway (SO_REUSEADDR), so the pre-start check must not call it in use."""
    import socket

    from mistral_serve.serving.local import port_in_use

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    assert port_in_use(port)
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    conn.close()  # the server closes first: its end goes to TIME_WAIT
    client.recv(1)
    client.close()
    listener.close()
    assert not port_in_use(port)


def test_repo_serve_config_args_validate():
    import yaml

    cfg = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    (app,) = cfg["applications"]
    assert app["import_path"] == "mistral_serve.serving:build_app"
    args = AppArgs.model_validate(app["args"])
    assert args.model == "tiny" and args.engine["device"] == "cpu"


def test_k8s_serve_config_args_validate():
    import yaml

    for path in (REPO / "k8s" / "base" / "serve-config.yaml", REPO / "k8s" / "overlays" / "cpu-tiny" / "serve-config.yaml"):
        if path.exists():
            for app in yaml.safe_load(path.read_text())["applications"]:
                AppArgs.model_validate(app["args"])


def test_serve_flags_map_into_app_args():
    from mistral_serve.serving.cli import build_args, parse_args

    args = build_args(parse_args(["--max-num-seqs", "16", "--max-queue-wait-s", "1.5",
                                  "--args", '{"admission": {"max_body_bytes": 2048}}']))
    parsed = AppArgs.model_validate(args)
    assert parsed.max_num_seqs == 16
    assert parsed.admission.max_queue_wait_s == 1.5 and parsed.admission.max_body_bytes == 2048
    assert AppArgs.model_validate(build_args(parse_args([]))).admission.max_queue_wait_s == 2.0  # on by default


def test_deployment_options():
    from mistral_serve.serving.app import deployment_options

    llm, router = deployment_options(AppArgs.model_validate(
        {"max_num_seqs": 16, "replicas": {"num_gpus": 1, "num_cpus": 4, "num_replicas": 3}}))
    assert llm["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 1,
                                        "runtime_env": {"env_vars": {"RAY_worker_niceness": "0"}}}
    assert llm["num_replicas"] == 3 and llm["max_ongoing_requests"] == 20
    assert llm["request_router_config"].request_router_class.endswith("LeastQueueDepthRouter")
    assert router["max_ongoing_requests"] >= 1000
    # the Router's code runs on Serve's main loop unless asked otherwise; the replicas' keep Ray's default
    assert router["ray_actor_options"]["runtime_env"]["env_vars"] == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
    _, router = deployment_options(AppArgs.model_validate({"router": {"user_code_thread": True}}))
    assert "runtime_env" not in router["ray_actor_options"]
    _, router = deployment_options(AppArgs.model_validate({"router": {"colocate_engine": True}}))
    assert router["ray_actor_options"]["runtime_env"]["env_vars"] == {
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_worker_niceness": "0"}
    llm, _ = deployment_options(AppArgs.model_validate({"replicas": {"autoscaling_config": {"max_replicas": 4}}}))
    assert "num_replicas" not in llm and llm["autoscaling_config"] == {"max_replicas": 4}


# ---- OpenAI requests -------------------------------------------------------------------------------------


def _err(fn) -> AdmissionError:
    with pytest.raises(AdmissionError) as info:
        fn()
    return info.value


def test_completion_request_mapping():
    req = parse(CompletionRequest, {"model": "m", "prompt": [1, 2, 3], "temperature": 0, "stop": "\n", "seed": 7,
                                    "ignore_eos": True, "top_k": 5, "min_tokens": 2, "user": "x", "unknown": 1})
    req.check()
    assert req.single_prompt() == [1, 2, 3]
    p = req.sampling_params(16, req.logprobs)
    assert (p.temperature, p.stop, p.seed, p.ignore_eos, p.top_k, p.min_tokens) == (0, ["\n"], 7, True, 5, 2)
    assert parse(CompletionRequest, {"model": "m", "prompt": ["only one"]}).single_prompt() == "only one"
    assert parse(CompletionRequest, {"model": "m", "prompt": [[4, 5]]}).single_prompt() == [4, 5]
    assert parse(CompletionRequest, {"model": "m", "prompt": "x"}).max_tokens == 16  # OpenAI's default


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x"}, "model"),
    ({"model": "m"}, "prompt"),
    ({"model": "m", "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": "m", "prompt": {"a": 1}}, "prompt"),
])
def test_request_validation_errors_name_the_param(body, param):
    e = _err(lambda: parse(CompletionRequest, body))
    assert e.status == 400 and e.param == param and e.reason == "invalid_request"


@pytest.mark.parametrize("extra,param", [
    ({"n": 2, "best_of": 1}, "best_of"), ({"best_of": 17}, "best_of"), ({"best_of": 3, "stream": True}, "best_of"),
    ({"n": 0, "best_of": 3}, "n"), ({"suffix": "x"}, "suffix"),
    ({"logit_bias": {"1": 5}}, "logit_bias"), ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_unsupported_options_rejected_clearly(extra, param):
    req = parse(CompletionRequest, {"model": "m", "prompt": "x", **extra})
    e = _err(req.check)
    assert e.param == param and e.status == 400


@pytest.mark.parametrize("field,value", [
    ("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("presence_penalty", 3), ("repetition_penalty", 0),
    ("logprobs", 21), ("min_p", 2), ("n", 0), ("n", 17), ("n", -1),
])
def test_sampling_errors_map_to_param(field, value):
    req = parse(CompletionRequest, {"model": "m", "prompt": "x", field: value})
    e = _err(lambda: req.sampling_params(16, req.logprobs))
    assert e.status == 400 and e.param == field, e.message


def test_chat_request_mapping():
    req = parse(ChatCompletionRequest, {
        "model": "m", "max_completion_tokens": 9, "logprobs": True, "top_logprobs": 3,
        "messages": [{"role": "developer", "content": "sys"},
                     {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    req.check()
    assert req.effective_max_tokens == 9 and req.engine_logprobs == 3
    assert req.normalized_messages() == [{"role": "system", "content": "sys"}, {"role": "user", "content": "ab"}]
    assert parse(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}]}
                 ).effective_max_tokens is None  # the rest of the context
    for body, param in (({"messages": []}, "messages"), ({"messages": [{"role": "bot", "content": "x"}]}, "messages")):
        assert _err(lambda b=body: parse(ChatCompletionRequest, {"model": "m", **b})).param == param
    json_mode = parse(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                              "response_format": {"type": "json_object"}})
    json_mode.check()  # structured outputs are served (serving/response_format.py)
    assert constraint_from_request(json_mode).kind == "json_schema"
    bad = parse(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                        "response_format": {"type": "xml"}})
    assert _err(lambda: constraint_from_request(bad)).param == "response_format"
    img = parse(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert _err(img.normalized_messages).param == "messages"


def test_logprobs_shapes():
    entries = [("He", -0.1, [("He", -0.1), ("Hi", -2.0)]), ("llo", -0.5, [("llo", -0.5), ("y", -1.0)])]
    c = completion_logprobs(entries)
    assert c["tokens"] == ["He", "llo"] and c["text_offset"] == [0, 2] and c["top_logprobs"][1] == {"llo": -0.5, "y": -1.0}
    ch = chat_logprobs(entries)["content"]
    assert ch[0]["token"] == "He" and ch[0]["bytes"] == [72, 101] and len(ch[0]["top_logprobs"]) == 2


# ---- cost ------------------------------------------------------------------------------------------------


def test_cost_math():
    assert request_cost_usd(3600, 2.49) == pytest.approx(2.49)
    assert request_cost_usd(-1, 2.49) == 0
    assert usd_per_million_tokens(1.0, 1_000_000) == 1.0 and usd_per_million_tokens(1.0, 0) is None
    # $2.49/h vs $0.25 per 1M output tokens at 5,000 tok/s full load: 2.49 / (0.25 * 18) = 0.553
    assert break_even_utilization(2.49, 0.25, 5000) == pytest.approx(2.49 / 4.5)


def test_busy_idle_meter_accounts_every_second():
    t = [0.0]
    meter = BusyIdleMeter(clock=lambda: t[0])
    assert meter.sample(100.0, False) == (0, 0)  # baseline: the engine's cumulative busy seconds
    t[0] = 10
    assert meter.sample(104.0, False) == (4.0, 6.0)
    t[0] = 20  # a long step in progress: busy lags, idle is held back until the engine is empty
    assert meter.sample(105.0, True) == (1.0, 0.0)
    t[0] = 25
    busy, idle = meter.sample(112.0, False)
    assert busy == 7.0 and idle == pytest.approx(25 - 12 - 6)
    total_busy, total_idle = 4 + 1 + busy, 6 + idle
    assert total_busy + total_idle == pytest.approx(25)


# ---- request router ranking ----------------------------------------------------------------------------


def test_queue_depth_ranking():
    from mistral_serve.serving.request_router import queue_depth

    small_busy = queue_depth({"batch_capacity": 8, "kv_usage": 0.1}, 6, 10)
    big_busy = queue_depth({"batch_capacity": 64, "kv_usage": 0.1}, 6, 80)
    kv_full = queue_depth({"batch_capacity": 64, "kv_usage": 0.95}, 6, 80)
    assert big_busy < small_busy and big_busy < kv_full
    assert queue_depth(None, None, 10) == 0  # a new replica without stats is preferred
    assert queue_depth({"batch_capacity": 4, "ongoing": 2}, None, 10) == 0.5


def test_retry_avoids_the_replica_that_failed_it():
    """A retried request lists the replica that failed it; that replica ranks last even while its
    routing stats still say it is healthy and idle, and is used only when nothing else is left."""
    import asyncio
    from collections import namedtuple
    from types import SimpleNamespace

    from mistral_serve.engine.sampling_params import SamplingParams
    from mistral_serve.serving.request_router import LeastQueueDepthRouter
    from mistral_serve.serving.wire import GenerateRequest

    replica_id = namedtuple("ReplicaID", "unique_id")  # hashable, like Serve's

    def replica(uid: str, ongoing: int):
        return SimpleNamespace(replica_id=replica_id(uid), max_ongoing_requests=8,
                               routing_stats={"batch_capacity": 4, "ongoing": ongoing, "failed": False})

    victim, busy = replica("victim", 0), replica("busy", 3)
    class Ranking(LeastQueueDepthRouter):  # only the ranking, without Serve's wiring
        replica_queue_len_cache: dict = {}
        candidates: list = []

        def apply_locality_routing(self, _pending):
            return {r.replica_id for r in self.candidates}

    router = object.__new__(Ranking)
    router.initialize_state()  # what Serve calls with request_router_kwargs

    def ranking(candidates, payload):
        router.candidates = candidates
        pending = SimpleNamespace(args=[payload], kwargs={})
        return [r[0].replica_id.unique_id for r in asyncio.run(router.choose_replicas(candidates, pending))]

    def request(avoid=()):
        return GenerateRequest("a", [1], SamplingParams(), avoid_replicas=list(avoid))

    assert ranking([victim, busy], request()) == ["victim", "busy"]  # idle wins
    assert ranking([victim, busy], request(["victim"])) == ["busy", "victim"]
    assert ranking([victim], request(["victim"])) == ["victim"]


# ---- metric names are exactly docs/metrics.md's -----------------------------------------------------------


def test_metric_names_match_docs():
    from mistral_serve.serving.metrics import COST_SERIES, ENGINE_SERIES, ROUTER_SERIES

    doc = (REPO / "docs" / "metrics.md").read_text()
    documented = re.findall(r"^\| `(ray_mistral_serve_[a-z0-9_]+)` \|", doc, flags=re.M)
    assert sorted(documented) == sorted(ENGINE_SERIES + ROUTER_SERIES + COST_SERIES)
    src = (REPO / "mistral_serve" / "serving" / "metrics.py").read_text()
    for name in documented:  # each is declared (counters without Ray's _total suffix)
        base = name.removeprefix("ray_").removesuffix("_total")
        assert f'"{base}"' in src, name


def test_token_buckets():
    from mistral_serve.serving.metrics import token_buckets

    assert token_buckets(512) == [1, 2, 5, 10, 20, 50, 100, 200, 500]


# ---- LLMReplica without Serve -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def replica_args(tiny_model_dir):
    return {"model": str(tiny_model_dir), "engine": {"device": "cpu", "max_num_seqs": 4, "num_threads": 1,
                                                   "kv_cache_memory_bytes": 32 << 20, "max_model_len": 256},
            "replicas": {"stream_interval_ms": 30, "stall_timeout_s": 0.5}}


async def _new_replica(args):
    from mistral_serve.serving.replica import LLMReplica

    cls = LLMReplica.func_or_class
    obj = object.__new__(cls)
    await cls.__init__(obj, args)
    return obj


def _req(rid, stream, max_tokens=12, **sampling):
    from mistral_serve.engine.sampling_params import SamplingParams
    from mistral_serve.serving.wire import GenerateRequest

    return GenerateRequest(rid, [1, 1500, 1600], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                                                **sampling), stream=stream)


@pytest.mark.timeout(120)
def test_replica_messages_coalescing_abort_and_health(replica_args):
    async def main():
        r = await _new_replica(replica_args)
        try:
            # non-streaming: the first token (start signal) and the final message, nothing else
            msgs = [m async for m in r.generate(_req("a", stream=False))]
            assert len(msgs) == 2 and msgs[-1].finish_reason == "length"
            assert sum(m.num_tokens for m in msgs) == 12
            assert (msgs[-1].prompt_tokens, msgs[-1].completion_tokens) == (3, 12)
            assert msgs[-1].cost_usd > 0
            text = "".join(m.text for m in msgs)
            # streaming: same text; with a 30 ms interval tokens are merged into fewer messages
            r.interval_s = 0.03
            r.engine.inject_fault("slow", seconds=0.01)  # ~10 ms steps
            smsgs = [m async for m in r.generate(_req("b", stream=True))]
            assert "".join(m.text for m in smsgs) == text
            assert 2 <= len(smsgs) < 12, [m.num_tokens for m in smsgs]
            r.engine.inject_fault("clear")
            # logprobs travel as (token, logprob, top) triples
            lp = [m async for m in r.generate(_req("c", stream=False, max_tokens=3, logprobs=2))]
            triples = [t for m in lp for t in m.logprobs]
            assert len(triples) == 3 and all(len(top) == 2 for _, _, top in triples)
            # closing a stream early aborts the request and frees its KV blocks
            for stream in (True, False):
                gen = r.generate(_req(f"d{stream}", stream=stream, max_tokens=200))
                await gen.__anext__()
                assert r.engine.stats().kv_blocks_used > 0
                await gen.aclose()
                for _ in range(100):
                    s = r.engine.stats()
                    if s.kv_blocks_used == 0 and s.num_running == 0:
                        break
                    await asyncio.sleep(0.02)
                assert s.kv_blocks_used == 0 and s.num_running == 0 and r._ongoing == 0
            # an invalid request comes back as an error message, not an exception
            bad = [m async for m in r.generate(_req("e", stream=False, max_tokens=300))]
            assert bad[0].status == 400 and bad[0].kind == "context_length"
            # routing / autoscaling stats
            stats = r.record_routing_stats()
            assert stats["batch_capacity"] == 4 and stats["kv_usage"] == 0
            assert set(r.record_autoscaling_stats()) >= {"num_waiting", "num_running", "kv_usage"}
            await r.check_health()
            # a wedged engine (a step that does not return) fails the health check
            r.engine.inject_fault("wedge", seconds=5)
            gen = r.generate(_req("f", stream=True, max_tokens=4))
            task = asyncio.ensure_future(gen.__anext__())
            await asyncio.sleep(1.0)
            with pytest.raises(Exception, match="no progress"):
                await r.check_health()
            r.engine.inject_fault("clear")
            await task
            await gen.aclose()
            # a dead engine loop: requests fail with 503 and the health check fails
            r.engine.inject_fault("raise")
            dead = [m async for m in r.generate(_req("g", stream=False))]
            assert dead[0].status == 503
            with pytest.raises(Exception, match="engine"):
                await r.check_health()
        finally:
            r.__del__()

    asyncio.run(main())


def test_start_local_refuses_a_busy_port_before_starting_ray():
    """A busy server port fails at once with the port named: with direct ingress Ray would move
    the Router to the next port of its range, and /ready on the asked port would never answer."""
    import socket

    from mistral_serve.serving.local import start_local

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=f"port {port} on 127.0.0.1 is already in use"):
            start_local({}, port=port)
