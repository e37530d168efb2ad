"""Retrieval-augmented generation baseline: the same backbone, no memory, retrieved passages.

The corpus is cut into passages of `chunk_tokens` backbone tokens (overlapping by `overlap`,
never crossing a document boundary), embedded once with a sentence-transformers model
(default all-MiniLM-L6-v2; the retriever question reads use too, `memformer.passages`), and
the question's nearest passages fill the same token budget the truncation baseline gives the
document tail. Passages are put back in document order before they go into the prompt.
"""
from __future__ import annotations

from memformer.passages import (INSTALL_HINT, Passage, PassageIndex, chunk_ranges, default_embedder,  # noqa: F401
                                encode_texts, load_embedder, sentence_ranges)


def _merge(passages: list[Passage]) -> list[Passage]:
    """Overlapping or touching passages -> one (best score kept), in stream order."""
    out: list[Passage] = []
    for p in sorted(passages, key=lambda p: p.start):
        if out and p.start <= out[-1].end:
            out[-1] = Passage(out[-1].start, max(out[-1].end, p.end), max(out[-1].score, p.score))
        else:
            out.append(p)
    return out


class RAGBaseline:
    """Passages of a `Corpus` embedded once; `retrieve(query, budget)` fills a token budget.

    embedder: anything with sentence-transformers' `encode(texts, convert_to_tensor=True,
    normalize_embeddings=True) -> [n, E]` (None = `default_embedder()`).
    sentences: rank passages by their sentences too (`MemoryConfig.sentence_ranking`); needs the
    `tokenizer` that cut the corpus.
    """

    def __init__(self, corpus, embedder=None, *, chunk_tokens: int = 128, overlap: int = 32,
                 batch_size: int = 32, show_progress: bool = False, sentences: bool = False, tokenizer=None):
        self.corpus = corpus
        self.embedder = embedder if embedder is not None else default_embedder()
        self.chunks = chunk_ranges([corpus.document_range(d) for d in range(len(corpus.documents))],
                                   chunk_tokens, overlap)
        texts = [self.passage_text(a, b) for a, b in self.chunks]
        self.passages = PassageIndex.from_texts(self.chunks, texts, self.embedder, batch_size, show_progress)
        if sentences:                            # rank by sentences too, as question reads do
            if tokenizer is None:
                raise ValueError("RAG with sentence ranking needs the tokenizer that cut the corpus")
            docs = [corpus.document_range(d) for d in range(len(corpus.documents))]
            self.passages.add_sentences(sentence_ranges(corpus.ids, docs, tokenizer), self.passage_text)

    def passage_text(self, start: int, end: int) -> str:
        d, c0, c1 = self.corpus.locate(start, end)
        return self.corpus.documents[d].text[c0:c1]

    def search(self, query: str) -> list[Passage]:
        """Every passage (chunk), most similar to `query` first."""
        return self.passages.search(query)

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
