"""Corpus memories: the key/value states of a whole document collection, computed once, kept on
disk, and attached read-only beside any sequence's own memory.

    memformer memory build --docs DIR --out MEM      # once (resumable)
    model.attach_corpus("MEM")                        # every memory layer now also searches MEM
    model.ask("...");  model.corpus_evidence()        # which documents the answer drew on

`memformer memory build` writes a Lance store (memformer/corpus_store.py, built by
memformer/corpus_build.py, in one process or on a Ray cluster); this module keeps the memory
directory: `build_corpus` writes one, `attach_corpus` and `corpus_info` read both kinds, and
`memformer memory convert` turns a directory into a store (one way).

A corpus memory directory is a memory directory (`memory.safetensors` + `manifest.json`, see
persistence.py) with one more file in the same atomic write, `corpus.json`: the documents in
reading order with their token range in the memory stream, sha256 and text (for evidence
snippets). Documents are read one after another as one stream; no window crosses a document
boundary (the overlap context is reset per document) and an EOS token ends each document.

The memory file also holds the corpus's passages (`passage_ranges` [C, 2] in stream positions,
`passage_embeddings` [C, E], embedded by the model's sentence embedder as the build goes), so a
question over an attached corpus is answered by question reads, as over a memorized document:
the passages nearest to it pick the corpus blocks every memory layer reads
(`MemformerForCausalLM.question_read`).

The model's memory state changes only through `model.state` (`memformer.memory_state`): a build
memorizes document after document, and attaching puts the corpus beside the own memory there.
"""
from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from memformer import persistence
from memformer.fileio import dir_lock, read_json, recover_for_reading
from memformer.documents import DOC_SUFFIXES, read_document
from memformer.memory_state import saved_passages

CORPUS_FILE = "corpus.json"
CORPUS_FORMAT = "memformer-corpus"


@dataclass
class CorpusDocument:
    name: str            # path relative to the corpus directory
    sha256: str          # of the text read
    start: int           # first token position in the memory stream
    end: int             # one past the last (EOS included)
    text: str


