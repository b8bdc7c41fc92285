"""The engine core's report coalescing (engine_core._Reporter): which deltas go at once, which
wait for the next report, and that none is lost or reordered."""

from __future__ import annotations

from mistral_serve.engine.engine_core import IDLE_HEARTBEAT_S, _Reporter
from mistral_serve.engine.outputs import CompletionOutput, RequestOutput


def _delta(rid: str, token: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(rid, [1, 2], [CompletionOutput(0, f"<{token}>", [token], "length" if finished else None)],
                         finished)


def _tokens(outputs: list[RequestOutput] | None) -> dict[str, list[int]]:
    return {o.request_id: o.outputs[0].token_ids for o in outputs or []}


def test_first_and_finished_outputs_go_at_once_the_rest_waits_for_the_interval():
    r = _Reporter(interval_s=0.010)
    assert _tokens(r.add([_delta("a", 10)], now=1.000, step_s=0.002)) == {"a": [10]}  # a's first token
    assert r.urgent  # a first output: the core sends its stats along (blocks taken)
    assert r.add([_delta("a", 11)], now=1.002, step_s=0.002) is None
    assert r.add([_delta("a", 12)], now=1.004, step_s=0.002) is None
    # b starts: its first token takes a's held ones along
    assert _tokens(r.add([_delta("a", 13), _delta("b", 20)], now=1.006, step_s=0.002)) == \
        {"a": [11, 12, 13], "b": [20]}
    assert r.add([_delta("a", 14), _delta("b", 21)], now=1.008, step_s=0.002) is None
    # the interval since the last report has passed: everything pending goes
    out = r.add([_delta("a", 15), _delta("b", 22)], now=1.016, step_s=0.002)
    assert _tokens(out) == {"a": [14, 15], "b": [21, 22]} and [o.outputs[0].text for o in out] == \
        ["<14><15>", "<21><22>"]
    assert not r.urgent  # an interval's report: its stats may wait (engine_core.STATS_REPORT_S)
    assert r.add([_delta("a", 16)], now=1.018, step_s=0.002) is None
    done = r.add([_delta("a", 17, finished=True)], now=1.019, step_s=0.001)  # the end goes at once
    assert _tokens(done) == {"a": [16, 17]} and done[0].finished and done[0].outputs[0].finish_reason == "length"
    assert r.urgent
    assert r.pending == {} and r.started == {"b"}


def test_a_long_step_does_not_hold_tokens_past_the_interval():
    r = _Reporter(interval_s=0.010)
    r.add([_delta("a", 1)], now=1.000, step_s=0.001)
    assert r.add([_delta("a", 2)], now=1.001, step_s=0.001) is None
    # the last step took 50 ms: waiting for the next one would deliver token 3 ~50 ms late
    assert _tokens(r.add([_delta("a", 3)], now=1.052, step_s=0.050)) == {"a": [2, 3]}
    r.add([_delta("a", 4)], now=1.053, step_s=0.001)
    assert _tokens(r.add([_delta("a", 5)], now=1.054, step_s=0.060)) == {"a": [4, 5]}  # predicted


def test_an_aborts_answer_carries_the_held_tokens():
    r = _Reporter(interval_s=1.0)
    r.add([_delta("a", 1)], now=0.0, step_s=0.001)
    r.add([_delta("a", 2)], now=0.1, step_s=0.001)
    r.add([_delta("a", 3)], now=0.2, step_s=0.001)
    answer = r.take("a", RequestOutput("a", [1, 2], [CompletionOutput(0, "", [], "abort")], True))
    assert answer.outputs[0].token_ids == [2, 3] and answer.finished and answer.outputs[0].finish_reason == "abort"
    assert r.pending == {} and r.started == set()
    assert r.take("unknown", None) is None


def test_zero_interval_reports_every_step():
    r = _Reporter(interval_s=0.0)
    r.add([_delta("a", 1)], now=0.0, step_s=0.001)
    for i in range(2, 6):
        assert _tokens(r.add([_delta("a", i)], now=i * 0.001, step_s=0.001)) == {"a": [i]}


def test_quiet_requests_report_their_start_and_end_and_a_heartbeat_only():
    """A non-streaming request's deltas never make a report go (its owner waits for the end),
    but ride along with any report, and the core still reports every IDLE_HEARTBEAT_S."""
    r = _Reporter(interval_s=0.010)
    r.quiet.add("q")
    assert _tokens(r.add([_delta("q", 1)], now=1.000, step_s=0.002)) == {"q": [1]}  # the start signal
    for i in range(2, 40):
        assert r.add([_delta("q", i)], now=1.000 + i * 0.005, step_s=0.005) is None
    beat = r.add([_delta("q", 40)], now=1.000 + IDLE_HEARTBEAT_S, step_s=0.005)
    assert _tokens(beat) == {"q": list(range(2, 41))}
    r.add([_delta("s", 100)], now=1.6, step_s=0.005)  # a streaming request's first token
    assert r.add([_delta("q", 41), _delta("s", 101)], now=1.605, step_s=0.002) is None
    assert _tokens(r.add([_delta("q", 42), _delta("s", 102)], now=1.611, step_s=0.002)) == \
        {"q": [41, 42], "s": [101, 102]}  # s is due: q's tokens ride along
    done = r.add([_delta("q", 43, finished=True)], now=1.612, step_s=0.001)
    assert _tokens(done) == {"q": [43]} and r.quiet == set()
