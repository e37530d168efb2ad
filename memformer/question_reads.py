"""Question reads: the prompt `ask` generates after, and the memory blocks a question reads.

    reads = model.questions
    reads.prompt_ids("What is the pass key?")        # [1, T] ids, in the chat template
    reads.blocks_for("What is the pass key?")        # [n] block ids under the nearest passages
    reads.passages                                    # PassageIndex over the memorized text

A sentence embedder (default all-MiniLM-L6-v2, `memformer.passages`) ranks the passages of the
memorized text (embedded on first use, kept with a saved memory) and of an attached corpus memory
(embedded as it was built). The blocks under the best of them (`passages.question_blocks`) are
what every memory layer then reads (`MemformerForCausalLM.reading_blocks`).

When the prompt is known (`ask`), the memory layers check the ranking: the blocks of each of the
`CANDIDATES` best passages are read alone under the prompt, and a candidate's score is its
passage's cosine plus `PROMPT_WEIGHT` times the mean log-probability of the prompt's own tokens
under that read (`checked_reads`; `verified_blocks` gives the best). The read that holds the question's words (the key of a
needle among look-alikes, the name asked about) predicts them; the document's instruction line
or a passage that only paraphrases the question does not, whatever the embedder thought of it.
All candidates are read in one forward, a batch of K rows over the one memory
(`candidate_reads`); each read answered from is generated from its own row of that prompt cache
(`keep_row`; several reads' rows stacked into one batch, `stack_rows`, answer side by side in one
`generate`), so no answer runs its prompt again. Each other read within `ANSWER_MARGIN` of the best that stands out of the field
(`ANSWER_LIFT` above the median score) is answered from too (`answer_reads`): several passages
that each hold the question's words, one key's several values or several keys asked at once.
"""
from __future__ import annotations

import contextlib
import copy
import statistics

import torch

from memformer.config import MemoryConfig
from memformer.context_cache import make_context_cache
from memformer.memory_state import MemoryState
from memformer.passages import SEARCH_DEPTH, PassageIndex, question_blocks, with_embedder

CANDIDATES = 12         # passages a question read tries, each read alone (in one batched forward)
CANDIDATE_TOKENS = 1024 # prompt tokens of candidate reads per batched forward (bounds the logits kept)
PROMPT_WEIGHT = 1.0     # weight of the prompt's mean token log-probability (<= 0) beside the cosine
ANSWER_MARGIN = 0.5     # a read within this of the best check score is answered from too (MemoryConfig.answer_reads),
ANSWER_LIFT = 0.25      # if it also beats the candidates' median score by this much (it stands out of the field)


