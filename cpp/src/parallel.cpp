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

class Pool {
 public:
  explicit Pool(int threads) : threads_(threads), owner_pid_(getpid()) {
    for (int i = 1; i < threads_; ++i) workers_.emplace_back([this] { worker_loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
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
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      n_ = n;
      chunk_ = chunk;
      next_.store(0, std::memory_order_relaxed);
      error_ = nullptr;
      pending_ = static_cast<int>(workers_.size());
      ++generation_;
    }
    cv_start_.notify_all();
    run_chunks();
    std::unique_lock<std::mutex> lock(mu_);
    cv_done_.wait(lock, [this] { return pending_ == 0; });
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

  void worker_loop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_start_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      run_chunks();
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (--pending_ == 0) cv_done_.notify_one();
      }
    }
  }

  const int threads_;
  const pid_t owner_pid_;
  std::vector<std::thread> workers_;
  std::mutex region_mu_;
  std::mutex mu_;
  std::condition_variable cv_start_, cv_done_;
  bool stop_ = false;
  uint64_t generation_ = 0;
  int pending_ = 0;
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
