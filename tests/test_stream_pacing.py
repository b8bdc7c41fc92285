"""Stream pacing: one message per step at low load, a bounded total message rate under load."""

from __future__ import annotations

import pytest

from mistral_serve.serving.stream_pacing import StreamPacer


def test_interval_grows_with_open_streams_between_the_bounds() -> None:
    pacer = StreamPacer(min_interval_s=0.01, max_interval_s=0.2, messages_per_s=400)
    assert pacer.interval_s() == 0.01  # no stream open
    pacer.opened()
    assert pacer.interval_s() == 0.01  # one stream: one message per step
    for _ in range(63):
        pacer.opened()
    assert pacer.interval_s() == pytest.approx(64 / 400)  # 64 streams: 400 messages/s in all
    for _ in range(200):
        pacer.opened()
    assert pacer.interval_s() == 0.2  # never slower than the max gap
    for _ in range(264):
        pacer.closed()
    assert pacer.active == 0 and pacer.interval_s() == 0.01


def test_zero_rate_means_every_step_and_bounds_are_checked() -> None:
    pacer = StreamPacer(0.0, 0.2, messages_per_s=0)
    for _ in range(100):
        pacer.opened()
    assert pacer.interval_s() == 0.0
    with pytest.raises(ValueError):
        StreamPacer(0.3, 0.2, 100)
