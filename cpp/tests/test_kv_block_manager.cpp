// Unit tests of bem::KVBlockManager and bem::hash_bytes: prefix reuse keyed by routing, exact
// verification under forced hash collisions, LRU eviction order, fork, and all-or-nothing errors.
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "bem/hash.h"
#include "bem/kv_block_manager.h"

namespace {

int g_failures = 0;

#define CHECK(cond)                                                            \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                            \
    }                                                                          \
  } while (0)

template <class E>
bool throws(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const E&) {
    return true;
  } catch (...) {
    return false;
  }
  return false;
}

using bem::KVBlockManager;
using bem::RoutingKey;

RoutingKey key(int64_t expert, uint8_t digest_byte = 1, int64_t version = 0) {
  RoutingKey k;
  k.expert = expert;
  k.weights_digest.fill(digest_byte);
  k.version = version;
  return k;
}

std::vector<int64_t> iota_tokens(int64_t n, int64_t start) {
  std::vector<int64_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) t[static_cast<size_t>(i)] = start + i;
  return t;
}

// Everything observable, as text, to compare the manager before and after a failing call.
std::string snapshot(const KVBlockManager& m) {
  std::ostringstream o;
  for (int64_t id : m.sequence_ids()) {
    const auto s = m.sequence_info(id);
    o << "seq " << id << " n=" << s.num_tokens << " blocks";
    for (int32_t b : s.blocks) o << ' ' << b;
    o << " canon";
    for (int32_t c : s.canonical) o << ' ' << c;
    o << '\n';
  }
  for (int32_t b = 0; b < m.num_blocks(); ++b) {
    const auto i = m.block_info(b);
    o << "block " << b << ' ' << i.ref_count << ' ' << i.generation << ' ' << i.cached << ' '
      << i.key << ' ' << i.parent << ' ' << i.hash << ' ' << i.filled << ':';
    for (int32_t t : m.block_tokens(b)) o << ' ' << t;
    o << '\n';
  }
  o << "lru";
  for (int32_t b : m.lru_order()) o << ' ' << b;
  o << "\nfree";
  for (int32_t b : m.free_blocks()) o << ' ' << b;
  const auto st = m.stats();
  o << "\nstats " << st.lookups << ' ' << st.tokens_queried << ' ' << st.tokens_hit << ' '
    << st.tokens_appended << ' ' << st.blocks_committed << ' ' << st.blocks_duplicate << ' '
    << st.blocks_uncacheable << ' ' << st.evictions << ' ' << st.blocks_in_use << ' '
    << st.blocks_evictable << ' ' << st.blocks_free << ' ' << st.blocks_cached << ' '
    << st.sequences << " keys " << m.num_routing_keys();
  return o.str();
}

std::vector<int64_t> append(KVBlockManager& m, int64_t seq, const std::vector<int64_t>& t,
                            int32_t k) {
  std::vector<int64_t> slots(t.size());
  m.append(seq, t.data(), static_cast<int64_t>(t.size()), k, slots.data());
  return slots;
}

int64_t match(KVBlockManager& m, int64_t seq, const std::vector<int64_t>& t,
              const std::vector<int32_t>& keys) {
  return m.match_prefix(seq, t.data(), static_cast<int64_t>(t.size()), keys.data(),
                        static_cast<int64_t>(keys.size()));
}

void test_hash() {
  const std::vector<uint8_t> data = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17};
  const uint64_t h = bem::hash_bytes(data.data(), data.size(), 0);
  CHECK(h == bem::hash_bytes(data.data(), data.size(), 0));
  CHECK(h != bem::hash_bytes(data.data(), data.size(), 1));
  CHECK(h != bem::hash_bytes(data.data(), data.size() - 1, 0));
  // Pinned values: the hash must not change between builds or platforms (it names cached blocks).
  CHECK(bem::hash_bytes(nullptr, 0, 0) == bem::hash_bytes("", 0, 0));
  const uint64_t pinned = bem::hash_bytes("bem kv cache", 12, 42);
  CHECK(pinned == 0x7c4dcdd553104383ull);
  std::mt19937_64 rng(7);
  for (int i = 0; i < 10000; ++i) {
    const uint64_t a = rng(), b = rng();
    CHECK(bem::hash_detail::fold_multiply(a, b) == bem::hash_detail::fold_multiply_portable(a, b));
  }
  CHECK(bem::hash_detail::fold_multiply(~0ull, ~0ull) ==
        bem::hash_detail::fold_multiply_portable(~0ull, ~0ull));
  // Every single-bit flip changes the hash, and about half of the output bits.
  int64_t flipped_bits = 0, flips = 0;
  for (size_t i = 0; i < data.size(); ++i)
    for (int bit = 0; bit < 8; ++bit) {
      std::vector<uint8_t> d = data;
      d[i] ^= static_cast<uint8_t>(1u << bit);
      const uint64_t g = bem::hash_bytes(d.data(), d.size(), 0);
      CHECK(g != h);
      flipped_bits += __builtin_popcountll(g ^ h);
      ++flips;
    }
  const double mean = static_cast<double>(flipped_bits) / static_cast<double>(flips);
  CHECK(mean > 28.0 && mean < 36.0);
  CHECK(bem::hash_combine(1, 2) != bem::hash_combine(2, 1));
  // Trailing zeros matter (the length is hashed).
  const uint8_t zeros[32] = {0};
  CHECK(bem::hash_bytes(zeros, 16, 0) != bem::hash_bytes(zeros, 17, 0));
}

