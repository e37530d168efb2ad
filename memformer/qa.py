"""Long-document QA: read documents into memory once, answer questions from memory, show evidence.

    ctx = prepare(model, [Path("book.txt"), Path("notes.md")], "memory", cache_dir="~/.cache/memformer/memories")
    ans = answer(model, ctx, "Who wrote the preface?")        # or ctx.answer(...)
    ans.text, ans.evidence                                    # [EvidenceSpan(document, start, end, text, score)]
    ctx.ask("Who wrote the preface?", modes=("memory", "truncate", "rag"))   # {mode: Answer}

The documents form one token stream (`Corpus`). The modes differ only in the document context
put before the question; truncate and rag get the same token budget (`tail_room`):

* memory   — by default (`memory_reads="question"`) the whole stream is memorized and only the
             question is local: every memory layer reads the memory blocks under the passages
             nearest the question, laid out just before it; with `"knn"` all but the last
             `tail_room` tokens are memorized, that tail stays local, and each layer makes its
             own kNN reads (as `model.generate`);
* truncate — the tail, memory off: the frozen backbone with the last window only;
* rag      — the passages most similar to the question (sentence-transformers), memory off;
* full     — the whole stream in the context, memory off (the long-context reference; only
             when it fits the backbone's native context, else `DoesNotFit`).

The bundled demo document lives in `memformer.demo`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from memformer.confidence import answer_confidence
from memformer.documents import Corpus, Document, DocumentError, as_documents, read_document  # noqa: F401 (API)
from memformer.evidence import EvidenceSpan, retrieval_mass, spans_from_mass

MODES = ("memory", "truncate", "rag", "full")
MEMORY_READS = ("question", "knn")       # how mode "memory" chooses what it reads (LongDocQA)
SINK_PREFIX = (False, True, "auto")      # question reads: blocks after their sink? (LongDocQA)
QA_FILE = "qa_documents.json"            # beside a saved memory: the documents it was built from
QA_FORMAT, QA_FORMAT_VERSION = "memformer-qa-documents", 1


class DoesNotFit(ValueError):
    """The documents (+ question) are longer than the mode can hold ("full": the native context)."""


@dataclass
class Answer:
    """One answer.

    evidence: memory — passages the memory layers attended to while answering; rag — the
    best-scoring passages (the first ones put in the prompt); truncate, full — none.
    memory_share (memory mode): mean fraction of attention, over layers, heads and answer
    tokens, that went to memory. corpus_evidence (memory mode with a corpus memory attached):
    the corpus documents drawn on, `memformer.corpus.corpus_evidence` dicts. read, confidence,
    alternative: see `LongDocQA` (sink_prefix) and `memformer.confidence`."""
    mode: str
    text: str
    evidence: list[EvidenceSpan] = field(default_factory=list)
    corpus_evidence: list[dict] = field(default_factory=list)
    memory_share: float | None = None
    prompt_tokens: int = 0
    read: str = ""                       # memory question reads: "blocks" or "sink+blocks"
    confidence: float | None = None      # memory: mean log-prob of the answer's first line
    alternative: dict | None = None      # sink_prefix "auto": the read not kept (read, text, confidence)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def tail_room(model, reserve: int = 96) -> int:
    """Tokens of the document kept in the local window beside the question (the rest is memory)."""
    cfg = model.memory_config
    return max(16, cfg.window - cfg.sink_tokens - reserve)


def memory_key(corpus: Corpus, model, split: int | None = None) -> str:
    """Cache key of a memory: the document texts, the backbone, the memory-layer weights, the
    memory config and `split`, the stream tokens memorized (question reads memorize all of it,
    kNN reads all but the tail)."""
    from memformer.persistence import adapter_hash
    h = hashlib.sha256()
    for doc in corpus.documents:
        h.update(bytes.fromhex(doc.sha256))
    h.update(model.backbone_fingerprint.encode())
    h.update(adapter_hash(model).encode())
    # neighbours, block reads and kNN layers only change how memory is read, not what is stored
    h.update(dataclasses.replace(model.memory_config, neighbors=0, read_blocks=0, block_size=64,
                                 knn_layers=None).to_json().encode())
    if split is not None:
        h.update(f"split={split}".encode())
    return h.hexdigest()[:20]


class LongDocQA:
    """Documents read for QA, answerable in every mode of `MODES` (see the module docstring).

    mode: the default mode of `answer`. With mode "memory" `read` memorizes the documents (the
    other modes need no memory, so reading for them skips that cost); "rag" embeds the passages;
    "full" checks at once that the documents fit the native context. It owns the model's memory: `read` resets it, and a
    memory answer refuses a memory changed since.
    embedder: a sentence-transformers model for mode "rag" and question reads (None =
    all-MiniLM-L6-v2, loaded on first use). rag_chunk_tokens / rag_overlap: passage size and
    overlap in backbone tokens.
    memory_reads: how mode "memory" reads memory. "question": the whole stream is memorized and
    the question alone is local; the passages most similar to the question (the RAG
    retriever), each widened by
    `question_margin` tokens on both sides, pick `question_blocks` memory blocks
    (`model.memory_config.block_size` tokens each), and every memory layer reads those blocks'
    cached keys/values, whole and laid out contiguously just before the local window, while the
    answer is generated (`model.reading_blocks`): retrieval by the question's meaning, reading
    by attention over the stored states. sink_prefix: whether those blocks are read after the
    sink their windows began with: False, True, or "auto" (default): answer both ways and keep
    the answer the model is surer of (`memformer.confidence`; each memory answer costs two
    generations). "knn": all but the last `tail_room` tokens are memorized,
    that tail is local, and every layer retrieves its own top-k keys per query (or blocks, per
    the MemoryConfig). Question reads fall back to kNN reads (question still alone in the window)
    beside an attached corpus memory.
    """

    def __init__(self, model, mode: str = "memory", *, embedder=None, rag_chunk_tokens: int = 128,
                 rag_overlap: int = 32, memory_reads: str = "question", question_blocks: int = 4,
                 question_margin: int = 32, sink_prefix: bool | str = "auto"):
        if model.tokenizer is None:
            raise ValueError("LongDocQA needs a model with a tokenizer")
        if memory_reads not in MEMORY_READS:
            raise ValueError(f"unknown memory_reads {memory_reads!r}; choose from {', '.join(MEMORY_READS)}")
        if question_blocks < 1 or question_margin < 0:
            raise ValueError(f"need question_blocks >= 1 and question_margin >= 0, got {question_blocks}, "
                             f"{question_margin}")
        if sink_prefix not in SINK_PREFIX:
            raise ValueError(f"sink_prefix must be one of {SINK_PREFIX}, got {sink_prefix!r}")
        self.model, self.mode, self.embedder = model, _check_mode(mode), embedder
        self.rag_chunk_tokens, self.rag_overlap = rag_chunk_tokens, rag_overlap
        self.memory_reads, self.question_blocks = memory_reads, question_blocks
        self.question_margin, self.sink_prefix = question_margin, sink_prefix
        self.corpus: Corpus | None = None
        self.split = 0                    # stream tokens [0, split) are memorized, [split, N) local in mode memory
        self.memorized = False            # the memory holds [0, split) (or split = 0: nothing to hold)
        self.from_cache = False
        self._rag = None

    # ------------------------------------------------------------------ reading
    def read(self, documents, *, cache_dir=None, show_progress: bool = True) -> "LongDocQA":
        """Tokenize `documents` (texts, `Path`s or `Document`s); in mode "memory" memorize them
        (all, or all but the tail: `memory_reads`). cache_dir: reuse the memory saved there under
        `memory_key` when it exists and fits this model (else build it and save it there). Sets
        `from_cache`."""
        model = self.model
        self._set_corpus(Corpus.from_documents(documents, model.tokenizer))
        model.reset_memory()
        self.from_cache = self.memorized = False
        if self.mode == "full":
            self._full_prompt_room()                        # DoesNotFit now, not at the first question
        if self.mode == "rag" or (self.mode == "memory" and self.memory_reads == "question"):
            self.rag()                                      # embed the passages now, not in the first answer
        if self.mode != "memory" or self.split == 0:        # split 0: all fits in the local window
            self.memorized = self.mode == "memory"
            return self
        path = None if cache_dir is None else Path(cache_dir).expanduser() / memory_key(self.corpus, model, self.split)
        self.from_cache = path is not None and self._try_load(path)
        if not self.from_cache:
            model.memorize(torch.tensor([self.corpus.ids[:self.split]]), show_progress=show_progress)
        self.memorized = True
        if path is not None and not self.from_cache:
            self.save(path)
        return self

    def _set_corpus(self, corpus: Corpus) -> None:
        self.corpus, self._rag = corpus, None
        self.split = self._extent(self.memory_reads)

    def _extent(self, memory_reads: str) -> int:
        """Stream tokens memory mode memorizes with `memory_reads`: 0 when the stream fits in the
        local window beside the question (then nothing is memorized), else all of it (question
        reads) or all but the last `tail_room` tokens (kNN reads)."""
        n = len(self.corpus)
        if n - tail_room(self.model) <= self.model.memory_config.sink_tokens:
            # memorize() keeps the first sink_tokens local; a prefix that short holds nothing
            return 0
        return n if memory_reads == "question" else n - tail_room(self.model)

    def _try_load(self, path: Path) -> bool:
        """Load the memory at `path` if it was built from exactly this corpus by this model."""
        try:
            saved = _read_qa_file(path)
        except (FileNotFoundError, DocumentError):
            return False
        if [d["sha256"] for d in saved["documents"]] != [d.sha256 for d in self.corpus.documents] \
                or saved["split"] != self.split:
            return False
        try:
            self.model.load_memory(path)
        except (ValueError, FileNotFoundError):             # another model / config, or corrupt
            self.model.reset_memory()
            return False
        if self.memory_reads == "question" and self.model.unknown_window_slots():
            # saved before window slots were kept: its rotated keys cannot be laid out contiguously
            self.model.reset_memory()
            return False
        return True

    @property
    def tail(self) -> list[int]:
        """The last `tail_room` stream tokens: mode truncate's context."""
        self._need_corpus()
        return self.corpus.ids[-tail_room(self.model):]

    @property
    def local(self) -> list[int]:
        """Stream tokens mode memory keeps in the local window beside the question (those not
        memorized: none with question reads, the tail with kNN reads)."""
        self._need_corpus()
        return self.corpus.ids[self.split:]

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> Path:
        """Write the memory (`model.save_memory`) plus `qa_documents.json` (document names and
        texts, so evidence spans work after `load`)."""
        self._need_corpus()
        path = Path(path).expanduser()
        if not self.memorized or self.split == 0:
            raise ValueError("nothing to save: the memory is empty (documents read for another mode, "
                             "or short enough for the local window)")
        self.model.save_memory(path)
        payload = {"format": QA_FORMAT, "format_version": QA_FORMAT_VERSION, "split": self.split,
                   "tokens": len(self.corpus),
                   "documents": [{"name": d.name, "sha256": d.sha256, "text": d.text} for d in self.corpus.documents]}
        tmp = path / f".{QA_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, path / QA_FILE)                     # written after the memory: present = complete
        return path

    @classmethod
    def load(cls, model, path, **kwargs) -> "LongDocQA":
        """A LongDocQA (mode "memory") from a directory written by `save` (memory + documents);
        the memory is refused (MemoryFileError) if another model or memory config built it."""
        path = Path(path).expanduser()
        saved = _read_qa_file(path)
        qa = cls(model, "memory", **kwargs)
        qa._set_corpus(Corpus.from_documents([Document(d["name"], d["text"]) for d in saved["documents"]],
                                             model.tokenizer))
        if [d.sha256 for d in qa.corpus.documents] != [d["sha256"] for d in saved["documents"]]:
            raise DocumentError(f"{path / QA_FILE}: document texts do not match their checksums")
        if len(qa.corpus) == saved["tokens"] and saved["split"] != qa.split:
            other = next((r for r in MEMORY_READS if saved["split"] == qa._extent(r)), None)
            if other is not None:
                raise ValueError(f"{path}: this memory was saved for memory_reads={other!r} (it holds "
                                 f"{saved['split']} of {saved['tokens']} tokens); load it with that, or "
                                 f"read the documents again for memory_reads={qa.memory_reads!r}")
        if qa.split != saved["split"] or len(qa.corpus) != saved["tokens"]:
            raise DocumentError(f"{path / QA_FILE}: the documents tokenize to {len(qa.corpus)} tokens here, "
                                f"{saved['tokens']} when saved (another tokenizer or window)")
        model.load_memory(path)
        qa.memorized = qa.from_cache = True
        return qa

    # ------------------------------------------------------------------ answering
    def answer(self, question: str | None = None, *, cue: str | None = None, mode: str | None = None,
               max_new_tokens: int = 48, evidence: int = 3) -> Answer:
        """Answer one question (greedy) in `mode` (default: this context's mode).

        question: asked in the chat template (when the tokenizer has one), after the context.
        cue: instead, a sentence for the model to complete after the context ("The code is");
            the question (or the cue) is also the RAG query. evidence: spans to return (0 = none).
        """
        mode = self.mode if mode is None else _check_mode(mode)
        if not (question and question.strip()) and not (cue and cue.strip()):
            raise ValueError("give a question or a cue")
        self._need_corpus()
        if mode == "memory":
            self._check_memory()
        t0 = time.perf_counter()
        ranked = []
        if mode == "rag":
            ranked = self.rag().search(question or cue)
            context = self._join(self.rag().fill(ranked, tail_room(self.model)))
        else:
            context = self.corpus.ids if mode == "full" else self.local if mode == "memory" else self.tail
        x = self._prompt(context, question, cue, full=mode == "full")
        if mode != "memory":
            ans = Answer(mode, self._generate(x, mode, record=False, max_new_tokens=max_new_tokens)[0],
                         prompt_tokens=x.shape[1])
            if mode == "rag" and evidence > 0:              # the best passages, as embedded (unmerged)
                ans.evidence = [self._span(p.start, p.end, p.score) for p in ranked[:evidence]]
        else:
            # block reads need the sequence's own memory alone: beside a corpus memory, kNN reads
            by_question = (self.memory_reads == "question" and self.split > 0 and not self.model.runtime.corpus)
            blocks = self.memory_blocks_for(question or cue) if by_question else None
            reads = ((False, True) if self.sink_prefix == "auto" else (self.sink_prefix,)) if by_question else (None,)
            tries = [self._memory_answer(x, blocks, sp, evidence, max_new_tokens) for sp in reads]
            ans = max(tries, key=lambda a: a.confidence)    # "auto": the answer the model is surer of
            if len(tries) > 1:
                other = tries[1 - tries.index(ans)]
                ans.alternative = dict(read=other.read, text=other.text, confidence=other.confidence)
        ans.seconds = time.perf_counter() - t0
        return ans

    def _memory_answer(self, x: torch.Tensor, blocks, sink_prefix, evidence: int, max_new_tokens: int) -> Answer:
        """One memory-mode answer to prompt x [1, T]: question reads of `blocks` (after their sink
        when sink_prefix), or the model's own reads when blocks is None; with its evidence."""
        corpus = evidence > 0 and bool(self.model.runtime.corpus)
        record = evidence > 0 and self.split > 0
        with self.model.reading_blocks(blocks, sink_prefix=sink_prefix) if blocks is not None \
                else contextlib.nullcontext():
            text, confidence = self._generate(x, "memory", record=record or corpus, max_new_tokens=max_new_tokens)
        ans = Answer("memory", text, prompt_tokens=x.shape[1], confidence=confidence,
                     read="" if blocks is None else "sink+blocks" if sink_prefix else "blocks")
        if corpus:
            ans.corpus_evidence = self.model.corpus_evidence(top=evidence)
            self.model.runtime.retrieved_corpus.clear()
        if record:
            mass = retrieval_mass(self.model, len(self.corpus))
            self.model.runtime.retrieved.clear()            # recordings are large; drop them now
            ans.memory_share = mass.memory_share
            # lift (what the answer read beyond the prompt) discounts rows every query reads; when
            # no row drew more (question reads: all queries read the same few blocks), the answer's mass
            lift = mass.lift
            ans.evidence = spans_from_mass(self.corpus, lift if float(lift.sum()) > 0 else mass.answer, top=evidence)
        return ans

    def ask(self, question: str | None = None, *, cue: str | None = None,
            modes=("memory", "truncate"), **kwargs) -> dict[str, Answer]:
        """`answer` in each of `modes`: {mode: Answer}."""
        return {m: self.answer(question, cue=cue, mode=m, **kwargs) for m in modes}

    def memory_blocks_for(self, query: str) -> list[int]:
        """The `question_blocks` memory blocks that question reads read for `query`: the blocks
        under the RAG passages most similar to it, best passage first, each passage widened by
        `question_margin` tokens on both sides (a fact cut by a passage boundary is read whole),
        clipped to the memorized part and taken whole or not at all (the best one narrowed to
        the passage, then cut, when it is too long); in document order."""
        bs, split, m = self.model.memory_config.block_size, self.split, self.question_margin
        blocks_of = lambda a, b: list(range(max(0, a) // bs, (min(b, split) - 1) // bs + 1))
        chosen: list[int] = []
        for p in self.rag().search(query):
            if p.start >= split:                            # in the local tail already
                continue
            new = [b for b in blocks_of(p.start - m, p.end + m) if b not in chosen]
            if not chosen and len(new) > self.question_blocks:
                new = blocks_of(p.start, p.end)[:self.question_blocks]
            if len(chosen) + len(new) <= self.question_blocks:
                chosen += new
            if len(chosen) == self.question_blocks:
                break
        return sorted(chosen)

    def rag(self):
        """The RAG baseline over this corpus (`memformer.rag.RAGBaseline`, embedded on first use)."""
        from memformer.rag import RAGBaseline, default_embedder
        self._need_corpus()
        if self._rag is None:
            if self.embedder is None:
                self.embedder = default_embedder()
            self._rag = RAGBaseline(self.corpus, self.embedder, chunk_tokens=self.rag_chunk_tokens,
                                    overlap=self.rag_overlap)
        return self._rag

    # ------------------------------------------------------------------ internals
    def _need_corpus(self) -> None:
        if self.corpus is None:
            raise RuntimeError("no documents: call read(documents) (or LongDocQA.load(model, path)) first")

    def _check_memory(self) -> None:
        if not self.memorized:
            raise RuntimeError(f"the documents were read for mode {self.mode!r}, without memory; "
                               f"prepare them with mode 'memory' to answer from memory")
        held = self.model.seen if self.model.memories else []
        want = [self.split] if self.split else []
        if held != want:
            raise RuntimeError(f"the model's memory changed since read() (it holds {held} tokens per sequence, "
                               f"the documents need {want}); call read() again")

    def _full_prompt_room(self) -> int:
        """Tokens left for the question in mode "full" (DoesNotFit if there are too few)."""
        native = getattr(self.model.config, "max_position_embeddings", None)
        if native is None:
            raise DoesNotFit("mode 'full' needs the backbone's native context (config.max_position_embeddings)")
        room = native - len(self.corpus)
        if room < 96:
            raise DoesNotFit(f"mode 'full': {len(self.corpus)} document tokens + a question do not fit the "
                             f"native context of {native} tokens")
        return room

    def _join(self, passages) -> list[int]:
        sep = self.model.tokenizer("\n\n", add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        for p in passages:
            ids += (sep if ids else []) + self.corpus.ids[p.start:p.end]
        return ids

    def _span(self, start: int, end: int, score: float) -> EvidenceSpan:
        d, c0, c1 = self.corpus.locate(start, end)
        doc = self.corpus.documents[d]
        return EvidenceSpan(doc.name, d, c0, c1, doc.text[c0:c1], score, start, end)

    def _prompt(self, context: list[int], question: str | None, cue: str | None, full: bool = False) -> torch.Tensor:
        """[1, T] ids: context + cue as plain text, or context + question in the chat template.
        Cut to the local window (W - sink) from the left, so nothing spills into memory; in mode
        "full" checked against the native context instead."""
        model, tok = self.model, self.model.tokenizer
        if cue:
            x = torch.tensor([context + tok("\n\n" + cue, add_special_tokens=False)["input_ids"]])
        else:
            x = model.chat_ids(f"{tok.decode(context)}\n\n{question}" if context else question)
        if full:
            if x.shape[1] > len(context) + self._full_prompt_room():
                raise DoesNotFit("mode 'full': the documents and the question do not fit the native context")
            return x
        cfg = model.memory_config
        return x[:, -(cfg.window - cfg.sink_tokens):]

    def _generate(self, x: torch.Tensor, mode: str, *, record: bool, max_new_tokens: int) -> tuple[str, float | None]:
        """Greedy answer text after x [1, T]; in mode memory also its confidence."""
        model = self.model
        kw = dict(max_new_tokens=max_new_tokens, do_sample=False)
        if mode == "memory":
            out = model.generate(x, record=record, output_logits=True, return_dict_in_generate=True, **kw)
            new = out.sequences[0, x.shape[1]:]
            text = model.tokenizer.decode(new, skip_special_tokens=True).strip()
            return text, answer_confidence(model.tokenizer, new, out.logits)
        else:
            # the frozen backbone on exactly x: no sink prefix and no memory, however the context
            # was prepared (model.generate would also move all but the last window to memory)
            with model.memory_disabled():
                dev = model.device
                out = model.backbone.generate(input_ids=x.to(dev), attention_mask=torch.ones_like(x).to(dev),
                                              pad_token_id=model._pad_id(), **kw).cpu()
        return model.tokenizer.decode(out[0, x.shape[1]:], skip_special_tokens=True).strip(), None


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    return mode


def prepare(model, documents, mode: str = "memory", *, cache_dir=None, show_progress: bool = True,
            **kwargs) -> LongDocQA:
    """Read `documents` (texts, `Path`s or `Document`s) for answering in `mode` (see `MODES`):
    mode "memory" memorizes them (reusing `cache_dir` when given); "full" raises `DoesNotFit`
    when they exceed the native context. kwargs go to `LongDocQA` (embedder, rag_chunk_tokens,
    rag_overlap). Returns the context that `answer` takes."""
    return LongDocQA(model, mode, **kwargs).read(documents, cache_dir=cache_dir, show_progress=show_progress)


def answer(model, ctx: LongDocQA, question: str | None = None, *, cue: str | None = None,
           mode: str | None = None, max_new_tokens: int = 48, evidence: int = 3) -> Answer:
    """Answer `question` (chat template) or complete `cue` from a context made by `prepare`, in
    the context's mode unless `mode` is given. Returns an `Answer` (text, evidence, ...)."""
    if ctx.model is not model:
        raise ValueError("this context was prepared with another model")
    return ctx.answer(question, cue=cue, mode=mode, max_new_tokens=max_new_tokens, evidence=evidence)


def qa_settings(options: dict | None = None) -> dict:
    """The LongDocQA settings that `options` (its keyword arguments) amount to, defaults filled in,
    for run records (an embedder object is named by its class)."""
    import inspect
    params = inspect.signature(LongDocQA.__init__).parameters
    out = {k: p.default for k, p in params.items() if p.kind is p.KEYWORD_ONLY}
    out.update(options or {})
    if out.get("embedder") is not None:
        out["embedder"] = type(out["embedder"]).__name__
    return out


def _read_qa_file(path: Path) -> dict:
    f = Path(path) / QA_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{path} holds no QA documents ({QA_FILE}); it was not written by LongDocQA.save")
    try:
        saved = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DocumentError(f"{f} is corrupt: {e}") from None
    if saved.get("format") != QA_FORMAT or saved.get("format_version") != QA_FORMAT_VERSION:
        raise DocumentError(f"{f}: not a {QA_FORMAT} v{QA_FORMAT_VERSION} file")
    return saved
