"""Time and peak memory of one benchmark unit.

Time
----
* CPU: ``torch.utils.benchmark.Timer``. Warm-up calls are run first and discarded; then blocks of
  ``number`` calls are timed with ``Timer.timeit(number)`` until both a minimum sample count and a
  minimum measuring time are reached. Each sample is the mean of one block; we report the median
  and the 20th/80th percentiles over the samples.
* CUDA: one pair of CUDA events around every call, after the L2 cache has been flushed by writing a
  buffer larger than it (as ``triton.testing.do_bench`` does). Warm-up calls are discarded.
* Steps timed in turns (:func:`time_interleaved`, the paired cases: a whole loss on a model): each sample is a
  block of about 10 ms of calls between two device synchronizations, timed by the host clock (no L2 flush: a
  model step is far larger than the cache), the providers taking turns round after round.

In both cases the step function rotates over several copies of the inputs (see ``rotation_copies``)
so that a small working set cannot sit in the last-level cache between calls.

Peak memory above inputs
------------------------
* CUDA: ``torch.cuda.max_memory_allocated()`` during one call minus ``torch.cuda.memory_allocated()``
  just before it (inputs, and for the backward mode the saved autograd graph, are already resident).
* CPU: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free made through
  the c10 CPU allocator; the peak of the running sum of those events during one call is the peak of
  live tensor bytes above what existed before the call. This counts every tensor (ATen, native
  extension, Triton-interpreter outputs) but not memory that a library mallocs privately (e.g. a BLAS
  packing buffer or a ``std::vector`` inside a C++ kernel). ``tracemalloc`` does not see torch
  allocations at all, and an RSS high-water mark is blurred by the allocator's free lists, which is
  why we use the profiler.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return math.nan
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples_s: Sequence[float]) -> Timing:
    ms = [s * 1e3 for s in samples_s]
    return Timing(statistics.median(ms), percentile(ms, 20), percentile(ms, 80), len(ms))


def last_level_cache_bytes(device: torch.device) -> int:
    """L2 size on CUDA; the largest cache the OS reports on CPU (fallback 32 MiB)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20)
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            with open(os.path.join(base, idx, "size")) as f:
                text = f.read().strip()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            num = int(text[:-1]) if text[-1:] in "KMG" else int(text)
            best = max(best, num * mult)
    except (OSError, ValueError):
        pass
    return best or 32 * 2**20


