"""Long-document QA: read documents into memory once, answer questions from memory, show evidence.

    ctx = prepare(model, [Path("book.txt"), Path("notes.md")], cache_dir="~/.cache/memformer/memories")
    ans = answer(model, ctx, "Who wrote the preface?")        # or ctx.answer(...)
    ans.text, ans.evidence                                    # [EvidenceSpan(document, start, end, text, score)]
    ctx.ask("Who wrote the preface?", modes=("memory", "truncate", "rag"))   # {mode: Answer}

The documents form one token stream (`Corpus`). Mode "memory" is the product: the documents are
memorized (`model.memorize`, one call per document) and answers are `model.ask` — question reads,
the same code path as the library. The baselines differ only in the document context put before
the question; truncate and rag get the same token budget (`tail_room`). The baselines run the
frozen backbone exactly (`model.backbone_only()`: no memory and no LoRA), as a user without
memformer would:

* memory   — `model.ask`: the question alone in the window, every memory layer reading the memory
             blocks under the passages nearest the question;
* truncate — the tail: the frozen backbone with the last window only;
* rag      — the passages most similar to the question (sentence-transformers);
* full     — the whole stream in the context (the long-context reference; only
             when it fits the backbone's native context, else `DoesNotFit`).

The bundled demo document lives in `memformer.qa.demo`.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from memformer.fileio import WriteError, dir_lock, read_json, recover_for_reading
from memformer.qa.documents import Corpus, Document, DocumentError, as_documents, read_document  # noqa: F401 (API)
from memformer.qa.evidence import EvidenceSpan, answer_evidence
from memformer.qa.memory_cache import (DEFAULT_LIMIT as DEFAULT_CACHE_LIMIT, folder_bytes, mark_used, parse_size,
                                       remove_entry, trim)

MODES = ("memory", "truncate", "rag", "full")
QA_FILE = "qa_documents.json"            # beside a saved memory: the documents it was built from
QA_FORMAT, QA_FORMAT_VERSION = "memformer-qa-documents", 2


class DoesNotFit(ValueError):
    """The documents (+ question) are longer than the mode can hold ("full": the native context)."""


@dataclass
class Answer:
    """One answer.

    evidence: memory — passages the memory layers attended to while answering; rag — the
    best-scoring passages (the first ones put in the prompt); truncate, full — none.
    memory_share (memory mode): mean fraction of attention, over layers, heads and answer
    tokens, that went to memory. corpus_evidence (memory mode with a corpus memory attached):
    the corpus documents drawn on, `memformer.corpus.corpus_evidence` dicts. loop_cut: generation
    ran into a degenerate loop, cut back to one copy of its unit (`memformer.decoding`). reads
    (memory mode): how many checked reads it was answered from (`MemoryConfig.answer_reads`); 1
    in the other modes. read_answers, read_loops (memory mode): each read's own answer, best
    first, and whether a loop was cut from it (`AskOutput`)."""
    mode: str
    text: str
    evidence: list[EvidenceSpan] = field(default_factory=list)
    corpus_evidence: list[dict] = field(default_factory=list)
    memory_share: float | None = None
    prompt_tokens: int = 0
    seconds: float = 0.0
    loop_cut: bool = False
    reads: int = 1
    read_answers: list[str] = field(default_factory=list)
    read_loops: list[bool] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def tail_room(model, reserve: int = 96) -> int:
    """Tokens of the document kept in the local window beside the question (the rest is memory)."""
    return max(16, model.local_window - reserve)


def memory_key(corpus: Corpus, model) -> str:
    """Cache key of a memory: the document texts and what decides the memory stored from them
    (`persistence.memory_fingerprint`: backbone, memory-layer weights, memory layers, window, sink,
    overlap; and the dtype, index and capacity). Read-time settings (top_k, knn_layers,
    question_blocks, block_size) reuse the same memory."""
    from memformer.persistence import memory_fingerprint
    cfg = model.memory_config
    h = hashlib.sha256()
    for doc in corpus.documents:
        h.update(bytes.fromhex(doc.sha256))
    stored = dict(memory_fingerprint(model), dtype=cfg.memory_dtype, index=cfg.index, index_params=cfg.index_params,
                  capacity=cfg.capacity, eviction=cfg.eviction)
    h.update(json.dumps(stored, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


class LongDocQA:
    """Documents read for QA, answerable in every mode of `MODES` (see the module docstring).

    mode: the default mode of `answer`. With mode "memory" `read` memorizes the documents (the
    other modes need no memory, so reading for them skips that cost); "rag" embeds the passages;
    "full" checks at once that the documents fit the native context. It owns the model's memory:
    `read` resets it, and a memory answer refuses a memory changed since.
    embedder: a sentence-transformers model for mode "rag" (None = the model's question-read
    embedder, all-MiniLM-L6-v2 by default). rag_chunk_tokens / rag_overlap: passage size and
    overlap in backbone tokens.
    """

    def __init__(self, model, mode: str = "memory", *, embedder=None, rag_chunk_tokens: int = 128,
                 rag_overlap: int = 32):
        if model.tokenizer is None:
            raise ValueError("LongDocQA needs a model with a tokenizer")
        self.model, self.mode, self.embedder = model, _check_mode(mode), embedder
        self.rag_chunk_tokens, self.rag_overlap = rag_chunk_tokens, rag_overlap
        self.corpus: Corpus | None = None
        self.memorized = False            # the model's memory holds this corpus
        self.from_cache = False
        self._rag = None

    # ------------------------------------------------------------------ reading
    def read(self, documents, *, cache_dir=None, cache_limit=DEFAULT_CACHE_LIMIT,
             show_progress: bool = True) -> "LongDocQA":
        """Tokenize `documents` (texts, `Path`s or `Document`s); in mode "memory" memorize them.
        cache_dir: reuse the memory saved there under `memory_key` when it exists and fits this
        model (else build it and save it there). Sets `from_cache`.
        cache_limit: bytes the cache folder's memories may hold (an int, "20GB", or None for no
        limit): after a new memory is saved the least recently used ones are removed, and one
        larger than the limit alone is not kept (`memformer.qa.memory_cache`)."""
        model = self.model
        self.corpus, self._rag = Corpus.from_documents(documents, model.tokenizer), None
        model.reset_memory()
        self.from_cache = self.memorized = False
        if self.mode == "full":
            self._full_prompt_room()                        # DoesNotFit now, not at the first question
        if self.mode == "rag":
            self.rag()                                      # embed the passages now, not in the first answer
        if self.mode != "memory":
            return self
        limit = parse_size(cache_limit)                     # a bad limit fails before the work
        path = None if cache_dir is None else Path(cache_dir).expanduser() / memory_key(self.corpus, model)
        self.from_cache = path is not None and self._try_load(path)
        if self.from_cache:
            mark_used(path)
        else:
            self._memorize(show_progress)
        self.memorized = True
        if path is not None and not self.from_cache and model.memory_size() > 0:
            self._cache(path, limit)
        return self

    def _cache(self, path: Path, limit: int | None) -> None:
        """Save the memory at `path` in its cache folder, then trim the folder to `limit` bytes;
        a memory that cannot be written, or that alone exceeds the limit, is not kept (warning)."""
        try:
            self.save(path)
            nbytes = folder_bytes(path)
            if limit is not None and nbytes > limit:
                remove_entry(path)
                warnings.warn(f"memory not cached: it takes {nbytes / 2**20:.0f} MB, more than the cache "
                              f"limit of {limit / 2**20:.0f} MB", stacklevel=3)
                return
            trim(path.parent, limit, keep=path)
        except WriteError as e:                         # a cache that cannot be written: answer anyway
            warnings.warn(f"memory not cached: {e}", stacklevel=3)

    def _memorize(self, show_progress: bool) -> None:
        """One `memorize` call per document (with the separator before the next one), so question
        reads' passages never cross a document boundary; the passages are embedded now, not at
        the first answer."""
        # the last document's separator is not memorized: one document is exactly model.memorize(text)
        bounds = self.corpus.starts + [len(self.corpus) - 1]
        for a, b in zip(bounds, bounds[1:]):
            self.model.memorize(torch.tensor([self.corpus.ids[a:b]]), show_progress=show_progress)
        self.model.questions.passages                       # noqa: B018 (embeds them)

    def _try_load(self, path: Path) -> bool:
        """Load the memory at `path` if it was built from exactly this corpus by this model."""
        recover_for_reading(path)
        with dir_lock(path, shared=True):                   # the documents and the memory of one save
            try:
                saved = read_qa_file(path)
            except (FileNotFoundError, DocumentError):
                return False
            if [d["sha256"] for d in saved["documents"]] != [d.sha256 for d in self.corpus.documents]:
                return False
            try:
                self.model.load_memory(path)
            except (ValueError, FileNotFoundError):         # another model / config, or corrupt
                self.model.reset_memory()
                return False
        return True

    @property
    def tail(self) -> list[int]:
        """The last `tail_room` stream tokens: mode truncate's context."""
        self._need_corpus()
        return self.corpus.ids[-tail_room(self.model):]

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> Path:
        """Write the memory (`model.save_memory`) plus `qa_documents.json` (document names and
        texts, so evidence spans work after `load`)."""
        self._need_corpus()
        path = Path(path).expanduser()
        if not self.memorized:
            raise ValueError("nothing to save: the documents were read for another mode, without memory")
        from memformer.persistence import save_memory
        payload = {"format": QA_FORMAT, "format_version": QA_FORMAT_VERSION, "tokens": len(self.corpus),
                   "documents": [{"name": d.name, "sha256": d.sha256, "text": d.text} for d in self.corpus.documents]}
        # in the memory's own atomic write: the folder is complete (memory and documents) or absent
        return save_memory(self.model, path, extra_files={QA_FILE: json.dumps(payload)})

    @classmethod
    def load(cls, model, path, **kwargs) -> "LongDocQA":
        """A LongDocQA (mode "memory") from a directory written by `save` (memory + documents);
        the memory is refused (MemoryFileError) if another model or memory config built it."""
        path = Path(path).expanduser()
        recover_for_reading(path)
        with dir_lock(path, shared=True):                   # the documents and the memory of one save
            return cls._load_locked(model, path, **kwargs)

    @classmethod
    def _load_locked(cls, model, path: Path, **kwargs) -> "LongDocQA":
        saved = read_qa_file(path)
        qa = cls(model, "memory", **kwargs)
        qa.corpus = Corpus.from_documents([Document(d["name"], d["text"]) for d in saved["documents"]],
                                          model.tokenizer)
        if [d.sha256 for d in qa.corpus.documents] != [d["sha256"] for d in saved["documents"]]:
            raise DocumentError(f"{path / QA_FILE}: document texts do not match their checksums")
        if len(qa.corpus) != saved["tokens"]:
            raise DocumentError(f"{path / QA_FILE}: the documents tokenize to {len(qa.corpus)} tokens here, "
                                f"{saved['tokens']} when saved (another tokenizer)")
        model.load_memory(path)
        qa.memorized = qa.from_cache = True
        return qa

    # ------------------------------------------------------------------ answering
    def answer(self, question: str | None = None, *, cue: str | None = None, mode: str | None = None,
               max_new_tokens: int = 48, evidence: int = 3) -> Answer:
        """Answer one question (greedy) in `mode` (default: this context's mode).

        question: asked in the chat template (when the tokenizer has one), after the context.
        cue: instead, a sentence for the model to complete after the context ("The code is");
            the question (or the cue) is also the retrieval query. evidence: spans to return (0 = none).
        """
        mode = self.mode if mode is None else _check_mode(mode)
        if not (question and question.strip()) and not (cue and cue.strip()):
            raise ValueError("give a question or a cue")
        self._need_corpus()
        t0 = time.perf_counter()
        if mode == "memory":
            ans = self._memory_answer(question, cue, evidence, max_new_tokens)
        else:
            ranked = []
            if mode == "rag":
                ranked = self.rag().search(question or cue)
                context = self._join(self.rag().fill(ranked, tail_room(self.model)))
            else:
                context = self.corpus.ids if mode == "full" else self.tail
            x = self._prompt(context, question, cue, full=mode == "full")
            text, cut = self._generate(x, max_new_tokens, cue)
            ans = Answer(mode, text, prompt_tokens=x.shape[1], loop_cut=cut)
            if mode == "rag" and evidence > 0:              # the best passages, as embedded (unmerged)
                ans.evidence = [self._span(p.start, p.end, p.score) for p in ranked[:evidence]]
        ans.seconds = time.perf_counter() - t0
        return ans

    def _memory_answer(self, question, cue, evidence: int, max_new_tokens: int) -> Answer:
        """`model.ask` (question reads), with the evidence its reads recorded."""
        self._check_memory()
        model = self.model
        corpus = evidence > 0 and model.state.corpus_attached
        out = model.ask(question, cue=cue, max_new_tokens=max_new_tokens, record=evidence > 0, return_dict=True)
        ans = Answer("memory", out.text, prompt_tokens=model.questions.prompt_ids(question, cue=cue).shape[1],
                     loop_cut=out.loop_cut, reads=out.reads, read_answers=out.read_answers,
                     read_loops=out.read_loops)
        if corpus:
            ans.corpus_evidence = model.corpus_evidence(top=evidence)
        if evidence > 0:          # (drops the recordings, own and corpus, once read)
            ans.evidence, ans.memory_share = answer_evidence(model, self.corpus, evidence)
        return ans

    def ask(self, question: str | None = None, *, cue: str | None = None,
            modes=("memory",), **kwargs) -> dict[str, Answer]:
        """`answer` in each of `modes`: {mode: Answer}."""
        return {m: self.answer(question, cue=cue, mode=m, **kwargs) for m in modes}

    def rag(self):
        """The RAG baseline over this corpus (`memformer.qa.rag.RAGBaseline`, embedded on first use)."""
        from memformer.qa.rag import RAGBaseline
        self._need_corpus()
        if self._rag is None:
            if self.embedder is None:
                self.embedder = self.model.questions.embedder
            self._rag = RAGBaseline(self.corpus, self.embedder, chunk_tokens=self.rag_chunk_tokens,
                                    overlap=self.rag_overlap, sentences=self.model.memory_config.sentence_ranking,
                                    tokenizer=self.model.tokenizer)
        return self._rag

    # ------------------------------------------------------------------ internals
    def _need_corpus(self) -> None:
        if self.corpus is None:
            raise RuntimeError("no documents: call read(documents) (or LongDocQA.load(model, path)) first")

    def _check_memory(self) -> None:
        if not self.memorized:
            raise RuntimeError(f"the documents were read for mode {self.mode!r}, without memory; "
                               f"prepare them with mode 'memory' to answer from memory")
        held = self.model.state.seen if self.model.memories else []
        if held != [len(self.corpus) - 1]:
            raise RuntimeError(f"the model's memory changed since read() (it holds {held} tokens per sequence, "
                               f"the documents need [{len(self.corpus) - 1}]); call read() again")

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
            x = model.questions.chat_ids(f"{tok.decode(context)}\n\n{question}" if context else question)
        if full:
            if x.shape[1] > len(context) + self._full_prompt_room():
                raise DoesNotFit("mode 'full': the documents and the question do not fit the native context")
            return x
        return x[:, -model.local_window:]

    def _generate(self, x: torch.Tensor, max_new_tokens: int, cue: str | None = None) -> tuple[str, bool]:
        """Greedy answer of the frozen backbone on exactly x [1, T]: no sink prefix and no memory,
        however the context was prepared (model.generate would also move all but the last window
        to memory). Stops at a degenerate loop or a restated cue as `ask` does; returns (text,
        whether a loop was cut)."""
        from transformers import StoppingCriteriaList
        from memformer.decoding import LoopStop, cut_loop, end_at_cue
        model = self.model
        with model.backbone_only():
            dev = model.device
            out = model.backbone.generate(input_ids=x.to(dev), attention_mask=torch.ones_like(x).to(dev),
                                          pad_token_id=model.pad_token_id, max_new_tokens=max_new_tokens,
                                          do_sample=False,
                                          stopping_criteria=StoppingCriteriaList([LoopStop(model.tokenizer, cue=cue)])).cpu()
        return cut_loop(end_at_cue(model.tokenizer.decode(out[0, x.shape[1]:], skip_special_tokens=True).strip(), cue))


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    return mode


