// A small persistent thread pool behind bem::parallel_for. One parallel region runs at a time;
// a second caller (another Python thread, or a nested call) runs its loop serially instead of
// waiting, so concurrent use can never deadlock. Rebuilt after fork() (the child has no workers).
#include "bem/parallel.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
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

// Regions are "late-join": the calling thread starts on the chunks at once, and a worker helps
// only if it arrives while unclaimed chunks remain. When the caller has claimed the last chunk it
// closes the region and waits only for workers that actually joined, never for one still waking
// up. A small call therefore costs about what it costs serially even when the other cores are
// busy (torch's OpenMP threads, other processes), while large calls use every thread.
class Pool {
 public:
  explicit Pool(int threads) : threads_(threads), owner_pid_(getpid()) {
    for (int i = 1; i < threads_; ++i) workers_.emplace_back([this] { worker_loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_.store(true);
    }
    cv_start_.notify_all();
    for (auto& w : workers_) w.join();
  }
  int threads() const { return threads_; }
  pid_t owner_pid() const { return owner_pid_; }

  // Returns false (and runs nothing) when the pool is busy; the caller then runs serially.
  bool try_run(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn) {
    std::unique_lock<std::mutex> region(region_mu_, std::try_to_lock);
    if (!region.owns_lock()) return false;
    // Published to workers by the release in the state_ store below.
    fn_ = &fn;
    n_ = n;
    chunk_ = chunk;
    next_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    const uint64_t open = (++generation_ << 1) | 1u;
    state_.store(open, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(mu_);  // pairs with the predicate check of a sleeper
      cv_start_.notify_all();
    }
    run_chunks();
    state_.store(open & ~uint64_t{1}, std::memory_order_seq_cst);  // close: no late joiners
    for (int spins = 0; active_.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < kSpinIterations) cpu_relax(); else std::this_thread::yield();
    }
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
    return true;
  }

 private:
  void run_chunks() {
    t_inside_region = true;
    for (;;) {
      const int64_t begin = next_.fetch_add(chunk_, std::memory_order_relaxed);
      if (begin >= n_) break;
      try {
        (*fn_)(begin, std::min(n_, begin + chunk_));
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu_);
        if (!error_) error_ = std::current_exception();
        next_.store(n_, std::memory_order_relaxed);  // stop handing out work
      }
    }
    t_inside_region = false;
  }

  bool joinable(uint64_t s, uint64_t seen) const { return (s & 1u) && s != seen; }

  void worker_loop() {
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
      if (state_.load(std::memory_order_seq_cst) == s) run_chunks();
      active_.fetch_sub(1, std::memory_order_release);
    }
  }

  const int threads_;
  const pid_t owner_pid_;
  std::vector<std::thread> workers_;
  std::mutex region_mu_;
  std::mutex mu_;
  std::condition_variable cv_start_;
  std::atomic<bool> stop_{false};
  uint64_t generation_ = 0;
  std::atomic<uint64_t> state_{0};  // (generation << 1) | open
  std::atomic<int> active_{0};
  std::atomic<int> sleepers_{0};
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0, chunk_ = 1;
  std::atomic<int64_t> next_{0};
  std::exception_ptr error_;
};

std::mutex g_pool_mu;
Pool* g_pool = nullptr;  // leaked on purpose: joining threads at interpreter exit can hang

Pool& pool() {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  if (g_pool == nullptr) {
    g_pool = new Pool(default_threads());
  } else if (g_pool->owner_pid() != getpid()) {
    g_pool = new Pool(g_pool->threads());  // after fork(): the parent's workers do not exist here
  }
  return *g_pool;
}

}  // namespace

int num_threads() { return pool().threads(); }

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("num_threads: expected >= 1, got " + std::to_string(n));
  std::lock_guard<std::mutex> lock(g_pool_mu);
  Pool* old = g_pool;
  g_pool = new Pool(n);
  if (old != nullptr && old->owner_pid() == getpid()) delete old;
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  Pool& p = pool();
  const int64_t max_chunks = (n + grain - 1) / grain;
  if (t_inside_region || p.threads() == 1 || max_chunks == 1) {
    fn(0, n);
    return;
  }
  // A few chunks per thread balance uneven chunks without much scheduling overhead.
  const int64_t chunks = std::min<int64_t>(max_chunks, static_cast<int64_t>(p.threads()) * 4);
  const int64_t chunk = (n + chunks - 1) / chunks;
  if (!p.try_run(n, chunk, fn)) fn(0, n);
}

}  // namespace bem
