// KVBlockManager: block pool, per-sequence block tables, prefix cache with exact verification,
// LRU eviction of unreferenced cached blocks. See bem/kv_block_manager.h for the contract.
#include "bem/kv_block_manager.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <unordered_set>

#include "bem/hash.h"

namespace bem {
namespace {

constexpr uint64_t kRootHash = 0x6a09e667f3bcc908ull;  // parent hash of a sequence's first block
constexpr uint64_t kKeySeed = 0x510e527fade682d1ull;
constexpr int64_t kMaxToken = std::numeric_limits<int32_t>::max();

[[noreturn]] void invariant_failed(const std::string& what) {
  throw std::logic_error("KVBlockManager invariant violated: " + what);
}

}  // namespace

KVBlockManager::KVBlockManager(int64_t num_blocks, int64_t block_size, int hash_bits)
    : num_blocks_(num_blocks), block_size_(block_size), hash_bits_(hash_bits) {
  if (num_blocks < 1 || num_blocks > std::numeric_limits<int32_t>::max())
    throw ArgumentError("num_blocks", "expected an int in [1, 2147483647], got " +
                                          std::to_string(num_blocks));
  if (block_size < 1 || block_size > (int64_t{1} << 20))
    throw ArgumentError("block_size", "expected an int in [1, 1048576], got " +
                                          std::to_string(block_size));
  if (hash_bits < 1 || hash_bits > 64)
    throw ArgumentError("hash_bits",
                        "expected an int in [1, 64], got " + std::to_string(hash_bits));
  hash_mask_ = hash_bits == 64 ? ~uint64_t{0} : (uint64_t{1} << hash_bits) - 1;
  blocks_.resize(static_cast<size_t>(num_blocks));
  tokens_.resize(static_cast<size_t>(num_blocks * block_size));
  scratch_.resize(static_cast<size_t>(block_size));
  // Block 0 is allocated first: the stack's back is the next block out.
  free_stack_.reserve(static_cast<size_t>(num_blocks));
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_stack_.push_back(static_cast<int32_t>(b));
  cache_.reserve(static_cast<size_t>(std::min<int64_t>(num_blocks, int64_t{1} << 20)));
}

// ---- routing keys -------------------------------------------------------------------------------

int32_t KVBlockManager::intern_routing_key(const RoutingKey& key) {
  if (key.expert < -1)
    throw ArgumentError("expert", "expected an int >= -1, got " + std::to_string(key.expert));
  if (key.version < 0)
    throw ArgumentError("version", "expected an int >= 0, got " + std::to_string(key.version));
  unsigned char bytes[32];
  std::memcpy(bytes, &key.expert, 8);
  std::memcpy(bytes + 8, key.weights_digest.data(), 16);
  std::memcpy(bytes + 24, &key.version, 8);
  const uint64_t h = hash_bytes(bytes, sizeof bytes, kKeySeed);
  auto it = key_index_.find(h);
  if (it != key_index_.end())
    for (int32_t id : it->second)
      if (keys_[static_cast<size_t>(id)] == key) return id;
  if (keys_.size() >= static_cast<size_t>(std::numeric_limits<int32_t>::max()))
    throw ArgumentError("key", "too many distinct routing keys");
  const auto id = static_cast<int32_t>(keys_.size());
  key_index_[h].push_back(id);
  keys_.push_back(key);
  key_hashes_.push_back(h);
  key_stats_.emplace_back();
  return id;
}

const RoutingKey& KVBlockManager::routing_key(int32_t key_id) const {
  check_key_id(key_id, "key_id", -1);
  return keys_[static_cast<size_t>(key_id)];
}

// ---- argument checks ----------------------------------------------------------------------------

KVBlockManager::Sequence& KVBlockManager::sequence_or_throw(int64_t seq, const char* arg) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end())
    throw ArgumentError(arg, "no live sequence with id " + std::to_string(seq), true);
  return it->second;
}

const KVBlockManager::Sequence& KVBlockManager::sequence_or_throw(int64_t seq,
                                                                  const char* arg) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end())
    throw ArgumentError(arg, "no live sequence with id " + std::to_string(seq), true);
  return it->second;
}

