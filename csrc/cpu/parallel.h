// How many threads a kernel call uses, chosen from its amount of work.
//
// at::parallel_for (OpenMP backend) runs a range inline on the calling thread when it is shorter than the grain;
// otherwise every thread of the pool enters the parallel region and the call returns only after each of them has
// run. Waking a second thread costs ~10 µs on an idle machine, but a scheduler time slice (milliseconds) when that
// thread's core is busy with another process — which is the common case in training (a worker thread, the event
// loop, data loading and rollouts share the cores). Splitting sub-millisecond work therefore saves at most half of
// it on an idle machine and loses many times it on a busy one: ops.gae at B=256, T=1024 took 0.3 ms idle with two
// threads, 8 ms with two threads and one busy core, 0.5-1 ms with one thread (issue 17).
//
// So a kernel states the cost of one item (ns of single-thread work, measured on a 2-core AMD EPYC) and
// parallel_work() sets the grain so that a task holds at least kMinTaskNs of work: a call below kMinTaskNs runs on
// the calling thread alone, a larger one uses up to every thread with tasks of ≥ kMinTaskNs each. Results never
// depend on the split (every kernel writes disjoint outputs or merges fixed-size partials in a fixed order).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace signalrl {

// single-thread work below which a call is not split (ns)
constexpr double kMinTaskNs = 1.0e6;

// grain (items per task) for items of ~item_ns each
inline int64_t grain_for(double item_ns) {
  const double g = std::ceil(kMinTaskNs / std::max(item_ns, 1e-3));
  return g >= 1e15 ? static_cast<int64_t>(1e15) : std::max<int64_t>(1, static_cast<int64_t>(g));
}

// at::parallel_for over [begin, end) with the grain of items costing ~item_ns each
template <class F>
inline void parallel_work(int64_t begin, int64_t end, double item_ns, const F& f) {
  at::parallel_for(begin, end, grain_for(item_ns), f);
}

}  // namespace signalrl
