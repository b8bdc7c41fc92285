"""Cluster status: how many LLMReplica and Router replicas are RUNNING, from Serve's
controller. The Router derives its readiness, its default waiting bound (two batches per ready
replica) and its share of the limits (one Router of several) from them. With the engine in the
Router's own process (``router.colocate_engine``) there is exactly one replica, ready once the
Router is: a failed engine fails the Router's health check instead."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ray import serve

logger = logging.getLogger("ray.serve")

LLM_DEPLOYMENT = "LLMReplica"
ROUTER_DEPLOYMENT = "Router"


class ClusterStatus:
    def __init__(self, app_name: str | None, on_change: Callable[[], None], engine_in_process: bool = False) -> None:
        self.app_name = app_name
        self.engine_in_process = engine_in_process
        self.ready_replicas: int | None = 1 if engine_in_process else None  # None: not polled yet
        self.num_routers = 1
        self._on_change = on_change  # called after every successful poll

    async def poll(self) -> None:
        """One read of ``serve.status()`` (in a thread: it blocks); on failure the last known
        state stays. With the engine in process there is nothing to read (one Router, one
        replica: config.py checks it), and each read costs the Router ~30 ms of CPU (Serve
        pickles the request router's class into the reply)."""
        if self.engine_in_process:
            self._on_change()
            return
        try:
            status = await asyncio.to_thread(serve.status)
            app = status.applications.get(self.app_name) if self.app_name else None
            if app is None:
                return
            deps = app.deployments
            if LLM_DEPLOYMENT in deps:
                self.ready_replicas = int(deps[LLM_DEPLOYMENT].replica_states.get("RUNNING", 0))
            if ROUTER_DEPLOYMENT in deps:
                self.num_routers = max(1, int(deps[ROUTER_DEPLOYMENT].replica_states.get("RUNNING", 0)))
            self._on_change()
        except Exception:  # noqa: BLE001 - keep the last known state
            logger.debug("serve.status() failed", exc_info=True)
