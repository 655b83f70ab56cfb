// Masked multi-expert LoRA on the CPU: argument and index checks, the plan (runs of equal expert,
// the expand strategy per run), threading, and dispatch to the kernels of the CPU's SIMD level
// (lora_kernels.inl, compiled once per level).
#include "bem/lora.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "bem/dtype.h"
#include "bem/parallel.h"
#include "cpu_features.h"
#include "kernel_util.h"
#include "simd.h"

namespace bem {
namespace {

using detail::element_size;
using detail::got;
using detail::require_dtype;
using detail::round_up;
using detail::tls_buffer;

// How a run's expand is computed (lora_kernels.inl): row dot products with B (few tokens), B's used
// columns packed transposed (long runs), or tokens in vector lanes (up to a few dozen tokens that
// share their rank set). The packed and lanes forms do the same arithmetic (each output sums its k
// products in j order with FMAs from zero), so kBroadcast lets each work item take the cheaper of
// the two for its own tokens without the result depending on how the run is split over threads.
// Values 0–2 match the test hook g_lora_expand_override.
enum class ExpandForm : uint8_t { kRowdot = 0, kPacked = 1, kLanes = 2, kBroadcast = 3 };

// Consecutive tokens routed to the same expert (e = −1: no adapter). `expand` is chosen for the
// whole run, so the result never depends on how the run is split over threads.
struct Run {
  int64_t t0, t1, e;
  ExpandForm expand;
  bool shrink_gemm;  // shrink: broadcast-form GEMM (else dot-product tiles)
  int64_t used;      // distinct rank components used by the run's tokens
};

// Everything the work items read; built once per call.
struct LoraArgs {
  int64_t tokens = 0, d_in = 0, d_out = 0, r = 0, k = 0;
  float scale = 1.0f;
  const void* x = nullptr;      // (T, d_in), row stride ld_x
  int64_t ld_x = 0;
  const void* A = nullptr;      // (E, r, d_in)
  const void* B = nullptr;      // (E, d_out, r)
  const int64_t* idx = nullptr; // token t's active ranks: idx + t·idx_stride (k of them)
  int64_t idx_stride = 0;       // k, or 0 when every token uses ranks 0..r−1
  const float* gate = nullptr;  // (T, k) or null (ones)
  float* S = nullptr;           // (T, k) shrink results x·Aᵀ (written by the forward's shrink)
  void* y = nullptr;            // forward output, row stride ld_y
  int64_t ld_y = 0;
  bool accumulate = false;
  const void* dy = nullptr;     // backward: (T, d_out)
  float* grad_s = nullptr;      // backward: (T, k) u = Bᵀdy picked at the active ranks, then
                                // scale·gate·u (the gradient with respect to S)
  float* v_full = nullptr;      // backward: (T, r) grad_s scattered to rank positions (zeros elsewhere)
  float* w_full = nullptr;      // backward: (T, r) scale·gate·S scattered likewise
  void* grad_x = nullptr;
  float* grad_A = nullptr;
  float* grad_B = nullptr;
  const Run* runs = nullptr;
  int64_t n_runs = 0;
  // The row-dot expand of another instruction set to use instead of this one's (null: its own).
  bool (*rowdot)(const LoraArgs&, const Run&, int64_t t0, int64_t t1, int64_t o0, int64_t o1) = nullptr;
};

struct LoraKernels {
  int width;  // SIMD lanes, for the expand cost model
  void (*shrink)(const LoraArgs&, const Run&, int64_t t0, int64_t t1, int64_t j0, int64_t j1);
  bool (*expand)(const LoraArgs&, const Run&, int64_t t0, int64_t t1, int64_t o0, int64_t o1);
  bool (*expand_rowdot)(const LoraArgs&, const Run&, int64_t t0, int64_t t1, int64_t o0, int64_t o1);
  void (*grad_u)(const LoraArgs&, const Run&, int64_t t0, int64_t t1);
  void (*grad_x)(const LoraArgs&, const Run&, int64_t t0, int64_t t1);
  void (*grad_A)(const LoraArgs&, int64_t e, int64_t c0, int64_t c1);
  void (*grad_B)(const LoraArgs&, int64_t e, int64_t o0, int64_t o1);
};

// End of the maximal run of tokens from t (< t1) that share t's rank set.
inline int64_t segment_end(const LoraArgs& a, int64_t t, int64_t t1) {
  if (a.idx_stride == 0) return t1;
  const int64_t k = a.k;
  const int64_t* first = a.idx + t * k;
  int64_t s = t + 1;
  while (s < t1 && std::equal(first, first + k, a.idx + s * k)) ++s;
  return s;
}

// Expand costs in ns per output column, fitted on Zen 4 with AVX-512 (the ratios, which are all that
// matter, hold for AVX2). The row-dot expand pays per token for all r values of each B row (the
// packed-rows path for r = 4 or 8 is much cheaper); the packed expand pays once per run for
// transposing the used columns and then ~k FMAs per token; the lanes expand pays ~k FMAs and a
// share of one transpose per group of up to W tokens that share their rank set, full or not.
struct ExpandCost {
  double rowdot_per_token, packed_per_token, lanes_per_group;
  ExpandCost(const LoraArgs& a, int width) {
    const bool small_rows = width > 1 && (a.r == 4 || (a.r == 8 && width == 16));
    const double k = static_cast<double>(a.k);
    rowdot_per_token = small_rows ? 0.5 : 0.85 + 0.057 * static_cast<double>(a.r);
    packed_per_token = 0.27 + 0.018 * k;
    lanes_per_group = (6.0 + 0.33 * k) * static_cast<double>(width) / 16.0;
  }
  double packed(int64_t used, int64_t tokens) const {
    return 1.0 + 0.16 * static_cast<double>(used) + static_cast<double>(tokens) * packed_per_token;
  }
  double lanes(int64_t groups) const { return static_cast<double>(groups) * lanes_per_group; }
};

// Groups of at most `width` tokens sharing their rank set in tokens [t0, t1), and the length of the
// shortest such segment.
inline int64_t lane_groups(const LoraArgs& a, int64_t t0, int64_t t1, int width, int64_t* shortest = nullptr) {
  int64_t groups = 0, least = t1 - t0;
  for (int64_t t = t0; t < t1;) {
    const int64_t s1 = segment_end(a, t, t1);
    least = std::min(least, s1 - t);
    groups += (s1 - t + width - 1) / width;
    t = s1;
  }
  if (shortest != nullptr) *shortest = least;
  return groups;
}

// The form a work item over tokens [t0, t1) of `run` uses.
inline ExpandForm item_form(const LoraArgs& a, const Run& run, int64_t t0, int64_t t1, int width) {
  if (run.expand != ExpandForm::kBroadcast) return run.expand;
  if (width == 1) return ExpandForm::kPacked;
  const ExpandCost cost(a, width);
  return cost.lanes(lane_groups(a, t0, t1, width)) < cost.packed(run.used, t1 - t0) ? ExpandForm::kLanes
                                                                                     : ExpandForm::kPacked;
}

}  // namespace
}  // namespace bem

