// bem finds an OpenMP runtime loaded under a name it does not look up first (as the hashed
// libgomp-<hash>.so.1 bundled by some wheels): a stand-in runtime (support/fake_omp.cpp, built as
// libgomp-bemfake.so) is loaded here, and parallel_for must then run its regions through that
// library's GOMP_parallel, visiting every index once and rethrowing a region's exception.
#include <dlfcn.h>

#include <atomic>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "bem/parallel.h"
#include "test_util.h"

int main() {
  bem::set_num_threads(2);
  CHECK(bem::threading_backend() == "pool", "before loading: backend '%s'", bem::threading_backend().c_str());
  void* lib = dlopen(BEM_FAKE_OMP_PATH, RTLD_NOW | RTLD_LOCAL);
  CHECK(lib != nullptr, "dlopen %s: %s", BEM_FAKE_OMP_PATH, dlerror());
  if (lib == nullptr) return bem_test::finish("test_parallel_fallback");
  auto regions = reinterpret_cast<int (*)()>(dlsym(lib, "bem_fake_omp_region_count"));
  CHECK(regions != nullptr, "%s", "bem_fake_omp_region_count not exported");

  bem::set_num_threads(2);  // rebuilds the backend, which now finds the library
  const std::string backend = bem::threading_backend();
  CHECK(backend == "openmp (libgomp-bemfake.so)", "backend '%s'", backend.c_str());

  const int before = regions ? regions() : 0;
  std::vector<std::atomic<int>> seen(5000);
  for (auto& s : seen) s.store(0);
  bem::parallel_for(5000, 7, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) seen[static_cast<size_t>(i)].fetch_add(1);
  });
  int wrong = 0;
  for (auto& s : seen) wrong += s.load() != 1;
  CHECK(wrong == 0, "%d indices not visited exactly once", wrong);
  CHECK(regions && regions() == before + 1, "%s", "the region did not go through GOMP_parallel");

  bool thrown = false;
  try {
    bem::parallel_for(100, 1, [](int64_t b, int64_t) {
      if (b >= 50) throw std::runtime_error("boom");
    });
  } catch (const std::runtime_error&) {
    thrown = true;
  }
  CHECK(thrown, "%s", "exception not rethrown through the stand-in runtime");
  return bem_test::finish("test_parallel_fallback");
}