void test_prefix_reuse_keyed_by_routing() {
  KVBlockManager m(16, 8);
  const int32_t a = m.intern_routing_key(key(3));
  CHECK(m.intern_routing_key(key(3)) == a);
  const int32_t other_digest = m.intern_routing_key(key(3, 2));
  const int32_t other_version = m.intern_routing_key(key(3, 1, 1));
  const int32_t other_expert = m.intern_routing_key(key(4));
  CHECK(m.num_routing_keys() == 4);

  const auto tokens = iota_tokens(20, 100);  // two full blocks of 8 and a partial of 4
  const int64_t s0 = m.create_sequence();
  const auto slots = append(m, s0, tokens, a);
  const auto table = m.block_table(s0);
  CHECK(table.size() == 3);
  for (size_t i = 0; i < slots.size(); ++i)
    CHECK(slots[i] == table[i / 8] * 8 + static_cast<int64_t>(i % 8));
  CHECK(m.stats().blocks_committed == 2);
  CHECK(!m.block_info(table[2]).cached);
  m.check_invariants();

  // Same tokens and key: both full blocks hit; the partial block never does.
  const int64_t s1 = m.create_sequence();
  CHECK(match(m, s1, tokens, {a, a}) == 16);
  CHECK(m.block_table(s1) == std::vector<int32_t>(table.begin(), table.begin() + 2));
  CHECK(m.block_info(table[0]).ref_count == 2);
  // Another digest, version or expert for the first block: nothing is reused.
  for (int32_t k : {other_digest, other_version, other_expert}) {
    const int64_t s = m.create_sequence();
    CHECK(match(m, s, tokens, {k, a}) == 0);
    CHECK(m.num_tokens(s) == 0);
    m.free_sequence(s);
  }
  // Same first block, other key for the second: one block.
  const int64_t s2 = m.create_sequence();
  CHECK(match(m, s2, tokens, {a, other_expert}) == 8);
  // A change in the second block's tokens: one block.
  auto changed = tokens;
  changed[12] += 1;
  const int64_t s3 = m.create_sequence();
  CHECK(match(m, s3, changed, {a, a}) == 8);
  // A change in the first block's tokens breaks the whole chain.
  changed = tokens;
  changed[0] += 1;
  const int64_t s4 = m.create_sequence();
  CHECK(match(m, s4, changed, {a, a}) == 0);

  const auto st = m.stats();
  CHECK(st.lookups == 7);
  CHECK(st.tokens_queried == 7 * 20);
  CHECK(st.tokens_hit == 16 + 8 + 8);
  CHECK(m.key_stats()[static_cast<size_t>(a)].tokens_hit == 32);
  CHECK(m.key_stats()[static_cast<size_t>(a)].blocks_cached == 2);
  // Matching needs an empty sequence.
  CHECK(throws<bem::ArgumentError>([&] { match(m, s1, tokens, {a, a}); }));
  m.check_invariants();
}