void KVBlockManager::check_key_id(int32_t key_id, const char* arg, int64_t index) const {
  if (key_id < 0 || key_id >= static_cast<int32_t>(keys_.size())) {
    std::string where = index >= 0 ? " at index " + std::to_string(index) : "";
    throw ArgumentError(arg, "routing key id " + std::to_string(key_id) + where +
                                 " is not an interned key (have " + std::to_string(keys_.size()) +
                                 ")", true);
  }
}

void KVBlockManager::check_tokens(const int64_t* tokens, int64_t n, const char* arg,
                                  int64_t base) const {
  for (int64_t i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] > kMaxToken)
      throw ArgumentError(arg, "token ids must be in [0, 2147483647], got " +
                                   std::to_string(tokens[i]) + " at index " +
                                   std::to_string(base + i));
}

int64_t KVBlockManager::blocks_needed(int64_t num_tokens, int64_t num_blocks_held,
                                      int64_t n) const {
  const int64_t total = (num_tokens + n + block_size_ - 1) / block_size_;
  return std::max<int64_t>(0, total - num_blocks_held);
}

void KVBlockManager::throw_full(int64_t needed, const char* what) const {
  throw KVCacheFullError(
      std::string("KV cache full: ") + what + " needs " + std::to_string(needed) +
      " new blocks but only " + std::to_string(free_stack_.size()) + " free + " +
      std::to_string(lru_size_) + " evictable of " + std::to_string(num_blocks_) +
      " are available (" + std::to_string(blocks_in_use_) +
      " in use); free finished sequences or use a larger pool");
}

// ---- hashing and the cache index ----------------------------------------------------------------

uint64_t KVBlockManager::chain_hash(uint64_t parent_hash, const int32_t* tokens,
                                    int32_t key_id) const {
  const uint64_t seed = hash_combine(parent_hash, key_hashes_[static_cast<size_t>(key_id)]);
  return hash_bytes(tokens, static_cast<size_t>(block_size_) * sizeof(int32_t), seed) & hash_mask_;
}

int32_t KVBlockManager::find_cached(uint64_t hash, int32_t parent, const int32_t* tokens,
                                    int32_t key_id) const {
  auto it = cache_.find(hash);
  if (it == cache_.end()) return -1;
  const size_t bytes = static_cast<size_t>(block_size_) * sizeof(int32_t);
  for (int32_t c = it->second; c >= 0; c = blocks_[static_cast<size_t>(c)].hash_next) {
    const Block& b = blocks_[static_cast<size_t>(c)];
    // The parent must be the very block matched one position earlier: same index, and the same
    // generation (not a later reuse of that index).
    if (b.key != key_id || b.parent != parent) continue;
    if (parent >= 0 && b.parent_generation != blocks_[static_cast<size_t>(parent)].generation)
      continue;
    if (std::memcmp(&tokens_[static_cast<size_t>(c) * static_cast<size_t>(block_size_)], tokens,
                    bytes) != 0)
      continue;
    return c;
  }
  return -1;
}

void KVBlockManager::cache_insert(int32_t block) {
  Block& b = blocks_[static_cast<size_t>(block)];
  auto [it, inserted] = cache_.try_emplace(b.hash, block);
  b.hash_next = inserted ? -1 : it->second;
  if (!inserted) it->second = block;
  b.cached = true;
  ++blocks_cached_;
  ++key_stats_[static_cast<size_t>(b.key)].blocks_cached;
}

void KVBlockManager::cache_erase(int32_t block) {
  Block& b = blocks_[static_cast<size_t>(block)];
  auto it = cache_.find(b.hash);
  if (it->second == block) {
    if (b.hash_next < 0)
      cache_.erase(it);
    else
      it->second = b.hash_next;
  } else {
    int32_t prev = it->second;
    while (blocks_[static_cast<size_t>(prev)].hash_next != block)
      prev = blocks_[static_cast<size_t>(prev)].hash_next;
    blocks_[static_cast<size_t>(prev)].hash_next = b.hash_next;
  }
  b.hash_next = -1;
  b.cached = false;
  --blocks_cached_;
  --key_stats_[static_cast<size_t>(b.key)].blocks_cached;
}

// ---- reference counts, LRU, allocation ----------------------------------------------------------

