"""Redaction for the opt-in prompt log (``admission.log_prompts``; off by default, and then
no prompt or completion text is ever logged). What it masks: API-key-like and bearer tokens,
long opaque strings (hex, base64, JWTs), e-mail addresses and long digit runs (card, phone and
account numbers); the result is cut to ``max_chars``."""

from __future__ import annotations

import re

_PATTERNS = [
    (re.compile(r"(?i)\bbearer\s+\S+"), "Bearer [REDACTED_KEY]"),
    (re.compile(r"(?i)\b(?:sk|pk|rk|key|api|tok|token|secret)[-_][A-Za-z0-9_\-]{6,}"), "[REDACTED_KEY]"),
    (re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}"), "[REDACTED_EMAIL]"),
    (re.compile(r"[A-Za-z0-9+/_\-.=]{32,}"), "[REDACTED_SECRET]"),
    (re.compile(r"\d(?:[ \-]?\d){8,}"), "[REDACTED_NUMBER]"),
]


def redact(text: str, max_chars: int = 256) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    if len(text) > max_chars:
        text = f"{text[:max_chars]}...[+{len(text) - max_chars} chars]"
    return text
