// How a kernel call spreads its work over threads: chosen from the amount of work, and never waiting for a thread
// that has not started.
//
// at::parallel_for (OpenMP backend) makes every thread of the team enter the parallel region, and the call returns
// only after each of them has run its share. Waking a second thread costs ~10 µs on an idle machine, but a scheduler
// time slice (milliseconds) when that thread's core is busy with another process — the common case in training (a
// worker thread, the event loop, data loading and rollouts share the cores): ops.gae at B=256, T=1024 took 0.3 ms
// idle with two threads, 8 ms with two threads and one busy core, 0.5-1 ms with one thread (issue 17). OpenMP's
// threads also spin between regions, which costs them the scheduler's preference for threads that slept.
//
// parallel_work() runs a call below kMinSplitNs of single-thread work on the calling thread alone and cuts a larger
// one into tiles of about kTileNs, which the calling thread and helpers from PyTorch's inter-op pool (at::launch:
// threads that sleep on a condition variable between tasks) take one at a time from a shared counter. The calling
// thread starts on the tiles at once and returns when every tile is done: a helper that has not been scheduled yet
// costs nothing (when it runs it finds no tile left), so a busy core delays a call by at most the tile a helper
// holds, not by the helper's whole share. Measured side by side with one core kept busy (signalrl/bench/busy.py) and
// another job on the machine: gae B=1024, T=1024 2.1-2.9 ms against 8.7-12 ms with OpenMP, token_logprobs N=64,
// V=32000 1.0-1.6 ms against 12 ms. Helpers wake in tens of µs, so calls from 0.1 ms up are split: on an idle
// machine gae B=256, T=1024 0.30 -> 0.24 ms, value_loss B=64, T=4096 0.27 -> 0.21 ms; with one core busy they stay
// within 10% of the single-thread time. Results never depend on the split (every kernel writes disjoint outputs
// or merges fixed-size partials in a fixed order).
//
// The body runs on pool threads, so it must not call ATen ops (they would start parallel regions of their own);
// bodies that do (the linear log-probs GEMMs) use parallel_region(), an OpenMP region in which ATen's nested calls
// run on the task's own thread.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>

namespace signalrl {

// single-thread work below which a call runs on the calling thread alone (ns)
constexpr double kMinSplitNs = 100.0e3;
// the work of one tile (ns): the most a helper on a busy core can hold a call up by, and the unit of load balance
constexpr double kTileNs = 25.0e3;
// parallel_region: single-thread work per OpenMP task, below which the call runs on the calling thread alone (ns)
constexpr double kMinTaskNs = 1.0e6;

namespace detail {

// The tiles of one call, shared with its helpers (kept alive by them: a helper may start after the call returned,
// and then only finds that no tile is left).
struct TileQueue {
  int64_t begin = 0, end = 0, per_tile = 1, tiles = 0;
  std::atomic<int64_t> next{0};    // the next tile to hand out
  std::atomic<int64_t> active{0};  // helpers that may hold a tile
  std::mutex error_mutex;
  std::exception_ptr error;
};

// Takes tiles until none is left. A helper counts itself active before it takes a tile, so once the counter is past
// the last tile the calling thread waits only for helpers that hold one.
template <class F>
void take_tiles(TileQueue& q, const F& f, bool helper) {
  for (;;) {
    if (helper) q.active.fetch_add(1);
    const int64_t t = q.next.fetch_add(1);
    if (t >= q.tiles) {
      if (helper) q.active.fetch_sub(1);
      return;
    }
    const int64_t b = q.begin + t * q.per_tile, e = std::min(q.end, b + q.per_tile);
    try {
      f(b, e);
    } catch (...) {
      std::lock_guard<std::mutex> lock(q.error_mutex);
      if (!q.error) q.error = std::current_exception();
      q.next.store(q.tiles);  // hand out no more tiles
    }
    if (helper) q.active.fetch_sub(1);
  }
}

}  // namespace detail

// f(b, e) over [begin, end) for items of ~item_ns single-thread work each (see the top of this file)
template <class F>
inline void parallel_work(int64_t begin, int64_t end, double item_ns, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const double total_ns = static_cast<double>(n) * std::max(item_ns, 0.0);
  const int threads = at::get_num_threads();
  if (n < 2 || threads < 2 || total_ns < kMinSplitNs || at::in_parallel_region()) {
    f(begin, end);
    return;
  }
  auto q = std::make_shared<detail::TileQueue>();
  q->begin = begin;
  q->end = end;
  const int64_t want =
      std::min<int64_t>(n, std::clamp<int64_t>(static_cast<int64_t>(total_ns / kTileNs), 2, 64 * threads));
  q->per_tile = (n + want - 1) / want;
  q->tiles = (n + q->per_tile - 1) / q->per_tile;
  const F* body = &f;  // called by a helper only while it holds a tile, which is before this call returns
  const int helpers = static_cast<int>(std::min<int64_t>(threads - 1, q->tiles - 1));
  for (int h = 0; h < helpers; ++h) at::launch([q, body] { detail::take_tiles(*q, *body, /*helper=*/true); });
  detail::take_tiles(*q, f, /*helper=*/false);
  while (q->active.load() != 0) std::this_thread::yield();  // a helper finishing the tile it holds
  if (q->error) std::rethrow_exception(q->error);
}

// An OpenMP region (at::parallel_for) for bodies that call ATen ops (their nested parallel regions then run on the
// task's own thread), with tasks of at least kMinTaskNs: a call below it runs on the calling thread alone.
template <class F>
inline void parallel_region(int64_t begin, int64_t end, double item_ns, const F& f) {
  const double g = std::ceil(kMinTaskNs / std::max(item_ns, 1e-3));
  const int64_t grain = g >= 1e15 ? static_cast<int64_t>(1e15) : std::max<int64_t>(1, static_cast<int64_t>(g));
  at::parallel_for(begin, end, grain, f);
}

// parallel_region over n groups of ~group_ns each that the region's threads take one at a time from a shared counter,
// so groups of unequal cost (or a thread whose core is busy) do not leave a thread idle: f(next) runs once on each
// thread of the region, next() giving the next group or -1 when none is left. Each group's work must not depend on
// which thread runs it.
template <class F>
inline void parallel_groups(int64_t n, double group_ns, const F& f) {
  std::atomic<int64_t> counter{0};
  const auto next = [&counter, n]() -> int64_t {
    const int64_t g = counter.fetch_add(1);
    return g < n ? g : -1;
  };
  parallel_region(0, n, group_ns, [&](int64_t, int64_t) { f(next); });
}

}  // namespace signalrl