void KVBlockManager::lru_push_back(int32_t block) {
  Block& b = blocks_[static_cast<size_t>(block)];
  b.lru_prev = lru_tail_;
  b.lru_next = -1;
  if (lru_tail_ >= 0)
    blocks_[static_cast<size_t>(lru_tail_)].lru_next = block;
  else
    lru_head_ = block;
  lru_tail_ = block;
  b.in_lru = true;
  ++lru_size_;
}

void KVBlockManager::lru_remove(int32_t block) {
  Block& b = blocks_[static_cast<size_t>(block)];
  if (b.lru_prev >= 0)
    blocks_[static_cast<size_t>(b.lru_prev)].lru_next = b.lru_next;
  else
    lru_head_ = b.lru_next;
  if (b.lru_next >= 0)
    blocks_[static_cast<size_t>(b.lru_next)].lru_prev = b.lru_prev;
  else
    lru_tail_ = b.lru_prev;
  b.lru_prev = b.lru_next = -1;
  b.in_lru = false;
  --lru_size_;
}

void KVBlockManager::acquire(int32_t block) {
  Block& b = blocks_[static_cast<size_t>(block)];
  if (b.ref_count == 0) {
    lru_remove(block);  // an unreferenced block someone can reach is cached, hence in the LRU
    ++blocks_in_use_;
  }
  ++b.ref_count;
}

void KVBlockManager::release(int32_t block) {
  Block& b = blocks_[static_cast<size_t>(block)];
  if (--b.ref_count > 0) return;
  --blocks_in_use_;
  if (b.cached) {
    lru_push_back(block);
  } else {
    b.key = -1;
    b.filled = 0;
    free_stack_.push_back(block);
  }
}

int32_t KVBlockManager::allocate_block() {
  int32_t block;
  if (!free_stack_.empty()) {
    block = free_stack_.back();
    free_stack_.pop_back();
  } else {
    block = lru_head_;
    lru_remove(block);
    cache_erase(block);
    ++counters_.evictions;
    ++key_stats_[static_cast<size_t>(blocks_[static_cast<size_t>(block)].key)].evictions;
  }
  Block& b = blocks_[static_cast<size_t>(block)];
  ++b.generation;
  b.ref_count = 1;
  b.key = -1;
  b.parent = -1;
  b.parent_generation = 0;
  b.hash = 0;
  b.filled = 0;
  ++blocks_in_use_;
  return block;
}

// ---- sequences ----------------------------------------------------------------------------------

int64_t KVBlockManager::create_sequence() {
  const int64_t id = next_seq_;
  seqs_.emplace(id, Sequence{});
  ++next_seq_;
  return id;
}

int64_t KVBlockManager::match_unchecked(Sequence& s, const int64_t* tokens, int64_t n,
                                        const int32_t* key_ids) {
  const int64_t nb = n / block_size_;
  ++counters_.lookups;
  counters_.tokens_queried += n;
  int32_t* buf = scratch_.data();
  int32_t parent = -1;
  uint64_t parent_hash = kRootHash;
  bool matching = true;
  int64_t hits = 0;
  for (int64_t i = 0; i < nb; ++i) {
    const int32_t key = key_ids[i];
    KVKeyStats& ks = key_stats_[static_cast<size_t>(key)];
    ks.tokens_queried += block_size_;
    if (!matching) continue;
    const int64_t* t = tokens + i * block_size_;
    for (int64_t j = 0; j < block_size_; ++j) buf[j] = static_cast<int32_t>(t[j]);
    const uint64_t h = chain_hash(parent_hash, buf, key);
    const int32_t hit = find_cached(h, parent, buf, key);
    if (hit < 0) {
      matching = false;
      continue;
    }
    acquire(hit);
    s.blocks.push_back(hit);
    s.canonical.push_back(hit);
    parent = hit;
    parent_hash = h;
    ++hits;
    ks.tokens_hit += block_size_;
  }
  s.num_tokens = hits * block_size_;
  counters_.tokens_hit += s.num_tokens;
  return s.num_tokens;
}

