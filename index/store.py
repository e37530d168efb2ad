"""Value store and per-layer memory: index (keys) + values + token positions, with a capacity.

One `LayerMemory` per memory layer. Everything is shaped [B, Hkv, M, ...]: one isolated memory
per sequence of the batch and per kv head (GQA: the query heads of a group share it). Keys and
values are stored in one dtype: float32 / bfloat16 / float16, or int8 with a float32 scale per
row (`QuantizedBuffer`).
"""
from __future__ import annotations

import torch

from .base import GrowingBuffer, QuantizedBuffer, load_rows, row_buffer, rows_state
from .exact import ExactIndex
from .faiss_index import FaissIndex

# MemoryConfig.index name -> FaissIndex kind
FAISS_KINDS = {"faiss-flat": "flat", "faiss-ivf": "ivf"}


class MemoryCapacityError(RuntimeError):
    """Raised when memory is full and eviction is "none"; nothing has been written."""


class MemoryStore:
    """Values [B, Hkv, M, D] (int8 + scales [B, Hkv, M] when dtype is torch.int8), document token
    positions [B, M] (int64) and the window slot each row's key was computed at [B, M] (int64, -1 =
    unknown: memory files from before slots were kept)."""

    def __init__(self, batch: int, kv_heads: int, dim: int, dtype=torch.float32, device="cpu", mmap_dir=None):
        self.values = row_buffer((batch, kv_heads), dim, dtype, device, mmap_dir)
        self.positions = GrowingBuffer((batch,), (), torch.long, device)
        self.slots = GrowingBuffer((batch,), (), torch.long, device)

    def __len__(self) -> int:
        return self.values.length

    def add(self, values: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor | None = None) -> None:
        self.values.append(values)
        self.positions.append(positions)
        self.slots.append(torch.full_like(positions, -1) if slots is None else slots.to(positions))

    def _buffers(self):
        return self.values, self.positions, self.slots

    def remove_oldest(self, n: int) -> None:
        for buf in self._buffers():
            buf.drop_front(n)

    def reset(self) -> None:
        for buf in self._buffers():
            buf.reset()


def make_index(kind: str, group_shape, dim: int, dtype, device, **params):
    """Build the KNNIndex backend named by MemoryConfig.index."""
    if kind == "exact":
        return ExactIndex(group_shape, dim, dtype=dtype, device=device, **params)
    if kind in FAISS_KINDS:  # faiss itself is imported only when such an index is built
        return FaissIndex(group_shape, dim, kind=FAISS_KINDS[kind], dtype=dtype, device=device, **params)
    raise ValueError(f"unknown index kind {kind!r}; available: {['exact', *FAISS_KINDS]}")


