"""The engine in a process of its own (vLLM V1's EngineCore): ``AsyncLLM`` drives it over a pipe.

Why a process, not a thread: a served replica's event loops and Ray's own threads share the
GIL with the engine. The engine thread gives the GIL up around every torch op (hundreds per
step) and then waits for whichever thread took it to give it back. Measured on the 2-core
machine under the burst benchmark, with the engine as a thread: the system was ~25% idle, yet
the engine thread ran only ~62% of the time. Outside Ray, the in-process async engine already
reached only ~0.8 of the offline engine on workload-64 (2,880 against 3,600 tok/s). In its
own process the engine steps as the offline engine does. The replica's threads then cost it
a share of the cores, but never a wait on a lock it does not need. Workload-64 streamed over
HTTP (``mistral-serve bench http``, same machine, one after the other): 1,849-1,897 tok/s
with the engine as a thread, 2,460-2,775 with it as a process (0.51 -> 0.62 of offline).

The wire, one direction each way. Everything is pickled once per message, never per token:
- commands (``AsyncLLM`` → core): ``AddRequest``, ``AbortRequest``, ``SetReportInterval``,
  ``InjectFault``, ``Shutdown``;
- reports (core → ``AsyncLLM``): ``CoreStarted`` once, then ``StepReport``s: each holds the
  deltas of every request since the previous report, the time of the latest progress, a stats
  snapshot (with a request's first output or its end, an abort's answer and a heartbeat;
  otherwise at most every ``STATS_REPORT_S``) and, at most every ``ROUTING_REPORT_S``, the
  prefix-cache routing keys. An idle core sends an empty ``StepReport`` every
  ``IDLE_HEARTBEAT_S``, so the owner can tell idle from wedged.
  ``RequestFailed`` and ``AbortDone`` answer single commands; ``CoreFailed`` is the last word
  of a core whose step raised.

Reports are coalesced (``_Reporter``): a step whose deltas nobody waits for (no request's first
token, no finished request) is merged into the next report unless the report interval has
passed since the last one; the deltas of a request whose owner wants only its end (a
non-streaming one) never make a report go. A report costs its reader far more than the
unpickling in a warm loop suggests: the engine's threads evict the reader's caches between two
reports, and the reader runs cold. Measured on the 2-vCPU machine (a standalone ``AsyncLLM``,
one stream, per-thread CPU from /proc): 0.3-0.37 ms of the owner's CPU per report, ~0.1 ms of
it unpickling a report that takes 10 µs in a warm loop (4 of them the stats snapshot); hence
the stats at most every ``STATS_REPORT_S``: 0.27-0.31 ms per report after. Sequential 64-token
requests through `mistral-serve serve`, one report per ~4 ms step against coalesced, interleaved runs: 17-21 ->
5-6 ms of Router CPU per non-streaming request, 9-12 -> 6 ms per streaming one at 4 concurrent.
The owner keeps the interval at the gap it sends a stream's messages at (``SetReportInterval``:
the replica's pacing, which grows with the number of streams), so no message waits for it.

The core's main thread constructs and steps the engine: it is the thread whose OpenMP team
``torch.set_num_threads`` sizes (OpenMP counts threads per OS thread, and Ray's
``OMP_NUM_THREADS=1`` is inherited). A receiver thread reads commands into a queue the loop
drains between steps. It compiles grammars for structured outputs before queueing them, so no
step waits on a compile, and it applies fault hooks (tests) at once, even while the loop is
wedged. The core exits when its owner's end of the pipe closes (the replica died).
"""

from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

from mistral_serve.engine.args import EngineArgs
from mistral_serve.engine.outputs import RequestOutput
from mistral_serve.engine.sampling_params import SamplingParams
from mistral_serve.engine.stats import EngineStats

IDLE_HEARTBEAT_S = 0.5
ROUTING_REPORT_S = 0.5
STATS_REPORT_S = 0.1  # stats readers poll at ~1 s (routing, autoscaling, metrics export)


# ---- commands ----------------------------------------------------------------------------------

