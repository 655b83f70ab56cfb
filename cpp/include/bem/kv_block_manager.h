// Paged KV-cache block manager with prefix reuse keyed by the routing decision of every block.
// Deals in block indices only: the K/V tensors live in Python (bem.kv.KVStorage).
#pragma once
#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "bem/common.h"

namespace bem {

// What the layers computed one block's K/V with. Two blocks are interchangeable only when their
// keys are equal field by field, so reloading other weights under the same expert id (a new
// digest) or bumping the adapter/config version never reuses stale K/V.
struct RoutingKey {
  int64_t expert = -1;                        // expert id, ≥ −1 (−1: base model, no adapter)
  std::array<uint8_t, 16> weights_digest{};   // digest of that expert's weights (blake2b-128)
  int64_t version = 0;                        // adapter / config version, ≥ 0

  bool operator==(const RoutingKey& o) const {
    return expert == o.expert && weights_digest == o.weights_digest && version == o.version;
  }
};

// Thrown when an allocation needs more blocks than are free or evictable. The manager is left
// exactly as it was before the call (the capacity check precedes every mutation).
class KVCacheFullError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Counters since construction or the last reset_stats(), plus the pool's current occupancy.
struct KVStats {
  int64_t lookups = 0;             // match_prefix calls
  int64_t tokens_queried = 0;      // tokens passed to match_prefix (partial last blocks included)
  int64_t tokens_hit = 0;          // tokens served from cached blocks
  int64_t tokens_appended = 0;     // tokens appended
  int64_t blocks_committed = 0;    // full blocks added to the prefix cache
  int64_t blocks_duplicate = 0;    // full blocks equal to a cached one when they filled (private)
  int64_t blocks_uncacheable = 0;  // full blocks never cached: routing changed inside them, or
                                   // a block before them in the sequence was uncacheable
  int64_t evictions = 0;           // cached blocks evicted to make room
  // Current occupancy (not reset): every block is in exactly one of in_use, evictable, free.
  int64_t blocks_in_use = 0;       // reference count > 0
  int64_t blocks_evictable = 0;    // cached, reference count 0 (LRU queue)
  int64_t blocks_free = 0;         // empty: never filled, or freed without being cached
  int64_t blocks_cached = 0;       // in the prefix cache (in use or evictable)
  int64_t sequences = 0;           // live sequences
};

// Counters per interned routing key.
struct KVKeyStats {
  int64_t tokens_queried = 0;    // tokens of full blocks looked up under this key
  int64_t tokens_hit = 0;        // of those, tokens served from cache
  int64_t blocks_committed = 0;  // full blocks added to the cache under this key
  int64_t evictions = 0;         // cached blocks of this key evicted
  int64_t blocks_cached = 0;     // currently cached blocks of this key (not reset)
};

// What fork() did: the new sequence, and the block whose K/V the caller must copy (copy-on-write
// of the parent's partial last block), or −1/−1 when the parent's tokens fill whole blocks.
struct ForkResult {
  int64_t child = -1;
  int32_t copy_src = -1;
  int32_t copy_dst = -1;
};

// One block as the manager sees it, for inspection and tests.
struct KVBlockInfo {
  int32_t ref_count = 0;
  uint32_t generation = 0;   // bumped each time the block is (re)allocated
  bool cached = false;       // in the prefix cache
  int32_t key = -1;          // routing key id of its tokens; kMixedKey when it changed inside it
  int32_t parent = -1;       // cached: the cached block before it (−1 at the start of a sequence)
  uint64_t hash = 0;         // cached: its chain hash
  int32_t filled = 0;        // tokens written (block_size when full)
};

// One sequence as the manager sees it, for inspection and tests.
struct KVSequenceInfo {
  int64_t num_tokens = 0;
  std::vector<int32_t> blocks;      // block table: block i holds tokens [i·B, (i+1)·B)
  std::vector<int32_t> canonical;   // per full block: the cached block with the same content and
                                    // prefix (itself, or the one it duplicates), −1 if none
};

// Block manager over a fixed pool of num_blocks blocks of block_size tokens.
//
// A full block is cached under the chain hash of (its parent's hash, its token ids, its routing
// key). The hash only indexes: a hit is accepted after comparing the token ids and routing key
// exactly and checking that the candidate's parent is the very block matched one position
// earlier (same index and generation), so by induction the tokens and routing behind every hit
// equal those asked for, whatever the hash does. Only full blocks are shared; the partial last
// block of a sequence is private. Blocks whose reference count drops to 0 stay cached and are
// evicted in LRU order (a freed sequence releases its last block first, so tails go first);
// only unreferenced blocks are ever evicted. Every mutating call checks capacity and arguments
// before changing anything: when it throws, the manager is unchanged. Not thread-safe.
class KVBlockManager {
 public:
  static constexpr int32_t kMixedKey = -2;  // a block whose tokens were appended under >1 key

