"""The KNNIndex protocol every memory index implements, and a growable tensor buffer.

An index holds one independent vector set per *group*; a group is one (sequence, kv head)
pair, so sequence i never sees sequence j's keys and the query heads of a GQA group share
their kv head's set. All groups of an index receive keys in lock-step (one window at a time);
keys that are padding are added with valid=False and are never returned.
"""
from __future__ import annotations

import hashlib
import os
import uuid
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


def _mapped_empty(directory, shape, dtype) -> torch.Tensor:
    """An uninitialised CPU tensor backed by a memory-mapped file in `directory`.

    The file is unlinked at once: the mapping keeps it alive, the OS pages it to and from disk
    as needed (so it can exceed RAM), and its space is freed with the tensor — nothing to clean
    up after a crash."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    f = Path(directory) / f"memformer-{uuid.uuid4().hex}.bin"
    numel = 1
    for s in shape:
        numel *= s
    t = torch.from_file(str(f), shared=True, size=max(1, numel), dtype=dtype)
    os.unlink(f)
    return t[:numel].view(*shape)


class GrowingBuffer:
    """A [*G, n, *tail] tensor that grows along dim len(G) with amortised doubling.

    torch.cat on every window would copy the whole memory each time (quadratic in length).
    mmap_dir: keep the rows in memory-mapped files there instead of RAM (CPU only)."""

    def __init__(self, group_shape, tail_shape, dtype, device, initial: int = 1024, mmap_dir=None):
        self.group_shape = tuple(group_shape)
        self.tail_shape = tuple(tail_shape)
        self.mmap_dir = mmap_dir
        if mmap_dir is not None and torch.device(device).type != "cpu":
            raise ValueError(f"memory-mapped storage holds CPU tensors, not {device}")
        self._buf = self._empty(initial, dtype, device)
        self.length = 0

    def _empty(self, rows: int, dtype, device) -> torch.Tensor:
        shape = (*self.group_shape, rows, *self.tail_shape)
        if self.mmap_dir is not None:
            return _mapped_empty(self.mmap_dir, shape, dtype)
        return torch.empty(*shape, dtype=dtype, device=device)

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
            new = self._empty(new_cap, self._buf.dtype, self._buf.device)
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
        n = x.shape[self.dim]
        self._buf = self._empty(max(n, 1), self._buf.dtype, self._buf.device)
        self._buf.narrow(self.dim, 0, n).copy_(x)
        self.length = n


class QuantizedBuffer:
    """A GrowingBuffer of int8 rows with one float32 scale per row: row ~= int8 * scale.

    Symmetric per-row absmax quantisation (scale = max|x| / 127), so the error of every element
    is at most scale / 2 and a row costs D + 4 bytes instead of 4 D (fp32) — 3.76x less at D = 64.
    `data` is the int8 tensor and `scales` the [*G, n] scales, the layout the kNN kernels read.
    """

    def __init__(self, group_shape, dim: int, device, initial: int = 1024, mmap_dir=None):
        self.rows = GrowingBuffer(group_shape, (dim,), torch.int8, device, initial, mmap_dir)
        self._scales = GrowingBuffer(group_shape, (), torch.float32, device, initial, mmap_dir)

    @staticmethod
    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., D] float -> (int8 [..., D], scales [...] float32)."""
        x = x.float()
        scales = x.abs().amax(-1).clamp_min(1e-12) / 127.0                      # [...]
        q = torch.round(x / scales[..., None]).clamp_(-127, 127).to(torch.int8)
        return q, scales

    @property
    def length(self) -> int:
        return self.rows.length

    @property
    def data(self) -> torch.Tensor:
        """int8 rows [*G, n, D] (a view)."""
        return self.rows.data

    @property
    def scales(self) -> torch.Tensor:
        """[*G, n] float32."""
        return self._scales.data

    def dequantize(self, start: int = 0, n: int | None = None) -> torch.Tensor:
        """float32 rows [*G, n, D] from row `start`."""
        d = self.rows.dim
        n = self.length - start if n is None else n
        return self.data.narrow(d, start, n).float() * self.scales.narrow(d, start, n)[..., None]

    def append(self, x: torch.Tensor) -> None:
        q, s = self.quantize(x)
        self.rows.append(q)
        self._scales.append(s)

    def drop_front(self, n: int) -> None:
        self.rows.drop_front(n)
        self._scales.drop_front(n)

    def reset(self) -> None:
        self.rows.reset()
        self._scales.reset()

    def load(self, x: torch.Tensor, scales: torch.Tensor | None = None) -> None:
        """Saved int8 rows + their scales, or float rows (quantised here)."""
        if x.dtype != torch.int8:
            x, scales = self.quantize(x)
        elif scales is None or tuple(scales.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"int8 rows {tuple(x.shape)} need scales of shape {tuple(x.shape[:-1])}")
        self.rows.load(x)
        self._scales.load(scales.float())


def row_buffer(group_shape, dim: int, dtype, device, mmap_dir=None):
    """Storage for [*G, n, D] rows: a QuantizedBuffer for torch.int8, else a GrowingBuffer;
    in memory-mapped files under `mmap_dir` when given."""
    if dtype == torch.int8:
        return QuantizedBuffer(group_shape, dim, device, mmap_dir=mmap_dir)
    return GrowingBuffer(group_shape, (dim,), dtype, device, mmap_dir=mmap_dir)


def rows_state(buf, name: str) -> dict[str, torch.Tensor]:
    """Tensors saving a row buffer: {name: rows} (+ {name_scales: scales} when int8)."""
    state = {name: buf.data.contiguous()}
    if isinstance(buf, QuantizedBuffer):
        state[f"{name}_scales"] = buf.scales.contiguous()
    return state


def load_rows(buf, state: dict, name: str) -> None:
    """Inverse of rows_state; converts between int8 and float storage when they differ."""
    x, scales = state[name], state.get(f"{name}_scales")
    if isinstance(buf, QuantizedBuffer):
        if x.dtype == torch.int8:
            buf.load(x, scales)
        else:
            buf.load(x)
    elif x.dtype == torch.int8:
        if scales is None or tuple(scales.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"saved int8 {name} {tuple(x.shape)} lack matching {name}_scales")
        buf.load(x.float() * scales.float()[..., None])
    else:
        buf.load(x)


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

    def _init_raw_keys(self, group_shape, dim: int, dtype, device, mmap_dir=None) -> None:
        self._keys = row_buffer(group_shape, dim, dtype, device, mmap_dir)
        self._valid = GrowingBuffer(group_shape, (), torch.bool, device)

    def __len__(self) -> int:
        return self._keys.length

    @property
    def vectors(self) -> torch.Tensor:
        """The stored keys, [*G, n, D] (a view; int8 when quantised, see `key_scales`)."""
        return self._keys.data

    @property
    def key_scales(self) -> torch.Tensor | None:
        """[*G, n] float32 per-row scales of int8 keys, else None."""
        return self._keys.scales if isinstance(self._keys, QuantizedBuffer) else None

    def float_vectors(self, start: int = 0, n: int | None = None) -> torch.Tensor:
        """Keys [*G, n, D] as float32 (dequantised when int8)."""
        if isinstance(self._keys, QuantizedBuffer):
            return self._keys.dequantize(start, n)
        d = len(self.group_shape)
        n = len(self) - start if n is None else n
        return self.vectors.narrow(d, start, n).float()

    @property
    def valid(self) -> torch.Tensor:
        """[*G, n] bool: False for padding rows."""
        return self._valid.data