int64_t KVBlockManager::match_prefix(int64_t seq, const int64_t* tokens, int64_t n,
                                     const int32_t* key_ids, int64_t n_keys) {
  Sequence& s = sequence_or_throw(seq, "seq");
  if (s.num_tokens != 0)
    throw ArgumentError("seq", "match_prefix needs an empty sequence; sequence " +
                                   std::to_string(seq) + " holds " +
                                   std::to_string(s.num_tokens) + " tokens");
  if (n < 0) throw ArgumentError("tokens", "negative length " + std::to_string(n));
  if (n_keys != n / block_size_)
    throw ArgumentError("key_ids", "expected one routing key per full block (" +
                                       std::to_string(n / block_size_) + " for " +
                                       std::to_string(n) + " tokens), got " +
                                       std::to_string(n_keys));
  for (int64_t i = 0; i < n_keys; ++i) check_key_id(key_ids[i], "key_ids", i);
  check_tokens(tokens, n, "tokens", 0);
  s.blocks.reserve(static_cast<size_t>(n_keys));
  s.canonical.reserve(static_cast<size_t>(n_keys));
  return match_unchecked(s, tokens, n, key_ids);
}

void KVBlockManager::match_many(int64_t count, const int64_t* tokens, const int64_t* offsets,
                                const int32_t* key_ids, int64_t n_keys, int64_t* seqs_out,
                                int64_t* cached_out) {
  if (count < 0) throw ArgumentError("offsets", "negative item count");
  if (offsets[0] != 0)
    throw ArgumentError("offsets", "must start at 0, got " + std::to_string(offsets[0]));
  int64_t keys_expected = 0;
  for (int64_t i = 0; i < count; ++i) {
    if (offsets[i + 1] < offsets[i])
      throw ArgumentError("offsets", "must be non-decreasing; offsets[" + std::to_string(i + 1) +
                                         "] < offsets[" + std::to_string(i) + "]");
    keys_expected += (offsets[i + 1] - offsets[i]) / block_size_;
  }
  if (n_keys != keys_expected)
    throw ArgumentError("key_ids", "expected one routing key per full block of every item (" +
                                       std::to_string(keys_expected) + "), got " +
                                       std::to_string(n_keys));
  for (int64_t i = 0; i < n_keys; ++i) check_key_id(key_ids[i], "key_ids", i);
  check_tokens(tokens, offsets[count], "tokens", 0);
  seqs_.reserve(seqs_.size() + static_cast<size_t>(count));
  const int32_t* keys = key_ids;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = offsets[i + 1] - offsets[i];
    const int64_t id = create_sequence();
    Sequence& s = seqs_[id];
    s.blocks.reserve(static_cast<size_t>(n / block_size_));
    s.canonical.reserve(static_cast<size_t>(n / block_size_));
    seqs_out[i] = id;
    cached_out[i] = match_unchecked(s, tokens + offsets[i], n, keys);
    keys += n / block_size_;
  }
}

void KVBlockManager::commit_full_block(Sequence& s, int64_t block_index) {
  const int32_t block = s.blocks[static_cast<size_t>(block_index)];
  Block& b = blocks_[static_cast<size_t>(block)];
  const int32_t parent = block_index == 0 ? -1 : s.canonical[static_cast<size_t>(block_index - 1)];
  // A block is cacheable when one routing key produced all its tokens and everything before it
  // in the sequence is cached (its K/V depends on the whole prefix).
  if (b.key == kMixedKey || (block_index > 0 && parent < 0)) {
    s.canonical.push_back(-1);
    ++counters_.blocks_uncacheable;
    return;
  }
  const uint64_t parent_hash = parent < 0 ? kRootHash : blocks_[static_cast<size_t>(parent)].hash;
  const int32_t* toks = &tokens_[static_cast<size_t>(block) * static_cast<size_t>(block_size_)];
  const uint64_t h = chain_hash(parent_hash, toks, b.key);
  const int32_t existing = find_cached(h, parent, toks, b.key);
  if (existing >= 0) {
    // Someone computed the same block first (a concurrent miss). Keep ours private and hold the
    // cached twin, so that our later blocks can be cached as its children.
    acquire(existing);
    s.canonical.push_back(existing);
    ++counters_.blocks_duplicate;
    return;
  }
  b.hash = h;
  b.parent = parent;
  b.parent_generation = parent < 0 ? 0 : blocks_[static_cast<size_t>(parent)].generation;
  cache_insert(block);
  s.canonical.push_back(block);
  ++counters_.blocks_committed;
  ++key_stats_[static_cast<size_t>(b.key)].blocks_committed;
}