def chat_ids(tokenizer, question: str, system: str | None = None) -> torch.Tensor:
    """Token ids [1, T] of a question, in the tokenizer's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    else:
        text = (system + "\n" if system else "") + question
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def prompt_ids(tokenizer, question: str | None = None, *, cue: str | None = None,
               system: str | None = None) -> torch.Tensor:
    """[1, T] ids that `ask` generates after: the question in the chat template, or a cue (a
    sentence for the model to complete, "The code is") as plain text after a blank line."""
    if tokenizer is None:
        raise ValueError("ask() needs a tokenizer")
    if cue is not None and cue.strip():
        return torch.tensor([tokenizer("\n\n" + cue, add_special_tokens=False)["input_ids"]])
    if question is None or not question.strip():
        raise ValueError("ask: give a question or a cue")
    return chat_ids(tokenizer, question, system)


def read_query(question: str | None, cue: str | None) -> str | None:
    """What a question read ranks passages by: the cue when one is given, else the question."""
    return question if cue is None or not cue.strip() else cue


class QuestionReads:
    """The question reads of one model: its sentence embedder, the passages of its memory and of
    an attached corpus, and the blocks a question reads. state: the model's `MemoryState`
    (passages are kept there, so they are saved with the memory)."""

    def __init__(self, state: MemoryState, tokenizer, memory_config: MemoryConfig, embedder=None):
        self.state, self.tokenizer, self.memory_config = state, tokenizer, memory_config
        self._embedder = embedder

    @property
    def embedder(self):
        """The sentence embedder (all-MiniLM-L6-v2 unless one was given), loaded on first use."""
        if self._embedder is None:
            from memformer.passages import default_embedder
            self._embedder = default_embedder()
        return self._embedder

    def use_embedder(self, embedder) -> None:
        """Rank passages with `embedder` from now on (passages of another width are re-embedded)."""
        self._embedder = embedder

    def chat_ids(self, question: str, system: str | None = None) -> torch.Tensor:
        """[1, T] ids of a question in the chat template (`chat_ids`)."""
        return chat_ids(self.tokenizer, question, system)

    def prompt_ids(self, question: str | None = None, *, cue: str | None = None,
                   system: str | None = None) -> torch.Tensor:
        """[1, T] ids that `ask` generates after (`prompt_ids`)."""
        return prompt_ids(self.tokenizer, question, cue=cue, system=system)

    @property
    def passages(self) -> PassageIndex:
        """`PassageIndex` over the memorized text (sequence 0), embedded on first use (or loaded
        with the memory, when it was embedded by an embedder of the same width)."""
        state = self.state
        index = state.passages
        if index is not None:                         # saved passages of another width are re-embedded
            index = with_embedder(index, self.embedder)
        sentences = self.memory_config.sentence_ranking
        if index is None:
            if not state.stream or not state.stream[0]:
                raise ValueError("nothing is memorized")
            index = PassageIndex.from_stream(state.stream[0], state.doc_starts[0], self.tokenizer, self.embedder,
                                             sentences=sentences)
        elif sentences and index.sentence_embeddings is None:        # saved without sentences
            index.add_stream_sentences(state.stream[0], state.doc_starts[0], self.tokenizer)
        elif not sentences and index.sentence_embeddings is not None:
            index = PassageIndex(index.ranges, index.embeddings, index.embedder)    # passage cosines alone
        state.set_passages(index)
        return index

    @property
    def corpus_passages(self) -> PassageIndex:
        """The attached corpus's `PassageIndex` with this embedder attached (its width must be the
        one the corpus was built with)."""
        saved = self.state.corpus_passages
        if saved is None:
            raise ValueError("no corpus memory with passages is attached")
        bound = with_embedder(saved, self.embedder)
        if bound is None:
            raise ValueError(f"the corpus's passages were embedded {saved.embeddings.shape[1]}-wide, "
                             f"this model's sentence embedder gives another width; use the embedder it was built with")
        self.state.set_corpus_passages(bound)
        return bound

    def blocks_for(self, query: str, source: str = "own") -> list[int]:
        """The memory blocks a question reads: those under the passages nearest to `query`
        (`memformer.passages.question_blocks`), in document order. source: "own" (the memorized
        text; needs a memory of one sequence) or "corpus" (the attached corpus memory's passages)."""
        if source == "corpus":
            return self._blocks_under(self.corpus_passages.search(query, SEARCH_DEPTH), source)
        if source != "own":
            raise ValueError(f"source must be 'own' or 'corpus', got {source!r}")
        return self._blocks_under(self._own_passages().search(query, SEARCH_DEPTH), source)

    def choose(self, query: str) -> tuple[list[int], str] | None:
        """(blocks, source) a question `query` reads, unverified: the first of `candidates`."""
        found = self.candidates(query, 1)
        return None if found is None else (found[0][0][0], found[1])

    def candidates(self, query: str, n: int | None = None) -> tuple[list[tuple[list[int], float]], str] | None:
        """([(blocks, cosine)] of up to `n` (default `CANDIDATES`) passages, best first, source) a question `query` may
        read: with a corpus memory attached its passages are ranked too, and the candidates come
        from the memory (own or corpus) holding the best passage, a tie going to the own one. The
        first candidate is `question_blocks` of the whole ranking; each next one, the blocks of
        the next passage whose blocks none of the earlier candidates holds. None (the layers' own
        reads instead) with nothing memorized, or beside a corpus memory built without passages."""
        state = self.state
        own = bool(state.memories) and state.size() > 0
        if state.corpus_attached and state.corpus_passages is None:
            return None
        ranked = {}                                    # each source's passages, ranked once
        if state.corpus_attached:
            ranked["corpus"] = self.corpus_passages.search(query, SEARCH_DEPTH)
        if own:
            ranked["own"] = self._own_passages().search(query, SEARCH_DEPTH)
        if not ranked:
            return None
        source = max(ranked, key=lambda s: (ranked[s][0].score, s == "own"))
        passages, n = ranked[source], CANDIDATES if n is None else n
        found = [(self._blocks_under(passages, source), passages[0].score)]
        taken = set(found[0][0])
        for i, p in enumerate(passages[1:], start=1):
            if len(found) >= n:
                break
            blocks = self._blocks_under(passages[i:], source)
            if blocks and not taken & set(blocks):
                found.append((blocks, p.score))
                taken |= set(blocks)
        return found, source

    def _own_passages(self) -> PassageIndex:
        if len(self.state.stream) != 1:
            raise ValueError(f"question reads need a memory of one sequence, this one holds "
                             f"{len(self.state.stream)}; use generate() for a batch")
        return self.passages

    def _blocks_under(self, ranked, source: str) -> list[int]:
        """`question_blocks` of ranked passages of the own memory or of the attached corpus."""
        cfg = self.memory_config
        limit = self.state.corpus_documents[-1].end if source == "corpus" else self.state.seen[0]
        return question_blocks(ranked, cfg.question_blocks, cfg.block_size, limit)


def candidate_reads(model, blocks: list[list[int]], source: str, prompt_ids: torch.Tensor):
    """Reads of K candidates under one prompt, in one forward: row k reads blocks[k] alone
    (`model.reading_blocks` of [K, n], -1 padding the shorter rows, which changes no row's
    layout). The layers below the first memory layer never read memory, so they run the prompt
    once and the batch of K starts at that layer (`_widened_at`). prompt_ids [1, T], T >= 2.
    Returns (the prompt's KV cache but its last token, batch K from the first memory layer on:
    `keep_row` cuts it to one read for `model.generate(prompt_ids, cache=...)`;
    log-probabilities [K, T - 1] of the prompt's own tokens 1..T-1 under each read). The forward
    that scores a read also makes its cache, so the winner's answer does not run its prompt again.
    With the copy pointer on, the cache also keeps each memory layer's pointer shares at the
    prompt's last token but one (`memformer_pointer`, {layer: [K, Hq, R]}), from which the answer
    to a cue starts (`MemformerForCausalLM.generate`)."""
    K, padded = len(blocks), padded_rows(blocks)                                          # [K, n]
    first = model.adapter.layers(model.backbone)[min(model.memory_modules)]
    with model.reading_blocks(padded, source), _widened_at(first, K):
        cache, logits = make_context_cache(model, prompt_ids[:, :-1], return_logits=True)   # [K, T-1, V]
        # each read's copy-pointer shares at the prompt's last token but one ({layer: [K, Hq, R]}):
        # an answer to a cue starts from them (`MemformerForCausalLM.generate`)
        cache.memformer_pointer = prompt_pointer_shares(model.runtime)
    logits = logits.float()                                                               # [K, T-1, V]
    target = prompt_ids[:, 1:].expand(K, -1).to(logits.device)                           # [K, T-1]
    # log-softmax at the targets only: the whole [K, T-1, V] of it is never needed
    logp = logits.gather(2, target[..., None])[..., 0] - torch.logsumexp(logits, -1)     # [K, T-1]
    return cache, logp.cpu()


def prompt_pointer_shares(runtime) -> dict | None:
    """{memory layer: [B, Hq, R]} the copy pointers' shares after a prompt's forward inside
    `reading_blocks` (the last query's share per laid-out row), or None (no copy pointer)."""
    pointers = runtime.pointers or {}
    return {i: p.share for i, p in pointers.items() if p.share is not None} or None


def padded_rows(blocks: list[list[int]]) -> torch.Tensor:
    """[K, n] block ids for `model.reading_blocks`, row k reading blocks[k]: -1 pads the shorter
    rows on the left, which changes no row's layout (its blocks keep the positions just before
    the window that they take when read alone)."""
    K, n = len(blocks), max(len(b) for b in blocks)
    padded = torch.full((K, n), -1, dtype=torch.long)                                     # [K, n]
    for k, b in enumerate(blocks):
        padded[k, n - len(b):] = torch.as_tensor(b, dtype=torch.long)
    return padded


@contextlib.contextmanager
def _widened_at(layer, K: int):
    """Within this block `layer` takes its input hidden states [1, T, H] as K copies [K, T, H]
    (the layers below it run once; from it on, each row reads its own blocks)."""
    def widen(module, args, kwargs):
        if args:
            return (args[0].expand(K, -1, -1).contiguous(), *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=kwargs["hidden_states"].expand(K, -1, -1).contiguous())
    handle = layer.register_forward_pre_hook(widen, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def keep_row(cache, k: int):
    """A copy of `candidate_reads`' cache holding its row k only: the cache of that read alone (the
    layers below the first memory layer hold one row already). The batched cache is left as it
    was, so the rows of other reads can be kept from it too; tensors are not copied but cut."""
    index = torch.tensor([k])
    kept = copy.copy(cache)
    kept.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in kept.layers:
        if layer.keys is not None and layer.keys.dim() == 4 and layer.keys.shape[0] > 1:
            layer.batch_select_indices(index)          # assigns new tensors to the copy
    shares = getattr(cache, "memformer_pointer", None)
    if shares:
        kept.memformer_pointer = {i: s[k:k + 1] for i, s in shares.items()}             # [1, Hq, R]
    return kept


def stack_rows(caches: list):
    """One prompt cache of K rows from K one-row caches of the same prompt (`keep_row`'s), row k
    being caches[k]: the K reads' answers then run as one batch of `generate`. The layers below
    the first memory layer hold the same row in each (they read no memory) and are repeated."""
    stacked = copy.copy(caches[0])
    stacked.layers = [copy.copy(layer) for layer in caches[0].layers]
    for i, layer in enumerate(stacked.layers):
        if layer.keys is not None and layer.keys.dim() == 4:
            layer.keys = torch.cat([c.layers[i].keys for c in caches])          # [K, kv heads, T, d]
            layer.values = torch.cat([c.layers[i].values for c in caches])
    stacked.memformer_ids = caches[0].memformer_ids.expand(len(caches), -1).clone()   # [K, S + T - 1]
    shares = [getattr(c, "memformer_pointer", None) for c in caches]
    stacked.memformer_pointer = ({i: torch.cat([s[i] for s in shares]) for i in shares[0]}   # [K, Hq, R]
                                 if all(shares) else None)
    return stacked


def candidate_score(cosine: float, prompt_logp: torch.Tensor, weight: float = PROMPT_WEIGHT) -> float:
    """A candidate read's score in the check: its passage's cosine + weight * the mean
    log-probability of the prompt's own tokens under the read (prompt_logp [T - 1])."""
    return cosine + weight * prompt_logp.mean().item()


def checked_reads(model, candidates: list[tuple[list[int], float]], source: str, prompt_ids: torch.Tensor,
                  weight: float = PROMPT_WEIGHT, keep: int = 1):
    """Every candidate read alone under the prompt prompt_ids [1, T] and scored (`candidate_reads`:
    up to `CANDIDATE_TOKENS` prompt tokens of reads per batched forward): its passage's cosine +
    weight * the mean log-probability of the prompt's own tokens. Returns ([(blocks, score)] best
    first, a tie keeping the embedder's order; [each read's prompt cache (`keep_row`), from which
    its answer is generated without running the prompt again] in the same order). Only the `keep`
    best reads keep theirs (the others' entries are None), so at most `keep` rows outlive the
    forward that made them; `answer_reads(scored, limit)` chooses among the best `limit`. A prompt
    of one token is scored by cosine alone, with no caches (None)."""
    if prompt_ids.shape[1] < 2:
        return sorted(candidates, key=lambda c: -c[1]), None
    per = max(1, CANDIDATE_TOKENS // (prompt_ids.shape[1] - 1))          # reads per forward
    scored, caches = [], []
    for at in range(0, len(candidates), per):
        group = candidates[at:at + per]
        cache, logp = candidate_reads(model, [b for b, _ in group], source, prompt_ids)   # [k, T-1]
        scored += [(b, candidate_score(cos, lp, weight)) for (b, cos), lp in zip(group, logp)]
        caches += [(cache, k) for k in range(len(group))]
        # cut the rows that are among the best `keep` so far; drop the rest, and with them the
        # batched cache once no row of it is kept
        best = set(sorted(range(len(scored)), key=lambda i: (-scored[i][1], i))[:keep])
        caches = [(keep_row(*c) if isinstance(c, tuple) else c) if i in best else None for i, c in enumerate(caches)]
    order = sorted(range(len(scored)), key=lambda i: (-scored[i][1], i))   # stable: a tie keeps the ranking
    return [scored[i] for i in order], [caches[i] for i in order]


def answer_reads(scored: list[tuple[list[int], float]], limit: int, margin: float = ANSWER_MARGIN,
                 lift: float = ANSWER_LIFT) -> list[list[int]]:
    """The reads a question answers from, best first: the best checked read (`checked_reads`'
    [(blocks, score)], best first) and each next one whose score is within `margin` of it and
    at least `lift` above the median of all the candidates' scores, `limit` in all. Several reads
    pass when the memory holds several passages that each predict the question's words as well
    (one key's several values, several keys asked at once). A look-alike needle or a passage that
    only paraphrases the question trails the best by more; when nothing in memory holds the
    question's words, the candidates score alike and none stands out of the field, so the answer
    is the best read's alone. Both tests favour a higher score, so the reads chosen are the best
    ones, a prefix of `scored` (`checked_reads(..., keep=limit)` keeps their caches)."""
    if limit < 1:
        raise ValueError(f"answer_reads: limit must be >= 1, got {limit}")
    scores = [s for _, s in scored]
    best, field = scores[0], statistics.median(scores)
    return [scored[0][0]] + [b for b, s in scored[1:] if s >= best - margin and s - field >= lift][:limit - 1]


def verified_blocks(model, candidates: list[tuple[list[int], float]], source: str, prompt_ids: torch.Tensor,
                    weight: float = PROMPT_WEIGHT, return_cache: bool = False):
    """The candidate blocks under whose read the prompt prompt_ids [1, T] is likeliest
    (`checked_reads`' best). A read that holds the question's own words (a key among look-alike
    needles, a name) predicts them; a look-alike passage or the document's instruction line does
    not. The first candidate wins a tie; a prompt of one token is scored by cosine alone.
    return_cache: also return the winner's prompt cache (`keep_row`; None for a one-token
    prompt), from which `ask` generates the answer without running the prompt again."""
    scored, caches = checked_reads(model, candidates, source, prompt_ids, weight)
    return (scored[0][0], None if caches is None else caches[0]) if return_cache else scored[0][0]
