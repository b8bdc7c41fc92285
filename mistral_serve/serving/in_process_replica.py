"""The engine in the Router's own process (``router.colocate_engine``): an ``LLMReplica`` built
in place of a separate deployment, and its calls shaped like a streaming handle's.

Why: with a separate LLMReplica every request costs a Ray call and every streamed chunk a Ray
message, in two processes. On a 2-core machine (tiny model, `mistral-serve bench serve`, burst of
128 streams) that was 11.6 ms of Router and 8.8 ms of LLMReplica CPU per request, taken from the
engine's cores; in one process the Router and the replica logic together cost 5.4 ms
(docs/serving.md). The engine core still runs in a process of its own (engine/engine_core.py),
so the Router's event loop never waits on a forward pass.

The replica logic is the LLMReplica class itself (pacing, accumulation, billing of aborted
requests, health): one implementation for both layouts. ``InProcessCall`` gives the replica
client what a streaming ``DeploymentResponseGenerator`` gives it: ``__anext__`` for the next
wire message and ``cancel()``, which cancels the task that drives ``LLMReplica.generate``, as
Serve cancels a replica's call, so the generator's cleanup aborts the engine request.
"""

from __future__ import annotations

import asyncio

from mistral_serve.serving.wire import GenerateRequest, ReplicaMessage

_END = object()  # the generator finished


async def start_in_process_replica(args: dict):
    """An ``LLMReplica`` instance (engine started) in this process, outside Serve's replica wrapper."""
    from mistral_serve.serving.replica import LLMReplica

    cls = LLMReplica.func_or_class
    replica = cls.__new__(cls)
    await replica.__init__(args)  # LLMReplica.__init__ is async (Serve awaits it the same way)
    return replica


class InProcessCall:
    """One ``LLMReplica.generate`` call, driven by a task of its own so that cancelling it needs
    no ``await`` from the caller (``cancel()`` runs in ``finally`` blocks and finalizers)."""

    def __init__(self, replica, req: GenerateRequest) -> None:
        self._messages: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._drive(replica.generate(req)))

    async def _drive(self, gen) -> None:
        try:
            async for msg in gen:
                self._messages.put_nowait(msg)
            self._messages.put_nowait(_END)
        except Exception as exc:  # noqa: BLE001 - delivered to the reader, which maps it (replica_client.py)
            self._messages.put_nowait(exc)
        finally:
            await gen.aclose()  # after a cancel: runs generate's cleanup (engine abort, billing)

    async def __anext__(self) -> ReplicaMessage:
        msg = await self._messages.get()
        if msg is _END:
            raise StopAsyncIteration
        if isinstance(msg, BaseException):
            raise msg
        return msg

    def cancel(self) -> None:
        self._task.cancel()


def in_process_calls(replica):
    """The replica client's call opener for an in-process replica."""
    return lambda req: InProcessCall(replica, req)