def rotation_copies(input_bytes: int, cache_bytes: int, *, max_copies: int = 8,
                    max_total_bytes: int = 2**30) -> int:
    """How many copies of the inputs to rotate through.

    Enough copies that the rotated working set is at least twice the last-level cache, capped at
    ``max_copies`` and at ``max_total_bytes`` of inputs in total; a single copy when one copy alone
    already exceeds twice the cache (then no cache can hold it between calls anyway).
    """
    if input_bytes <= 0:
        return max_copies
    want = math.ceil(2 * cache_bytes / input_bytes)
    by_mem = max(1, max_total_bytes // input_bytes)
    return int(max(1, min(want, max_copies, by_mem)))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cpu(step: Callable[[], object], *, warmup_s: float = 0.05, warmup_min: int = 2,
             rep_s: float = 0.3, min_samples: int = 5, max_samples: int = 50,
             block_s: float = 0.01) -> Timing:
    """Median / p20 / p80 of ``step`` on the CPU via torch.utils.benchmark.Timer."""
    from torch.utils import benchmark as tb

    est = _warm_up(step, torch.device("cpu"), warmup_s, warmup_min)
    number = max(1, int(block_s / est))
    blocks = _sample_count(number * est, rep_s, min_samples, max_samples)
    timer = tb.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    samples = [timer.timeit(number).mean for _ in range(blocks)]
    return summarize(samples)


def time_interleaved(steps: dict[str, Callable[[], object]], device: torch.device, *, quick: bool = False,
                     warmup_s: float = 0.05, warmup_min: int = 2, rep_s: float = 0.6, min_samples: int = 5,
                     max_samples: int = 100, block_s: float = 0.01) -> dict[str, "Timing | Exception"]:
    """Median / p20 / p80 of each step, the steps timed in turns: every round times each step once (a block of
    calls of about ``block_s``, between two device synchronizations, by the host clock), in an order that rotates
    from round to round, until each step has about ``rep_s`` of samples (``min_samples`` to ``max_samples``
    rounds). For steps whose times differ by a few percent: a drift of the machine (another job, a frequency
    change) then lands on every step alike instead of on whichever was timed during it. A step that raises is left
    out of the later rounds and gets its exception instead of a Timing (KeyboardInterrupt propagates)."""
    if quick:
        warmup_s, warmup_min, rep_s, min_samples, max_samples = (_QUICK[k] for k in (
            "warmup_s", "warmup_min", "rep_s", "min_samples", "max_samples"))
    elif device.type == "cuda":
        rep_s = min(rep_s, 0.2)  # a GPU lease is short; the CUDA timer's own sample budget (time_cuda) is 0.1 s
    out: dict[str, Timing | Exception] = {}
    est = {}
    for name, step in steps.items():
        try:
            est[name] = _warm_up(step, device, warmup_s, warmup_min)
        except Exception as exc:  # noqa: BLE001 - one step's failure is its own row
            out[name] = exc
    names = list(est)
    if not names:
        return out
    number = {name: max(1, int(block_s / est[name])) for name in names}
    rounds = _sample_count(max(number[name] * est[name] for name in names), rep_s, min_samples, max_samples)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            if name in out:
                continue
            try:
                sync(device)
                t0 = time.perf_counter()
                for _ in range(number[name]):
                    steps[name]()
                sync(device)
            except Exception as exc:  # noqa: BLE001
                out[name] = exc
                continue
            samples[name].append((time.perf_counter() - t0) / number[name])
    for name in names:
        if name not in out:
            out[name] = summarize(samples[name])
    return out


def _warm_up(step: Callable[[], object], device: torch.device, warmup_s: float, warmup_min: int) -> float:
    """Runs ``step`` at least ``max(warmup_min, 1)`` times and for ``warmup_s`` (only once when a call is slower
    than SLOW_CALL_S); the seconds one call took, on average."""
    t0 = time.perf_counter()
    n = 0
    while n < max(warmup_min, 1) or time.perf_counter() - t0 < warmup_s:
        step()
        sync(device)
        n += 1
        if time.perf_counter() - t0 > SLOW_CALL_S:
            break  # a slow call: one warm-up is enough
    return max((time.perf_counter() - t0) / n, 1e-7)


def _sample_count(sample_s: float, rep_s: float, min_samples: int, max_samples: int) -> int:
    """Samples of ``sample_s`` each to take: enough for ``rep_s`` of them, within [min_samples, max_samples]; at
    most 3 as the minimum when one sample is slower than SLOW_CALL_S."""
    if sample_s > SLOW_CALL_S:
        min_samples = min(min_samples, 3)
    return int(min(max_samples, max(min_samples, math.ceil(rep_s / sample_s))))


# the settings of a --quick run (CI smoke): fewer, shorter samples
_QUICK = dict(warmup_s=0.0, warmup_min=1, rep_s=0.02, min_samples=3, max_samples=5)


_FLUSH: dict[int, torch.Tensor] = {}
SLOW_CALL_S = 0.5  # calls slower than this get one warm-up and at least 3 (not 5) samples


def _flush_buffer(device: torch.device) -> torch.Tensor:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _FLUSH:
        size = max(256 * 2**20, 2 * last_level_cache_bytes(device))
        _FLUSH[idx] = torch.empty(size // 4, dtype=torch.int32, device=device)
    return _FLUSH[idx]


def time_cuda(step: Callable[[], object], device: torch.device, *, warmup_s: float = 0.025,
              warmup_min: int = 2, rep_s: float = 0.1, min_samples: int = 5,
              max_samples: int = 100) -> Timing:
    """Median / p20 / p80 of ``step`` on a CUDA device: CUDA events per call, L2 flushed before each."""
    flush = _flush_buffer(device)
    sync(device)
    reps = _sample_count(_warm_up(step, device, warmup_s, warmup_min), rep_s, min_samples, max_samples)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.zero_()
        starts[i].record()
        step()
        ends[i].record()
    sync(device)
    return summarize([s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)])


def time_step(step: Callable[[], object], device: torch.device, *, quick: bool = False,
              smoke: bool = False) -> Timing:
    """Median / p20 / p80 of ``step`` with the device's timer. ``quick``: fewer, shorter samples (CI
    smoke); ``smoke``: a single timed call after one warm-up call (for the Triton interpreter)."""
    if smoke:
        step()
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        return summarize([time.perf_counter() - t0])
    if device.type == "cuda":
        return time_cuda(step, device, rep_s=0.03 if quick else 0.1)
    return time_cpu(step, **(_QUICK if quick else {}))


@contextlib.contextmanager
def _quiet_stderr():
    """Silence fd 2 (kineto prints start/stop lines there) for the duration of the block."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _cpu_peak_from_profile(prof) -> int:
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())  # stable: keeps record order for equal stamps
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def peak_memory(call: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated above the current state during one ``call()`` (see module doc)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = call()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False,
                     with_stack=False) as prof:
            out = call()
            del out
    return int(_cpu_peak_from_profile(prof))