  // num_blocks in [1, 2^31 − 1], block_size in [1, 2^20]. hash_bits in [1, 64] truncates the
  // index hash (below 64 only to exercise collision handling in tests).
  explicit KVBlockManager(int64_t num_blocks, int64_t block_size = 64, int hash_bits = 64);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  int hash_bits() const { return hash_bits_; }

  // Routing keys are interned: the same key always returns the same id (0, 1, 2, ...).
  int32_t intern_routing_key(const RoutingKey& key);
  const RoutingKey& routing_key(int32_t key_id) const;
  int64_t num_routing_keys() const { return static_cast<int64_t>(keys_.size()); }

  // A new, empty sequence. Ids count up from 0 and are never reused.
  int64_t create_sequence();
  bool has_sequence(int64_t seq) const { return seqs_.count(seq) != 0; }

  // Matches the longest cached prefix of tokens[0, n) made of full blocks, block i computed under
  // key_ids[i] (n_keys must equal n / block_size), into the empty sequence `seq`, taking a
  // reference on each matched block. Returns the number of cached tokens (a multiple of
  // block_size). Tokens must be in [0, 2^31 − 1].
  int64_t match_prefix(int64_t seq, const int64_t* tokens, int64_t n, const int32_t* key_ids,
                       int64_t n_keys);

  // Appends tokens[0, n) computed under key_id to `seq`; writes each token's slot
  // (block · block_size + offset) to slots_out[0, n). Blocks that fill are added to the cache.
  void append(int64_t seq, const int64_t* tokens, int64_t n, int32_t key_id, int64_t* slots_out);

  // Batched append: item i appends tokens[offsets[i], offsets[i+1]) under key_ids[i] to seqs[i]
  // (a sequence may appear several times; items apply in order). slots_out has offsets[count]
  // entries. All or nothing.
  void append_many(const int64_t* seqs, int64_t count, const int64_t* tokens,
                   const int64_t* offsets, const int32_t* key_ids, int64_t* slots_out);

  // Batched create + match: item i matches tokens[offsets[i], offsets[i+1]) with the next
  // (length / block_size) entries of key_ids. Writes new sequence ids and cached token counts.
  void match_many(int64_t count, const int64_t* tokens, const int64_t* offsets,
                  const int32_t* key_ids, int64_t n_keys, int64_t* seqs_out, int64_t* cached_out);

  // A new sequence with the same tokens: shares the full blocks; the partial last block (if any)
  // is copied into a fresh block, and the caller must copy its K/V (ForkResult::copy_src → dst).
  ForkResult fork(int64_t seq);

  // Releases the sequence's references, last block first.
  void free_sequence(int64_t seq);
  // Batched free of distinct sequences. All or nothing.
  void free_many(const int64_t* seqs, int64_t count);

  int64_t num_tokens(int64_t seq) const;
  const std::vector<int32_t>& block_table(int64_t seq) const;
  std::vector<int64_t> sequence_ids() const;  // ascending
  // Blocks an allocation can take now: free plus evictable.
  int64_t num_available_blocks() const {
    return static_cast<int64_t>(free_stack_.size()) + lru_size_;
  }

  KVStats stats() const;
  const std::vector<KVKeyStats>& key_stats() const { return key_stats_; }
  void reset_stats();

