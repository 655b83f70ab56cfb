// The CPU threads every bem kernel parallelises on: the OpenMP runtime already loaded in the
// process (torch's libgomp), found at run time and never linked, so bem's work goes to the threads
// that torch's ops leave spinning instead of to a second pool fighting them for the cores; else a
// persistent pool of bem's own (the C++ tests and benchmarks, BEM_CPU_THREADING=pool, or a forked
// child).
#pragma once
#include <cstdint>
#include <functional>
#include <string>

namespace bem {

// Threads used by parallel_for, the calling thread included. Default: the CPUs this process may
// run on (sched_getaffinity), or BEM_NUM_THREADS when set.
int num_threads();
// n >= 1; rebuilds the pool. Not to be called while a parallel_for is running.
void set_num_threads(int n);

// "openmp (<library>)", "pool" (bem's own workers) or "serial" (one thread).
std::string threading_backend();

// Calls fn(begin, end) on disjoint chunks covering [0, n), each of at least `grain` items except
// possibly the last, on the pool and the calling thread; returns when all are done. The first
// exception thrown by fn is rethrown here. A call from inside fn, or while another thread holds the
// pool, runs serially on the calling thread (so concurrent callers never deadlock).
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace bem
