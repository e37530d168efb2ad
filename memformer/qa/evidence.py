"""Evidence spans: which passages of the documents the memory layers read while answering.

`MemformerForCausalLM.generate(..., record=True)` keeps, per memory layer and forward call, the
retrieved row ids and the attention probability each row received (one softmax over local +
memory keys, so a row's probability is its true share of that head's attention). Rows carry
their stream position (`LayerMemory.positions`), so summing probabilities per position gives the
attention mass each memorized token received. The last query of each call predicts a generated
token ("answer" mass); the prefill's other queries read the prompt ("prompt" mass). Evidence
ranks tokens by how much more the answer attended to them than the prompt did (`lift`), groups
the heaviest into spans, widens them to sentence/line boundaries and maps them to characters of
their document (`Corpus.locate`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class EvidenceSpan:
    """A passage of one document.

    score: memory mode — the share of the answer's memory attention lift (`RetrievalMass.lift`,
    over layers, heads and answer tokens) inside the span; RAG — the passage's cosine similarity.
    """
    document: str           # document name
    doc_index: int          # index in the corpus
    start: int              # [start, end) character offsets in that document's text
    end: int
    text: str
    score: float
    token_start: int        # [token_start, token_end) stream positions
    token_end: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RetrievalMass:
    """Attention mass per stream token, averaged per (layer, head, query) softmax.

    answer: [N] over the queries that predicted a generated token (the last query of each call).
    prompt: [N] over the prompt's other queries (the prefill reading the local context).
    """
    answer: torch.Tensor
    prompt: torch.Tensor

    @property
    def memory_share(self) -> float:
        """Mean fraction of an answer query's attention that went to memory at all."""
        return float(self.answer.sum())

    @property
    def lift(self) -> torch.Tensor:
        """[N] mass the answer paid a token beyond what the prompt's queries paid it.

        Some memory rows draw attention from every query (punctuation, section starts: secondary
        sinks); they dominate `answer` whatever the question. Measured on SmolLM2 (8 facts planted
        in 8k tokens of Python's docs; git tag results-archive-2026-12-04, benchmarks/results/
        qa_evidence.md): the top-1 span was the planted fact for 7 of 8 answers ranked by `lift`,
        3 of 8 ranked by `answer`."""
        return (self.answer - self.prompt).clamp(min=0)


def retrieval_mass(model, n_tokens: int, *, batch_index: int = 0, retrieved: dict | None = None,
                   memories: dict | None = None) -> RetrievalMass:
    """Attention mass per memorized stream token from the reads the memory layers recorded
    (`model.recorded_reads()`, by `generate(..., record=True)` / `ask(record=True)`; the first
    recorded call is the prefill).

    n_tokens: length of the stream whose positions memory holds (memory positions must be < it).
    The probability of every retrieved row is added at the row's stream position, summed over
    memory layers and query heads, and divided by the number of softmaxes that contributed.
    retrieved / memories: the recording and the memories it indexes (default: the sequence's own,
    `model.recorded_reads()` / `model.memories`; an attached corpus: `model.recorded_reads(corpus=True)`
    / its layers' `corpus`, for a batch of one).
    """
    retrieved = model.recorded_reads() if retrieved is None else retrieved
    memories = model.memories if memories is None else memories
    answer, prompt = torch.zeros(n_tokens), torch.zeros(n_tokens)
    n_answer = n_prompt = 0
    for layer, calls in retrieved.items():
        positions = memories[layer].positions[batch_index].cpu()           # [M] stream position of each row
        if len(positions) and int(positions.max()) >= n_tokens:
            raise ValueError(f"memory holds stream position {int(positions.max())}, beyond the "
                             f"{n_tokens} tokens given: the memory was built from another stream")
        for c, (ids, probs) in enumerate(calls):                           # each [B, Hq, T, K]
            ids, probs = ids[batch_index].cpu(), probs[batch_index].float().cpu()   # [Hq, T, K]
            _add(answer, positions, ids[:, -1], probs[:, -1])
            n_answer += ids.shape[0]
            if c == 0 and ids.shape[1] > 1:                                # the prefill's other queries
                _add(prompt, positions, ids[:, :-1], probs[:, :-1])
                n_prompt += ids.shape[0] * (ids.shape[1] - 1)
    return RetrievalMass(answer / max(n_answer, 1), prompt / max(n_prompt, 1))


