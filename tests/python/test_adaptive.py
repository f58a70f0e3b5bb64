"""Adaptive checkpoint intervals: Daly's formula, the MTBF update, the schedule."""

import math
import time

import pytest

from tierckpt.adaptive import daly_interval, interval_steps, mtbf_from_records


def daly_reference(d, m):
    if d >= 2 * m:
        return m
    return math.sqrt(2 * d * m) * (1 + math.sqrt(d / (2 * m)) / 3 + (d / (2 * m)) / 9) - d


def test_daly_known_values():
    # d = 2 s, M = 1 h: sqrt(14400) = 120; x = 1/3600; 120 * (1 + (1/60)/3 + (1/3600)/9) - 2
    assert daly_interval(2.0, 3600.0) == pytest.approx(120 * (1 + 1 / 180 + 1 / 32400) - 2, rel=1e-12)
    assert daly_interval(2.0, 3600.0) == pytest.approx(118.6704, abs=1e-3)
    # d = 50, M = 100: x = 0.25 -> sqrt(10000) * (1 + 0.5/3 + 0.25/9) - 50 = 69.444...
    assert daly_interval(50.0, 100.0) == pytest.approx(100 * (1 + 1 / 6 + 1 / 36) - 50, rel=1e-12)
    assert daly_interval(200.0, 100.0) == 100.0   # d >= 2M: M
    assert daly_interval(0.0, 100.0) == 0.0
    for d, m in [(0.1, 86400), (30, 3600), (1, 10), (19.9, 10)]:
        assert daly_interval(d, m) == pytest.approx(daly_reference(d, m), rel=1e-12)
    with pytest.raises(ValueError):
        daly_interval(1.0, 0.0)


def test_interval_grows_with_cost_and_shrinks_with_failures():
    now = time.time()
    steps = [interval_steps(d, 3600.0, 0.1, 1, 10**9) for d in (0.01, 0.1, 1.0, 10.0)]
    assert steps == sorted(steps) and len(set(steps)) == 4, steps
    start = {"unix_ms": int((now - 7200) * 1000), "kind": "start", "detail": "", "step": None, "restart": 0}
    fail = lambda k: {"unix_ms": int(now * 1000), "kind": k, "detail": "x", "step": 10, "restart": 1}
    m0 = mtbf_from_records(3600.0, [start], now)
    m2 = mtbf_from_records(3600.0, [start, fail("exit"), fail("signal")], now)
    m4 = mtbf_from_records(3600.0, [start] + [fail("hang")] * 4, now)
    assert m0 == pytest.approx(3600 + 7200, rel=1e-6)
    assert m2 == pytest.approx((3600 + 7200) / 3, rel=1e-6)
    assert m0 > m2 > m4
    i0, i2, i4 = (interval_steps(1.0, m, 0.1, 1, 10**9) for m in (m0, m2, m4))
    assert i0 > i2 > i4


def test_interval_clamped_and_conservative_without_measurements():
    assert interval_steps(None, 3600, 0.1, 7, 100) == 7
    assert interval_steps(1.0, 3600, None, 7, 100) == 7
    assert interval_steps(1e-9, 3600, 10.0, 7, 100) == 7
    assert interval_steps(100.0, 1e9, 1e-3, 7, 100) == 100
    assert 7 <= interval_steps(1.0, 3600, 1.0, 7, 100) <= 100