void test_routing_changes_between_and_inside_blocks() {
  KVBlockManager m(16, 4);
  const int32_t a = m.intern_routing_key(key(0)), b = m.intern_routing_key(key(1));
  const auto tokens = iota_tokens(12, 7);
  // Chunk-sticky routing that changes between blocks: each block carries its own key.
  const int64_t s0 = m.create_sequence();
  append(m, s0, {tokens.begin(), tokens.begin() + 4}, a);
  append(m, s0, {tokens.begin() + 4, tokens.begin() + 8}, b);
  append(m, s0, {tokens.begin() + 8, tokens.end()}, a);
  CHECK(m.stats().blocks_committed == 3);
  const int64_t s1 = m.create_sequence();
  CHECK(match(m, s1, tokens, {a, b, a}) == 12);
  const int64_t s2 = m.create_sequence();
  CHECK(match(m, s2, tokens, {a, a, a}) == 4);
  // Routing changing inside a block: that block and every later one stay private.
  const int64_t s3 = m.create_sequence();
  append(m, s3, {1, 2}, a);
  append(m, s3, {3, 4}, b);
  append(m, s3, {5, 6, 7, 8}, a);
  CHECK(m.block_info(m.block_table(s3)[0]).key == KVBlockManager::kMixedKey);
  CHECK(!m.block_info(m.block_table(s3)[0]).cached);
  CHECK(!m.block_info(m.block_table(s3)[1]).cached);
  CHECK(m.stats().blocks_uncacheable == 2);
  m.check_invariants();
}

void test_fork_and_copy_on_write() {
  KVBlockManager m(8, 4);
  const int32_t a = m.intern_routing_key(key(0));
  const int64_t p = m.create_sequence();
  append(m, p, iota_tokens(10, 1), a);  // blocks: full, full, partial(2)
  const auto pt = m.block_table(p);
  const auto f = m.fork(p);
  const auto ct = m.block_table(f.child);
  CHECK(m.num_tokens(f.child) == 10);
  CHECK(ct[0] == pt[0] && ct[1] == pt[1] && ct[2] != pt[2]);
  CHECK(f.copy_src == pt[2] && f.copy_dst == ct[2]);
  CHECK(m.block_tokens(ct[2]) == m.block_tokens(pt[2]));
  CHECK(m.block_info(pt[0]).ref_count == 2 && m.block_info(pt[2]).ref_count == 1);
  // The two continuations diverge without touching each other.
  append(m, p, {50, 51}, a);
  append(m, f.child, {60}, a);
  CHECK(m.block_tokens(pt[2]) == (std::vector<int32_t>{9, 10, 50, 51}));
  CHECK(m.block_tokens(ct[2]) == (std::vector<int32_t>{9, 10, 60}));
  // A fork at a block boundary copies nothing.
  const int64_t q = m.create_sequence();
  append(m, q, iota_tokens(4, 1), a);
  const auto g = m.fork(q);
  CHECK(g.copy_src == -1 && g.copy_dst == -1);
  CHECK(m.block_table(g.child) == m.block_table(q));
  m.check_invariants();
}

void test_lru_eviction_order() {
  KVBlockManager m(6, 2);
  const int32_t a = m.intern_routing_key(key(0));
  const int64_t s0 = m.create_sequence();
  append(m, s0, {1, 2, 3, 4, 5, 6}, a);  // blocks 0, 1, 2, all cached
  const int64_t s1 = m.create_sequence();
  append(m, s1, {7, 8, 9, 10}, a);  // blocks 3, 4
  m.free_sequence(s0);
  // The freed sequence's tail goes first.
  CHECK(m.lru_order() == (std::vector<int32_t>{2, 1, 0}));
  m.free_sequence(s1);
  CHECK(m.lru_order() == (std::vector<int32_t>{2, 1, 0, 4, 3}));
  CHECK(m.free_blocks() == (std::vector<int32_t>{5}));
  // A hit takes blocks out of the queue; releasing puts them back at the end, tail first.
  const int64_t s2 = m.create_sequence();
  CHECK(match(m, s2, {1, 2, 3, 4}, {a, a}) == 4);
  CHECK(m.lru_order() == (std::vector<int32_t>{2, 4, 3}));
  // Allocation uses free blocks first, then evicts from the front; referenced blocks stay.
  const int64_t s3 = m.create_sequence();
  append(m, s3, {20, 21, 22, 23, 24, 25}, a);
  CHECK(m.block_table(s3) == (std::vector<int32_t>{5, 2, 4}));
  CHECK(m.stats().evictions == 2);
  CHECK(m.key_stats()[static_cast<size_t>(a)].evictions == 2);
  CHECK(m.block_table(s2) == (std::vector<int32_t>{0, 1}));
  // The evicted prefix {1..6}'s tail is gone, its head (held by s2) is still matched.
  const int64_t s4 = m.create_sequence();
  CHECK(match(m, s4, {1, 2, 3, 4, 5, 6}, {a, a, a}) == 4);
  m.check_invariants();
}

