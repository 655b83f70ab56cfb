"""bem.kv — a paged KV cache whose prefix reuse is keyed by each block's routing decision.

A block's K/V is reused only for the same prefix, the same token ids and the same
:class:`RoutingKey` (expert, digest of that expert's weights, adapter/config version), compared
exactly. :class:`KVBlockManager` deals in block indices (C++ core, or a pure-Python twin);
:class:`KVStorage` holds the K/V tensors on any torch device; :class:`KVCache` joins them for an
attention layer. See docs/kv.md.
"""
from bem.kv.cache import KVCache, Prefill
from bem.kv.manager import Fork, KeyStats, KVBlockManager, KVStats, as_token_array
from bem.kv.reference import KVCacheFullError, ReferenceBlockManager
from bem.kv.routing_key import DIGEST_BYTES, RoutingKey, weights_digest
from bem.kv.storage import KVStorage

__all__ = ["DIGEST_BYTES", "Fork", "KVBlockManager", "KVCache", "KVCacheFullError", "KVStats",
           "KVStorage", "KeyStats", "Prefill", "ReferenceBlockManager", "RoutingKey",
           "as_token_array", "weights_digest"]
