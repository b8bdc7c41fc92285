"""The ``AdmissionState`` deployment: the tenants' token buckets, shared by every Router replica."""

from __future__ import annotations

import dataclasses

from ray import serve

from mistral_serve.serving.admission import TenantLimiter
from mistral_serve.serving.config import AppArgs
from mistral_serve.serving.tenants import build_tenants


@serve.deployment(name="AdmissionState", num_replicas=1, max_ongoing_requests=4096,
                  ray_actor_options={"num_cpus": 0})
class AdmissionState:
    """A tenant's limit holds whichever Router its requests land on. One replica; if it is lost
    its replacement starts with full buckets, and Routers fall back to their local share
    meanwhile (tickets.py)."""

    def __init__(self, args: dict) -> None:
        cfg = AppArgs.model_validate(args).admission
        _, limits, _ = build_tenants(cfg)
        self.limiter = TenantLimiter(limits)

    async def reserve(self, tenant: str, tokens: int) -> dict:
        return dataclasses.asdict(self.limiter.reserve(tenant, tokens))

    async def refund(self, tenant: str, tokens: int) -> None:
        self.limiter.refund(tenant, tokens)

    async def snapshot(self) -> dict:
        return self.limiter.snapshot()