  // Full state, for inspection and tests.
  KVBlockInfo block_info(int32_t block) const;
  std::vector<int32_t> block_tokens(int32_t block) const;  // the `filled` tokens written
  KVSequenceInfo sequence_info(int64_t seq) const;
  std::vector<int32_t> lru_order() const;      // evictable blocks, next to be evicted first
  std::vector<int32_t> free_blocks() const;    // empty blocks, next to be allocated first
  // Checks every structural invariant (reference counts equal the references held by
  // sequences, each block in exactly one of in use / evictable / free, the cache index and the
  // LRU list consistent, every cached block's parent cached, counters consistent); throws
  // std::logic_error naming the first violation.
  void check_invariants() const;

 private:
  struct Block {
    int32_t ref_count = 0;
    uint32_t generation = 0;
    bool cached = false;
    int32_t key = -1;
    int32_t parent = -1;
    uint32_t parent_generation = 0;
    uint64_t hash = 0;
    int32_t filled = 0;
    int32_t lru_prev = -1, lru_next = -1;  // LRU links, valid while evictable
    int32_t hash_next = -1;                // next cached block with the same chain hash
    bool in_lru = false;
  };
  struct Sequence {
    int64_t num_tokens = 0;
    std::vector<int32_t> blocks;
    std::vector<int32_t> canonical;
  };

  Sequence& sequence_or_throw(int64_t seq, const char* arg);
  const Sequence& sequence_or_throw(int64_t seq, const char* arg) const;
  void check_key_id(int32_t key_id, const char* arg, int64_t index) const;
  void check_tokens(const int64_t* tokens, int64_t n, const char* arg, int64_t base) const;
  int64_t blocks_needed(int64_t num_tokens, int64_t num_blocks_held, int64_t n) const;
  void throw_full(int64_t needed, const char* what) const;

  // Hash of (parent's chain hash, tokens[0, block_size), routing key), truncated to hash_bits.
  uint64_t chain_hash(uint64_t parent_hash, const int32_t* tokens, int32_t key_id) const;
  // The cached block equal to (parent, tokens, key), or −1. Exact comparison behind the hash.
  int32_t find_cached(uint64_t hash, int32_t parent, const int32_t* tokens, int32_t key_id) const;
  int32_t allocate_block();                 // caller checked capacity; evicts LRU when no free
  void acquire(int32_t block);              // +1 reference; leaves the LRU queue at 0 → 1
  void release(int32_t block);              // −1 reference; enters LRU or the free stack at 0
  void lru_push_back(int32_t block);
  void lru_remove(int32_t block);
  void cache_insert(int32_t block);
  void cache_erase(int32_t block);
  void fill_unchecked(Sequence& s, const int64_t* tokens, int64_t n, int32_t key_id,
                      int64_t* slots_out);
  void commit_full_block(Sequence& s, int64_t block_index);
  int64_t match_unchecked(Sequence& s, const int64_t* tokens, int64_t n, const int32_t* key_ids);
  void free_unchecked(Sequence& s);

  int64_t num_blocks_, block_size_;
  int hash_bits_;
  uint64_t hash_mask_;
  std::vector<Block> blocks_;
  std::vector<int32_t> tokens_;       // num_blocks × block_size token ids
  std::vector<int32_t> free_stack_;   // back() is allocated next
  std::vector<int32_t> scratch_;      // one block of token ids, for lookups
  int32_t lru_head_ = -1, lru_tail_ = -1;
  int64_t lru_size_ = 0;
  int64_t blocks_in_use_ = 0, blocks_cached_ = 0;
  std::unordered_map<uint64_t, int32_t> cache_;  // chain hash → first cached block with it
  std::vector<RoutingKey> keys_;
  std::vector<uint64_t> key_hashes_;
  std::vector<KVKeyStats> key_stats_;
  std::unordered_map<uint64_t, std::vector<int32_t>> key_index_;  // key hash → key ids
  std::unordered_map<int64_t, Sequence> seqs_;
  int64_t next_seq_ = 0;
  KVStats counters_;
};

}  // namespace bem
