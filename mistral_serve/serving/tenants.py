"""Tenants and their API keys from the three sources: the config, an environment variable and a
mounted file (a Kubernetes Secret). Read once per Router / AdmissionState replica at start."""

from __future__ import annotations

import logging
import os

from mistral_serve.serving.admission import ANONYMOUS, KeyStore, Limits, _digest_of, load_key_file, parse_key_lines
from mistral_serve.serving.config import AdmissionConfig, TenantConfig

logger = logging.getLogger("ray.serve")


def _limits(t: TenantConfig) -> Limits:
    return Limits(t.requests_per_minute, t.tokens_per_minute, t.priority)


def build_tenants(cfg: AdmissionConfig, environ: dict | None = None) -> tuple[KeyStore, dict[str, Limits], bool]:
    """(key store, limits by tenant, whether requests without a key are served as 'anonymous')."""
    environ = os.environ if environ is None else environ
    store = KeyStore()
    limits: dict[str, Limits] = {}
    for t in cfg.tenants:
        limits[t.name] = _limits(t)
        for key in t.api_keys:
            store.add(t.name, _digest_of(key))
    extra: list[tuple[str, str]] = []
    if cfg.api_keys_env and environ.get(cfg.api_keys_env):
        extra += parse_key_lines(environ[cfg.api_keys_env], f"${cfg.api_keys_env}")
    if cfg.api_keys_file:
        if os.path.exists(cfg.api_keys_file):
            extra += load_key_file(cfg.api_keys_file)
        else:
            logger.warning("api_keys_file %s does not exist; no keys loaded from it", cfg.api_keys_file)
    for tenant, digest in extra:
        if tenant == ANONYMOUS:
            raise ValueError("'anonymous' is reserved for requests without an API key")
        store.add(tenant, digest)
        limits.setdefault(tenant, _limits(cfg.default_limits))
    allow_anonymous = cfg.allow_anonymous if cfg.allow_anonymous is not None else len(store) == 0
    if allow_anonymous:
        limits[ANONYMOUS] = _limits(cfg.anonymous)
    return store, limits, allow_anonymous