void KVBlockManager::fill_unchecked(Sequence& s, const int64_t* tokens, int64_t n, int32_t key_id,
                                    int64_t* slots_out) {
  int64_t i = 0;
  while (i < n) {
    const int64_t bi = s.num_tokens / block_size_;
    const int64_t off = s.num_tokens % block_size_;
    const int32_t block = s.blocks[static_cast<size_t>(bi)];
    Block& b = blocks_[static_cast<size_t>(block)];
    if (off == 0)
      b.key = key_id;
    else if (b.key != key_id)
      b.key = kMixedKey;
    const int64_t run = std::min(n - i, block_size_ - off);
    int32_t* dst = &tokens_[static_cast<size_t>(block) * static_cast<size_t>(block_size_) +
                            static_cast<size_t>(off)];
    const int64_t slot0 = static_cast<int64_t>(block) * block_size_ + off;
    for (int64_t j = 0; j < run; ++j) {
      dst[j] = static_cast<int32_t>(tokens[i + j]);
      slots_out[i + j] = slot0 + j;
    }
    b.filled += static_cast<int32_t>(run);
    s.num_tokens += run;
    i += run;
    if (off + run == block_size_) commit_full_block(s, bi);
  }
  counters_.tokens_appended += n;
}

void KVBlockManager::append(int64_t seq, const int64_t* tokens, int64_t n, int32_t key_id,
                            int64_t* slots_out) {
  sequence_or_throw(seq, "seq");
  check_key_id(key_id, "key_id", -1);
  const int64_t offsets[2] = {0, n};
  append_many(&seq, 1, tokens, offsets, &key_id, slots_out);
}

void KVBlockManager::append_many(const int64_t* seqs, int64_t count, const int64_t* tokens,
                                 const int64_t* offsets, const int32_t* key_ids,
                                 int64_t* slots_out) {
  if (count < 0) throw ArgumentError("offsets", "negative item count");
  if (offsets[0] != 0)
    throw ArgumentError("offsets", "must start at 0, got " + std::to_string(offsets[0]));
  // Pass 1, no mutation: arguments, and the blocks every item needs given the items before it.
  struct Projection {
    int64_t tokens, blocks, final_full;
  };
  std::unordered_map<int64_t, Projection> projected;
  int64_t needed = 0;
  for (int64_t i = 0; i < count; ++i) {
    const Sequence& s = sequence_or_throw(seqs[i], "seqs");
    check_key_id(key_ids[i], "key_ids", i);
    const int64_t n = offsets[i + 1] - offsets[i];
    if (n < 0)
      throw ArgumentError("offsets", "must be non-decreasing; offsets[" + std::to_string(i + 1) +
                                         "] < offsets[" + std::to_string(i) + "]");
    auto [it, fresh] = projected.try_emplace(
        seqs[i], Projection{s.num_tokens, static_cast<int64_t>(s.blocks.size()), 0});
    Projection& p = it->second;
    const int64_t add = blocks_needed(p.tokens, p.blocks, n);
    needed += add;
    p.blocks += add;
    p.tokens += n;
    p.final_full = p.tokens / block_size_;
  }
  check_tokens(tokens, offsets[count], "tokens", 0);
  if (needed > num_available_blocks()) throw_full(needed, count == 1 ? "append" : "append_many");
  for (const auto& [id, p] : projected) {
    Sequence& s = seqs_[id];
    s.blocks.reserve(static_cast<size_t>(p.blocks));
    s.canonical.reserve(static_cast<size_t>(p.final_full));
  }
  // Pass 2: take every new block before filling any, so that a duplicate found while filling
  // (which takes a reference on an evictable block) can never starve a later allocation.
  for (auto& [id, p] : projected) p.tokens = seqs_[id].num_tokens;
  for (int64_t i = 0; i < count; ++i) {
    Sequence& s = seqs_[seqs[i]];
    Projection& p = projected[seqs[i]];
    const int64_t n = offsets[i + 1] - offsets[i];
    const int64_t add = blocks_needed(p.tokens, static_cast<int64_t>(s.blocks.size()), n);
    for (int64_t k = 0; k < add; ++k) s.blocks.push_back(allocate_block());
    p.tokens += n;
  }
  // Pass 3: write the tokens and cache the blocks that fill.
  for (int64_t i = 0; i < count; ++i)
    fill_unchecked(seqs_[seqs[i]], tokens + offsets[i], offsets[i + 1] - offsets[i], key_ids[i],
                   slots_out + offsets[i]);
}

