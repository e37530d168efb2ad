"""ExactIndex: brute-force inner-product search, chunked over keys (FAISS's kernel on CPU, torch
matmul + topk elsewhere).

It is the oracle every approximate backend is tested against, and the default for memories
that fit in (GPU) memory. Scores are computed in float32 whatever the storage dtype.
"""
from __future__ import annotations

import torch

from .base import RawKeys, load_rows, rows_state

# Upper bound on the elements of one [G, q_chunk, key_chunk] score block (64 MB of float32).
_BLOCK_ELEMS = 1 << 24
# FAISS's brute force runs one query at a time below 20 queries (no sgemm): decode steps, whose
# few queries torch handles well, stay on the torch path.
_FAISS_MIN_QUERIES = 32


def _torch_topk(q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, k: int):
    """q [G, nq, D], keys [G, n, D] float32, valid [G, n] -> (scores, ids) [G, nq, k]; queries in
    chunks so one score block stays under _BLOCK_ELEMS."""
    G, nq, _ = q.shape
    n = keys.shape[1]
    qc = max(1, min(nq, _BLOCK_ELEMS // max(1, G * n)))
    kt = keys.transpose(1, 2)                                          # [G, D, n]
    masked = not bool(valid.all())
    out_s, out_i = [], []
    for q0 in range(0, nq, qc):
        s = torch.bmm(q[:, q0:q0 + qc], kt)                            # [G, qc, n]
        if masked:
            s.masked_fill_(~valid[:, None, :], float("-inf"))
        s_top, i_top = s.topk(k, dim=-1)                               # [G, qc, k]
        out_s.append(s_top)
        out_i.append(i_top)
    return torch.cat(out_s, dim=1), torch.cat(out_i, dim=1)


def _faiss_knn():
    """A CPU top-k inner-product search by FAISS's brute-force kernel, or None without faiss.

    Returns knn(q [G, nq, D], keys [G, n, D] float32, k) -> (scores [G, nq, k], ids [G, nq, k])."""
    try:
        import faiss
    except ImportError:
        return None
    import numpy as np

    def knn(q: torch.Tensor, keys: torch.Tensor, k: int):
        faiss.omp_set_num_threads(torch.get_num_threads())          # the same budget as torch
        qn = q.contiguous().numpy()
        kn = keys.contiguous().numpy()
        out = [faiss.knn(qn[g], kn[g], k, metric=faiss.METRIC_INNER_PRODUCT) for g in range(q.shape[0])]
        scores = torch.from_numpy(np.stack([s for s, _ in out]))       # [G, nq, k]
        ids = torch.from_numpy(np.stack([i for _, i in out]))
        return scores, ids

    return knn


class ExactIndex(RawKeys):
    """Exact top-k over one vector set per group.

    group_shape: leading dims of every call, e.g. (batch, kv_heads).
    dim: vector size D. dtype/device: storage of the keys (torch.int8 = int8 rows + scales).
    mmap_dir: keep the keys in memory-mapped files there (memories larger than RAM; search reads
        them chunk by chunk).
    backend: "faiss" (CPU default): FAISS's brute-force kernel (blocked sgemm with a fused top-k
        heap), 2-3x faster than matmul + topk on CPU and the same neighbours; chunks holding
        padding rows, calls with fewer than 32 queries (decoding) and tensors on a GPU use the
        torch path. "torch": matmul + topk always (the reference the tests hold FAISS to).
    """

    def __init__(self, group_shape, dim: int, dtype=torch.float32, device="cpu", key_chunk: int = 32768,
                 mmap_dir=None, backend: str = "faiss"):
        if backend not in ("faiss", "torch"):
            raise ValueError(f"ExactIndex: backend {backend!r} is not 'faiss' or 'torch'")
        self.group_shape = tuple(group_shape)
        self.dim = int(dim)
        self.key_chunk = int(key_chunk)
        self.backend = backend
        self._init_raw_keys(self.group_shape, self.dim, dtype, device, mmap_dir)

    # -- protocol ---------------------------------------------------------------------------
    def add(self, keys: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        g = len(self.group_shape)
        if tuple(keys.shape[:g]) != self.group_shape or keys.shape[-1] != self.dim or keys.dim() != g + 2:
            raise ValueError(f"ExactIndex.add: keys {tuple(keys.shape)} do not match "
                             f"[*{self.group_shape}, n, {self.dim}]")
        n = keys.shape[g]
        if valid is None:
            valid = torch.ones(keys.shape[:-1], dtype=torch.bool, device=keys.device)
        elif tuple(valid.shape) != tuple(keys.shape[:-1]):
            raise ValueError(f"ExactIndex.add: valid {tuple(valid.shape)} != {tuple(keys.shape[:-1])}")
        start = len(self)
        self._keys.append(keys)
        self._valid.append(valid)
        return torch.arange(start, start + n, device=keys.device)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = len(self.group_shape)
        if tuple(queries.shape[:g]) != self.group_shape or queries.shape[-1] != self.dim:
            raise ValueError(f"ExactIndex.search: queries {tuple(queries.shape)} do not match "
                             f"[*{self.group_shape}, q, {self.dim}]")
        nq = queries.shape[g]
        G = 1
        for s in self.group_shape:
            G *= s
        q = queries.reshape(G, nq, self.dim).float()                  # [G, q, D]
        keys = self.vectors.reshape(G, len(self), self.dim)            # [G, n, D]
        scales = None if self.key_scales is None else self.key_scales.reshape(G, len(self))  # int8 keys
        valid = self.valid.reshape(G, len(self))                       # [G, n]
        best_s = torch.full((G, nq, k), float("-inf"), device=q.device)
        best_i = torch.full((G, nq, k), -1, dtype=torch.long, device=q.device)
        n = len(self)
        kc = max(1, min(self.key_chunk, n))
        knn = _faiss_knn() if self.backend == "faiss" and q.device.type == "cpu" else None
        for k0 in range(0, n if nq else 0, kc):
            kb = keys[:, k0:k0 + kc].float()                           # [G, kc, D]
            if scales is not None:                                     # dequantise this chunk only
                kb = kb * scales[:, k0:k0 + kc, None]
            vb = valid[:, k0:k0 + kc]                                  # [G, kc]
            top = min(k, kb.shape[1])
            if knn is not None and nq >= _FAISS_MIN_QUERIES and bool(vb.all()):  # nothing to mask
                s_top, i_top = knn(q, kb, top)                         # [G, q, top]
            else:
                s_top, i_top = _torch_topk(q, kb, vb, top)
            cand_s = torch.cat([best_s, s_top], dim=-1)                # [G, q, k + top]
            cand_i = torch.cat([best_i, i_top + k0], dim=-1)
            best_s, pick = cand_s.topk(k, dim=-1)                      # [G, q, k]
            best_i = cand_i.gather(-1, pick)
        best_i = best_i.masked_fill(torch.isinf(best_s), -1)
        out_shape = (*self.group_shape, nq, k)
        return best_s.reshape(out_shape), best_i.reshape(out_shape)

    def remove_oldest(self, n: int) -> None:
        self._keys.drop_front(n)
        self._valid.drop_front(n)

    def reset(self) -> None:
        self._keys.reset()
        self._valid.reset()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**rows_state(self._keys, "keys"), "valid": self.valid.contiguous()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        keys, valid = state["keys"], state["valid"]
        g = len(self.group_shape)
        if tuple(keys.shape[:g]) != self.group_shape or keys.shape[-1] != self.dim:
            raise ValueError(f"ExactIndex: saved keys {tuple(keys.shape)} do not fit "
                             f"[*{self.group_shape}, n, {self.dim}]")
        if tuple(valid.shape) != tuple(keys.shape[:-1]):
            raise ValueError("ExactIndex: saved valid mask does not match saved keys")
        load_rows(self._keys, state, "keys")
        self._valid.load(valid.bool())
