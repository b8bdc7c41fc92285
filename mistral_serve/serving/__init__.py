"""The serving layer on Ray Serve: ``build_app`` is the application builder that
``serve_config.yaml`` (``import_path: mistral_serve.serving:build_app``) and
``mistral-serve serve`` use. Importing this package does not import Ray."""

from __future__ import annotations

from typing import Any


def build_app(args: dict[str, Any] | None = None):
    """The Serve application (Router → LLMReplica) for typed args; see serving/config.py."""
    from mistral_serve.serving.app import build_app as _build

    return _build(args)


__all__ = ["build_app"]
