// Thin pybind11 binding of bem::KVBlockManager as bem._C.KVBlockManager (used through bem.kv).
// Arrays must already be 1-D contiguous numpy arrays of the stated dtype; bem.kv converts.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <mutex>
#include <optional>
#include <string>

#include "bem/kv_block_manager.h"
#include "registry.h"

namespace py = pybind11;

namespace {

// The manager plus the lock that makes releasing the GIL safe: every call holds the lock while it
// touches the manager, so two Python threads never run inside it at once.
struct BoundManager {
  bem::KVBlockManager core;
  std::mutex mutex;
  BoundManager(int64_t num_blocks, int64_t block_size, int hash_bits)
      : core(num_blocks, block_size, hash_bits) {}
};

// Work above this many tokens or items runs with the GIL released.
constexpr int64_t kReleaseGilAbove = 4096;

template <class T>
py::array_t<T> checked_array(const py::handle& obj, const char* arg) {
  const char* want = std::is_same<T, int64_t>::value ? "int64" : "int32";
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(arg) + ": expected a 1-D numpy " + want + " array, got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::type_error(std::string(arg) + ": expected dtype " + want + ", got " +
                         std::string(py::str(a.dtype())));
  if (a.ndim() != 1)
    throw py::value_error(std::string(arg) + ": expected a 1-D array, got " +
                          std::to_string(a.ndim()) + " dimensions");
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(arg) + ": expected a contiguous array");
  return py::reinterpret_borrow<py::array_t<T>>(a);
}

template <class T>
py::array_t<T> to_numpy(const std::vector<int32_t>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  T* p = out.mutable_data();
  for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<T>(v[i]);
  return out;
}

void check_offsets(const py::array_t<int64_t>& offsets, int64_t items, int64_t tokens) {
  if (offsets.size() != items + 1)
    throw py::value_error("offsets: expected " + std::to_string(items + 1) + " entries, got " +
                          std::to_string(offsets.size()));
  if (offsets.size() > 0 && offsets.data()[items] != tokens)
    throw py::value_error("offsets: last offset " + std::to_string(offsets.data()[items]) +
                          " != number of tokens " + std::to_string(tokens));
}

py::dict stats_dict(const bem::KVStats& s) {
  py::dict d;
  d["lookups"] = s.lookups;
  d["tokens_queried"] = s.tokens_queried;
  d["tokens_hit"] = s.tokens_hit;
  d["tokens_appended"] = s.tokens_appended;
  d["blocks_committed"] = s.blocks_committed;
  d["blocks_duplicate"] = s.blocks_duplicate;
  d["blocks_uncacheable"] = s.blocks_uncacheable;
  d["evictions"] = s.evictions;
  d["blocks_in_use"] = s.blocks_in_use;
  d["blocks_evictable"] = s.blocks_evictable;
  d["blocks_free"] = s.blocks_free;
  d["blocks_cached"] = s.blocks_cached;
  d["sequences"] = s.sequences;
  return d;
}

}  // namespace

