// Unit tests of bem::parallel_for on both backends — bem's own late-join pool, then the process's
// OpenMP runtime (libgomp, loaded here the way torch loads it): every index is visited exactly
// once for any n, grain and thread count; many tiny back-to-back regions (the decode pattern) and
// concurrent callers from several threads neither lose work nor deadlock; nested calls run
// serially; the first exception is rethrown and the backend stays usable afterwards; a forked
// child runs regions on a fresh pool of its own.
#include "bem/parallel.h"

#include <dlfcn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "test_util.h"

namespace {

// Visits [0, n) with parallel_for and checks each index was seen exactly once.
bool covers_once(int64_t n, int64_t grain) {
  std::vector<std::atomic<int>> seen(static_cast<size_t>(n));
  for (auto& s : seen) s.store(0);
  bem::parallel_for(n, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) seen[static_cast<size_t>(i)].fetch_add(1);
  });
  for (auto& s : seen)
    if (s.load() != 1) return false;
  return true;
}

void test_coverage(int threads) {
  bem::set_num_threads(threads);
  CHECK(bem::num_threads() == threads, "threads %d", threads);
  for (int64_t n : {1, 2, 3, 7, 64, 1000, 4099})
    for (int64_t grain : {1, 3, 64, 5000})
      CHECK(covers_once(n, grain), "n %lld grain %lld threads %d", static_cast<long long>(n),
            static_cast<long long>(grain), threads);
  bem::parallel_for(0, 1, [&](int64_t, int64_t) { CHECK(false, "%s", "n = 0 ran fn"); });
}

void test_many_tiny_regions() {
  // Back-to-back regions far shorter than a thread wake-up: workers arrive late or not at all.
  int64_t total = 0;
  for (int rep = 0; rep < 20000; ++rep) {
    std::atomic<int64_t> sum{0};
    bem::parallel_for(8, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) sum.fetch_add(i + 1);
    });
    total += sum.load();
  }
  CHECK(total == 20000 * 36, "total %lld", static_cast<long long>(total));
}

void test_concurrent_callers() {
  // Callers that find the pool busy run serially; results must be complete either way.
  std::atomic<int> bad{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < 4; ++c) {
    callers.emplace_back([&] {
      for (int rep = 0; rep < 2000; ++rep)
        if (!covers_once(37 + rep % 50, 1 + rep % 4)) bad.fetch_add(1);
    });
  }
  for (auto& t : callers) t.join();
  CHECK(bad.load() == 0, "%d incomplete regions", bad.load());
}

void test_nested_and_exceptions() {
  std::atomic<int64_t> inner{0};
  bem::parallel_for(16, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      bem::parallel_for(10, 1, [&](int64_t b2, int64_t e2) { inner.fetch_add(e2 - b2); });
  });
  CHECK(inner.load() == 160, "inner %lld", static_cast<long long>(inner.load()));

  bool thrown = false;
  try {
    bem::parallel_for(1000, 1, [&](int64_t b, int64_t) {
      if (b >= 500) throw std::runtime_error("boom");
    });
  } catch (const std::runtime_error&) {
    thrown = true;
  }
  CHECK(thrown, "%s", "exception not rethrown");
  CHECK(covers_once(1000, 1), "%s", "pool unusable after an exception");
}

void test_fork_child() {
  // The child of a process that has run regions (on either backend) gets a pool of its own.
  const pid_t pid = fork();
  if (pid == 0) {
    alarm(20);  // a hang fails the test instead of blocking ctest
    const bool ok = covers_once(4099, 1) && bem::threading_backend() == "pool";
    _exit(ok ? 0 : 1);
  }
  int status = 0;
  CHECK(pid > 0 && waitpid(pid, &status, 0) == pid, "%s", "fork/waitpid failed");
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %d", status);
}

void run_suite(const std::string& backend) {
  for (int threads : {1, 2, 3, 8}) {
    test_coverage(threads);
    const std::string got = bem::threading_backend();
    const std::string want = threads == 1 ? "serial" : backend;
    CHECK(got.compare(0, want.size(), want) == 0, "threads %d: backend '%s', expected '%s'", threads,
          got.c_str(), want.c_str());
  }
  bem::set_num_threads(4);
  test_many_tiny_regions();
  test_concurrent_callers();
  test_nested_and_exceptions();
  bem::set_num_threads(2);
  test_many_tiny_regions();
  test_fork_child();
}

}  // namespace

int main() {
  run_suite("pool");  // no OpenMP runtime in this process yet
#if defined(__SANITIZE_THREAD__)
  // libgomp is not built with ThreadSanitizer: its barriers are invisible to TSan, which would
  // report every region of the OpenMP backend as a race. That backend runs under ASan/UBSan.
  std::printf("test_parallel: OpenMP backend not tested under ThreadSanitizer\n");
  return bem_test::finish("test_parallel");
#endif
  // Load GNU OpenMP as torch does (RTLD_GLOBAL not needed: bem finds it by soname); a rebuild of
  // the backend (set_num_threads) then picks it up.
  if (dlopen("libgomp.so.1", RTLD_NOW) != nullptr) {
    bem::set_num_threads(2);
    run_suite("openmp");
  } else {
    std::printf("test_parallel: libgomp.so.1 not found, OpenMP backend not tested\n");
  }
  return bem_test::finish("test_parallel");
}