def _add(mass: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor) -> None:
    hit = ids >= 0                                                         # -1 = no neighbour
    mass.index_add_(0, positions[ids[hit]], probs[hit])


def _snap(text: str, start: int, end: int, reach: int) -> tuple[int, int]:
    """Widen [start, end) to the enclosing sentence or line, looking at most `reach` chars out."""
    left = text[max(0, start - reach):start]
    cut = max(left.rfind("\n"), left.rfind(". "))
    if cut >= 0:
        start = start - len(left) + cut + (1 if left[cut] == "\n" else 2)
    right = text[end:end + reach]
    stops = [i for i in (right.find("\n"), right.find(". ")) if i >= 0]
    if stops:
        end += min(stops) + (0 if right[min(stops)] == "\n" else 1)
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _clusters(corpus, seeds: torch.Tensor, merge_gap: int) -> list[tuple[int, int]]:
    """Sorted seed positions -> [first, last] groups: same document, gaps <= merge_gap tokens."""
    groups: list[list[int]] = []
    for p in seeds.tolist():
        d = int(corpus.doc_index[p])
        if d < 0:
            continue                                                    # a separator token
        if groups and d == int(corpus.doc_index[groups[-1][1]]) and p - groups[-1][1] <= merge_gap:
            groups[-1][1] = p
        else:
            groups.append([p, p])
    return [(a, b) for a, b in groups]


def spans_from_mass(corpus, mass: torch.Tensor, *, top: int = 3, seeds: int = 32, merge_gap: int = 16,
                    reach: int = 160) -> list[EvidenceSpan]:
    """The `top` passages holding the most attention mass, best first.

    mass: [N] per stream token (`retrieval_mass(...).lift`). The `seeds` heaviest tokens are grouped
    (same document, at most `merge_gap` tokens apart); a group's score is the mass of every token
    between its ends over the total mass. Each group is widened to its sentence/line (up to
    `reach` characters each side); groups whose widened spans overlap are merged.
    """
    if mass.dim() != 1 or len(mass) != len(corpus):
        raise ValueError(f"mass must be [{len(corpus)}] (one value per corpus token), got {tuple(mass.shape)}")
    total = float(mass.sum())
    if top < 1 or total <= 0:
        return []
    heavy = mass.topk(min(seeds, len(mass))).indices
    heavy = heavy[mass[heavy] > 0].sort().values
    found: list[EvidenceSpan] = []
    for a, b in _clusters(corpus, heavy, merge_gap):
        d, c0, c1 = corpus.locate(a, b + 1)
        text = corpus.documents[d].text
        c0, c1 = _snap(text, c0, c1, reach)
        score = float(mass[a:b + 1].sum()) / total
        prev = found[-1] if found else None
        if prev is not None and prev.doc_index == d and c0 < prev.end:     # widened into the previous one
            prev.end, prev.token_end = max(prev.end, c1), b + 1
            prev.score = float(mass[prev.token_start:b + 1].sum()) / total
            prev.text = text[prev.start:prev.end]
            continue
        found.append(EvidenceSpan(corpus.documents[d].name, d, c0, c1, text[c0:c1], score, a, b + 1))
    return sorted(found, key=lambda s: -s.score)[:top]


def answer_evidence(model, corpus, top: int = 3) -> tuple[list[EvidenceSpan], float]:
    """Evidence of the answer just generated with `record=True` (`model.ask`): its `top` spans and
    the share of attention that went to memory; the recording is dropped afterwards (it is large)."""
    mass = retrieval_mass(model, len(corpus))
    model.clear_recorded_reads()
    # lift (what the answer read beyond the prompt) discounts rows every query reads; when no row
    # drew more (question reads: every query reads the same few blocks), the answer's own mass
    lift = mass.lift
    return spans_from_mass(corpus, lift if float(lift.sum()) > 0 else mass.answer, top=top), mass.memory_share
