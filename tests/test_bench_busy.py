"""signalrl/bench/busy.py: the --busy background load starts, spins, and is stopped with its block, whatever happens."""
from __future__ import annotations

import time

import pytest

from signalrl.bench import busy


def test_busy_core_runs_inside_the_block_and_stops_after():
    with busy.busy_core(60) as proc:
        time.sleep(0.2)
        assert proc.poll() is None  # spinning
    assert proc.poll() is not None


def test_busy_core_stops_on_exception():
    with pytest.raises(RuntimeError):
        with busy.busy_core(60) as proc:
            raise RuntimeError("boom")
    assert proc.poll() is not None


def test_busy_core_is_bounded_in_time():
    with busy.busy_core(0.3) as proc:
        proc.wait(timeout=20)  # exits by itself after max_s
        assert proc.returncode == 0
