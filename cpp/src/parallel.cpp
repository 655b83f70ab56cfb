// The threads behind bem::parallel_for: the OpenMP runtime the process has already loaded (torch's
// libgomp) when there is one, else a small persistent pool of bem's own. One parallel region runs
// at a time; a second caller (another Python thread, or a nested call) runs its loop serially
// instead of waiting, so concurrent use can never deadlock. After fork() the child uses a fresh
// pool of its own (the parent's workers, bem's or OpenMP's, do not exist there).
//
// Why share OpenMP's threads: after every parallel torch op, libgomp's workers busy-wait for the
// next region (GOMP_SPINCOUNT, 300,000 spins by default: milliseconds). A second pool then
// competes with them for the same cores: on the 2-core Zen 4 VM a T=1024, r=64 lora_delta made
// between torch matmuls took 2.2–2.7 ms on bem's 2 pool threads, no better than on 1 thread, and
// 1.37–1.54 ms as an OpenMP region, picked up at once by the very threads that were spinning.
// bem does not link OpenMP: it looks the runtime up with dlopen(RTLD_NOLOAD), so a process without
// one (the C++ tests and benchmarks) keeps bem's own pool. BEM_CPU_THREADING=pool forces the own
// pool.
#include "bem/parallel.h"

#include <dlfcn.h>
#include <link.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace bem {
namespace {

int default_threads() {
  if (const char* env = std::getenv("BEM_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n >= 1) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n >= 1) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

thread_local bool t_inside_region = false;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// How long an idle worker polls for the next region before it sleeps, and how long the caller
// polls for late workers before it yields: back-to-back kernel calls (a model's layers) then never
// pay a futex wake-up, and an idle pool costs nothing.
constexpr int kSpinIterations = 4000;  // ~20–50 µs of pause instructions

// One parallel region's work, shared by both backends: the chunks of [0, n), split into one
// contiguous range per thread. Thread i claims the chunks of its own range first and then those
// left in the others' ranges, so a call of the same shape gives thread i the same chunks (and
// the same rows of the weights, still in its core's cache from the last call) unless a thread
// comes late or runs slow, while no thread ever waits for work another could take. The first
// exception is kept (and stops the handing out of work) for the caller to rethrow. run() never
// lets an exception escape (the OpenMP body is called from C).
struct Region {
  explicit Region(int threads) : cursors(static_cast<size_t>(std::max(threads, 1))) {}

  const std::function<void(int64_t, int64_t)>* fn = nullptr;
  int64_t n = 0, chunk = 1, chunks = 0;
  std::vector<std::atomic<int64_t>> cursors;  // next chunk of each thread's range
  std::atomic<bool> stop{false};
  std::atomic<int> arrivals{0};  // thread index when the backend cannot tell one
  int (*team_index)() = nullptr;  // the OpenMP runtime's omp_get_thread_num, if it has one
  std::mutex mu;
  std::exception_ptr error;

  int64_t range_begin(size_t i) const { return chunks * static_cast<int64_t>(i) / static_cast<int64_t>(cursors.size()); }

  void reset(const std::function<void(int64_t, int64_t)>& f, int64_t count, int64_t size) {
    fn = &f;
    n = count;
    chunk = size;
    chunks = (n + chunk - 1) / chunk;
    for (size_t i = 0; i < cursors.size(); ++i) cursors[i].store(range_begin(i), std::memory_order_relaxed);
    stop.store(false, std::memory_order_relaxed);
    arrivals.store(0, std::memory_order_relaxed);
    error = nullptr;
  }

  // `index`: this thread's place in the team (0: the caller), or −1 for the order of arrival.
  void run(int index) {
    const bool outer = t_inside_region;
    t_inside_region = true;
    const size_t p = cursors.size();
    const int who = index >= 0 ? index : arrivals.fetch_add(1, std::memory_order_relaxed);
    const size_t home = static_cast<size_t>(who) % p;
    for (size_t k = 0; k < p && !stop.load(std::memory_order_relaxed); ++k) {
      const size_t r = (home + k) % p;
      const int64_t end = range_begin(r + 1);
      for (;;) {
        const int64_t c = cursors[r].fetch_add(1, std::memory_order_relaxed);
        if (c >= end || stop.load(std::memory_order_relaxed)) break;
        try {
          (*fn)(c * chunk, std::min(n, (c + 1) * chunk));
        } catch (...) {
          std::lock_guard<std::mutex> lock(mu);
          if (!error) error = std::current_exception();
          stop.store(true, std::memory_order_relaxed);  // stop handing out work
        }
      }
    }
    t_inside_region = outer;
  }
};

// Regions are "late-join": the calling thread starts on the chunks at once, and a worker helps
// only if it arrives while unclaimed chunks remain. When the caller has claimed the last chunk it
// closes the region and waits only for workers that actually joined, never for one still waking
// up. A small call therefore costs about what it costs serially even when the other cores are
// busy (torch's OpenMP threads, other processes), while large calls use every thread.
class Pool {
 public:
  explicit Pool(int threads) : region_(threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_.store(true);
    }
    cv_start_.notify_all();
    for (auto& w : workers_) w.join();
  }

  // Returns false (and runs nothing) when the pool is busy; the caller then runs serially.
  bool try_run(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn) {
    std::unique_lock<std::mutex> region(region_mu_, std::try_to_lock);
    if (!region.owns_lock()) return false;
    region_.reset(fn, n, chunk);  // published to workers by the release in the state_ store below
    const uint64_t open = (++generation_ << 1) | 1u;
    state_.store(open, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(mu_);  // pairs with the predicate check of a sleeper
      cv_start_.notify_all();
    }
    region_.run(0);
    state_.store(open & ~uint64_t{1}, std::memory_order_seq_cst);  // close: no late joiners
    for (int spins = 0; active_.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < kSpinIterations) cpu_relax(); else std::this_thread::yield();
    }
    if (region_.error) std::rethrow_exception(region_.error);
    return true;
  }

 private:

  bool joinable(uint64_t s, uint64_t seen) const { return (s & 1u) && s != seen; }

  void worker_loop(int index) {
    uint64_t seen = 0;  // the open state of the last region this worker looked at
    for (;;) {
      uint64_t s = state_.load(std::memory_order_acquire);
      for (int spins = 0; !joinable(s, seen) && spins < kSpinIterations; ++spins) {
        if (stop_.load(std::memory_order_relaxed)) return;
        cpu_relax();
        s = state_.load(std::memory_order_acquire);
      }
      if (!joinable(s, seen)) {
        std::unique_lock<std::mutex> lock(mu_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        cv_start_.wait(lock, [&] {
          s = state_.load(std::memory_order_seq_cst);
          return stop_.load() || joinable(s, seen);
        });
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
        if (stop_.load()) return;
      }
      seen = s;
      // Join only if the region is still open: either the caller sees this increment before
      // it stops waiting, or this thread sees the region closed and leaves without touching it.
      active_.fetch_add(1, std::memory_order_seq_cst);
      if (state_.load(std::memory_order_seq_cst) == s) region_.run(index);
      active_.fetch_sub(1, std::memory_order_release);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex region_mu_;
  std::mutex mu_;
  std::condition_variable cv_start_;
  std::atomic<bool> stop_{false};
  uint64_t generation_ = 0;
  std::atomic<uint64_t> state_{0};  // (generation << 1) | open
  std::atomic<int> active_{0};
  std::atomic<int> sleepers_{0};
  Region region_;
};

// ---- the process's OpenMP runtime ----------------------------------------------------------------
// GOMP_parallel(fn, data, num_threads, flags): the entry point GCC emits for `#pragma omp
// parallel` since GCC 4.9; libgomp exports it, and LLVM's and Intel's runtimes export it for
// compatibility. It runs fn(data) on a team of num_threads threads (the caller is thread 0) and
// returns when all have finished.
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);

struct OmpRuntime {
  GompParallel parallel = nullptr;
  int (*thread_num)() = nullptr;  // omp_get_thread_num
  std::string library;
};

bool named_like_openmp(const char* path) {
  const char* slash = std::strrchr(path, '/');
  const char* base = slash ? slash + 1 : path;
  for (const char* prefix : {"libgomp", "libiomp", "libomp"}) {
    if (std::strncmp(base, prefix, std::strlen(prefix)) == 0) return true;
  }
  return false;
}

// GOMP_parallel of an already loaded library (RTLD_NOLOAD: bem never brings an OpenMP runtime
// into a process); the handle stays open so the library cannot be unloaded under us.
OmpRuntime open_loaded(const char* name) {
  if (void* h = dlopen(name, RTLD_LAZY | RTLD_NOLOAD)) {
    if (void* fn = dlsym(h, "GOMP_parallel")) {
      const char* slash = std::strrchr(name, '/');
      return OmpRuntime{reinterpret_cast<GompParallel>(fn),
                        reinterpret_cast<int (*)()>(dlsym(h, "omp_get_thread_num")), slash ? slash + 1 : name};
    }
    dlclose(h);
  }
  return {};
}

OmpRuntime find_openmp() {
  if (const char* env = std::getenv("BEM_CPU_THREADING")) {
    if (std::strcmp(env, "pool") == 0) return {};
  }
  for (const char* name : {"libgomp.so.1", "libiomp5.so", "libomp.so", "libomp.so.5"}) {
    OmpRuntime rt = open_loaded(name);
    if (rt.parallel != nullptr) return rt;
  }
  // Else any loaded library named like one, by path (e.g. a wheel's libgomp-<hash>.so.1).
  std::vector<std::string> paths;
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) {
        if (info->dlpi_name != nullptr && named_like_openmp(info->dlpi_name)) {
          static_cast<std::vector<std::string>*>(data)->push_back(info->dlpi_name);
        }
        return 0;
      },
      &paths);
  for (const std::string& path : paths) {
    OmpRuntime rt = open_loaded(path.c_str());
    if (rt.parallel != nullptr) return rt;
  }
  return {};
}

// What every thread of the OpenMP team runs.
extern "C" void bem_omp_body(void* data) {
  Region* r = static_cast<Region*>(data);
  r->run(r->team_index != nullptr ? r->team_index() : -1);
}

// ---- the backend in use ------------------------------------------------------------------------
struct Backend {
  int threads = 1;
  pid_t pid = 0;            // the process this backend was set up in
  OmpRuntime omp;           // used when omp.parallel is set
  Pool* pool = nullptr;     // else this (workers only when threads > 1)
};

std::mutex g_backend_mu;
std::mutex g_omp_region_mu;  // one OpenMP region of bem's at a time, as with the own pool
Backend* g_backend = nullptr;  // leaked on purpose: joining threads at interpreter exit can hang

// The process that loaded bem. A forked child never starts OpenMP teams: libgomp keeps the
// parent's (non-existent) threads in its pool and a team started in the child can hang forever
// (measured: torch's own matmul in such a child never returns).
const pid_t g_load_pid = getpid();

Backend* make_backend(int threads) {
  auto* b = new Backend;
  b->threads = threads;
  b->pid = getpid();
  if (threads > 1) {
    if (b->pid == g_load_pid) b->omp = find_openmp();
    if (b->omp.parallel == nullptr) b->pool = new Pool(threads);
  }
  return b;
}

Backend& backend() {
  std::lock_guard<std::mutex> lock(g_backend_mu);
  if (g_backend == nullptr) {
    g_backend = make_backend(default_threads());
  } else if (g_backend->pid != getpid()) {
    g_backend = make_backend(g_backend->threads);  // after fork(): an own pool (see g_load_pid)
  }
  return *g_backend;
}

bool run_openmp(const Backend& b, int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn) {
  std::unique_lock<std::mutex> region(g_omp_region_mu, std::try_to_lock);
  if (!region.owns_lock()) return false;
  Region r(b.threads);
  r.reset(fn, n, chunk);
  r.team_index = b.omp.thread_num;
  b.omp.parallel(&bem_omp_body, &r, static_cast<unsigned>(b.threads), 0);
  if (r.error) std::rethrow_exception(r.error);
  return true;
}

}  // namespace

int num_threads() { return backend().threads; }

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("num_threads: expected >= 1, got " + std::to_string(n));
  std::lock_guard<std::mutex> lock(g_backend_mu);
  Backend* old = g_backend;
  g_backend = make_backend(n);
  if (old != nullptr && old->pid == getpid()) {
    delete old->pool;
    delete old;
  }
}

std::string threading_backend() {
  const Backend& b = backend();
  if (b.omp.parallel != nullptr) return "openmp (" + b.omp.library + ")";
  return b.threads > 1 ? "pool" : "serial";
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const Backend& b = backend();
  const int64_t max_chunks = (n + grain - 1) / grain;
  if (t_inside_region || b.threads == 1 || max_chunks == 1) {
    fn(0, n);
    return;
  }
  // A few chunks per thread balance uneven chunks without much scheduling overhead.
  const int64_t chunks = std::min<int64_t>(max_chunks, static_cast<int64_t>(b.threads) * 4);
  const int64_t chunk = (n + chunks - 1) / chunks;
  const bool ran = b.omp.parallel != nullptr ? run_openmp(b, n, chunk, fn) : b.pool->try_run(n, chunk, fn);
  if (!ran) fn(0, n);
}

}  // namespace bem