#define BEM_ISA_KERNELS "lora_kernels.inl"
#define BEM_ISA_WITH_GEMM
#include "isa_instantiate.inl"

namespace bem {
namespace {

const LoraKernels& kernels_for(DType dtype) {
  switch (detail::simd_level()) {
#ifdef BEM_SIMD_X86
    case detail::SimdLevel::Avx512: return isa_avx512::lora_kernels(dtype);
    case detail::SimdLevel::Avx2: return isa_avx2::lora_kernels(dtype);
#endif
    default: return isa_scalar::lora_kernels(dtype);
  }
}

// Below this many multiply-adds a call runs on the calling thread: waking the pool costs more.
// Forward: measured on Zen 4 (2 threads, interleaved), 2^18 multiply-adds (T = 1, d = 4096, k = 32:
// 21.5 → 12.7 µs; T = 2, d = 1024, r = 64: 10.0 → 7.6 µs), while 2^17 loses (T = 1, d = 1024,
// r = 64: 7.2 → 11.5 µs). Calls with 4 routed tokens per thread or more (the fused split: one
// region) pay from 2^16 (T = 8, d = 1024, r = 8: 4.8 → 3.4 µs; k = 4: 4.3 → 3.1 µs).
constexpr int64_t kParallelForwardMacs = int64_t{1} << 18;
constexpr int64_t kParallelFusedMacs = int64_t{1} << 16;
constexpr int64_t kParallelBackwardMacs = int64_t{1} << 19;
// Segments from which the shrink transposes rows of A for the GEMM form (measured break-even
// against the dot-product tiles on Zen 4: ~64 tokens).
constexpr int64_t kShrinkGemmMinTokens = 64;
// Tokens per expand work item when a call is split over threads.
constexpr int64_t kExpandBlock = 128;
// Scratch above this many floats is released after the call instead of kept for the next one.
constexpr size_t kKeepScratchFloats = size_t{1} << 22;

struct PlanScratch {
  std::vector<Run> runs;
  std::vector<int64_t> identity;
  std::vector<float> S, grad_s, v_full, w_full;
  std::vector<int64_t> seen;
  void trim() {
    for (std::vector<float>* v : {&S, &grad_s, &v_full, &w_full}) {
      if (v->capacity() > kKeepScratchFloats) std::vector<float>().swap(*v);
    }
  }
};

PlanScratch& plan_scratch() {
  thread_local PlanScratch s;
  return s;
}

void check_common(int64_t tokens, int64_t d_in, int64_t d_out, int64_t rank, int64_t active,
                  int64_t experts, DType dtype, const int64_t* rank_index) {
  BEM_REQUIRE(tokens >= 1, "tokens", "expected at least one token, " + got(tokens));
  BEM_REQUIRE(d_in >= 1, "d_in", "expected >= 1, " + got(d_in));
  BEM_REQUIRE(d_out >= 1, "d_out", "expected >= 1, " + got(d_out));
  BEM_REQUIRE(rank >= 1, "rank", "expected >= 1, " + got(rank));
  BEM_REQUIRE(experts >= 1, "experts", "expected >= 1, " + got(experts));
  BEM_REQUIRE(active >= 1 && active <= rank, "rank_index",
          "expected k (active ranks) in [1, r=" + std::to_string(rank) + "], " + got(active));
  BEM_REQUIRE(rank_index != nullptr || active == rank, "rank_index",
          "is null (all ranks) but k=" + std::to_string(active) + " != r=" + std::to_string(rank));
  require_dtype(dtype);
}

// Runs of equal expert over all tokens, with the expand strategy of each.
void build_runs(const LoraArgs& a, const int64_t* expert_index, int width, std::vector<Run>& runs) {
  runs.clear();
  int64_t t = 0;
  while (t < a.tokens) {
    const int64_t e = expert_index ? expert_index[t] : 0;
    int64_t t1 = t + 1;
    while (t1 < a.tokens && (expert_index ? expert_index[t1] : 0) == e) ++t1;
    runs.push_back(Run{t, t1, e, ExpandForm::kRowdot, false, 0});
    t = t1;
  }
  const ExpandCost cost(a, width);
  for (Run& run : runs) {
    if (run.e < 0) continue;
    const int64_t n = run.t1 - run.t0;
    run.used = a.k;
    if (a.idx_stride != 0 && n > 1) {
      std::vector<int64_t>& seen = plan_scratch().seen;
      seen.assign(static_cast<size_t>(a.r), 0);
      run.used = 0;
      for (int64_t i = run.t0 * a.k; i < run.t1 * a.k && run.used < a.r; ++i) {
        if (!seen[a.idx[i]]) {
          seen[a.idx[i]] = 1;
          ++run.used;
        }
      }
    }
    int64_t shortest = 0;
    const int64_t groups = lane_groups(a, run.t0, run.t1, width, &shortest);
    const double broadcast_cost = std::min(cost.packed(run.used, n), width > 1 ? cost.lanes(groups) : 1e300);
    const int forced = detail::g_lora_expand_override.load(std::memory_order_relaxed);
    if (forced >= 0) {
      run.expand = static_cast<ExpandForm>(forced);
    } else {
      run.expand = broadcast_cost < static_cast<double>(n) * cost.rowdot_per_token ? ExpandForm::kBroadcast
                                                                                    : ExpandForm::kRowdot;
    }
    // The GEMM shrink needs a full vector of active ranks and segments long enough to pay for
    // transposing their rows of A.
    const int forced_shrink = detail::g_lora_shrink_override.load(std::memory_order_relaxed);
    run.shrink_gemm = forced_shrink >= 0 ? forced_shrink == 1
                                         : width > 1 && a.k >= width && shortest >= kShrinkGemmMinTokens;
  }
}

void zero_rows(void* base, DType dtype, int64_t t0, int64_t t1, int64_t ld, int64_t c0, int64_t c1) {
  const size_t es = element_size(dtype);
  char* p = static_cast<char*>(base);
  for (int64_t t = t0; t < t1; ++t) {
    std::memset(p + (t * ld + c0) * static_cast<int64_t>(es), 0, static_cast<size_t>(c1 - c0) * es);
  }
}

int64_t routed_tokens(const std::vector<Run>& runs) {
  int64_t n = 0;
  for (const Run& r : runs)
    if (r.e >= 0) n += r.t1 - r.t0;
  return n;
}

// A rectangle of work: run `run`, tokens [t0, t1), and a range [c0, c1) of slots or columns.
struct Item {
  int64_t run, t0, t1, c0, c1;
};

// Token blocks of every routed run, each split into `parts` ranges of [0, extent) (multiples of
// `align`), so that there are about `want` items for the pool even at one token. When the slot
// split alone cannot make that many (few active ranks), blocks shrink down to `min_block` tokens.
// With `gemm_block` > 0, runs whose shrink takes the GEMM form are cut into about `want` blocks of
// at least that many tokens instead: each item transposes the run's rank rows of A once, which a
// 16-token block would not pay back.
void token_items(const std::vector<Run>& runs, int64_t block, int64_t extent, int64_t align,
                 int64_t want, std::vector<Item>& items, int64_t gemm_block = 0, int64_t min_block = 0) {
  items.clear();
  min_block = min_block > 0 ? std::min(min_block, block) : block;
  auto block_of = [&](const Run& r, int64_t tb) {
    if (gemm_block <= 0 || !r.shrink_gemm) return tb;
    const int64_t n = r.t1 - r.t0;
    return std::max(gemm_block, round_up((n + want - 1) / want, block));
  };
  auto count_blocks = [&](int64_t tb) {
    int64_t n = 0;
    for (const Run& r : runs)
      if (r.e >= 0) n += (r.t1 - r.t0 + block_of(r, tb) - 1) / block_of(r, tb);
    return n;
  };
  const int64_t blocks = std::max<int64_t>(1, count_blocks(block));
  const int64_t parts = blocks >= want ? 1 : (want + blocks - 1) / blocks;
  const int64_t step = std::max(align, round_up((extent + parts - 1) / parts, align));
  const int64_t slot_items = (extent + step - 1) / step;
  int64_t tb = block;
  while (tb > min_block && count_blocks(tb) * slot_items < want) tb = std::max(min_block, tb / 2);
  for (size_t q = 0; q < runs.size(); ++q) {
    const Run& r = runs[q];
    if (r.e < 0) continue;
    const int64_t rb = block_of(r, tb);
    for (int64_t t = r.t0; t < r.t1; t += rb) {
      for (int64_t c = 0; c < extent; c += step) {
        items.push_back(Item{static_cast<int64_t>(q), t, std::min(r.t1, t + rb), c, std::min(extent, c + step)});
      }
    }
  }
}

// Token block of the fused parallel forward, or 0 for the two-phase split. Fused: each work item
// is one token block of a run, shrink then expand, one block per thread (at most kFusedMaxBlock
// tokens): one parallel region, no barrier between the phases, and each thread writes whole rows
// of y. Measured on Zen 4 (2 threads on torch's OpenMP threads, interleaved with the two-phase
// split, two runs): 1.02–1.9x faster in 12 of 14 shapes from T = 16 to 1024, and 6% slower at
// T = 16, d = 4096, r = 64, a short call whose active weights exceed L2 (every thread streams all
// of A and B, 2 MB, from L3). With the lanes expand, the two-phase split also wins at T = 16 for
// active weights of 0.5–1 MB (d = 1024, r = 64: 34 vs 39 µs; d = 4096, r = 64, k = 32: 63 vs
// 74 µs): its expand items keep all 16 tokens in the lanes of one vector, where a fused 8-token
// block fills half. So blocks of fewer than min(16, W) tokens fuse only when the active weights
// fit in 256 KB (under AVX2, W = 8, 8-token blocks fill the lanes and fuse), and fewer than 4
// tokens per thread (decode) never fuse.
constexpr int64_t kFusedMaxBlock = 256;
constexpr int64_t kFusedMinTokensPerThread = 4;

// `routed`: the call's tokens with an adapter (routed_tokens).
int64_t fused_block(const LoraArgs& a, int64_t routed, int threads, int width, DType dtype) {
  const int forced = detail::g_lora_split_override.load(std::memory_order_relaxed);
  if (forced == 0) return 0;
  const int64_t per_thread = (routed + threads - 1) / threads;
  if (forced == 1) return std::max<int64_t>(1, std::min(per_thread, kFusedMaxBlock));
  if (per_thread < kFusedMinTokensPerThread) return 0;
  const int64_t fb = std::min(kFusedMaxBlock, round_up(per_thread, 4));
  const int64_t weight_bytes = a.k * (a.d_in + a.d_out) * static_cast<int64_t>(element_size(dtype));
  return fb >= std::min(16, width) || weight_bytes <= (int64_t{1} << 18) ? fb : 0;
}

}  // namespace

void validate_lora_indices(int64_t tokens, int64_t experts, int64_t rank, int64_t active,
                           const int64_t* expert_index, const int64_t* rank_index) {
  if (expert_index != nullptr) {
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t e = expert_index[t];
      if (e < -1 || e >= experts) {
        throw ArgumentError("expert_index", "value " + std::to_string(e) + " at token " + std::to_string(t) +
                                                " is out of range [-1, " + std::to_string(experts) + ")",
                            true);
      }
    }
  }
  if (rank_index == nullptr) return;
  std::vector<int64_t>& seen = plan_scratch().seen;
  seen.assign(static_cast<size_t>(std::max<int64_t>(rank, 0)), -1);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t j = 0; j < active; ++j) {
      const int64_t i = rank_index[t * active + j];
      if (i < 0 || i >= rank) {
        throw ArgumentError("rank_index", "value " + std::to_string(i) + " at (" + std::to_string(t) + ", " +
                                              std::to_string(j) + ") is out of range [0, " + std::to_string(rank) + ")",
                            true);
      }
      if (seen[i] == t) {
        throw ArgumentError("rank_index", "token " + std::to_string(t) + " lists rank " + std::to_string(i) +
                                              " twice; a token's active ranks must be distinct");
      }
      seen[i] = t;
    }
  }
}

