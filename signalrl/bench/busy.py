"""``--busy``: run the benchmark with one core kept busy by a bounded background load.

Training runs on a busy machine: a worker thread, the event loop, data loading and rollouts share the cores. A
kernel that splits sub-millisecond work across threads then waits for a time slice on the busy core (issue 17:
``ops.gae`` at B=256, T=1024 took 8 ms with two threads and one busy core, 0.3 ms idle). This mode measures every
row with that load present, so the same ratios show how each provider holds up.

The load is one child process spinning on the CPU at normal priority (one core's worth: a single thread). It is
bounded three ways: it exits by itself after ``max_s`` seconds, it exits when its parent is gone (checked every
few milliseconds, and on Linux the kernel sends it SIGKILL when the parent dies), and :func:`busy_core` kills it
when its block exits — normally, on an exception or on Ctrl-C — and at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys

# The spinning child: pure Python busy work, checking its deadline and its parent every ~5 ms.
_SPIN = """
import os, sys, time
parent, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
x = 0
while time.monotonic() < end and os.getppid() == parent:
    for i in range(20000):
        x ^= i
"""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the child's own parent check still stops it
        pass


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass


@contextlib.contextmanager
def busy_core(max_s: float):
    """Keep one core busy for the duration of the block (and at most ``max_s`` seconds)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SPIN, str(os.getpid()), str(float(max_s))],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    atexit.register(_stop, proc)
    try:
        yield proc
    finally:
        _stop(proc)
        atexit.unregister(_stop)


def describe(max_s: float) -> str:
    return (f"one core kept busy by a spinning child process (signalrl/bench/busy.py; at most {max_s:.0f} s, "
            "stopped with the run)")
