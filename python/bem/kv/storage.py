"""KVStorage: the K/V tensors of a paged cache, owned by Python on any torch device, addressed by
the slots and block tables a KVBlockManager hands out."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from bem.kv.manager import _int_arg


class KVStorage:
    """K/V of every block: ``data`` (layers, num_blocks, 2, heads, block_size, head_dim).

    ``data[l, b, 0]`` holds the keys and ``data[l, b, 1]`` the values of block ``b`` at layer
    ``l``; a slot ``s`` is position ``s % block_size`` of block ``s // block_size``. All
    operations are plain torch indexing, so they run on whatever device ``data`` lives on.
    The tensor starts zeroed; only slots the manager handed out hold meaningful K/V.
    """

    def __init__(self, layers: int, num_blocks: int, heads: int, head_dim: int,
                 block_size: int = 64, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        sizes = {}
        for name, value in (("layers", layers), ("num_blocks", num_blocks), ("heads", heads),
                            ("head_dim", head_dim), ("block_size", block_size)):
            sizes[name] = _int_arg(value, name)
            if sizes[name] < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype}")
        self.layers, self.num_blocks = sizes["layers"], sizes["num_blocks"]
        self.heads, self.head_dim = sizes["heads"], sizes["head_dim"]
        self.block_size = sizes["block_size"]
        self.data = torch.zeros(self.layers, self.num_blocks, 2, self.heads, self.block_size,
                                self.head_dim, dtype=dtype, device=device)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    def _layer(self, layer: int) -> int:
        layer = _int_arg(layer, "layer")
        if not 0 <= layer < self.layers:
            raise IndexError(f"layer: expected an index in [0, {self.layers}), got {layer}")
        return layer

    def _index(self, index, name: str, bound: int) -> torch.Tensor:
        """A 1-D int64 index tensor on the storage device, every entry in [0, bound).

        ``index``: numpy array, list or torch tensor of ints. Tensors already on a CUDA device
        are not range-checked (that would synchronise); torch's own indexing checks them."""
        if isinstance(index, torch.Tensor):
            if index.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"{name}: expected an int64 or int32 tensor, got {index.dtype}")
            t = index
        else:
            a = np.asarray(index)
            if a.size and a.dtype.kind not in "iu":
                raise TypeError(f"{name}: expected integers, got dtype {a.dtype}")
            t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
        if t.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D index, got shape {tuple(t.shape)}")
        if t.device.type == "cpu" and t.numel():
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= bound:
                raise IndexError(f"{name}: entries must be in [0, {bound}), got "
                                 f"{lo if lo < 0 else hi}")
        return t.to(self.device, torch.int64, non_blocking=True)

    def slots(self, slots) -> torch.Tensor:
        """Manager slots as a checked int64 tensor on the storage device, for reuse across
        layers (convert once per step, then pass the result to :meth:`write`)."""
        return self._index(slots, "slots", self.num_blocks * self.block_size)

    def write(self, layer: int, slots, k: torch.Tensor, v: torch.Tensor) -> None:
        """Scatter new K/V into their slots.

        ``slots``: (n,) from KVBlockManager.append (numpy) or :meth:`slots` (tensor).
        ``k``, ``v``: (heads, n, head_dim), the storage's dtype and device.
        """
        layer = self._layer(layer)
        s = self.slots(slots)
        n = s.numel()
        want = (self.heads, n, self.head_dim)
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
            if tuple(x.shape) != want:
                raise ValueError(f"{name}: expected shape {want} (heads, tokens, head_dim), got "
                                 f"{tuple(x.shape)}")
            if x.dtype != self.dtype or x.device != self.device:
                raise TypeError(f"{name}: expected {self.dtype} on {self.device}, got {x.dtype} "
                                f"on {x.device}")
        blocks = torch.div(s, self.block_size, rounding_mode="floor")
        offsets = s - blocks * self.block_size
        # Advanced indices on dims 0 and 3 around two slices: the indexed view is
        # (n, 2, heads, head_dim), filled from k and v stacked and moved to match.
        self.data[layer][blocks, :, :, offsets] = torch.stack((k, v)).permute(2, 0, 1, 3)

    def read(self, layer: int, block_table, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather one sequence's K/V for attention.

        ``block_table``: (ceil(num_tokens / block_size),) block indices (KVBlockManager.block_table
        or a tensor of them). Returns k, v: (heads, num_tokens, head_dim), in token order.
        """
        layer = self._layer(layer)
        table = self._index(block_table, "block_table", self.num_blocks)
        num_tokens = _int_arg(num_tokens, "num_tokens")
        nb = table.numel()
        if not (nb - 1) * self.block_size < num_tokens <= nb * self.block_size:
            raise ValueError(f"num_tokens: {num_tokens} does not fit a table of {nb} blocks of "
                             f"{self.block_size}")
        kv = self.data[layer].index_select(0, table)  # (nb, 2, heads, block_size, head_dim)
        kv = kv.permute(1, 2, 0, 3, 4).reshape(2, self.heads, nb * self.block_size, self.head_dim)
        return kv[0, :, :num_tokens], kv[1, :, :num_tokens]

    def copy_blocks(self, src: int | Sequence[int], dst: int | Sequence[int]) -> None:
        """Copy whole blocks (all layers, K and V): the copy-on-write of a fork (Fork.copy_src →
        Fork.copy_dst). ``dst`` entries must be distinct."""
        src_t = self._index([src] if isinstance(src, int) else src, "src", self.num_blocks)
        dst_t = self._index([dst] if isinstance(dst, int) else dst, "dst", self.num_blocks)
        if src_t.numel() != dst_t.numel():
            raise ValueError(f"src, dst: expected equal lengths, got {src_t.numel()} and "
                             f"{dst_t.numel()}")
        self.data[:, dst_t] = self.data[:, src_t]