bool lora_forward_cpu(const LoraForwardParams& p) {
  check_common(p.tokens, p.d_in, p.d_out, p.rank, p.active, p.experts, p.dtype, p.rank_index);
  BEM_REQUIRE(p.x != nullptr, "x", "is null");
  BEM_REQUIRE(p.A != nullptr, "A", "is null");
  BEM_REQUIRE(p.B != nullptr, "B", "is null");
  BEM_REQUIRE(p.y != nullptr, "y", "is null");
  BEM_REQUIRE(p.ld_x >= p.d_in, "ld_x", "expected >= d_in=" + std::to_string(p.d_in) + ", " + got(p.ld_x));
  BEM_REQUIRE(p.ld_y >= p.d_out, "ld_y", "expected >= d_out=" + std::to_string(p.d_out) + ", " + got(p.ld_y));
  validate_lora_indices(p.tokens, p.experts, p.rank, p.active, p.expert_index, p.rank_index);

  const LoraKernels& kern = kernels_for(p.dtype);
  PlanScratch& ps = plan_scratch();
  LoraArgs a;
  a.tokens = p.tokens;
  a.d_in = p.d_in;
  a.d_out = p.d_out;
  a.r = p.rank;
  a.k = p.active;
  a.scale = p.scale;
  a.x = p.x;
  a.ld_x = p.ld_x;
  a.A = p.A;
  a.B = p.B;
  if (p.rank_index != nullptr) {
    a.idx = p.rank_index;
    a.idx_stride = p.active;
  } else {
    int64_t* id = tls_buffer(ps.identity, p.rank);
    for (int64_t i = 0; i < p.rank; ++i) id[i] = i;
    a.idx = id;
    a.idx_stride = 0;
  }
  a.gate = p.rank_gate;
  a.S = p.shrink_out ? p.shrink_out : tls_buffer(ps.S, p.tokens * p.active);
  a.y = p.y;
  a.ld_y = p.ld_y;
  a.accumulate = p.accumulate;
#ifdef BEM_SIMD_X86
  // Rows of 9–32 values: the 256-bit row-dot expand first sums each row's two to four vectors with
  // FMAs and then takes a short tree of 256-bit horizontal adds; the 512-bit one holds a row in one
  // or two vectors and reduces W of them with 512-bit shuffles, which Zen 4 runs at half rate.
  // Measured on Zen 4 (whole forward, 1 thread, interleaved): T = 1, d = 4096, r = 16: 7.3 vs
  // 12.0 µs; r = 32: 14.5 vs 17.2 µs.
  if (kern.width == 16 && a.r > 8 && a.r <= 32) a.rowdot = isa_avx2::lora_kernels(p.dtype).expand_rowdot;
#endif
  build_runs(a, p.expert_index, kern.width, ps.runs);
  const std::vector<Run>& runs = ps.runs;
  a.runs = runs.data();
  a.n_runs = static_cast<int64_t>(runs.size());

  for (const Run& run : runs) {
    if (run.e >= 0) continue;
    if (p.shrink_out) std::fill(p.shrink_out + run.t0 * a.k, p.shrink_out + run.t1 * a.k, 0.0f);
    if (!p.accumulate) zero_rows(p.y, p.dtype, run.t0, run.t1, p.ld_y, 0, p.d_out);
  }

  const int64_t routed = routed_tokens(runs), macs = routed * a.k * (a.d_in + a.d_out);
  const int64_t min_macs =
      routed >= kFusedMinTokensPerThread * num_threads() ? kParallelFusedMacs : kParallelForwardMacs;
  const int threads = macs >= detail::parallel_threshold(min_macs) ? num_threads() : 1;
  bool finite = true;
  if (threads == 1) {
    for (const Run& run : runs)
      if (run.e >= 0) kern.shrink(a, run, run.t0, run.t1, 0, a.k);
    for (const Run& run : runs)
      if (run.e >= 0) finite &= kern.expand(a, run, run.t0, run.t1, 0, a.d_out);
  } else if (const int64_t fb = fused_block(a, routed, threads, kern.width, p.dtype); fb > 0) {
    // Fused token blocks: each item runs the shrink and then the expand of its own tokens, so
    // there is one parallel region and no barrier between the two phases.
    std::vector<Item> items;
    token_items(runs, fb, 1, 1, 1, items);
    std::atomic<bool> all_finite{true};
    parallel_for(static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
      bool ok = true;
      for (int64_t i = b; i < e; ++i) {
        const Item& it = items[i];
        kern.shrink(a, runs[it.run], it.t0, it.t1, 0, a.k);
        ok &= kern.expand(a, runs[it.run], it.t0, it.t1, 0, a.d_out);
      }
      if (!ok) all_finite.store(false, std::memory_order_relaxed);
    });
    finite = all_finite.load();
  } else {
    std::vector<Item> items;
    // Shrink: 16-token blocks (GEMM-form runs: blocks of >= 64 tokens), the k slots split when
    // there are few tokens (decode on big layers): ranges of 16 slots when k allows (each x tile
    // copied for the dot-product tiles then serves four rank groups), and token blocks down to
    // one 4-token tile when the slots alone give too few items. About one item per thread: more,
    // smaller items read the same rows of A once per token block (measured on Zen 4, 2 threads,
    // T = 1 to 32, r = 16 and 64: one per thread was as fast or up to 7% faster than four).
    token_items(runs, 16, a.k, a.k >= 32 ? 16 : 8, threads, items, kShrinkGemmMinTokens, 4);
    parallel_for(static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const Item& it = items[i];
        kern.shrink(a, runs[it.run], it.t0, it.t1, it.c0, it.c1);
      }
    });
    // Expand: blocks of up to kExpandBlock tokens of each run (the packing decision is per run,
    // and every output element sums its k terms in the same order in any block), split over
    // output columns (multiples of 64 so the lane layout of every output block is the same for
    // any split) until there are about 8 items per thread: the pool's workers join late, and
    // coarse items would leave the caller finishing alone.
    items.clear();
    int64_t blocks = 0;
    for (const Run& r : runs)
      if (r.e >= 0) blocks += (r.t1 - r.t0 + kExpandBlock - 1) / kExpandBlock;
    const int64_t want = 8 * static_cast<int64_t>(threads);
    const int64_t parts = blocks >= want ? 1 : (want + blocks - 1) / std::max<int64_t>(blocks, 1);
    const int64_t step = std::max<int64_t>(128, round_up((a.d_out + parts - 1) / parts, 64));
    for (size_t q = 0; q < runs.size(); ++q) {
      const Run& r = runs[q];
      if (r.e < 0) continue;
      for (int64_t t = r.t0; t < r.t1; t += kExpandBlock) {
        for (int64_t c = 0; c < a.d_out; c += step) {
          items.push_back(Item{static_cast<int64_t>(q), t, std::min(r.t1, t + kExpandBlock), c, std::min(a.d_out, c + step)});
        }
      }
    }
    std::atomic<bool> all_finite{true};
    parallel_for(static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
      bool ok = true;
      for (int64_t i = b; i < e; ++i) ok &= kern.expand(a, runs[items[i].run], items[i].t0, items[i].t1, items[i].c0, items[i].c1);
      if (!ok) all_finite.store(false, std::memory_order_relaxed);
    });
    finite = all_finite.load();
  }
  ps.trim();
  return finite;
}