void test_exhaustion_changes_nothing() {
  KVBlockManager m(4, 4);
  const int32_t a = m.intern_routing_key(key(0));
  const int64_t s0 = m.create_sequence();
  append(m, s0, iota_tokens(10, 0), a);  // 3 blocks in use
  const int64_t s1 = m.create_sequence();
  const std::string before = snapshot(m);
  std::vector<int64_t> big = iota_tokens(9, 500), slots(9);
  CHECK(throws<bem::KVCacheFullError>([&] { m.append(s1, big.data(), 9, a, slots.data()); }));
  CHECK(snapshot(m) == before);
  // A batch whose total need exceeds the pool fails whole, even when its first items fit.
  const int64_t seqs[2] = {s1, s0};
  const int64_t offsets[3] = {0, 3, 9};
  const int32_t keys[2] = {a, a};
  CHECK(throws<bem::KVCacheFullError>(
      [&] { m.append_many(seqs, 2, big.data(), offsets, keys, slots.data()); }));
  CHECK(snapshot(m) == before);
  // Fork of a sequence with a partial block needs one block.
  append(m, s1, {1, 2, 3}, a);
  const std::string full = snapshot(m);
  CHECK(throws<bem::KVCacheFullError>([&] { m.fork(s0); }));
  CHECK(snapshot(m) == full);
  m.check_invariants();
}

void test_bad_arguments_change_nothing() {
  CHECK(throws<bem::ArgumentError>([] { KVBlockManager(0, 4); }));
  CHECK(throws<bem::ArgumentError>([] { KVBlockManager(4, 0); }));
  CHECK(throws<bem::ArgumentError>([] { KVBlockManager(4, -3); }));
  CHECK(throws<bem::ArgumentError>([] { KVBlockManager(4, 4, 0); }));
  KVBlockManager m(8, 4);
  CHECK(throws<bem::ArgumentError>([&] { m.intern_routing_key(key(-2)); }));
  CHECK(throws<bem::ArgumentError>([&] { m.intern_routing_key(key(0, 1, -1)); }));
  const int32_t a = m.intern_routing_key(key(0));
  const int64_t s = m.create_sequence();
  append(m, s, {1, 2, 3, 4, 5}, a);
  const std::string before = snapshot(m);
  std::vector<int64_t> slots(8);
  const std::vector<int64_t> bad = {1, -1, 3};
  const std::vector<int64_t> huge = {int64_t{1} << 31};
  auto index_error = [](const std::function<void()>& fn) {
    try {
      fn();
    } catch (const bem::ArgumentError& e) {
      return e.index_error();
    }
    return false;
  };
  CHECK(index_error([&] { append(m, 99, {1}, a); }));
  CHECK(index_error([&] { append(m, -1, {1}, a); }));
  CHECK(index_error([&] { append(m, s, {1}, 7); }));
  CHECK(index_error([&] { append(m, s, {1}, -1); }));
  CHECK(throws<bem::ArgumentError>([&] { append(m, s, bad, a); }));
  CHECK(throws<bem::ArgumentError>([&] { append(m, s, huge, a); }));
  CHECK(index_error([&] { m.free_sequence(12); }));
  CHECK(index_error([&] { m.fork(12); }));
  CHECK(index_error([&] { m.block_info(8); }));
  const int64_t twice[2] = {s, s};
  CHECK(throws<bem::ArgumentError>([&] { m.free_many(twice, 2); }));
  const int64_t e = m.create_sequence();
  const std::string with_e = snapshot(m);
  CHECK(throws<bem::ArgumentError>([&] { match(m, e, iota_tokens(8, 0), {a}); }));
  CHECK(throws<bem::ArgumentError>([&] { match(m, e, {1, 2, 3, 4, -5}, {a}); }));
  CHECK(snapshot(m) == with_e);
  m.free_sequence(e);
  CHECK(snapshot(m) == before);
  m.check_invariants();
}

void test_duplicates_keep_later_blocks_cacheable() {
  KVBlockManager m(16, 2);
  const int32_t a = m.intern_routing_key(key(0));
  // Two sequences compute the same prompt without a hit (they arrived together).
  const int64_t s0 = m.create_sequence(), s1 = m.create_sequence();
  append(m, s0, {1, 2, 3, 4}, a);
  append(m, s1, {1, 2, 3, 4}, a);
  CHECK(m.stats().blocks_duplicate == 2);
  // s1 continues; its new block is cached as a child of s0's blocks.
  append(m, s1, {5, 6}, a);
  CHECK(m.block_info(m.block_table(s1)[2]).cached);
  m.free_sequence(s0);
  m.free_sequence(s1);
  const int64_t s2 = m.create_sequence();
  CHECK(match(m, s2, {1, 2, 3, 4, 5, 6}, {a, a, a}) == 6);
  m.check_invariants();
}

