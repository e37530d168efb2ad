"""Building a corpus memory into a Lance store (memformer/corpus_store.py), in this process or
sharded over the workers of a Ray cluster with Ray Data.

    build_store(model, "docs/", "corpus.lance")                                   # one process
    build_store(model, "docs/", "s3://bucket/corpus", ray_address="local", workers=2,
                model_factory=functools.partial(load_model, args))                # Ray

1. Plan (here): read and tokenize the documents the store does not hold yet, in the sorted order
   of `corpus.find_documents`, and give each its place in the one token stream: its range, its
   first stored position (the stream's first tokens are the sink, kept local and never stored)
   and its first row in the blocks table. Documents go into shards of about `shard_tokens`.
2. Each shard (a Ray Data actor per worker, each with its own copy of the frozen model, a GPU
   when the cluster has them): every document is memorized alone, where it sits in the stream,
   with the corpus's sink (`MemoryState.begin_shard`). No window crosses a document and writing
   reads no memory, so a document's rows depend on its tokens and the sink only: any sharding
   gives the rows of one process, bit for bit, when the processes run the model at the same
   torch thread count (a Ray worker runs one thread per CPU it is given). At another count a
   CPU matrix product over few rows splits its sums differently, and the rows of a short
   document or of a document's short last window can differ by float rounding (an int8 value by
   one step). Its rows are cut into block pieces, its passages embedded (one document at a
   time, so batching cannot change them), and both written as uncommitted Lance fragments.
3. Commit (here), shard after shard in stream order as they finish: the fragments, the document
   rows and the manifest. A worker killed mid-shard is restarted by Ray and its shard run again;
   the files of the lost attempt are never committed, so nothing is lost or written twice. A
   build stopped at any point keeps every committed shard; running it again continues, and
   documents added to the folder later are appended, nothing rebuilt.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import pickle
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from memformer import corpus_store, persistence
from memformer.corpus import find_documents
from memformer.documents import read_document
from memformer.fileio import hold_dir_lock, release_dir_lock, write_error

SHARD_TOKENS = 32_768     # tokens per shard: a retry redoes at most this; ~85 MB of int8 rows in RAM


@dataclass
class PlannedDocument:
    """A document's place in the store: stream range [start, end) (EOS included), first stored
    position, first row in the blocks table, and its token ids (int32 [end - start])."""
    doc: int
    name: str
    sha256: str
    start: int
    end: int
    first: int
    row: int
    text: str
    ids: np.ndarray

    def pieces(self, block_size: int) -> int:
        """Block rows of this document: one per memory block its stored positions meet."""
        return (self.end - 1) // block_size - self.first // block_size + 1 if self.end > self.first else 0

    def row_dict(self) -> dict:
        return {"doc": self.doc, "name": self.name, "sha256": self.sha256, "start": self.start, "end": self.end,
                "first": self.first, "row": self.row, "text": self.text}


def plan_documents(model, root: Path, paths: list[Path], manifest: dict | None) -> tuple[list[PlannedDocument], list[int]]:
    """(the documents to add, the corpus's sink ids) after the store's `manifest` (None: a new
    store). The sink is the first `sink_tokens` tokens of the stream's first document."""
    tok = model.tokenizer
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    bs, S = model.memory_config.block_size, model.memory_config.sink_tokens
    doc, pos = (manifest["documents"], manifest["tokens"]) if manifest else (0, 0)
    row = manifest["block_rows"] if manifest else 0
    sink = list(manifest["sink_ids"]) if manifest else None
    out = []
    for path in paths:
        text = read_document(path)
        ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"] + [eos], dtype=np.int32)
        if sink is None:
            sink = ids[:min(S, len(ids))].tolist()
        first = pos + (len(sink) if pos == 0 else 0)
        d = PlannedDocument(doc, path.relative_to(root).as_posix(), hashlib.sha256(text.encode()).hexdigest(),
                            pos, pos + len(ids), min(first, pos + len(ids)), row, text, ids)
        out.append(d)
        doc, pos, row = doc + 1, d.end, row + d.pieces(bs)
    return out, sink or []


def shards_of(docs: list[PlannedDocument], shard_tokens: int) -> list[list[PlannedDocument]]:
    """Consecutive documents in groups of about `shard_tokens` tokens (a longer document alone)."""
    shards, cur, n = [], [], 0
    for d in docs:
        if cur and n + (d.end - d.start) > shard_tokens:
            shards.append(cur)
            cur, n = [], 0
        cur.append(d)
        n += d.end - d.start
    return shards + ([cur] if cur else [])


def cut_pieces(mems: dict, doc: int, first: int, end: int, row0: int, block_size: int) -> list[dict]:
    """The block pieces of one document whose stored positions [first, end) are rows row0.. of
    the LayerMemories `mems` {layer: [1, Hkv, M, D]}: dicts for `corpus_store.block_table`."""
    m0 = next(iter(mems.values()))
    pieces = []
    for b in range(first // block_size, (end - 1) // block_size + 1) if end > first else ():
        a, e = row0 + max(first, b * block_size) - first, row0 + min(end, (b + 1) * block_size) - first
        layers = {i: (m.keys[0, :, a:e], m.values[0, :, a:e],
                      None if m.key_scales is None else m.key_scales[0, :, a:e],
                      None if m.value_scales is None else m.value_scales[0, :, a:e]) for i, m in mems.items()}
        pieces.append({"doc": doc, "block": b, "start": first + a - row0, "end": first + e - row0,
                       "slots": m0.slots[0, a:e].int(), "layers": layers})
    return pieces


def document_rows(model, d: PlannedDocument, sink: list[int]) -> tuple[list[dict], list, torch.Tensor | None]:
    """Memorize document `d` alone where it sits in the stream; returns (its block pieces for
    `corpus_store.block_table`, its passage ranges, their embeddings [C, E] or None)."""
    from memformer.passages import chunk_ranges, encode_texts
    state, bs = model.state, model.memory_config.block_size
    state.begin_shard(d.start, torch.tensor([sink]) if d.start > 0 and sink else None)
    model.memorize(torch.from_numpy(d.ids.astype(np.int64))[None], show_progress=False)
    pieces = []
    if d.end > d.first:
        positions = next(iter(state.memories.values())).positions[0]
        if positions[0].item() != d.first or len(positions) != d.end - d.first:   # the plan is the model's
            raise RuntimeError(f"{d.name}: stored positions {positions[0].item()}.. ({len(positions)}) differ from "
                               f"the plan {d.first}..{d.end}")
        pieces = cut_pieces(state.memories, d.doc, d.first, d.end, 0, bs)
    state.clear()
    ranges = chunk_ranges([(d.start, d.end - 1)]) if d.end - 1 > d.start else []
    emb = None
    if ranges:
        ids = d.ids.tolist()
        texts = [model.tokenizer.decode(ids[a - d.start:b - d.start]) for a, b in ranges]
        emb = encode_texts(model.questions.embedder, texts, batch_size=32)
    return pieces, ranges, emb


def run_shard(model, docs: list[PlannedDocument], sink: list[int], uri: str, layout: dict) -> dict:
    """Memorize a shard's documents and write their block and passage rows as uncommitted
    fragments of the store at `uri`; returns what `StoreWriter.commit` needs (JSON-able)."""
    pieces, p_docs, p_ranges, p_emb = [], [], [], []
    with torch.no_grad():
        for d in docs:
            rows, ranges, emb = document_rows(model, d, sink)
            pieces += rows
            if emb is not None:
                p_docs += [d.doc] * len(ranges)
                p_ranges += ranges
                p_emb.append(emb)
    blocks = corpus_store.write_fragments(uri, "blocks", corpus_store.block_table(pieces, layout))
    passages = (corpus_store.write_fragments(uri, "passages", corpus_store.passage_table(p_docs, p_ranges, torch.cat(p_emb)))
                if p_emb else [])
    return {"first_doc": docs[0].doc, "docs": len(docs), "tokens": docs[-1].end - docs[0].start,
            "blocks": blocks, "passages": passages, "block_rows": len(pieces), "n_passages": len(p_ranges)}


def passage_width(model) -> int:
    from memformer.passages import embedding_width, encode_texts
    emb = model.questions.embedder
    return embedding_width(emb) or encode_texts(emb, ["width"]).shape[1]


def build_store(model, docs_dir, uri, *, ray_address: str | None = None, workers: int | None = None,
                model_factory=None, shard_tokens: int = SHARD_TOKENS, show_progress: bool = True) -> dict:
    """Read every document under `docs_dir` that the store at `uri` does not hold yet into it
    (creating it). ray_address None: in this process; "local": a Ray cluster started on this
    machine (`workers` CPUs, default all) or the one this process already joined; else the
    address of a running cluster. model_factory: a picklable callable giving the same model in
    every worker (Ray only; its fingerprint is checked there). Returns the store's manifest.

    Raises ConnectionError (unreachable Ray address), WriteError (a URI that cannot be written),
    MemoryFileError (a store of another model or layout; nothing is written), ValueError (a
    document changed since the store read it)."""
    if ray_address is not None and model_factory is None:
        raise ValueError("a Ray build needs model_factory, a picklable callable that builds the model in a worker")
    if ray_address not in (None, "local"):
        check_reachable(ray_address)
    uri = corpus_store.normalize_uri(uri)
    fingerprint, layout = persistence.memory_fingerprint(model), corpus_store.layout_of(model)
    width = passage_width(model)
    try:
        manifest = corpus_store.read_manifest(uri)
        corpus_store.check_compatible(manifest, fingerprint, layout, uri, width)
    except FileNotFoundError:
        manifest = None
    root = Path(docs_dir)
    paths = find_documents(root)
    if manifest:
        paths = new_documents(uri, root, paths)
    docs, sink = plan_documents(model, root, paths, manifest)
    # a second build of a local store stops at once (BusyError); on object storage the commit checks
    lock = lock_store(uri)
    try:
        writer = corpus_store.StoreWriter(uri, fingerprint, layout, width, sink)   # refuses an unwritable URI
    except BaseException:
        release_dir_lock(lock)
        raise
    shards = shards_of(docs, shard_tokens)
    results = (ray_results(shards, sink, uri, layout, fingerprint, ray_address, workers, model_factory)
               if ray_address is not None and shards else (run_shard(model, s, sink, uri, layout) for s in shards))
    try:
        commit_in_order(writer, docs, results, show_progress)
        writer.index_passages()
    finally:
        release_dir_lock(lock)
        model.state.clear()
    return writer.manifest


def lock_store(uri: str):
    """The exclusive lock of a local store's folder (`fileio.hold_dir_lock`), None on object storage."""
    if "://" in uri:
        return None
    try:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(uri, e) from None
    return hold_dir_lock(uri)


def commit_in_order(writer, docs: list[PlannedDocument], results, show_progress: bool) -> None:
    """Commit each shard's result (`run_shard`), as they come in stream order, showing documents
    and tokens done across the cluster."""
    by_doc = {d.doc: d for d in docs}
    total = sum(d.end - d.start for d in docs)
    done = 0
    with tqdm(total=len(docs), desc="corpus", unit="doc", disable=not show_progress) as bar:
        for res in results:
            rows = [by_doc[res["first_doc"] + k].row_dict() for k in range(res["docs"])]
            writer.commit(res["blocks"], res["passages"], rows, res["block_rows"], res["n_passages"])
            done += res["tokens"]
            bar.update(res["docs"])
            bar.set_postfix(tokens=f"{done:,}/{total:,}")


def new_documents(uri: str, root: Path, paths: list[Path]) -> list[Path]:
    """The documents under `root` the store does not hold (by name), in order; ValueError when
    one it holds has changed (a store only grows: rebuild into another URI)."""
    import lance
    held = lance.dataset(corpus_store.table_uri(uri, "documents"),
                         version=corpus_store.read_manifest(uri)["versions"]["documents"],
                         storage_options=corpus_store.storage_options()).to_table(columns=["name", "sha256"])
    sha = dict(zip(held["name"].to_pylist(), held["sha256"].to_pylist()))
    out = []
    for p in paths:
        name = p.relative_to(root).as_posix()
        if name not in sha:
            out.append(p)
        elif hashlib.sha256(read_document(p).encode()).hexdigest() != sha[name]:
            raise ValueError(f"{name} changed since {uri} read it; a store only appends documents: build into "
                             f"another --out")
    return out


# ---------------------------------------------------------------- conversion
def convert_directory(old, uri, *, block_size: int = 64, shard_tokens: int = SHARD_TOKENS,
                      show_progress: bool = True) -> dict:
    """Write the corpus memory directory `old` (`corpus.build_corpus`) as a Lance store at `uri`,
    with the blocks of `block_size` the reading model uses: the same rows, passages, sink and
    fingerprint. One way: the directory is only read. Returns the store's manifest."""
    from safetensors.torch import load_file
    from memformer.corpus import read_corpus_table
    from memformer.fileio import dir_lock, recover_for_reading
    from memformer.index import LayerMemory
    from memformer.index.base import sha256_file
    old = Path(old)
    recover_for_reading(old)
    with dir_lock(old, shared=True):
        table = read_corpus_table(old)
        manifest = persistence.read_manifest(old)
        if sha256_file(old / "memory.safetensors") != manifest["sha256"]:
            raise persistence.MemoryFileError(f"{old / 'memory.safetensors'} is corrupt or truncated (checksum mismatch)")
        tensors = load_file(str(old / "memory.safetensors"))
    fp = manifest["fingerprint"]
    layout = {"memory_layers": fp["memory_layers"], "block_size": block_size, "kv_heads": manifest["kv_heads"],
              "head_dim": manifest["head_dim"], "dtype": manifest["dtype"]}
    mems = {i: LayerMemory(1, manifest["kv_heads"], manifest["head_dim"], dtype=corpus_store.DTYPES[manifest["dtype"]])
            for i in fp["memory_layers"]}
    persistence.fill_layer_memories(mems, tensors, old / "memory.safetensors")
    positions = next(iter(mems.values())).positions[0]
    if len(positions) and not torch.equal(positions, torch.arange(int(positions[0]), int(positions[0]) + len(positions))):
        raise persistence.MemoryFileError(f"{old}: the rows are not one contiguous stream (evicted rows?)")
    sink = tensors["sink_ids"][0].tolist() if "sink_ids" in tensors else []
    docs, row = [], 0
    for n, d in enumerate(table):
        first = min(d.start + (len(sink) if d.start == 0 else 0), d.end)
        docs.append(PlannedDocument(n, d.name, d.sha256, d.start, d.end, first, row, d.text, np.zeros(0, np.int32)))
        row += docs[-1].pieces(block_size)
    ranges = tensors["passage_ranges"].tolist() if "passage_ranges" in tensors else []
    emb = tensors.get("passage_embeddings")
    if emb is None:                                 # a store is read by question reads alone
        raise persistence.MemoryFileError(f"{old} holds no passages (built before corpus memories kept them); "
                                          f"build the documents again with `memformer memory build`")
    width = emb.shape[1]
    starts = [d.start for d in docs]
    if "://" in str(uri) or Path(uri).exists():
        try:
            corpus_store.read_manifest(uri)
            raise ValueError(f"{uri} already holds a corpus memory; convert into a new URI")
        except FileNotFoundError:
            pass
    lock = lock_store(corpus_store.normalize_uri(uri))
    try:
        writer = corpus_store.StoreWriter(uri, fp, layout, width, sink)
    except BaseException:
        release_dir_lock(lock)
        raise
    row0 = int(positions[0]) if len(positions) else 0

    def results():
        for shard in shards_of(docs, shard_tokens):
            pieces = [p for d in shard for p in cut_pieces(mems, d.doc, d.first, d.end, d.first - row0, block_size)]
            lo, hi = shard[0].start, shard[-1].end
            sel = [c for c, (a, _) in enumerate(ranges) if lo <= a < hi]
            p_docs = [bisect.bisect_right(starts, ranges[c][0]) - 1 for c in sel]
            frags = (corpus_store.write_fragments(writer.uri, "passages", corpus_store.passage_table(
                p_docs, [tuple(ranges[c]) for c in sel], emb[sel])) if sel else [])
            yield {"first_doc": shard[0].doc, "docs": len(shard), "tokens": hi - lo,
                   "blocks": corpus_store.write_fragments(writer.uri, "blocks", corpus_store.block_table(pieces, layout)),
                   "passages": frags, "block_rows": len(pieces), "n_passages": len(sel)}
    try:
        commit_in_order(writer, docs, results(), show_progress)
    finally:
        release_dir_lock(lock)
    return writer.manifest


# ---------------------------------------------------------------- Ray
def check_reachable(address: str, timeout: float = 5.0) -> None:
    """ConnectionError naming `address` (host:port or ray://host:port) when nothing answers there;
    "auto" (the cluster `ray start` left on this machine) is left to Ray."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise ConnectionError(f"cannot reach the Ray cluster at {address!r} ({e}); start one with "
                              f"`ray start --head`, or leave out the address to start a local one") from None


class ShardWorker:
    """A Ray Data actor: builds the model once (`factory`), refuses one whose fingerprint differs
    from the driver's, and runs each shard it is given (`run_shard`)."""

    def __init__(self, factory, fingerprint: dict, layout: dict, uri: str, sink: list[int]):
        import ray
        cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1) or 1)
        torch.set_num_threads(max(1, cpus))
        self.model = factory()
        if torch.cuda.is_available():
            self.model.to("cuda")
        got = persistence.memory_fingerprint(self.model)
        if got != fingerprint or corpus_store.layout_of(self.model) != layout:
            raise persistence.MemoryFileError(f"a Ray worker built another model than the driver's "
                                              f"(fingerprint {got} vs {fingerprint})")
        self.uri, self.layout, self.sink = uri, layout, sink

    def __call__(self, batch: dict) -> dict:
        out = []
        for payload in batch["payload"]:
            docs = pickle.loads(payload)         # written by this job's driver (ray_results)
            out.append(json.dumps(run_shard(self.model, docs, self.sink, self.uri, self.layout)))
        return {"result": out}


def ray_results(shards, sink, uri, layout, fingerprint, address, workers, factory):
    """Run the shards on a Ray cluster (Ray Data, one actor per worker); yields their results in
    stream order as they finish."""
    try:
        import ray
    except ImportError as e:
        raise corpus_store.needs_scale_extra(e) from None
    started = not ray.is_initialized()
    if started:
        if address == "local":
            ray.init(num_cpus=workers or os.cpu_count(), include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        workers = workers or (gpus or int(ray.cluster_resources().get("CPU", 1)))
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True   # results come back in stream order
        ctx.enable_progress_bars = False              # the driver shows documents and tokens instead
        items = [{"payload": pickle.dumps(s)} for s in shards]
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        out = ds.map_batches(ShardWorker, batch_size=1, concurrency=workers,
                             fn_constructor_kwargs=dict(factory=factory, fingerprint=fingerprint, layout=layout,
                                                        uri=uri, sink=sink), **resources)
        for row in out.iter_rows():
            yield json.loads(row["result"])
    finally:
        if started:
            ray.shutdown()