namespace bem_bindings {

void bind_kv(py::module_& m) {
  py::register_exception<bem::KVCacheFullError>(m, "KVCacheFullError", PyExc_RuntimeError);

  using Lock = std::lock_guard<std::mutex>;
  py::class_<BoundManager>(m, "KVBlockManager",
                           "Paged KV block manager with routing-keyed prefix reuse (see bem.kv).")
      .def(py::init<int64_t, int64_t, int>(), py::arg("num_blocks"), py::arg("block_size") = 64,
           py::arg("hash_bits") = 64)
      .def_property_readonly("num_blocks",
                             [](BoundManager& self) { return self.core.num_blocks(); })
      .def_property_readonly("block_size",
                             [](BoundManager& self) { return self.core.block_size(); })
      .def_property_readonly("hash_bits",
                             [](BoundManager& self) { return self.core.hash_bits(); })
      .def("intern_key",
           [](BoundManager& self, int64_t expert, py::bytes digest, int64_t version) {
             const std::string d = digest;
             bem::RoutingKey k;
             if (d.size() != k.weights_digest.size())
               throw bem::ArgumentError("weights_digest", "expected 16 bytes, got " +
                                                              std::to_string(d.size()));
             k.expert = expert;
             std::memcpy(k.weights_digest.data(), d.data(), d.size());
             k.version = version;
             Lock lock(self.mutex);
             return self.core.intern_routing_key(k);
           },
           py::arg("expert"), py::arg("weights_digest"), py::arg("version"))
      .def("routing_key",
           [](BoundManager& self, int32_t key_id) {
             Lock lock(self.mutex);
             const bem::RoutingKey& k = self.core.routing_key(key_id);
             return py::make_tuple(
                 k.expert,
                 py::bytes(reinterpret_cast<const char*>(k.weights_digest.data()),
                           k.weights_digest.size()),
                 k.version);
           },
           py::arg("key_id"))
      .def("num_keys", [](BoundManager& self) {
        Lock lock(self.mutex);
        return self.core.num_routing_keys();
      })
      .def("create", [](BoundManager& self) {
        Lock lock(self.mutex);
        return self.core.create_sequence();
      })
      .def("match_prefix",
           [](BoundManager& self, int64_t seq, const py::handle& tokens_obj,
              const py::handle& keys_obj) {
             auto tokens = checked_array<int64_t>(tokens_obj, "tokens");
             auto keys = checked_array<int32_t>(keys_obj, "key_ids");
             std::optional<py::gil_scoped_release> release;
             if (tokens.size() > kReleaseGilAbove) release.emplace();
             Lock lock(self.mutex);
             return self.core.match_prefix(seq, tokens.data(), tokens.size(), keys.data(),
                                           keys.size());
           },
           py::arg("seq"), py::arg("tokens"), py::arg("key_ids"))
      .def("append",
           [](BoundManager& self, int64_t seq, const py::handle& tokens_obj, int32_t key_id) {
             auto tokens = checked_array<int64_t>(tokens_obj, "tokens");
             py::array_t<int64_t> slots(tokens.size());
             int64_t* out = slots.mutable_data();
             {
               std::optional<py::gil_scoped_release> release;
               if (tokens.size() > kReleaseGilAbove) release.emplace();
               Lock lock(self.mutex);
               self.core.append(seq, tokens.data(), tokens.size(), key_id, out);
             }
             return slots;
           },
           py::arg("seq"), py::arg("tokens"), py::arg("key_id"))
      .def("append_many",
           [](BoundManager& self, const py::handle& seqs_obj, const py::handle& tokens_obj,
              const py::handle& offsets_obj, const py::handle& keys_obj) {
             auto seqs = checked_array<int64_t>(seqs_obj, "seqs");
             auto tokens = checked_array<int64_t>(tokens_obj, "tokens");
             auto offsets = checked_array<int64_t>(offsets_obj, "offsets");
             auto keys = checked_array<int32_t>(keys_obj, "key_ids");
             check_offsets(offsets, seqs.size(), tokens.size());
             if (keys.size() != seqs.size())
               throw py::value_error("key_ids: expected one key per item (" +
                                     std::to_string(seqs.size()) + "), got " +
                                     std::to_string(keys.size()));
             py::array_t<int64_t> slots(tokens.size());
             int64_t* out = slots.mutable_data();
             {
               std::optional<py::gil_scoped_release> release;
               if (tokens.size() + seqs.size() > kReleaseGilAbove) release.emplace();
               Lock lock(self.mutex);
               self.core.append_many(seqs.data(), seqs.size(), tokens.data(), offsets.data(),
                                     keys.data(), out);
             }
             return slots;
           },
           py::arg("seqs"), py::arg("tokens"), py::arg("offsets"), py::arg("key_ids"))
      .def("match_many",
           [](BoundManager& self, const py::handle& tokens_obj, const py::handle& offsets_obj,
              const py::handle& keys_obj) {
             auto tokens = checked_array<int64_t>(tokens_obj, "tokens");
             auto offsets = checked_array<int64_t>(offsets_obj, "offsets");
             auto keys = checked_array<int32_t>(keys_obj, "key_ids");
             if (offsets.size() < 1) throw py::value_error("offsets: expected at least 1 entry");
             const int64_t count = offsets.size() - 1;
             check_offsets(offsets, count, tokens.size());
             py::array_t<int64_t> seqs(count), cached(count);
             int64_t* seqs_out = seqs.mutable_data();
             int64_t* cached_out = cached.mutable_data();
             {
               std::optional<py::gil_scoped_release> release;
               if (tokens.size() + count > kReleaseGilAbove) release.emplace();
               Lock lock(self.mutex);
               self.core.match_many(count, tokens.data(), offsets.data(), keys.data(),
                                    keys.size(), seqs_out, cached_out);
             }
             return py::make_tuple(seqs, cached);
           },
           py::arg("tokens"), py::arg("offsets"), py::arg("key_ids"))
      .def("fork",
           [](BoundManager& self, int64_t seq) {
             Lock lock(self.mutex);
             const bem::ForkResult r = self.core.fork(seq);
             return py::make_tuple(r.child, r.copy_src, r.copy_dst);
           },
           py::arg("seq"))
      .def("free",
           [](BoundManager& self, int64_t seq) {
             Lock lock(self.mutex);
             self.core.free_sequence(seq);
           },
           py::arg("seq"))
      .def("free_many",
           [](BoundManager& self, const py::handle& seqs_obj) {
             auto seqs = checked_array<int64_t>(seqs_obj, "seqs");
             std::optional<py::gil_scoped_release> release;
             if (seqs.size() > kReleaseGilAbove) release.emplace();
             Lock lock(self.mutex);
             self.core.free_many(seqs.data(), seqs.size());
           },
           py::arg("seqs"))
      .def("num_tokens",
           [](BoundManager& self, int64_t seq) {
             Lock lock(self.mutex);
             return self.core.num_tokens(seq);
           },
           py::arg("seq"))
      .def("block_table",
           [](BoundManager& self, int64_t seq) {
             Lock lock(self.mutex);
             return to_numpy<int64_t>(self.core.block_table(seq));
           },
           py::arg("seq"))
      .def("sequences", [](BoundManager& self) {
        Lock lock(self.mutex);
        return self.core.sequence_ids();
      })
      .def("num_available_blocks", [](BoundManager& self) {
        Lock lock(self.mutex);
        return self.core.num_available_blocks();
      })
      .def("stats", [](BoundManager& self) {
        Lock lock(self.mutex);
        return stats_dict(self.core.stats());
      })
      .def("key_stats", [](BoundManager& self) {
        Lock lock(self.mutex);
        py::list out;
        for (const bem::KVKeyStats& k : self.core.key_stats()) {
          py::dict d;
          d["tokens_queried"] = k.tokens_queried;
          d["tokens_hit"] = k.tokens_hit;
          d["blocks_committed"] = k.blocks_committed;
          d["evictions"] = k.evictions;
          d["blocks_cached"] = k.blocks_cached;
          out.append(d);
        }
        return out;
      })
      .def("reset_stats", [](BoundManager& self) {
        Lock lock(self.mutex);
        self.core.reset_stats();
      })
      .def("state",
           [](BoundManager& self) {
             Lock lock(self.mutex);
             const bem::KVBlockManager& c = self.core;
             py::dict seqs;
             for (int64_t id : c.sequence_ids()) {
               const bem::KVSequenceInfo s = c.sequence_info(id);
               seqs[py::int_(id)] = py::make_tuple(s.num_tokens, py::tuple(py::cast(s.blocks)),
                                                   py::tuple(py::cast(s.canonical)));
             }
             py::list blocks;
             for (int32_t b = 0; b < c.num_blocks(); ++b) {
               const bem::KVBlockInfo i = c.block_info(b);
               blocks.append(py::make_tuple(i.ref_count, i.generation, i.cached, i.key, i.parent,
                                            i.filled, py::tuple(py::cast(c.block_tokens(b))),
                                            i.hash));
             }
             py::dict d;
             d["sequences"] = seqs;
             d["blocks"] = blocks;
             d["lru"] = py::tuple(py::cast(c.lru_order()));
             d["free"] = py::tuple(py::cast(c.free_blocks()));
             d["stats"] = stats_dict(c.stats());
             d["num_keys"] = c.num_routing_keys();
             return d;
           },
           "Full state: sequences {id: (num_tokens, blocks, canonical)}, blocks [(ref_count, "
           "generation, cached, key, parent, filled, tokens, hash)], lru, free, stats, num_keys.")
      .def("check_invariants",
           [](BoundManager& self) {
             Lock lock(self.mutex);
             self.core.check_invariants();
           },
           "Raises RuntimeError naming the first broken structural invariant.");
}

}  // namespace bem_bindings