// Random operations on a manager whose index hash has 2 bits (constant collisions): every hit
// must still return exactly the tokens and keys asked for, and the invariants must hold.
void test_random_operations_under_collisions() {
  for (int hash_bits : {2, 64}) {
    std::mt19937_64 rng(1234 + hash_bits);
    KVBlockManager m(24, 3, hash_bits);
    std::vector<int32_t> keys;
    for (int e = 0; e < 3; ++e) keys.push_back(m.intern_routing_key(key(e)));
    struct Shadow {
      std::vector<int64_t> tokens;
      std::vector<int32_t> block_keys;  // per block, or kMixedKey
    };
    std::map<int64_t, Shadow> live;
    auto pick = [&](size_t n) { return static_cast<size_t>(rng() % n); };
    for (int step = 0; step < 4000; ++step) {
      const int op = static_cast<int>(rng() % 4);
      if (op == 0 || live.empty()) {  // new sequence from a small token alphabet, matched first
        const int64_t n = static_cast<int64_t>(rng() % 10);
        std::vector<int64_t> t(static_cast<size_t>(n));
        for (auto& x : t) x = static_cast<int64_t>(rng() % 3);
        std::vector<int32_t> ks(static_cast<size_t>(n / 3));
        for (auto& k : ks) k = keys[pick(keys.size())];
        const int64_t s = m.create_sequence();
        const int64_t hit = match(m, s, t, ks);
        CHECK(hit % 3 == 0 && hit <= n);
        const auto table = m.block_table(s);
        for (int64_t i = 0; i < hit / 3; ++i) {
          const int32_t b = table[static_cast<size_t>(i)];
          const auto bt = m.block_tokens(b);
          for (int j = 0; j < 3; ++j)
            CHECK(bt[static_cast<size_t>(j)] == t[static_cast<size_t>(i * 3 + j)]);
          CHECK(m.block_info(b).key == ks[static_cast<size_t>(i)]);
        }
        Shadow sh;
        sh.tokens.assign(t.begin(), t.begin() + hit);
        sh.block_keys.assign(ks.begin(), ks.begin() + hit / 3);
        live[s] = sh;
      } else if (op == 1) {  // append a few tokens under one key
        auto it = std::next(live.begin(), static_cast<long>(pick(live.size())));
        const int64_t n = 1 + static_cast<int64_t>(rng() % 4);
        std::vector<int64_t> t(static_cast<size_t>(n));
        for (auto& x : t) x = static_cast<int64_t>(rng() % 3);
        const int32_t k = keys[pick(keys.size())];
        try {
          append(m, it->first, t, k);
          for (int64_t x : t) {
            Shadow& sh = it->second;
            if (sh.tokens.size() % 3 == 0)
              sh.block_keys.push_back(k);
            else if (sh.block_keys.back() != k)
              sh.block_keys.back() = KVBlockManager::kMixedKey;
            sh.tokens.push_back(x);
          }
        } catch (const bem::KVCacheFullError&) {
        }
      } else if (op == 2) {
        auto it = std::next(live.begin(), static_cast<long>(pick(live.size())));
        try {
          const auto f = m.fork(it->first);
          live[f.child] = it->second;
        } catch (const bem::KVCacheFullError&) {
        }
      } else {
        auto it = std::next(live.begin(), static_cast<long>(pick(live.size())));
        m.free_sequence(it->first);
        live.erase(it);
      }
      // Every live sequence's blocks hold exactly its tokens under its keys.
      for (const auto& [s, sh] : live) {
        const auto table = m.block_table(s);
        CHECK(m.num_tokens(s) == static_cast<int64_t>(sh.tokens.size()));
        for (size_t i = 0; i < table.size(); ++i) {
          const auto bt = m.block_tokens(table[i]);
          for (size_t j = 0; j < bt.size(); ++j) CHECK(bt[j] == sh.tokens[i * 3 + j]);
          CHECK(m.block_info(table[i]).key == sh.block_keys[i]);
        }
      }
      m.check_invariants();
      if (g_failures > 0) return;
    }
    CHECK(m.stats().tokens_hit > 0);
    CHECK(m.stats().evictions > 0);
  }
}

}  // namespace

int main() {
  test_hash();
  test_prefix_reuse_keyed_by_routing();
  test_routing_changes_between_and_inside_blocks();
  test_fork_and_copy_on_write();
  test_lru_eviction_order();
  test_exhaustion_changes_nothing();
  test_bad_arguments_change_nothing();
  test_duplicates_keep_later_blocks_cacheable();
  test_random_operations_under_collisions();
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("test_kv_block_manager: all checks passed\n");
  return 0;
}