ForkResult KVBlockManager::fork(int64_t seq) {
  const Sequence& parent = sequence_or_throw(seq, "seq");
  const int64_t full = parent.num_tokens / block_size_;
  const bool partial = parent.num_tokens % block_size_ != 0;
  if (partial && num_available_blocks() < 1) throw_full(1, "fork");
  Sequence child;
  child.num_tokens = parent.num_tokens;
  child.blocks.reserve(parent.blocks.size());
  child.canonical = parent.canonical;
  child.blocks.assign(parent.blocks.begin(), parent.blocks.begin() + full);
  seqs_.reserve(seqs_.size() + 1);
  ForkResult r;
  for (int64_t i = 0; i < full; ++i) {
    acquire(child.blocks[static_cast<size_t>(i)]);
    const int32_t c = child.canonical[static_cast<size_t>(i)];
    if (c >= 0 && c != child.blocks[static_cast<size_t>(i)]) acquire(c);
  }
  if (partial) {
    const int32_t src = parent.blocks.back();
    const int32_t dst = allocate_block();
    const Block& sb = blocks_[static_cast<size_t>(src)];
    Block& db = blocks_[static_cast<size_t>(dst)];
    db.key = sb.key;
    db.filled = sb.filled;
    std::memcpy(&tokens_[static_cast<size_t>(dst) * static_cast<size_t>(block_size_)],
                &tokens_[static_cast<size_t>(src) * static_cast<size_t>(block_size_)],
                static_cast<size_t>(sb.filled) * sizeof(int32_t));
    child.blocks.push_back(dst);
    r.copy_src = src;
    r.copy_dst = dst;
  }
  r.child = next_seq_++;
  seqs_.emplace(r.child, std::move(child));
  return r;
}

void KVBlockManager::free_unchecked(Sequence& s) {
  for (int64_t i = static_cast<int64_t>(s.blocks.size()) - 1; i >= 0; --i) {
    const int32_t b = s.blocks[static_cast<size_t>(i)];
    release(b);
    if (i < static_cast<int64_t>(s.canonical.size())) {
      const int32_t c = s.canonical[static_cast<size_t>(i)];
      if (c >= 0 && c != b) release(c);
    }
  }
}

void KVBlockManager::free_sequence(int64_t seq) {
  Sequence& s = sequence_or_throw(seq, "seq");
  free_unchecked(s);
  seqs_.erase(seq);
}

void KVBlockManager::free_many(const int64_t* seqs, int64_t count) {
  std::unordered_set<int64_t> seen;
  seen.reserve(static_cast<size_t>(std::max<int64_t>(count, 0)));
  for (int64_t i = 0; i < count; ++i) {
    sequence_or_throw(seqs[i], "seqs");
    if (!seen.insert(seqs[i]).second)
      throw ArgumentError("seqs", "sequence " + std::to_string(seqs[i]) + " appears twice");
  }
  for (int64_t i = 0; i < count; ++i) free_sequence(seqs[i]);
}

// ---- queries ------------------------------------------------------------------------------------

int64_t KVBlockManager::num_tokens(int64_t seq) const {
  return sequence_or_throw(seq, "seq").num_tokens;
}

const std::vector<int32_t>& KVBlockManager::block_table(int64_t seq) const {
  return sequence_or_throw(seq, "seq").blocks;
}

std::vector<int64_t> KVBlockManager::sequence_ids() const {
  std::vector<int64_t> ids;
  ids.reserve(seqs_.size());
  for (const auto& kv : seqs_) ids.push_back(kv.first);
  std::sort(ids.begin(), ids.end());
  return ids;
}

KVStats KVBlockManager::stats() const {
  KVStats s = counters_;
  s.blocks_in_use = blocks_in_use_;
  s.blocks_evictable = lru_size_;
  s.blocks_free = static_cast<int64_t>(free_stack_.size());
  s.blocks_cached = blocks_cached_;
  s.sequences = static_cast<int64_t>(seqs_.size());
  return s;
}

