"""FaissIndex: the KNNIndex protocol over FAISS (flat / IVF), one faiss index per group.

The raw keys stay in a GrowingBuffer as in ExactIndex (`.vectors` / `.valid`): attention reads the keys
of the retrieved ids, and rebuilds and training need them. A row id is the position in that buffer,
shared by all groups. A trained IVF index holds the keys minus a per-group center c (the training
keys' mean): q.(k - c) ranks keys exactly as q.k does (q.c is the same for every key), but attention
keys share a large common component (SmolLM2: norms 17-25, 10-16 once centered), and inner-product
IVF finds neighbours much better around the origin (measured on real keys, recall@32 0.87 -> 0.94).
Search adds q.c back, so scores stay exact inner products.
Inside faiss a row carries the id `row + base` (base = rows evicted so far), so
FIFO eviction removes one contiguous id range and never renumbers what stays; callers still see ids
that shift down by n, as with ExactIndex. Padding rows (valid=False) are never added to faiss, so they
can never be returned.

faiss is imported lazily (`pip install faiss-cpu`, or `memformer[gpu]` for faiss-gpu). With faiss-gpu
and a cuda device, the indexes live on the GPU.

HNSW and IVF-PQ were removed: on real SmolLM2 keys they found fewer of the exact top-32 than IVF at
every speed measured (1M keys: HNSW ef=256 recall 0.574 at 13.7x exact's speed, IVF-PQ 0.634 at
14.3x, IVF nprobe=64 0.852 at 28.8x; benchmarks/results/index/index.md), and since attention
gathers the raw keys, which every backend keeps, neither made the memory smaller.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from .base import RawKeys, load_rows, rows_state, sha256_file as _sha256

KINDS = ("flat", "ivf")      # saved as their index here: 2 and 3 were HNSW and IVF-PQ
FORMAT, VERSION = "memformer-faiss-index", 1
# Below this many keys per group IVF does not pay on CPU: FAISS's brute-force kernel is as fast
# as the nprobe real SmolLM2 keys need for recall 0.95 (benchmarks/results/index_growth/README.md).
DEFAULT_TRAIN_THRESHOLD = 65536
_KMEANS_POINTS = 64             # k-means sample per centroid (faiss's own default is 256)
_DATA = "memory.safetensors"
_GPU_RES: dict = {}  # device -> StandardGpuResources; one per process, each reserves scratch memory


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError("FaissIndex needs faiss: pip install faiss-cpu "
                          "(or pip install 'memformer[gpu]' for faiss-gpu)") from e
    return faiss


def _f32(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().contiguous().numpy()


class FaissIndex(RawKeys):
    """Approximate (or, kind="flat", exact) inner-product top-k over one faiss index per group.

    group_shape: leading dims of every call, e.g. (batch, kv_heads). dim: vector size D.
    kind: "flat" (exact) or "ivf" (IVF-Flat).
    ivf searches exactly until every group holds `train_threshold` valid rows (default
        max(65536, 39*nlist)), then trains on the stored keys and switches.
        nlist=None picks nlist_factor*sqrt(n) at each training (at most n/39) and retrains (k-means
        on a sample, every row re-added, none lost) each time the memory has grown `retrain_growth`
        times since the last training; a fixed nlist trains once.
    nprobe: IVF lists visited per query; None = calibrated after each training on the first search
        call's queries: the smallest power of two whose recall@k against exact search reaches
        `target_recall`.
    """

    def __init__(self, group_shape, dim: int, kind: str = "flat", dtype=torch.float32, device="cpu",
                 nlist: int | None = None, nprobe: int | None = None, train_threshold: int | None = None,
                 nlist_factor: float = 4.0, retrain_growth: float = 4.0, target_recall: float = 0.95):
        if kind not in KINDS:
            raise ValueError(f"FaissIndex: kind {kind!r} not in {KINDS}")
        self.faiss = _faiss()
        self.group_shape, self.dim, self.kind = tuple(int(s) for s in group_shape), int(dim), kind
        self.G = math.prod(self.group_shape)
        self.nlist, self.nprobe = nlist, None if nprobe is None else int(nprobe)
        self.nlist_factor, self.retrain_growth = float(nlist_factor), float(retrain_growth or 0)
        self.target_recall = float(target_recall)
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"FaissIndex: target_recall {target_recall} not in (0, 1]")
        if self.nlist_factor <= 0 or (self.retrain_growth and self.retrain_growth <= 1):
            raise ValueError(f"FaissIndex: nlist_factor {nlist_factor} must be > 0 and retrain_growth "
                             f"{retrain_growth} > 1 (or 0: never retrain)")
        if train_threshold is None:
            train_threshold = max(DEFAULT_TRAIN_THRESHOLD, 39 * (nlist or 0))
        self.train_threshold = int(train_threshold)
        dev = torch.device(device)
        self._gpu = (dev.type == "cuda" and hasattr(self.faiss, "StandardGpuResources")
                     and self.faiss.get_num_gpus() > 0)
        self._gpu_id = dev.index if dev.index is not None else 0
        if self._gpu and dev.index is None:
            self._gpu_id = torch.cuda.current_device()
        self._init_raw_keys(self.group_shape, self.dim, dtype, device)
        self.reset()

    # -- protocol ---------------------------------------------------------------------------
    @property
    def trained(self) -> bool:
        """True once an ivf index has switched from exact to approximate search."""
        return self._trained[0] is not None

    def reset(self) -> None:
        """Empty the index; an ivf index forgets its training (a new document retrains)."""
        self._keys.reset()
        self._valid.reset()
        self._base, self.nlist_trained, self.trained_rows = 0, 0, 0
        self._probe = [self.nprobe or 1] * self.G    # nprobe in effect per group
        self._calibrated = False
        self._nvalid = np.zeros(self.G, np.int64)   # valid rows per group (training trigger)
        self._trained: list = [None] * self.G        # serialized trained-but-empty IVF per group
        self._center: np.ndarray | None = None       # [G, D] subtracted inside approximate indexes
        self._indexes = [self._empty(g) for g in range(self.G)]

    def add(self, keys: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """keys [*G, n, D], valid [*G, n] bool -> ids [n] (row ids, shared by all groups)."""
        g = len(self.group_shape)
        if tuple(keys.shape[:g]) != self.group_shape or keys.shape[-1] != self.dim or keys.dim() != g + 2:
            raise ValueError(f"FaissIndex.add: keys {tuple(keys.shape)} do not match "
                             f"[*{self.group_shape}, n, {self.dim}]")
        n, start = keys.shape[g], len(self)
        if valid is None:
            valid = torch.ones(keys.shape[:-1], dtype=torch.bool, device=keys.device)
        elif tuple(valid.shape) != tuple(keys.shape[:-1]):
            raise ValueError(f"FaissIndex.add: valid {tuple(valid.shape)} != {tuple(keys.shape[:-1])}")
        self._keys.append(keys)
        self._valid.append(valid)
        v = valid.reshape(self.G, n).cpu().numpy()
        self._nvalid += v.sum(1)
        if not self._maybe_train():  # training re-adds every row itself
            # faiss gets the rows as stored (e.g. rounded to bf16), so its scores equal q . vectors[id]
            x = _f32(self.float_vectors(start, n).reshape(self.G, n, self.dim))
            if self._center is not None:
                x = x - self._center[:, None, :]
            for gi, index in enumerate(self._indexes):
                rows = np.flatnonzero(v[gi])
                if rows.size:
                    index.add_with_ids(np.ascontiguousarray(x[gi, rows]), rows + start + self._base)
        return torch.arange(start, start + n, device=keys.device)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [*G, q, D] -> (scores [*G, q, k] float32, ids [*G, q, k] int64); -inf / -1 = none.

        One faiss call per group (all queries of the group at once)."""
        g = len(self.group_shape)
        if tuple(queries.shape[:g]) != self.group_shape or queries.shape[-1] != self.dim:
            raise ValueError(f"FaissIndex.search: queries {tuple(queries.shape)} do not match "
                             f"[*{self.group_shape}, q, {self.dim}]")
        nq = queries.shape[g]
        out_s = np.full((self.G, nq, k), -np.inf, np.float32)
        out_i = np.full((self.G, nq, k), -1, np.int64)
        q = _f32(queries.reshape(self.G, nq, self.dim))
        if self.trained and self.nprobe is None and not self._calibrated and nq:
            self._calibrate(q, k)
        for gi, index in enumerate(self._indexes):
            kk = min(k, index.ntotal)    # faiss-gpu caps k; nothing beyond ntotal exists anyway
            if kk == 0 or nq == 0:
                continue
            s, i = index.search(q[gi], kk)
            out_s[gi, :, :kk], out_i[gi, :, :kk] = s, i
        missing = out_i < 0
        if self._center is not None:    # faiss scored q.(k - c): add q.c back
            out_s += np.einsum("gqd,gd->gq", q, self._center)[:, :, None]
        out_i = np.where(missing, -1, out_i - self._base)
        out_s[missing] = -np.inf        # faiss pads with -FLT_MAX, the protocol says -inf
        scores, ids = torch.from_numpy(out_s).to(queries.device), torch.from_numpy(out_i).to(queries.device)
        shape = (*self.group_shape, nq, k)
        return scores.reshape(shape), ids.reshape(shape)

    def remove_oldest(self, n: int) -> None:
        """FIFO: drop the n oldest rows of every group; ids shift down by n.

        faiss remove_ids of the id range, O(n) (a scan, no re-training). GPU indexes cannot delete
        and are rebuilt from the kept keys, O(n)."""
        n = min(int(n), len(self))
        if n <= 0:
            return
        dropped = self.valid.reshape(self.G, len(self))[:, :n].sum(1).cpu().numpy()
        lo = self._base
        self._keys.drop_front(n)
        self._valid.drop_front(n)
        self._base += n
        self._nvalid -= dropped
        for gi, index in enumerate(self._indexes):
            try:
                index.remove_ids(self.faiss.IDSelectorRange(lo, lo + n))
            except RuntimeError:        # GPU indexes do not implement remove_ids
                self._rebuild(gi)

    def set_search_params(self, nprobe: int | None = None) -> None:
        """Change the search effort of a built index without rebuilding it: IVF lists visited."""
        if nprobe is not None:
            self.nprobe = int(nprobe)
            self._probe = [self.nprobe] * self.G
        for g in range(self.G):
            if self._trained[g] is not None:
                self._set_nprobe(g, self._probe[g])

    @property
    def nprobes(self) -> list[int]:
        """The nprobe in effect per group (calibrated or fixed); meaningful once trained."""
        return list(self._probe)

    def _set_nprobe(self, g: int, nprobe: int) -> None:
        self._probe[g] = int(nprobe)
        index = self._indexes[g]
        if self._gpu:
            self.faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", self._probe[g])
        else:
            index.nprobe = self._probe[g]

    def _calibrate(self, q: np.ndarray, k: int, sample: int = 256) -> None:
        """Per group, the smallest power-of-two nprobe whose recall@k on (up to `sample` of) these
        queries reaches target_recall; truth = FAISS brute force over the group's stored keys."""
        f = self.faiss
        f.omp_set_num_threads(torch.get_num_threads())        # the thread budget the caller set
        pick = np.linspace(0, q.shape[1] - 1, min(sample, q.shape[1])).astype(np.int64)
        for g, index in enumerate(self._indexes):
            x, rows = self._group_rows(g)
            kk = min(k, len(rows))
            if kk == 0:
                continue
            qs = np.ascontiguousarray(q[g, pick])                                   # [s, D]
            _, pos = f.knn(qs, x, kk, metric=f.METRIC_INNER_PRODUCT)                # [s, kk]
            truth = rows[pos] + self._base                                          # faiss ids
            nprobe, top = 1, self.nlist_trained
            while nprobe < top:
                self._set_nprobe(g, nprobe)
                _, ids = index.search(qs, min(k, index.ntotal))
                hits = (ids[:, :, None] == truth[:, None, :]).any(1).mean()
                if hits >= self.target_recall:
                    break
                nprobe *= 2
            self._set_nprobe(g, min(nprobe, top))
        self._calibrated = True

    # -- building ---------------------------------------------------------------------------
    def _empty(self, g: int):
        """An empty faiss index of the current stage for group g (on the GPU where it applies)."""
        f = self.faiss
        if self._trained[g] is not None:
            index = f.deserialize_index(self._trained[g])
            index.nprobe = self._probe[g]
        else:                           # flat, and ivf before training: exact search
            index = f.IndexIDMap(f.IndexFlatIP(self.dim))
        return self._to_gpu(index)

    def _to_gpu(self, index):
        if not self._gpu:
            return index
        res = _GPU_RES.setdefault(self._gpu_id, self.faiss.StandardGpuResources())
        return self.faiss.index_cpu_to_gpu(res, self._gpu_id, index)

    def _to_cpu(self, index):
        return self.faiss.index_gpu_to_cpu(index) if self._gpu else index

    def _group_rows(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys [m, D] float32, row ids [m]) of the valid rows of group g."""
        n = len(self)
        rows = np.flatnonzero(self.valid.reshape(self.G, n)[g].cpu().numpy())
        keys = self.vectors.reshape(self.G, n, self.dim)[g].float()          # this group only
        if self.key_scales is not None:                                      # int8 rows
            keys = keys * self.key_scales.reshape(self.G, n)[g][:, None]
        return np.ascontiguousarray(_f32(keys)[rows]), rows

    def _rebuild(self, g: int) -> None:
        """Re-create group g's faiss index from the kept keys (keeps IVF training and the center)."""
        self._indexes[g] = self._empty(g)
        x, rows = self._group_rows(g)
        if self._center is not None and self._trained[g] is not None:
            x = np.ascontiguousarray(x - self._center[g])
        if rows.size:
            self._indexes[g].add_with_ids(x, rows + self._base)

    def _maybe_train(self) -> bool:
        """ivf: once every group holds train_threshold valid rows, train and re-add them;
        with an automatic nlist, train again each time the memory has grown retrain_growth times."""
        n = int(self._nvalid.min())
        if self.kind != "ivf":
            return False
        if not self.trained:
            if n < self.train_threshold:
                return False
        elif self.nlist is not None or not self.retrain_growth or n < self.retrain_growth * self.trained_rows:
            return False
        f, ip = self.faiss, self.faiss.METRIC_INNER_PRODUCT
        # faiss k-means wants >= 39 points per centroid; clamp the default rather than warn.
        nlist = int(self.nlist or max(1, min(int(self.nlist_factor * math.sqrt(n)), n // 39)))
        self._center = np.zeros((self.G, self.dim), np.float32)
        rng = np.random.default_rng(0)
        for g in range(self.G):
            x, _ = self._group_rows(g)
            self._center[g] = x.mean(0)
            if len(x) > _KMEANS_POINTS * nlist:   # k-means on a sample: training cost stays O(nlist^2)
                x = x[np.sort(rng.choice(len(x), _KMEANS_POINTS * nlist, replace=False))]
            x = np.ascontiguousarray(x - self._center[g])
            ivf = f.IndexIVFFlat(f.IndexFlatIP(self.dim), self.dim, nlist, ip)
            ivf.train(x)                # k-means seed is fixed in faiss: deterministic for the same keys
            self._trained[g] = f.serialize_index(ivf)
            self._rebuild(g)
        self.nlist_trained, self.trained_rows, self._calibrated = nlist, n, False
        return True

    # -- persistence ------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        """keys, valid, meta (int64: version, kind, trained, nlist, 0, 0 (were IVF-PQ's), base), trained.<g>."""
        meta = [VERSION, KINDS.index(self.kind), int(self.trained), self.nlist_trained, 0, 0, self._base]
        state = {**rows_state(self._keys, "keys"), "valid": self.valid.contiguous(),
                 "meta": torch.tensor(meta, dtype=torch.int64)}
        if self._center is not None:
            state["center"] = torch.from_numpy(self._center.copy())
        for g, blob in enumerate(self._trained):
            if blob is not None:
                state[f"trained.{g}"] = torch.from_numpy(np.array(blob, dtype=np.uint8))
        return state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only: the index is rebuilt on load from the keys (and the trained, empty IVF as
        uint8 bytes)."""
        return self._tensors()

    def _parse(self, state: dict) -> tuple:
        """Validate a state without changing self -> (keys, valid, meta or None, trained blobs)."""
        keys, valid, meta = state["keys"], state["valid"], state.get("meta")
        g = len(self.group_shape)
        if tuple(keys.shape[:g]) != self.group_shape or keys.shape[-1] != self.dim or keys.dim() != g + 2:
            raise ValueError(f"FaissIndex: saved keys {tuple(keys.shape)} do not fit "
                             f"[*{self.group_shape}, n, {self.dim}]")
        if tuple(valid.shape) != tuple(keys.shape[:-1]):
            raise ValueError("FaissIndex: saved valid mask does not match saved keys")
        if meta is not None and (meta.numel() != 7 or int(meta[0]) != VERSION):
            raise ValueError(f"FaissIndex: saved meta {meta.tolist()} is not format version {VERSION}")
        # Another backend's state (e.g. ExactIndex) has keys + valid only: rebuild from those.
        same = meta is not None and int(meta[1]) == KINDS.index(self.kind)
        trained = [None] * self.G
        if same and int(meta[2]):
            try:
                trained = [state[f"trained.{g}"].cpu().numpy().astype(np.uint8) for g in range(self.G)]
            except KeyError as e:
                raise ValueError(f"FaissIndex: saved state lacks {e}") from None
        rows = {"keys": keys, "keys_scales": state.get("keys_scales"),
                "center": state.get("center") if same else None}
        if rows["center"] is not None and tuple(rows["center"].shape) != (self.G, self.dim):
            raise ValueError(f"FaissIndex: saved center {tuple(rows['center'].shape)} != {(self.G, self.dim)}")
        if keys.dtype == torch.int8 and (rows["keys_scales"] is None
                                         or tuple(rows["keys_scales"].shape) != tuple(keys.shape[:-1])):
            raise ValueError("FaissIndex: saved int8 keys lack matching keys_scales")
        return rows, valid.bool(), (meta if same else None), trained

    def _commit(self, rows, valid, meta, trained, indexes=None) -> None:
        """Install a parsed state; indexes = saved CPU faiss indexes, else rebuild from the keys."""
        nvalid = valid.reshape(self.G, -1).sum(1).cpu().numpy().astype(np.int64)
        for g, index in enumerate(indexes or []):   # check everything before changing anything
            if index.d != self.dim or index.ntotal != nvalid[g]:
                raise ValueError(f"FaissIndex: saved faiss index {g} (d={index.d}, ntotal={index.ntotal}) "
                                 f"does not match {nvalid[g]} valid keys of dim {self.dim}")
        load_rows(self._keys, rows, "keys")
        self._valid.load(valid)
        c = rows.get("center")
        self._center = None if c is None else c.float().numpy().copy()
        self._nvalid, self._trained = nvalid, trained
        self.nlist_trained = int(meta[3]) if meta is not None and trained[0] is not None else 0
        self.trained_rows = int(nvalid.min()) if self.nlist_trained else 0
        self._calibrated = False
        if indexes is None:
            self._base = 0
            for g in range(self.G):
                self._rebuild(g)
            self._maybe_train()         # e.g. an exact memory loaded into faiss-ivf
            return
        self._base = int(meta[6])
        for g, index in enumerate(indexes):
            if trained[g] is not None:
                index.nprobe = self._probe[g]
            self._indexes[g] = self._to_gpu(index)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._commit(*self._parse(state))

    def save(self, path) -> None:
        """Write <path>/ {manifest.json, memory.safetensors, group_<g>.faiss} atomically: into a temp
        dir beside it, then renamed over (an existing <path> is moved aside first, then deleted)."""
        from safetensors.torch import save_file
        from memformer.fileio import atomic_dir

        def fill(tmp: Path) -> None:
            save_file({k: v.cpu().contiguous() for k, v in self._tensors().items()}, str(tmp / _DATA))
            for g, index in enumerate(self._indexes):
                self.faiss.write_index(self._to_cpu(index), str(tmp / f"group_{g}.faiss"))
            files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
            manifest = {"format": FORMAT, "version": VERSION, "kind": self.kind, "files": files,
                        "group_shape": list(self.group_shape), "dim": self.dim, "rows": len(self),
                        "dtype": str(self._keys.data.dtype), "faiss": self.faiss.__version__}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))

        atomic_dir(path, fill)

    def load(self, path) -> None:
        """Read what save() wrote; ValueError if it is missing, corrupt, truncated or does not fit."""
        from safetensors.torch import load_file
        path = Path(path)

        def need(ok, msg):
            if not ok:
                raise ValueError(f"FaissIndex.load: {path}: {msg}")
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            files = dict(manifest["files"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"FaissIndex.load: {path} has no readable manifest.json ({e})") from None
        m = manifest.get
        need(m("format") == FORMAT and m("version") == VERSION, f"not a {FORMAT} v{VERSION} directory")
        need(tuple(m("group_shape", ())) == self.group_shape and m("dim") == self.dim,
             f"holds group shape {m('group_shape')} and dim {m('dim')}; "
             f"this index has {list(self.group_shape)} and {self.dim}")
        need(m("kind") == self.kind, f"holds a {m('kind')!r} index, not {self.kind!r}")
        want = {_DATA} | {f"group_{g}.faiss" for g in range(self.G)}
        need(set(files) == want, f"manifest lists {sorted(files)}, expected {sorted(want)}")
        for name, info in files.items():
            p = path / name
            need(p.is_file() and p.stat().st_size == info.get("size") and _sha256(p) == info.get("sha256"),
                 f"{name} is missing, truncated or corrupt (size / sha256 differ from the manifest)")
        try:
            state = load_file(str(path / _DATA))
            indexes = [self.faiss.read_index(str(path / f"group_{g}.faiss")) for g in range(self.G)]
        except Exception as e:          # checksums matched, so this is a writer / version problem
            raise ValueError(f"FaissIndex.load: cannot read {path}: {e}") from None
        rows, valid, meta, trained = self._parse(state)
        need(meta is not None, f"{_DATA} has no meta for kind {self.kind!r}")
        self._commit(rows, valid, meta, trained, indexes)