void lora_backward_cpu(const LoraBackwardParams& p) {
  check_common(p.tokens, p.d_in, p.d_out, p.rank, p.active, p.experts, p.dtype, p.rank_index);
  BEM_REQUIRE(p.x != nullptr, "x", "is null");
  BEM_REQUIRE(p.A != nullptr, "A", "is null");
  BEM_REQUIRE(p.B != nullptr, "B", "is null");
  BEM_REQUIRE(p.grad_y != nullptr, "grad_y", "is null");
  validate_lora_indices(p.tokens, p.experts, p.rank, p.active, p.expert_index, p.rank_index);
  if (!p.grad_x && !p.grad_A && !p.grad_B && !p.grad_gate) return;

  const LoraKernels& kern = kernels_for(p.dtype);
  PlanScratch& ps = plan_scratch();
  const int64_t T = p.tokens, k = p.active, r = p.rank;
  LoraArgs a;
  a.tokens = T;
  a.d_in = p.d_in;
  a.d_out = p.d_out;
  a.r = r;
  a.k = k;
  a.scale = p.scale;
  a.x = p.x;
  a.ld_x = p.d_in;
  a.A = p.A;
  a.B = p.B;
  if (p.rank_index != nullptr) {
    a.idx = p.rank_index;
    a.idx_stride = k;
  } else {
    int64_t* id = tls_buffer(ps.identity, r);
    for (int64_t i = 0; i < r; ++i) id[i] = i;
    a.idx = id;
    a.idx_stride = 0;
  }
  a.gate = p.rank_gate;
  a.dy = p.grad_y;
  a.grad_x = p.grad_x;
  a.grad_A = p.grad_A;
  a.grad_B = p.grad_B;
  build_runs(a, p.expert_index, kern.width, ps.runs);
  const std::vector<Run>& runs = ps.runs;
  a.runs = runs.data();
  a.n_runs = static_cast<int64_t>(runs.size());

  const bool need_S = p.grad_B || p.grad_gate;
  const bool need_u = p.grad_x || p.grad_A || p.grad_gate;
  const int64_t routed = routed_tokens(runs);
  const int64_t macs = routed * (r * (p.d_out + p.d_in) + k * (p.d_in + (p.shrink ? 0 : p.d_in)));
  const int threads = macs >= detail::parallel_threshold(kParallelBackwardMacs) ? num_threads() : 1;
  std::vector<Item> items;
  // Runs a per-token-block kernel over every routed run, on the pool when it pays.
  auto over_tokens = [&](int64_t block, auto&& fn) {
    if (threads == 1) {
      for (const Run& run : runs)
        if (run.e >= 0) fn(run, run.t0, run.t1);
      return;
    }
    token_items(runs, block, 1, 1, 2, items);
    parallel_for(static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) fn(runs[items[i].run], items[i].t0, items[i].t1);
    });
  };
  // Runs fn(e, c0, c1) over every expert and column block of [0, extent).
  auto over_experts = [&](int64_t extent, auto&& fn) {
    const int64_t E = p.experts;
    const int64_t want = 4 * static_cast<int64_t>(threads);
    const int64_t parts = threads == 1 ? 1 : std::max<int64_t>(1, (want + E - 1) / E);
    const int64_t step = std::max<int64_t>(64, round_up((extent + parts - 1) / parts, 64));
    const int64_t per_e = (extent + step - 1) / step;
    if (threads == 1) {
      for (int64_t e = 0; e < E; ++e) fn(e, int64_t{0}, extent);
      return;
    }
    parallel_for(E * per_e, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t c0 = (i % per_e) * step;
        fn(i / per_e, c0, std::min(extent, c0 + step));
      }
    });
  };

  if (need_S) {
    if (p.shrink != nullptr) {
      a.S = const_cast<float*>(p.shrink);  // read only in the backward
    } else {
      a.S = tls_buffer(ps.S, T * k);
      over_tokens(16, [&](const Run& run, int64_t t0, int64_t t1) { kern.shrink(a, run, t0, t1, 0, k); });
    }
  }
  if (need_u) {
    a.grad_s = tls_buffer(ps.grad_s, T * k);
    over_tokens(32, [&](const Run& run, int64_t t0, int64_t t1) { kern.grad_u(a, run, t0, t1); });
  }
  if (p.grad_gate) {
    std::fill(p.grad_gate, p.grad_gate + T * k, 0.0f);
    for (const Run& run : runs) {
      if (run.e < 0) continue;
      for (int64_t i = run.t0 * k; i < run.t1 * k; ++i) p.grad_gate[i] = p.scale * a.S[i] * a.grad_s[i];
    }
  }
  if (p.grad_x || p.grad_A) {
    for (const Run& run : runs) {
      if (run.e < 0) continue;
      for (int64_t i = run.t0 * k; i < run.t1 * k; ++i) a.grad_s[i] *= p.scale * (p.rank_gate ? p.rank_gate[i] : 1.0f);
    }
  }
  if (p.grad_x) {
    for (const Run& run : runs)
      if (run.e < 0) zero_rows(p.grad_x, p.dtype, run.t0, run.t1, p.d_in, 0, p.d_in);
    over_tokens(16, [&](const Run& run, int64_t t0, int64_t t1) { kern.grad_x(a, run, t0, t1); });
  }
  if (p.grad_A) {
    a.v_full = tls_buffer(ps.v_full, T * r);
    std::fill(a.v_full, a.v_full + T * r, 0.0f);
    for (const Run& run : runs) {
      if (run.e < 0) continue;
      for (int64_t t = run.t0; t < run.t1; ++t) {
        const int64_t* ranks = a.idx + t * a.idx_stride;
        for (int64_t j = 0; j < k; ++j) a.v_full[t * r + ranks[j]] = a.grad_s[t * k + j];
      }
    }
    over_experts(p.d_in, [&](int64_t e, int64_t c0, int64_t c1) { kern.grad_A(a, e, c0, c1); });
  }
  if (p.grad_B) {
    a.w_full = tls_buffer(ps.w_full, T * r);
    std::fill(a.w_full, a.w_full + T * r, 0.0f);
    for (const Run& run : runs) {
      if (run.e < 0) continue;
      for (int64_t t = run.t0; t < run.t1; ++t) {
        const int64_t* ranks = a.idx + t * a.idx_stride;
        for (int64_t j = 0; j < k; ++j) {
          const float g = p.rank_gate ? p.rank_gate[t * k + j] : 1.0f;
          a.w_full[t * r + ranks[j]] = p.scale * g * a.S[t * k + j];
        }
      }
    }
    over_experts(p.d_out, [&](int64_t e, int64_t o0, int64_t o1) { kern.grad_B(a, e, o0, o1); });
  }
  ps.trim();
}

}  // namespace bem
