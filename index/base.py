"""The KNNIndex protocol every memory index implements, and a growable tensor buffer.

An index holds one independent vector set per *group*; a group is one (sequence, kv head)
pair, so sequence i never sees sequence j's keys and the query heads of a GQA group share
their kv head's set. All groups of an index receive keys in lock-step (one window at a time);
keys that are padding are added with valid=False and are never returned.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class KNNIndex(Protocol):
    group_shape: tuple[int, ...]
    dim: int

    def add(self, keys: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """keys [*G, n, D], valid [*G, n] bool -> ids [n] (row ids, shared by all groups)."""

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [*G, q, D] -> (scores [*G, q, k] float32, ids [*G, q, k] int64).

        Scores are inner products q.k; missing neighbours (k > size, invalid rows) have
        score -inf and id -1."""

    def remove_oldest(self, n: int) -> None:
        """Drop the n oldest rows of every group (FIFO eviction); later ids shift down by n."""

    def reset(self) -> None: ...

    def __len__(self) -> int: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


class GrowingBuffer:
    """A [*G, n, *tail] tensor that grows along dim len(G) with amortised doubling.

    torch.cat on every window would copy the whole memory each time (quadratic in length)."""

    def __init__(self, group_shape, tail_shape, dtype, device, initial: int = 1024):
        self.group_shape = tuple(group_shape)
        self.tail_shape = tuple(tail_shape)
        self._buf = torch.empty(*self.group_shape, initial, *self.tail_shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def dim(self) -> int:
        return len(self.group_shape)

    @property
    def data(self) -> torch.Tensor:
        """A view of the filled rows, [*G, length, *tail]."""
        return self._buf.narrow(self.dim, 0, self.length)

    def append(self, x: torch.Tensor) -> None:
        n = x.shape[self.dim]
        need = self.length + n
        cap = self._buf.shape[self.dim]
        if need > cap:
            new_cap = max(need, 2 * cap)
            new = torch.empty(*self.group_shape, new_cap, *self.tail_shape,
                              dtype=self._buf.dtype, device=self._buf.device)
            new.narrow(self.dim, 0, self.length).copy_(self.data)
            self._buf = new
        self._buf.narrow(self.dim, self.length, n).copy_(x)
        self.length = need

    def drop_front(self, n: int) -> None:
        n = min(n, self.length)
        keep = self.length - n
        if keep > 0:
            self._buf.narrow(self.dim, 0, keep).copy_(self._buf.narrow(self.dim, n, keep).clone())
        self.length = keep

    def reset(self) -> None:
        self.length = 0

    def load(self, x: torch.Tensor) -> None:
        self._buf = x.to(dtype=self._buf.dtype, device=self._buf.device).contiguous().clone()
        self.length = x.shape[self.dim]


def sha256_file(path) -> str:
    """Hex sha256 of a file, read in 1 MB blocks (manifests of saved indexes and memories)."""
    h = hashlib.sha256()
    with open(Path(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class RawKeys:
    """Mixin: the raw keys and padding flags an index keeps beside its search structure.

    Attention gathers the retrieved rows from `vectors`, so every backend stores them; a row id
    is the row's place here, shared by all groups."""

    def _init_raw_keys(self, group_shape, dim: int, dtype, device) -> None:
        self._keys = GrowingBuffer(group_shape, (dim,), dtype, device)
        self._valid = GrowingBuffer(group_shape, (), torch.bool, device)

    def __len__(self) -> int:
        return self._keys.length

    @property
    def vectors(self) -> torch.Tensor:
        """The stored keys, [*G, n, D] (a view)."""
        return self._keys.data

    @property
    def valid(self) -> torch.Tensor:
        """[*G, n] bool: False for padding rows."""
        return self._valid.data
