// bem's 64-bit non-cryptographic hash: deterministic (no per-process seed), so the same bytes give
// the same value in every process and on every run. Used to index the KV block cache.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace bem {
namespace hash_detail {

// Odd constants with a balanced mix of set bits (digits of π and e in hex), so that xoring one
// into a word never leaves a sparse operand for the multiply.
constexpr uint64_t kK0 = 0x243f6a8885a308d3ull;  // π
constexpr uint64_t kK1 = 0x13198a2e03707345ull;  // π, continued
constexpr uint64_t kK2 = 0xb7e151628aed2a6bull;  // e
constexpr uint64_t kK3 = 0xa4093822299f31d1ull;  // π, continued

// 64×64 → 128-bit multiply folded to 64 bits (low half xor high half), in 64-bit arithmetic:
// the fallback where the compiler has no 128-bit integer, and the reference it is tested against.
inline uint64_t fold_multiply_portable(uint64_t a, uint64_t b) {
  const uint64_t a_lo = a & 0xffffffffull, a_hi = a >> 32, b_lo = b & 0xffffffffull, b_hi = b >> 32;
  const uint64_t ll = a_lo * b_lo, lh = a_lo * b_hi, hl = a_hi * b_lo, hh = a_hi * b_hi;
  const uint64_t mid = (ll >> 32) + (lh & 0xffffffffull) + (hl & 0xffffffffull);
  const uint64_t lo = (ll & 0xffffffffull) | (mid << 32);
  const uint64_t hi = hh + (lh >> 32) + (hl >> 32) + (mid >> 32);
  return lo ^ hi;
}

// Every output bit depends on every input bit of both operands, which is what makes one multiply
// per 16 bytes enough.
inline uint64_t fold_multiply(uint64_t a, uint64_t b) {
#if defined(__SIZEOF_INT128__)
  const unsigned __int128 r = static_cast<unsigned __int128>(a) * b;
  return static_cast<uint64_t>(r) ^ static_cast<uint64_t>(r >> 64);
#else
  return fold_multiply_portable(a, b);
#endif
}

// Final avalanche (MurmurHash3's fmix64): spreads the last multiply's bits over the whole word.
inline uint64_t avalanche(uint64_t h) {
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ull;
  h ^= h >> 33;
  return h;
}

inline uint64_t load_u64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

}  // namespace hash_detail

// Hash of n bytes under `seed`. Consumes 16 bytes per multiply; the length is mixed in first so
// that inputs differing only by trailing zero bytes differ.
inline uint64_t hash_bytes(const void* data, size_t n, uint64_t seed) {
  using namespace hash_detail;
  const unsigned char* p = static_cast<const unsigned char*>(data);
  uint64_t h = fold_multiply(seed ^ kK0, static_cast<uint64_t>(n) ^ kK1);
  while (n >= 16) {
    h = fold_multiply(load_u64(p) ^ kK2 ^ h, load_u64(p + 8) ^ kK3);
    p += 16;
    n -= 16;
  }
  if (n > 0) {
    unsigned char tail[16] = {0};
    std::memcpy(tail, p, n);
    h = fold_multiply(load_u64(tail) ^ kK2 ^ h, load_u64(tail + 8) ^ kK1);
  }
  return avalanche(h);
}

// Combines two hashes; not symmetric (combine(a, b) != combine(b, a) in general).
inline uint64_t hash_combine(uint64_t a, uint64_t b) {
  using namespace hash_detail;
  return avalanche(fold_multiply(a ^ kK0, b ^ kK3) ^ a);
}

}  // namespace bem