class LayerMemory:
    """Memory of one layer: keys in a KNNIndex, values + positions in a MemoryStore.

    capacity: max tokens per sequence (None = unbounded). eviction: "fifo" (drop the oldest rows)
    or "none" (MemoryCapacityError when full).
    mmap_dir: keep keys and values in memory-mapped files there instead of RAM (exact index only:
        FAISS indexes hold their own copy of the keys).
    """

    def __init__(self, batch: int, kv_heads: int, dim: int, *, dtype=torch.float32, device="cpu",
                 index: str = "exact", index_params: dict | None = None,
                 capacity: int | None = None, eviction: str = "fifo", mmap_dir=None):
        self.batch, self.kv_heads, self.dim = batch, kv_heads, dim
        self.capacity, self.eviction = capacity, eviction
        params = dict(index_params or {})
        if mmap_dir is not None:
            if index != "exact":
                raise ValueError(f"memory-mapped storage works with index='exact', not {index!r} "
                                 f"(FAISS keeps its own in-RAM copy of the keys)")
            params["mmap_dir"] = mmap_dir
        self.index = make_index(index, (batch, kv_heads), dim, dtype, device, **params)
        self.store = MemoryStore(batch, kv_heads, dim, dtype=dtype, device=device, mmap_dir=mmap_dir)

    def __len__(self) -> int:
        return len(self.store)

    @property
    def keys(self) -> torch.Tensor:
        """[B, Hkv, M, D] stored keys (rotated at their window slot, see `slots`)."""
        return self.index.vectors

    @property
    def values(self) -> torch.Tensor:
        """[B, Hkv, M, D] (int8 when quantised, see `value_scales`)"""
        return self.store.values.data

    @property
    def key_scales(self) -> torch.Tensor | None:
        """[B, Hkv, M] float32 scales of int8 keys, else None."""
        return self.index.key_scales

    @property
    def value_scales(self) -> torch.Tensor | None:
        """[B, Hkv, M] float32 scales of int8 values, else None."""
        v = self.store.values
        return v.scales if isinstance(v, QuantizedBuffer) else None

    @property
    def positions(self) -> torch.Tensor:
        """[B, M] document token position of every stored row."""
        return self.store.positions.data

    @property
    def slots(self) -> torch.Tensor:
        """[B, M] window slot (position inside its window) of every stored row's key; -1 = unknown."""
        return self.store.slots.data

    @property
    def valid(self) -> torch.Tensor:
        """[B, M] False for padding rows (same for every kv head)."""
        return self.index.valid[:, 0]

    def check_room(self, n: int) -> None:
        """Raise MemoryCapacityError if adding n tokens would overflow with eviction='none'."""
        if self.capacity is not None and self.eviction == "none" and len(self) + n > self.capacity:
            raise MemoryCapacityError(
                f"memory full: {len(self)} + {n} tokens > capacity {self.capacity} with eviction='none'; "
                f"raise MemoryConfig.capacity, use eviction='fifo', or reset_memory()")

    def add(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
            valid: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> None:
        """keys/values [B, Hkv, n, D], positions [B, n] (document token positions), valid [B, n]
        bool, slots [B, n]: the position inside its window each key was computed (and, in
        rotated) at; None = unknown (-1)."""
        B, H, n, D = keys.shape
        if (B, H, D) != (self.batch, self.kv_heads, self.dim) or values.shape != keys.shape:
            raise ValueError(f"LayerMemory.add: keys {tuple(keys.shape)} / values {tuple(values.shape)} "
                             f"do not match [{self.batch}, {self.kv_heads}, n, {self.dim}]")
        if positions.shape != (B, n) or (slots is not None and slots.shape != (B, n)):
            raise ValueError(f"LayerMemory.add: positions {tuple(positions.shape)} / slots "
                             f"{None if slots is None else tuple(slots.shape)} != {(B, n)}")
        self.check_room(n)
        if self.capacity is not None and n > self.capacity:  # only the newest rows can fit
            keys, values = keys[:, :, -self.capacity:], values[:, :, -self.capacity:]
            positions = positions[:, -self.capacity:]
            slots = None if slots is None else slots[:, -self.capacity:]
            valid = None if valid is None else valid[:, -self.capacity:]
            n = self.capacity
        if self.capacity is not None and len(self) + n > self.capacity:
            self.remove_oldest(len(self) + n - self.capacity)
        kvalid = None if valid is None else valid[:, None, :].expand(B, H, n)
        self.index.add(keys, kvalid)
        self.store.add(values, positions, slots)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, Hkv, q, D] -> (scores, ids) [B, Hkv, q, k]; id -1 = no neighbour."""
        return self.index.search(queries, k)

    def remove_oldest(self, n: int) -> None:
        self.index.remove_oldest(n)
        self.store.remove_oldest(n)

    def reset(self) -> None:
        self.index.reset()
        self.store.reset()

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"index.{k}": v for k, v in self.index.state_dict().items()}
        state.update(rows_state(self.store.values, "values"))
        state["positions"] = self.positions.contiguous()
        state["slots"] = self.slots.contiguous()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        values, positions = state["values"], state["positions"]
        if tuple(values.shape[:2]) != (self.batch, self.kv_heads) or values.shape[-1] != self.dim:
            raise ValueError(f"saved values {tuple(values.shape)} do not fit "
                             f"[{self.batch}, {self.kv_heads}, M, {self.dim}]")
        if tuple(positions.shape) != (self.batch, values.shape[2]):
            raise ValueError("saved positions do not match saved values")
        slots = state["slots"]                          # where each key was rotated: question reads need it
        if tuple(slots.shape) != tuple(positions.shape):
            raise ValueError("saved slots do not match saved positions")
        # memories saved before score eviction was removed also hold "mass": not needed, ignored
        self.index.load_state_dict({k[len("index."):]: v for k, v in state.items() if k.startswith("index.")})
        if len(self.index) != values.shape[2]:
            raise ValueError("saved index and values hold different numbers of rows")
        load_rows(self.store.values, state, "values")
        self.store.positions.load(positions)
        self.store.slots.load(slots.long())