void KVBlockManager::reset_stats() {
  counters_ = KVStats{};
  for (KVKeyStats& k : key_stats_) {
    const int64_t cached = k.blocks_cached;
    k = KVKeyStats{};
    k.blocks_cached = cached;
  }
}

KVBlockInfo KVBlockManager::block_info(int32_t block) const {
  if (block < 0 || block >= num_blocks_)
    throw ArgumentError("block", "expected a block index in [0, " + std::to_string(num_blocks_) +
                                     "), got " + std::to_string(block), true);
  const Block& b = blocks_[static_cast<size_t>(block)];
  KVBlockInfo info;
  info.ref_count = b.ref_count;
  info.generation = b.generation;
  info.cached = b.cached;
  info.key = b.key;
  info.parent = b.cached ? b.parent : -1;
  info.hash = b.cached ? b.hash : 0;
  info.filled = b.filled;
  return info;
}

std::vector<int32_t> KVBlockManager::block_tokens(int32_t block) const {
  const KVBlockInfo info = block_info(block);
  const int32_t* p = &tokens_[static_cast<size_t>(block) * static_cast<size_t>(block_size_)];
  return std::vector<int32_t>(p, p + info.filled);
}

KVSequenceInfo KVBlockManager::sequence_info(int64_t seq) const {
  const Sequence& s = sequence_or_throw(seq, "seq");
  return KVSequenceInfo{s.num_tokens, s.blocks, s.canonical};
}

std::vector<int32_t> KVBlockManager::lru_order() const {
  std::vector<int32_t> order;
  order.reserve(static_cast<size_t>(lru_size_));
  for (int32_t b = lru_head_; b >= 0; b = blocks_[static_cast<size_t>(b)].lru_next)
    order.push_back(b);
  return order;
}

std::vector<int32_t> KVBlockManager::free_blocks() const {
  return std::vector<int32_t>(free_stack_.rbegin(), free_stack_.rend());
}

