"""Corpus memories as a Lance dataset: written in fragments from any number of workers, opened
from a local folder or object storage, read a few blocks at a time.

    memformer memory build --docs DIR --out URI [--ray [ADDRESS]]   # memformer/corpus_build.py
    model.attach_corpus(URI)        # reads the manifest and the document offsets, nothing else
    model.ask("...")                # fetches the blocks the question reads, by row offset

A store is a LanceDB database (a local folder, or a prefix of s3://, gs://, az://) of four tables:

  manifest   one row: the JSON of the store (format, the fingerprint of the model and the memory
             layout it was built with, the corpus's sink ids) and the version of each other table
             that the last complete write committed. Readers open those versions, so a write killed
             between two tables' commits is invisible, and the next writer drops its rows.
  documents  doc, name, sha256, start, end (stream range, EOS included), first (first stored
             position: after the sink in the stream's first document), row (its first row in
             blocks), text.
  blocks     one row per piece of a document inside one memory block, in stream order: doc, block,
             start, end (its positions, contiguous), slots [n], and per memory layer i the bytes of
             k{i} / v{i} [Hkv, n, D] in the stored dtype (int8 rows also ks{i} / vs{i} [Hkv, n]
             float32 scales). Block b of the stream is at most a few rows (one per document it
             touches); their offsets follow from the document table, so a read is one `take`.
  passages   doc, start, end, vector [E]: the normalised sentence embedding of each passage.

A block row holds what `LayerMemory` holds for those positions (`fetch_blocks` rebuilds one
holding only the rows read); block summaries of the block-memory layout are not stored yet.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memformer import persistence
from memformer.fileio import BusyError, write_error
from memformer.passages import SEARCH_DEPTH

STORE_FORMAT = "memformer-lance-corpus"
STORE_VERSION = 1
TABLES = ("documents", "blocks", "passages")
# Passage search: up to this many passages their embeddings are loaded into a FAISS flat index at
# attach (measured faster than a LanceDB scan at that size, benchmarks/results/scale); beyond it
# LanceDB searches the table, so RSS at attach does not grow with the corpus.
FAISS_MAX_PASSAGES = 16_384
# Past this many passages (6.3M tokens; a scan then takes ~80 ms on one core, and at 10M tokens
# made answers 2x slower than at 1M, benchmarks/results/scale) a build ends by training LanceDB's
# IVF-PQ index over them, again whenever they have doubled since. Searches probe NPROBES lists
# and re-rank REFINE x the depth by exact distance.
INDEX_MIN_PASSAGES = 65_536
NPROBES, REFINE = 20, 2


def needs_scale_extra(e: ImportError) -> ImportError:
    return ImportError(f"Lance corpus memories need the scale extra: pip install 'memformer[scale]' ({e})")


def _lance():
    try:
        import lance
        import pyarrow as pa
    except ImportError as e:
        raise needs_scale_extra(e) from None
    return lance, pa


def normalize_uri(uri) -> str:
    """A local path made absolute; an object-storage URI (scheme://...) as given."""
    s = str(uri)
    return s.rstrip("/") if "://" in s else str(Path(s).expanduser().resolve())


def table_uri(uri: str, name: str) -> str:
    """Where LanceDB keeps table `name` of the database at `uri`."""
    return f"{uri}/{name}.lance"


def is_store(path) -> bool:
    """True for a Lance corpus store: an object-storage URI, or a folder holding its manifest."""
    s = str(path)
    return "://" in s or (Path(s) / "manifest.lance").is_dir()


def storage_options() -> dict | None:
    """Object-storage settings for Lance from MEMFORMER_STORAGE_OPTIONS (a JSON object), else the
    usual AWS_* / GOOGLE_* / AZURE_* variables, which Lance reads itself."""
    text = os.environ.get("MEMFORMER_STORAGE_OPTIONS")
    return json.loads(text) if text else None


# ---------------------------------------------------------------- schemas
def layout_of(model) -> dict:
    """The memory layout a store's rows have, as the model writes them: memory layers, block size,
    kv heads, head dim and the stored dtype."""
    mem = model.state.new_layer_memory(1, bounded=False)
    return {"memory_layers": list(model.memory_layer_ids), "block_size": model.memory_config.block_size,
            "kv_heads": mem.kv_heads, "head_dim": mem.dim, "dtype": str(mem.keys.dtype).replace("torch.", "")}


def blocks_schema(layout: dict):
    _, pa = _lance()
    fields = [("doc", pa.int64()), ("block", pa.int64()), ("start", pa.int64()), ("end", pa.int64()),
              ("slots", pa.list_(pa.int32()))]
    for i in layout["memory_layers"]:
        fields += [(f"k{i}", pa.binary()), (f"v{i}", pa.binary())]
        if layout["dtype"] == "int8":
            fields += [(f"ks{i}", pa.binary()), (f"vs{i}", pa.binary())]
    return pa.schema(fields)


def passages_schema(width: int):
    _, pa = _lance()
    return pa.schema([("doc", pa.int64()), ("start", pa.int64()), ("end", pa.int64()),
                      ("vector", pa.list_(pa.float32(), width))])


def documents_schema():
    _, pa = _lance()
    return pa.schema([("doc", pa.int64()), ("name", pa.string()), ("sha256", pa.string()), ("start", pa.int64()),
                      ("end", pa.int64()), ("first", pa.int64()), ("row", pa.int64()), ("text", pa.large_string())])


def manifest_schema():
    _, pa = _lance()
    return pa.schema([("json", pa.large_string())])


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor (any dtype, bfloat16 included)."""
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def bytes_tensor(b: bytes, dtype: torch.dtype, shape) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8).view(dtype).view(*shape)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}


def block_table(pieces: list[dict], layout: dict):
    """pyarrow Table of block rows from `pieces`: dicts with doc, block, start, end, slots [n] and
    per layer i: keys / values [Hkv, n, D] (and key_scales / value_scales [Hkv, n] when int8)."""
    _, pa = _lance()
    cols: dict[str, list] = {name: [] for name in blocks_schema(layout).names}
    for p in pieces:
        for name in ("doc", "block", "start", "end"):
            cols[name].append(int(p[name]))
        cols["slots"].append(p["slots"].tolist())
        for i in layout["memory_layers"]:
            k, v = p["layers"][i][:2]
            cols[f"k{i}"].append(tensor_bytes(k))
            cols[f"v{i}"].append(tensor_bytes(v))
            if layout["dtype"] == "int8":
                cols[f"ks{i}"].append(tensor_bytes(p["layers"][i][2].float()))
                cols[f"vs{i}"].append(tensor_bytes(p["layers"][i][3].float()))
    return pa.table(cols, schema=blocks_schema(layout))


def passage_table(docs: list[int], ranges: list[tuple[int, int]], embeddings: torch.Tensor):
    """pyarrow Table of passage rows: document ids [C], stream ranges [C] and embeddings [C, E]."""
    _, pa = _lance()
    E = embeddings.shape[1]
    flat = pa.array(embeddings.float().contiguous().numpy().ravel(), type=pa.float32())
    return pa.table({"doc": pa.array(docs, pa.int64()), "start": pa.array([a for a, _ in ranges], pa.int64()),
                     "end": pa.array([b for _, b in ranges], pa.int64()),
                     "vector": pa.FixedSizeListArray.from_arrays(flat, E)}, schema=passages_schema(E))


# ---------------------------------------------------------------- writing
def write_fragments(uri: str, name: str, table) -> list[str]:
    """Write `table` as new data files of table `name` of the store at `uri` without committing
    them (any worker may do this); returns the fragments' metadata as JSON, for `StoreWriter.commit`.
    A worker killed before its fragments are committed leaves files no version refers to."""
    lance, _ = _lance()
    if table.num_rows == 0:
        return []
    frags = lance.fragment.write_fragments(table, table_uri(uri, name), schema=table.schema,
                                           storage_options=storage_options())
    return [json.dumps(f.to_json()) for f in frags]


class StoreWriter:
    """Appends documents to a store (created when missing), one complete write at a time.

    fingerprint, layout: the building model's (`persistence.memory_fingerprint`, `layout_of`);
    width: its passage embeddings' width; sink: the corpus's sink ids (kept when creating). A store
    built by another model or layout is refused (MemoryFileError) before anything is written; rows
    a killed write left (committed to a table, not named by the manifest) are dropped first.
    Callers hold the store's lock (`corpus_build.lock_store`)."""

    def __init__(self, uri, fingerprint: dict, layout: dict, width: int, sink: list[int]):
        lance, pa = _lance()
        self.uri = normalize_uri(uri)
        self.opts = storage_options()
        try:
            old = read_manifest(self.uri)
        except FileNotFoundError:
            old = None
        if old is not None:
            check_compatible(old, fingerprint, layout, self.uri, width)
            self.manifest = old
            for name in TABLES:                 # drop what a killed write committed past the manifest
                ds = lance.dataset(table_uri(self.uri, name), storage_options=self.opts)
                if ds.version != old["versions"][name]:
                    lance.dataset(table_uri(self.uri, name), version=old["versions"][name],
                                  storage_options=self.opts).restore()
                    self.manifest["versions"][name] = lance.dataset(table_uri(self.uri, name),
                                                                    storage_options=self.opts).version
            return
        schemas = {"documents": documents_schema(), "blocks": blocks_schema(layout), "passages": passages_schema(width)}
        try:
            if "://" not in self.uri:
                Path(self.uri).mkdir(parents=True, exist_ok=True)
            versions = {name: lance.write_dataset(pa.Table.from_pylist([], schema=s), table_uri(self.uri, name),
                                                  mode=self._mode(name), storage_options=self.opts).version
                        for name, s in schemas.items()}
        except OSError as e:
            raise write_error(self.uri, e) from None
        self.manifest = {"format": STORE_FORMAT, "format_version": STORE_VERSION, "fingerprint": fingerprint,
                         "layout": layout, "passage_width": width, "sink_ids": list(sink), "documents": 0,
                         "tokens": 0, "block_rows": 0, "passages": 0, "versions": versions}
        self._write_manifest()

    @property
    def documents(self) -> int:
        return self.manifest["documents"]

    def commit(self, blocks: list[str], passages: list[str], docs: list[dict], block_rows: int, n_passages: int) -> None:
        """Commit one write: block and passage fragments (JSON from `write_fragments`, in stream
        order), the rows of `docs` (documents_schema fields) and then the manifest, the one commit
        that makes the rest visible."""
        lance, pa = _lance()
        from lance.fragment import FragmentMetadata
        v = self.manifest["versions"]
        for name in TABLES:                      # one writer at a time (object storage has no lock file)
            if lance.dataset(table_uri(self.uri, name), storage_options=self.opts).version != v[name]:
                raise BusyError(f"{self.uri} was written by another build meanwhile ({name} moved past version "
                                f"{v[name]}); run one build per store at a time")
        try:
            for name, frags in (("blocks", blocks), ("passages", passages)):
                if frags:
                    op = lance.LanceOperation.Append([FragmentMetadata.from_json(f) for f in frags])
                    v[name] = lance.LanceDataset.commit(table_uri(self.uri, name), op, read_version=v[name],
                                                        storage_options=self.opts).version
            table = pa.Table.from_pylist(docs, schema=documents_schema())
            v["documents"] = lance.write_dataset(table, table_uri(self.uri, "documents"), mode="append",
                                                 storage_options=self.opts).version
        except OSError as e:
            raise write_error(self.uri, e) from None
        self.manifest["documents"] += len(docs)
        self.manifest["tokens"] = docs[-1]["end"] if docs else self.manifest["tokens"]
        self.manifest["block_rows"] += block_rows
        self.manifest["passages"] += n_passages
        self._write_manifest()

    def index_passages(self) -> bool:
        """Train LanceDB's IVF-PQ index over the passages when there are INDEX_MIN_PASSAGES of them
        and they have doubled since the last index (rows added after it are scanned meanwhile).
        Returns True when it trained one."""
        lance, _ = _lance()
        import lancedb
        n, last = self.manifest["passages"], self.manifest.get("passage_index_rows", 0)
        if n < INDEX_MIN_PASSAGES or n < 2 * last:
            return False
        table = lancedb.connect(self.uri, storage_options=self.opts).open_table("passages")
        try:
            table.create_index(metric="dot", vector_column_name="vector", index_type="IVF_PQ", replace=True)
        except OSError as e:
            raise write_error(self.uri, e) from None
        self.manifest["versions"]["passages"] = lance.dataset(table_uri(self.uri, "passages"),
                                                              storage_options=self.opts).version
        self.manifest["passage_index_rows"] = n
        self._write_manifest()
        return True

    def _mode(self, name: str) -> str:
        """"create" for a table not there yet (Lance warns when "overwrite" creates one)."""
        local = "://" not in self.uri
        return "create" if local and not Path(table_uri(self.uri, name)).exists() else "overwrite"

    def _write_manifest(self) -> None:
        lance, pa = _lance()
        table = pa.table({"json": [json.dumps(self.manifest)]}, schema=manifest_schema())
        try:
            lance.write_dataset(table, table_uri(self.uri, "manifest"), mode=self._mode("manifest"),
                                storage_options=self.opts)
        except OSError as e:
            raise write_error(self.uri, e) from None


# ---------------------------------------------------------------- reading
def read_manifest(uri) -> dict:
    """The store's manifest; FileNotFoundError when `uri` holds no store, MemoryFileError when it is
    not one of this format."""
    lance, _ = _lance()
    uri = normalize_uri(uri)
    try:
        rows = lance.dataset(table_uri(uri, "manifest"), storage_options=storage_options()).to_table().to_pylist()
    except (ValueError, FileNotFoundError, OSError) as e:
        if "://" not in uri and not (Path(uri) / "manifest.lance").exists():
            raise FileNotFoundError(f"{uri} is not a Lance corpus memory (no manifest.lance)") from None
        raise persistence.MemoryFileError(f"{uri}: the manifest cannot be read: {e}") from None
    try:
        manifest = json.loads(rows[0]["json"])
    except (IndexError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise persistence.MemoryFileError(f"{uri}: the manifest is corrupt ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        raise persistence.MemoryFileError(f"{uri}: not a {STORE_FORMAT} store")
    if manifest.get("format_version") != STORE_VERSION:
        raise persistence.MemoryFileError(f"{uri}: store version {manifest.get('format_version')!r} is not "
                                          f"supported (this memformer reads version {STORE_VERSION})")
    return manifest


def check_compatible(manifest: dict, fingerprint: dict, layout: dict, uri: str, width: int | None = None) -> None:
    """MemoryFileError naming every mismatch when the store was built by another model, memory
    config or layout (or passages of another width) than the one given."""
    saved = {**{f"fingerprint.{k}": v for k, v in manifest.get("fingerprint", {}).items()},
             **{f"layout.{k}": v for k, v in manifest.get("layout", {}).items()}}
    mine = {**{f"fingerprint.{k}": v for k, v in fingerprint.items()}, **{f"layout.{k}": v for k, v in layout.items()}}
    if width is not None:
        saved["passage_width"], mine["passage_width"] = manifest.get("passage_width"), width
    diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
    if diff:
        raise persistence.MemoryFileError(f"the corpus memory at {uri} was built with another model or memory "
                                          f"layout; mismatched (saved, this model): {diff}")


@dataclass
class StoreDocument:
    """A document of a store, as `corpus.CorpusDocument` (name, sha256, start, end, text)."""
    name: str
    sha256: str
    start: int
    end: int
    text: str


class StoreDocuments:
    """The document table of an opened store as a read-only sequence of `StoreDocument`: the
    stream offsets of every document are in RAM (`starts`, `ends`, 16 bytes a document); names and
    text are fetched when a document is asked for."""

    def __init__(self, dataset, starts: np.ndarray, ends: np.ndarray):
        self._ds, self.starts, self.ends = dataset, starts, ends
        self._cache: dict[int, StoreDocument] = {}        # the last document is asked at every question

    def __len__(self) -> int:
        return len(self.starts)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]                  # negative indices, IndexError
        return self._fetch(i)

    def _fetch(self, i: int) -> StoreDocument:
        if i not in self._cache:
            if len(self._cache) >= 32:
                self._cache.clear()
            row = self._ds.take([i], columns=["name", "sha256", "start", "end", "text"]).to_pylist()[0]
            self._cache[i] = StoreDocument(**row)
        return self._cache[i]


class StorePassages:
    """Passage search over a store's passages table with LanceDB (exact dot-product scan; an
    ANN index when the table has one). Duck-types `memformer.passages.PassageIndex.search`; the
    query is embedded by `embedder()`, the model's sentence embedder of the moment."""

    def __init__(self, table, width: int, embedder, indexed: bool = False):
        self.table, self.width, self._embedder, self.indexed = table, width, embedder, indexed

    @property
    def embedder(self):
        return self._embedder()

    def search(self, query: str, depth: int = SEARCH_DEPTH):
        from memformer.passages import Passage, encode_texts
        if not query or not query.strip():
            raise ValueError("passage search needs a non-empty query")
        q = encode_texts(self.embedder, [query])[0]                                   # [E], normalised
        if q.shape[0] != self.width:
            raise ValueError(f"the corpus's passages were embedded {self.width}-wide, this model's sentence "
                             f"embedder gives {q.shape[0]}; use the embedder it was built with")
        query = self.table.search(q.numpy(), vector_column_name="vector").metric("dot").limit(depth)
        if self.indexed:
            query = query.nprobes(NPROBES).refine_factor(REFINE)
        hits = query.select(["start", "end"]).to_arrow()
        # LanceDB's "dot" distance is 1 - q.v
        return [Passage(int(a), int(b), 1.0 - float(d)) for a, b, d in
                zip(hits["start"].to_pylist(), hits["end"].to_pylist(), hits["_distance"].to_pylist())]


class CorpusStore:
    """An opened store, pinned to the versions its manifest names. Holds the manifest and the
    per-document offsets; block rows and passages stay in the dataset."""

    def __init__(self, uri):
        lance, _ = _lance()
        self.uri = normalize_uri(uri)
        self.manifest = read_manifest(self.uri)
        opts, v = storage_options(), self.manifest["versions"]
        self.datasets = {name: lance.dataset(table_uri(self.uri, name), version=v[name], storage_options=opts)
                         for name in TABLES}
        offsets = self.datasets["documents"].to_table(columns=["start", "end", "first", "row"])
        self.starts, self.ends, self.firsts, self.rows = (offsets[c].to_numpy() for c in ("start", "end", "first", "row"))
        self.layout = self.manifest["layout"]
        self.block_size = int(self.layout["block_size"])
        self.blocks = int(self.ends[-1] - 1) // self.block_size + 1 if len(self.ends) else 0

    def check(self, model) -> None:
        """Refuse (MemoryFileError) a store of another model, memory config or layout. The dtype
        the rows are stored in may differ from the model's `memory_dtype`: fetched blocks keep the
        store's dtype and are dequantised when read (building into a store checks it too)."""
        layout = {**layout_of(model), "dtype": self.layout.get("dtype")}
        check_compatible(self.manifest, persistence.memory_fingerprint(model), layout, self.uri)

    @property
    def sink_ids(self) -> torch.Tensor | None:
        s = self.manifest["sink_ids"]
        return torch.tensor([s], dtype=torch.long) if s else None

    def documents(self) -> StoreDocuments:
        return StoreDocuments(self.datasets["documents"], self.starts, self.ends)

    def passages(self, embedder):
        """The passage index question reads rank: a FAISS `PassageIndex` over the embeddings up to
        FAISS_MAX_PASSAGES passages, else a LanceDB search (`StorePassages`); None without passages.
        embedder: a callable giving the model's sentence embedder."""
        n = self.datasets["passages"].count_rows()
        if n == 0:
            return None
        if n <= FAISS_MAX_PASSAGES:
            from memformer.passages import PassageIndex
            t = self.datasets["passages"].to_table(columns=["start", "end", "vector"])
            emb = torch.from_numpy(t["vector"].combine_chunks().flatten().to_numpy().reshape(n, -1).copy())
            return PassageIndex(list(zip(t["start"].to_pylist(), t["end"].to_pylist())), emb, None)
        import lancedb
        table = lancedb.connect(self.uri, storage_options=storage_options()).open_table("passages")
        table.checkout(self.manifest["versions"]["passages"])
        return StorePassages(table, int(self.manifest["passage_width"]), embedder,
                             indexed=self.manifest.get("passage_index_rows", 0) > 0)

    def block_rows(self, blocks) -> list[int]:
        """Row offsets in the blocks table of every piece of memory blocks `blocks` [n], in stream
        order: the pieces of block b belong to the documents whose stored range meets it."""
        bs, out = self.block_size, []
        for b in sorted(int(x) for x in blocks):
            lo, hi = b * bs, (b + 1) * bs
            d = int(np.searchsorted(self.ends, lo, side="right"))          # first document ending after lo
            while d < len(self.ends) and self.firsts[d] < hi:
                if self.firsts[d] < self.ends[d]:                            # it stores rows
                    out.append(int(self.rows[d] + b - self.firsts[d] // bs))
                d += 1
        return out

    def fetch_blocks(self, blocks, device="cpu") -> dict:
        """{layer: LayerMemory [1, Hkv, R, D]} holding only the rows of memory blocks `blocks`, at
        their stream positions and window slots: one `take` of their rows."""
        from memformer.index import LayerMemory
        rows = self.block_rows(blocks)
        lay = self.layout
        Hkv, D, dtype = int(lay["kv_heads"]), int(lay["head_dim"]), DTYPES[lay["dtype"]]
        t = self.datasets["blocks"].take(rows)
        starts, ends = t["start"].to_pylist(), t["end"].to_pylist()
        positions = torch.cat([torch.arange(a, b) for a, b in zip(starts, ends)])[None]           # [1, R]
        slots = torch.tensor([s for row in t["slots"].to_pylist() for s in row], dtype=torch.long)[None]
        n = [b - a for a, b in zip(starts, ends)]
        out = {}
        for i in lay["memory_layers"]:
            def rows_of(col, dt, tail):
                return torch.cat([bytes_tensor(x, dt, (Hkv, m, *tail)) for x, m in zip(t[col].to_pylist(), n)], dim=1)[None]
            state = {"index.keys": rows_of(f"k{i}", dtype, (D,)), "values": rows_of(f"v{i}", dtype, (D,)),
                     "index.valid": torch.ones(1, Hkv, positions.shape[1], dtype=torch.bool),
                     "positions": positions, "slots": slots}
            if lay["dtype"] == "int8":
                state["index.keys_scales"] = rows_of(f"ks{i}", torch.float32, ())
                state["values_scales"] = rows_of(f"vs{i}", torch.float32, ())
            mem = LayerMemory(1, Hkv, D, dtype=dtype, device=device)
            mem.load_state_dict({k: v.to(device) for k, v in state.items()})
            out[i] = mem
        return out


def attach_store(model, uri) -> StoreDocuments:
    """Attach the store at `uri` to `model` as its corpus memory (replacing an attached one): the
    manifest is checked first (another model or layout: MemoryFileError, the attached memory is
    kept); question reads then fetch the blocks they read."""
    store = CorpusStore(uri)
    store.check(model)
    docs = store.documents()
    passages = store.passages(lambda: model.questions.embedder)
    model.state.attach_corpus_store(store, docs, store.sink_ids, passages)
    return docs


def store_info(uri) -> dict:
    """What a store holds (from its manifest and the documents table)."""
    store = CorpusStore(uri)
    m, lay = store.manifest, store.layout
    info = {"path": store.uri, "format": "lance", "documents": m["documents"], "tokens_read": m["tokens"],
            "block_rows": m["block_rows"], "passages": m["passages"], "memory_layers": lay["memory_layers"],
            "block_size": lay["block_size"], "window": m["fingerprint"].get("window"), "dtype": lay["dtype"],
            "kv_heads": lay["kv_heads"], "head_dim": lay["head_dim"], "backbone": m["fingerprint"].get("backbone")}
    if "://" not in store.uri:
        info["bytes_on_disk"] = sum(f.stat().st_size for f in Path(store.uri).rglob("*") if f.is_file())
    docs = store.documents()
    info["first_documents"] = [docs[i].name for i in range(min(5, len(docs)))]
    return info