@dataclass(slots=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    interim: bool = True  # the owner wants deltas before the end (False: a non-streaming request)


@dataclass(slots=True)
class SetReportInterval:
    """The gap the core may hold deltas nobody waits for (``_Reporter``)."""

    seconds: float


@dataclass(slots=True)
class AbortRequest:
    request_id: str
    token: int | None = None  # set: answer with an ``AbortDone`` of this token


@dataclass(slots=True)
class InjectFault:
    """Test hooks (reliability tests): ``raise`` makes the step after ``after_steps`` more raise
    (the loop dies, as on a CUDA error); ``wedge`` blocks the loop before its next step for
    ``seconds`` (no progress); ``slow`` sleeps ``seconds`` before every step; ``clear`` removes
    the hook and releases a wedge."""

    kind: str
    after_steps: int = 0
    seconds: float = 0.0


@dataclass(slots=True)
class Shutdown:
    pass


# ---- reports -----------------------------------------------------------------------------------

@dataclass(slots=True)
class CoreFacts:
    """What the owner needs to know about the engine and never changes."""

    max_model_len: int
    vocab_size: int
    quantization: str
    block_size: int


@dataclass(slots=True)
class CoreStarted:
    facts: CoreFacts | None
    stats: EngineStats | None
    error: BaseException | None = None  # the engine could not be built


@dataclass(slots=True)
class StepReport:
    """One step's deltas. Their ``prompt_token_ids`` are left empty (``without_prompts``): the
    async engine sent the prompt and puts it back, so no step pickles O(context) per request."""

    outputs: list[RequestOutput]
    stats: EngineStats | None  # None: not sent with this report (``EngineCore._report``); the owner keeps the last
    progress_time: float  # time.monotonic() (one clock for all processes) of the latest progress
    routing_keys: list[int] | None = None  # None: unchanged since the last report that had them


@dataclass(slots=True)
class RequestFailed:
    request_id: str
    error: BaseException  # a RequestError (client-facing message)


@dataclass(slots=True)
class AbortDone:
    token: int
    output: RequestOutput | None  # as StepReport's, without the prompt


def without_prompts(outputs: list[RequestOutput]) -> list[RequestOutput]:
    """``outputs`` (fresh objects of this step) with the prompt left out for the pipe."""
    for out in outputs:
        out.prompt_token_ids = []
    return outputs


@dataclass(slots=True)
class CoreFailed:
    error: str


# ---- the core process ----------------------------------------------------------------------------

def run_engine_core(args: EngineArgs, conn: Connection, report_interval_s: float = 0.0) -> None:
    """The core process's entry point (spawned by ``AsyncLLM``)."""
    from mistral_serve.engine.llm_engine import LLMEngine

    try:
        engine = LLMEngine(args)
    except BaseException as exc:  # noqa: BLE001 - reported to the owner, which raises it
        conn.send(CoreStarted(None, None, exc))
        return
    facts = CoreFacts(engine.max_model_len, engine.config.vocab_size, engine.quantization,
                      engine.block_manager.block_size)
    conn.send(CoreStarted(facts, engine.stats.snapshot(alive=True, seconds_since_progress=0.0)))
    EngineCore(engine, conn, report_interval_s).run()


class _FaultHook:
    """The fault a test injected, checked by the loop before every step."""

    def __init__(self) -> None:
        self.fault: InjectFault | None = None
        self.release = threading.Event()

    def set(self, fault: InjectFault) -> None:
        if fault.kind not in ("raise", "wedge", "slow", "clear"):
            return
        self.release.set()  # a new hook (or clear) ends any wedge
        self.release = threading.Event()
        self.fault = None if fault.kind == "clear" else InjectFault(fault.kind, fault.after_steps, fault.seconds)

    def before_step(self) -> None:
        fault = self.fault
        if fault is None:
            return
        if fault.kind == "raise":
            if fault.after_steps <= 0:
                raise RuntimeError("injected engine fault (test hook)")
            fault.after_steps -= 1
        elif fault.kind == "wedge":
            self.release.wait(fault.seconds)
            if self.fault is fault:
                self.fault = None
        else:
            time.sleep(fault.seconds)


class _Reporter:
    """Which deltas go out now and which are merged into the next report (the module docstring:
    why). A report goes at once when it holds a request's first output (TTFT) or a finished one
    (a client's slot frees). Otherwise it goes once ``interval_s`` has passed since the last
    report, or would pass before the next step ends (the last step's duration predicts it, so a
    held token never waits a long step out), if it holds a delta of a request whose owner
    wants interim deltas; and at least every ``IDLE_HEARTBEAT_S`` while the engine works (its
    stats, and the progress a health check reads). Every report carries every pending delta."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.pending: dict[str, RequestOutput] = {}  # request id -> its deltas merged, unsent
        self.started: set[str] = set()  # requests whose first output was sent
        self.quiet: set[str] = set()  # requests whose owner wants only the first output and the end
        self.sent_at = -interval_s
        self.urgent = False  # the last report returned by ``add`` held a request's first output or its end

    def add(self, outputs: list[RequestOutput], now: float, step_s: float) -> list[RequestOutput] | None:
        """Take a step's deltas; returns every pending output if a report should go now, else None."""
        urgent = False
        for out in outputs:
            rid = out.request_id
            if rid not in self.started or out.finished:
                urgent = True
            held = self.pending.get(rid)
            if held is None:
                self.pending[rid] = out
            else:
                held.merge(out)
        if not urgent and now - self.sent_at < IDLE_HEARTBEAT_S and (
                now + step_s < self.sent_at + self.interval_s or self.quiet.issuperset(self.pending)):
            return None
        self.urgent = urgent
        return self.flush(now)

    def flush(self, now: float) -> list[RequestOutput]:
        outputs = list(self.pending.values())
        self.pending.clear()
        for out in outputs:
            if out.finished:
                self.started.discard(out.request_id)
                self.quiet.discard(out.request_id)
            else:
                self.started.add(out.request_id)
        self.sent_at = now
        return outputs

    def take(self, request_id: str, last: RequestOutput | None) -> RequestOutput | None:
        """The request's unsent deltas with its ``last`` output merged in (an abort's answer)."""
        self.started.discard(request_id)
        self.quiet.discard(request_id)
        held = self.pending.pop(request_id, None)
        if held is None or last is None:  # nothing held, or the engine no longer knew the request
            return last
        held.merge(last)
        return held


class EngineCore:
    def __init__(self, engine, conn: Connection, report_interval_s: float = 0.0) -> None:
        self.engine = engine
        self.conn = conn
        self._reporter = _Reporter(report_interval_s)
        self._commands: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._send_lock = threading.Lock()
        self._stopping = False
        self._faults = _FaultHook()
        self._routing_sent_at = -ROUTING_REPORT_S
        self._stats_sent_at = -STATS_REPORT_S
        threading.Thread(target=self._receive, name="engine-core-receiver", daemon=True).start()

    def _send(self, report) -> None:
        with self._send_lock:
            self.conn.send(report)

    def _receive(self) -> None:
        """Commands from the owner, until it shuts us down or goes away."""
        try:
            while True:
                cmd = self.conn.recv()
                if isinstance(cmd, InjectFault):
                    self._faults.set(cmd)
                    continue
                if isinstance(cmd, SetReportInterval):
                    self._reporter.interval_s = cmd.seconds  # read by the loop at its next step
                    continue
                if isinstance(cmd, AddRequest) and cmd.params.structured_output is not None:
                    try:  # compiled here, cached: the loop then only copies the matcher
                        self.engine.grammars.prepare(cmd.params.structured_output)
                    except ValueError as exc:
                        from mistral_serve.engine.llm_engine import RequestError

                        self._send(RequestFailed(cmd.request_id, RequestError(str(exc))))
                        continue
                self._commands.append(cmd)
                self._wake.set()
                if isinstance(cmd, Shutdown):
                    return
        except (EOFError, OSError):
            # The owner is gone (a killed replica): nobody can read our outputs.
            os._exit(0)

    def run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                self._apply_commands()
                if not engine.has_unfinished_requests():
                    if not self._wake.wait(timeout=IDLE_HEARTBEAT_S):
                        self._report([])
                    self._wake.clear()
                    continue
                self._faults.before_step()
                start = time.monotonic()
                outputs = engine.step()
                now = time.monotonic()
                outputs = self._reporter.add(outputs, now, now - start)
                if outputs is not None:
                    self._report(outputs, now, with_stats=self._reporter.urgent)
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the waiting clients
            self._send(CoreFailed(repr(exc)))

    def _apply_commands(self) -> None:
        from mistral_serve.engine.llm_engine import RequestError

        aborted: list[RequestOutput] = []
        answers: list[AbortDone] = []
        while self._commands:
            cmd = self._commands.popleft()
            if isinstance(cmd, AddRequest):
                try:
                    self.engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params, cmd.priority)
                except RequestError as exc:
                    self._send(RequestFailed(cmd.request_id, exc))
                    continue
                if not cmd.interim:
                    self._reporter.quiet.add(cmd.request_id)
            elif isinstance(cmd, AbortRequest):
                out = self._reporter.take(cmd.request_id, self.engine.abort_request(cmd.request_id))
                if cmd.token is not None:
                    answers.append(AbortDone(cmd.token, without_prompts([out])[0] if out is not None else None))
                elif out is not None:
                    aborted.append(out)
            elif isinstance(cmd, Shutdown):
                self._stopping = True
        if aborted or answers:
            # The stats first: whoever awaited an abort then reads its blocks already freed.
            self._report(aborted)
            for answer in answers:
                self._send(answer)

    def _report(self, outputs: list[RequestOutput], now: float | None = None, with_stats: bool = True) -> None:
        """``with_stats``: the report must carry the stats (a request starts or ends, whose owner
        may read them next: its blocks taken, or freed); otherwise they go at most every
        ``STATS_REPORT_S``."""
        now = time.monotonic() if now is None else now
        keys = None
        if now - self._routing_sent_at >= ROUTING_REPORT_S:
            keys = self.engine.block_manager.routing_keys()
            self._routing_sent_at = now
        stats = None
        if with_stats or now - self._stats_sent_at >= STATS_REPORT_S:
            stats = self.engine.stats.snapshot(alive=True, seconds_since_progress=0.0)
            self._stats_sent_at = now
        self._send(StepReport(without_prompts(outputs), stats, now, keys))