void KVBlockManager::check_invariants() const {
  const size_t nb = blocks_.size();
  const auto bs = static_cast<size_t>(block_size_);
  std::vector<int64_t> refs(nb, 0);
  for (const auto& [id, s] : seqs_) {
    const std::string who = "sequence " + std::to_string(id);
    const int64_t full = s.num_tokens / block_size_;
    const int64_t want_blocks = (s.num_tokens + block_size_ - 1) / block_size_;
    if (static_cast<int64_t>(s.blocks.size()) != want_blocks)
      invariant_failed(who + " has " + std::to_string(s.blocks.size()) + " blocks for " +
                       std::to_string(s.num_tokens) + " tokens");
    if (static_cast<int64_t>(s.canonical.size()) != full)
      invariant_failed(who + " has a canonical entry count != its full blocks");
    bool broken = false;
    for (int64_t i = 0; i < want_blocks; ++i) {
      const int32_t b = s.blocks[static_cast<size_t>(i)];
      if (b < 0 || b >= num_blocks_) invariant_failed(who + " holds an invalid block index");
      ++refs[static_cast<size_t>(b)];
      const Block& blk = blocks_[static_cast<size_t>(b)];
      const int32_t want_fill = i < full ? static_cast<int32_t>(block_size_)
                                         : static_cast<int32_t>(s.num_tokens % block_size_);
      if (blk.filled != want_fill)
        invariant_failed(who + " block " + std::to_string(b) + " fill " +
                         std::to_string(blk.filled) + " != " + std::to_string(want_fill));
      if (i == full && (blk.cached || blk.ref_count != 1))
        invariant_failed(who + " partial block " + std::to_string(b) + " is shared or cached");
      if (i < full) {
        const int32_t c = s.canonical[static_cast<size_t>(i)];
        if (c < 0) {
          broken = true;
          continue;
        }
        if (broken) invariant_failed(who + " has a cached block after an uncacheable one");
        const Block& cb = blocks_[static_cast<size_t>(c)];
        if (!cb.cached) invariant_failed(who + " canonical block is not cached");
        const int32_t* ct = &tokens_[static_cast<size_t>(c) * bs];
        const int32_t* bt = &tokens_[static_cast<size_t>(b) * bs];
        if (cb.key != blk.key || std::memcmp(ct, bt, bs * sizeof(int32_t)) != 0)
          invariant_failed(who + " canonical block differs from its own block");
        const int32_t want_parent = i == 0 ? -1 : s.canonical[static_cast<size_t>(i - 1)];
        if (cb.parent != want_parent)
          invariant_failed(who + " canonical block's parent is not the previous canonical");
        if (c != b) ++refs[static_cast<size_t>(c)];
      }
    }
  }
  int64_t in_use = 0, cached = 0;
  for (size_t b = 0; b < nb; ++b) {
    const Block& blk = blocks_[b];
    if (blk.ref_count < 0) invariant_failed("block " + std::to_string(b) + " has a negative count");
    if (blk.ref_count != refs[b])
      invariant_failed("block " + std::to_string(b) + " count " + std::to_string(blk.ref_count) +
                       " != references held " + std::to_string(refs[b]));
    in_use += blk.ref_count > 0;
    cached += blk.cached;
    if (blk.in_lru != (blk.cached && blk.ref_count == 0))
      invariant_failed("block " + std::to_string(b) + " LRU membership is wrong");
    if (blk.cached) {
      if (blk.filled != block_size_ || blk.key < 0)
        invariant_failed("cached block " + std::to_string(b) + " is not a full single-key block");
      if (blk.parent >= 0) {
        const Block& p = blocks_[static_cast<size_t>(blk.parent)];
        if (!p.cached || p.generation != blk.parent_generation)
          invariant_failed("cached block " + std::to_string(b) + " lost its parent");
      }
    }
  }
  if (in_use != blocks_in_use_) invariant_failed("blocks_in_use counter is wrong");
  if (cached != blocks_cached_) invariant_failed("blocks_cached counter is wrong");
  std::vector<char> on_free(nb, 0);
  for (int32_t b : free_stack_) {
    const Block& blk = blocks_[static_cast<size_t>(b)];
    if (on_free[static_cast<size_t>(b)]) invariant_failed("block on the free stack twice");
    on_free[static_cast<size_t>(b)] = 1;
    if (blk.ref_count != 0 || blk.cached) invariant_failed("free block in use or cached");
  }
  int64_t lru_count = 0;
  int32_t prev = -1;
  for (int32_t b = lru_head_; b >= 0; b = blocks_[static_cast<size_t>(b)].lru_next) {
    const Block& blk = blocks_[static_cast<size_t>(b)];
    if (blk.lru_prev != prev) invariant_failed("LRU links broken");
    if (!blk.in_lru) invariant_failed("LRU holds a block not marked");
    if (++lru_count > lru_size_) invariant_failed("LRU longer than its size");
    prev = b;
  }
  if (prev != lru_tail_) invariant_failed("LRU tail is not the last block");
  if (lru_count != lru_size_) invariant_failed("LRU size counter is wrong");
  if (in_use + lru_size_ + static_cast<int64_t>(free_stack_.size()) != num_blocks_)
    invariant_failed("in use + evictable + free != num_blocks");
  int64_t indexed = 0;
  std::vector<int64_t> per_key(keys_.size(), 0);
  for (const auto& [h, head] : cache_) {
    for (int32_t c = head; c >= 0; c = blocks_[static_cast<size_t>(c)].hash_next) {
      const Block& blk = blocks_[static_cast<size_t>(c)];
      if (!blk.cached || blk.hash != h) invariant_failed("cache index holds a wrong block");
      const uint64_t ph =
          blk.parent < 0 ? kRootHash : blocks_[static_cast<size_t>(blk.parent)].hash;
      if (chain_hash(ph, &tokens_[static_cast<size_t>(c) * bs], blk.key) != h)
        invariant_failed("cached block's hash does not match its content");
      if (find_cached(h, blk.parent, &tokens_[static_cast<size_t>(c) * bs], blk.key) != c)
        invariant_failed("two cached blocks with the same content and parent");
      ++per_key[static_cast<size_t>(blk.key)];
      if (++indexed > blocks_cached_) invariant_failed("cache index longer than the cached count");
    }
  }
  if (indexed != blocks_cached_) invariant_failed("cache index misses cached blocks");
  for (size_t k = 0; k < keys_.size(); ++k)
    if (per_key[k] != key_stats_[k].blocks_cached)
      invariant_failed("per-key cached count is wrong");
  if (counters_.tokens_hit > counters_.tokens_queried) invariant_failed("more hits than queries");
}

}  // namespace bem
