// A stand-in OpenMP runtime for test_parallel_fallback: a shared library whose file name and
// soname (libgomp-bemfake.so) are not among the names bem looks up first, like the hashed
// libgomp-<hash>.so.1 some wheels bundle, so bem must find it among the loaded libraries. It
// exports GOMP_parallel with libgomp's contract: fn(data) on num_threads threads, the caller
// being one of them, returning when all have finished.
#include <atomic>
#include <thread>
#include <vector>

extern "C" {

std::atomic<int> bem_fake_omp_regions{0};

__attribute__((visibility("default"))) void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads,
                                                          unsigned /*flags*/) {
  bem_fake_omp_regions.fetch_add(1);
  std::vector<std::thread> team;
  for (unsigned i = 1; i < num_threads; ++i) team.emplace_back(fn, data);
  fn(data);
  for (auto& t : team) t.join();
}

__attribute__((visibility("default"))) int bem_fake_omp_region_count() { return bem_fake_omp_regions.load(); }
}