def find_documents(docs_dir) -> list[Path]:
    """Documents under `docs_dir` (recursively, sorted), by suffix."""
    root = Path(docs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory of documents")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DOC_SUFFIXES)
    if not paths:
        raise ValueError(f"{root}: no documents ({', '.join(sorted(DOC_SUFFIXES))}) found")
    return paths


def read_corpus_table(path) -> list[CorpusDocument]:
    f = Path(path) / CORPUS_FILE
    if not f.is_file():
        raise persistence.MemoryFileError(f"{path} is a memory but not a corpus memory (no {CORPUS_FILE})")
    data = read_json(f, error=persistence.MemoryFileError, format=CORPUS_FORMAT)
    rows = data.get("documents")
    if not isinstance(rows, list):
        raise persistence.MemoryFileError(f"{f} is corrupt: 'documents' must be a list")
    docs, end = [], 0
    for n, d in enumerate(rows):
        ok = isinstance(d, dict) and set(d) == _TABLE_FIELDS and all(isinstance(d[k], str) for k in ("name", "sha256", "text")) \
            and all(isinstance(d[k], int) and not isinstance(d[k], bool) for k in ("start", "end"))
        if not ok or d["start"] != end or d["end"] <= d["start"]:   # contiguous, in reading order
            raise persistence.MemoryFileError(f"{f} is corrupt: document {n} is not a document entry "
                                              f"({', '.join(sorted(_TABLE_FIELDS))}; contiguous token ranges)")
        docs.append(CorpusDocument(**d))
        end = d["end"]
    return docs


_TABLE_FIELDS = {"name", "sha256", "start", "end", "text"}


def _table_json(docs: list[CorpusDocument]) -> str:
    return json.dumps({"format": CORPUS_FORMAT, "documents": [asdict(d) for d in docs]})


# A save rewrites the whole memory: between two saves the memory grows by at least this share of
# what was saved last, so the bytes written over a build stay under (1 + 1/share) times the final
# size (5x for a quarter) instead of growing with the square of the corpus; a kill loses at most
# that share of the work.
SAVE_GROWTH = 0.25


def build_corpus(model, docs_dir, out, *, save_every: int = 10, show_progress: bool = True) -> list[CorpusDocument]:
    """Read every document under `docs_dir` into one memory saved at `out`.

    Resumable: the memory and the table of finished documents are saved together (atomically)
    after every `save_every` documents once the memory has grown by `SAVE_GROWTH` since the last
    save, on Ctrl-C and at the end; running again with the same `out` loads them and continues
    with the next document. Returns the document table.
    """
    if not isinstance(save_every, int) or save_every < 1:
        raise ValueError(f"save_every must be an integer >= 1, got {save_every!r}")
    root, out = Path(docs_dir), Path(out)
    paths = find_documents(root)
    done: list[CorpusDocument] = []
    model.reset_memory()
    recover_for_reading(out)                    # a save killed between its two renames
    if (out / "manifest.json").is_file():
        with dir_lock(out, shared=True):        # the table and the memory of one save
            done = read_corpus_table(out)
            model.load_memory(out)              # refuses another model's / config's memory
        names = [p.relative_to(root).as_posix() for p in paths]
        if [d.name for d in done] != names[:len(done)]:
            raise ValueError(f"{out} was built from other documents than {root}; use another --out")
    tok = model.tokenizer
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    todo = paths[len(done):]

    saved = {"docs": len(done), "tokens": done[-1].end if done else 0}
    # passages of the documents read so far (a memory saved before passages existed has none)
    old = model.state.passages if done else None
    passages = {"ranges": list(old.ranges) if old is not None else [],
                "embeddings": [old.embeddings] if old is not None else [], "docs": len(done) if old is not None else 0}

    def save():
        if done and len(done) > saved["docs"]:
            model.state.set_passages(embed_passages(model, done, passages))
            persistence.save_memory(model, out, extra_files={CORPUS_FILE: _table_json(done)})
            saved.update(docs=len(done), tokens=done[-1].end)

    try:
        for path in tqdm(todo, desc="corpus", unit="doc", disable=not show_progress):
            text = read_document(path)
            ids = tok(text, add_special_tokens=False)["input_ids"] + [eos]
            model.state.break_context()         # no overlap context from the previous document
            start = model.state.seen[0] if model.state.seen else 0
            model.memorize(torch.tensor([ids]), show_progress=False)
            done.append(CorpusDocument(path.relative_to(root).as_posix(),
                                       hashlib.sha256(text.encode()).hexdigest(), start, start + len(ids), text))
            if len(done) - saved["docs"] >= save_every and done[-1].end - saved["tokens"] >= SAVE_GROWTH * saved["tokens"]:
                save()
    except KeyboardInterrupt:
        save()
        raise
    save()
    return done


def embed_passages(model, docs: list[CorpusDocument], passages: dict):
    """The corpus's `PassageIndex`, after embedding the passages of `docs[passages["docs"]:]` (the
    documents not embedded yet) with the model's sentence embedder; `passages` accumulates
    {"ranges": [(start, end)], "embeddings": [[c, E] tensors], "docs": documents embedded}.
    Passages are cut from the token stream per document (its EOS left out), as
    `PassageIndex.from_stream` cuts a memorized document."""
    from memformer.passages import PassageIndex, chunk_ranges, encode_texts
    embedder = model.questions.embedder
    new = chunk_ranges([(d.start, d.end - 1) for d in docs[passages["docs"]:] if d.end - 1 > d.start])
    if new:
        stream = model.state.stream[0]
        emb = encode_texts(embedder, [model.tokenizer.decode(stream[a:b]) for a, b in new], batch_size=32)
        if passages["embeddings"] and emb.shape[1] != passages["embeddings"][0].shape[1]:
            raise ValueError(f"the corpus's passages were embedded {passages['embeddings'][0].shape[1]}-wide, "
                             f"this embedder gives {emb.shape[1]}; build with the same sentence embedder")
        passages["ranges"] += new
        passages["embeddings"].append(emb)
    passages["docs"] = len(docs)
    if not passages["ranges"]:
        return None
    return PassageIndex(passages["ranges"], torch.cat(passages["embeddings"]), embedder)


def corpus_info(path) -> dict:
    """What a corpus memory holds (from its manifest and table; tensors are not loaded)."""
    from memformer import corpus_store
    if corpus_store.is_store(path):
        return corpus_store.store_info(path)
    path = Path(path)
    recover_for_reading(path)
    with dir_lock(path, shared=True):
        manifest = persistence.read_manifest(path)
        docs = read_corpus_table(path)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return {"path": str(path), "documents": len(docs), "tokens_read": int(sum(manifest["seen"])),
            "tokens_in_memory": manifest["tokens"], "memory_layers": manifest["fingerprint"]["memory_layers"],
            "window": manifest["fingerprint"]["window"], "dtype": manifest["dtype"],
            "kv_heads": manifest["kv_heads"], "head_dim": manifest["head_dim"], "bytes_on_disk": size,
            "backbone": manifest["fingerprint"]["backbone"],
            "first_documents": [d.name for d in docs[:5]]}


def attach_corpus(model, path) -> list[CorpusDocument]:
    """Attach the corpus memory at `path` read-only to every memory layer of `model` (replacing an
    attached one). It must come from the same backbone and memory config; the model's own memory
    is untouched. A Lance store (a folder or object-storage URI, `memformer.corpus_store`) is
    opened, not loaded: question reads fetch the blocks they read."""
    from memformer import corpus_store
    if corpus_store.is_store(path):
        return corpus_store.attach_store(model, path)
    path = Path(path)
    recover_for_reading(path)
    with dir_lock(path, shared=True):            # the table and the tensors of one save
        docs = read_corpus_table(path)
        manifest, tensors = persistence.read_memory(model, path)
    if int(manifest["batch"]) != 1:
        raise persistence.MemoryFileError(f"{path}: a corpus memory holds one stream, this one {manifest['batch']}")
    state = model.state
    layers = {i: state.new_layer_memory(1, bounded=False) for i in model.memory_layer_ids}   # no capacity
    persistence.fill_layer_memories(layers, tensors, path / "memory.safetensors")
    # question reads over the corpus, when it was built with passages (embedder attached at search)
    state.attach_corpus(layers, docs, tensors.get("sink_ids"), saved_passages(tensors))
    return docs


def corpus_mass(model) -> dict[int, float]:
    """Attention mass per corpus token position, summed over layers, heads and generated steps of
    the last answer recorded (`ask(record=True)`: every read it answered from)."""
    pos_all, w_all = [], []
    for layer, records in model.recorded_reads(corpus=True).items():
        for j, (ids, probs) in enumerate(records):
            positions = model.state.corpus_positions(layer, j)                      # [M]
            ok = ids >= 0
            pos_all.append(positions.to(ids.device)[ids.clamp(min=0)][ok].cpu())
            w_all.append(probs.float()[ok].cpu())
    if not pos_all:
        return {}
    pos, inverse = torch.cat(pos_all).unique(return_inverse=True)                 # summed per position
    mass = torch.zeros(len(pos)).index_add_(0, inverse, torch.cat(w_all))
    return dict(zip(pos.tolist(), mass.tolist()))


def corpus_evidence(model, top: int = 3, context_tokens: int = 24) -> list[dict]:
    """The corpus documents the last recorded generation drew on, most attention mass first:
    [{"doc", "mass", "share", "position", "snippet"}] (`position` = the token, within the
    document, that received the most mass; `snippet` = the text around it)."""
    docs = model.state.corpus_documents
    if not docs:
        raise ValueError("no corpus memory attached (attach_corpus first)")
    starts = getattr(docs, "starts", None)          # a store's table has them without fetching text
    starts = [d.start for d in docs] if starts is None else starts.tolist()
    per_doc: dict[int, dict[int, float]] = {}
    for pos, m in corpus_mass(model).items():
        i = bisect.bisect_right(starts, pos) - 1
        if 0 <= i and pos < docs[i].end:
            per_doc.setdefault(i, {})[pos] = per_doc.get(i, {}).get(pos, 0.0) + m
    total = sum(sum(v.values()) for v in per_doc.values()) or 1.0
    ranked = sorted(per_doc.items(), key=lambda kv: -sum(kv[1].values()))[:top]
    out = []
    tok = model.tokenizer
    for i, positions in ranked:
        d = docs[i]
        peak = max(positions, key=positions.get)
        ids = tok(d.text, add_special_tokens=False)["input_ids"]
        at = peak - d.start
        snippet = tok.decode(ids[max(0, at - context_tokens):at + context_tokens])
        out.append({"doc": d.name, "mass": round(sum(positions.values()), 4),
                    "share": round(sum(positions.values()) / total, 4), "position": at,
                    "snippet": " ".join(snippet.split())})
    return out