def prepare(model, documents, mode: str = "memory", *, cache_dir=None, cache_limit=DEFAULT_CACHE_LIMIT,
            show_progress: bool = True, **kwargs) -> LongDocQA:
    """Read `documents` (texts, `Path`s or `Document`s) for answering in `mode` (see `MODES`):
    mode "memory" memorizes them (reusing `cache_dir` when given, kept under `cache_limit` bytes);
    "full" raises `DoesNotFit` when they exceed the native context. kwargs go to `LongDocQA`
    (embedder, rag_chunk_tokens, rag_overlap). Returns the context that `answer` takes."""
    return LongDocQA(model, mode, **kwargs).read(documents, cache_dir=cache_dir, cache_limit=cache_limit,
                                                 show_progress=show_progress)


def answer(model, ctx: LongDocQA, question: str | None = None, *, cue: str | None = None,
           mode: str | None = None, max_new_tokens: int = 48, evidence: int = 3) -> Answer:
    """Answer `question` (chat template) or complete `cue` from a context made by `prepare`, in
    the context's mode unless `mode` is given. Returns an `Answer` (text, evidence, ...)."""
    if ctx.model is not model:
        raise ValueError("this context was prepared with another model")
    return ctx.answer(question, cue=cue, mode=mode, max_new_tokens=max_new_tokens, evidence=evidence)


def read_qa_file(path: Path) -> dict:
    """The checked contents of `qa_documents.json` in the memory folder `path` (document names,
    checksums, texts and the token count). FileNotFoundError when absent; DocumentError when corrupt."""
    f = Path(path) / QA_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{path} holds no QA documents ({QA_FILE}); it was not written by LongDocQA.save")
    data = read_json(f, error=DocumentError, format=QA_FORMAT, version=QA_FORMAT_VERSION)
    docs, tokens = data.get("documents"), data.get("tokens")
    ok = isinstance(docs, list) and docs and isinstance(tokens, int) and not isinstance(tokens, bool) and all(
        isinstance(d, dict) and all(isinstance(d.get(k), str) for k in ("name", "sha256", "text")) for d in docs)
    if not ok:
        raise DocumentError(f"{f} is corrupt: expected 'tokens' (an integer) and 'documents' (a non-empty "
                            f"list of {{name, sha256, text}} strings)")
    return data
