"""MemoryState: what a model has memorized, per sequence, and the corpus memory attached beside it.

    state = model.state
    state.seen, state.stream, state.doc_starts     # tokens memorized, per sequence
    state.memories                                 # {layer: LayerMemory [B, Hkv, M, D]}
    state.to_tensors() / state.load_tensors(t, B)  # what a saved memory holds (persistence.py)

Its fields are read freely and changed only by its methods (memorize, reset, load, attach or
detach a corpus); each change that alters what memory reads can find bumps `version`, so a
context cache can tell whether the memory it read is still the one held.

The layer memories live on the memory layers themselves (`MemoryAttention.memory`, and `.corpus`
for an attached corpus, which is where the attention reads them); this object is the one that
installs, replaces and drops them.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from memformer.config import MemoryConfig
from memformer.index import LayerMemory

MEMORY_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}


def empty_layer_memory(cfg: MemoryConfig, backbone, batch: int, *, bounded: bool = True) -> LayerMemory:
    """An empty LayerMemory [batch, Hkv, 0, D] for a layer of `backbone` as `cfg` asks (dtype,
    index, storage; with `bounded`, its capacity and eviction: a read-only corpus has none)."""
    bcfg = backbone.config
    head_dim = getattr(bcfg, "head_dim", None) or bcfg.hidden_size // bcfg.num_attention_heads
    param = next(backbone.parameters())
    dtype = param.dtype if cfg.memory_dtype == "auto" else MEMORY_DTYPES[cfg.memory_dtype]
    return LayerMemory(batch, bcfg.num_key_value_heads, head_dim, dtype=dtype, device=param.device,
                       index=cfg.index, index_params=cfg.index_params,
                       mmap_dir=cfg.storage_dir if bounded else None,
                       capacity=cfg.capacity if bounded else None, eviction=cfg.eviction if bounded else "fifo")


class MemoryState:
    """One model's memory: per sequence b, `seen[b]` tokens memorized, the tokens themselves
    (`stream[b]`, question reads cut passages from them), where each `memorize` call began
    (`doc_starts[b]`, a document each), the sink prefix (`sink_ids` [B, S]) and the last `overlap`
    tokens of the previous call (`tail_ids` [B, ov]); the passages of question reads over
    sequence 0 (`passages`, a `memformer.passages.PassageIndex`, None until embedded); and an
    attached read-only corpus memory (`corpus_documents`, `corpus_sink_ids` [1, S],
    `corpus_passages`).

    layers: {layer index: MemoryAttention} of the model. new_layer_memory(batch, bounded=True):
    an empty LayerMemory [batch, Hkv, 0, D] as the model's MemoryConfig asks
    (`empty_layer_memory`)."""

    def __init__(self, layers: dict, new_layer_memory: Callable[..., LayerMemory]):
        self.layers = layers
        self.new_layer_memory = new_layer_memory
        self.seen: list[int] = []
        self.stream: list[list[int]] = []
        self.doc_starts: list[list[int]] = []
        self.passages = None
        self.sink_ids: torch.Tensor | None = None
        self.tail_ids: torch.Tensor | None = None
        self.corpus_documents: list = []
        self.corpus_sink_ids: torch.Tensor | None = None
        self.corpus_passages = None
        self.corpus_store = None                 # a Lance store attached (memformer.corpus_store)
        # per layer, the stream positions of the rows each recorded store read fetched: (index of
        # the first corpus recording taken under it, positions [M]), since the recordings were cleared
        self.corpus_fetched: dict[int, list[tuple[int, torch.Tensor]]] = {}
        self.fetch_first: dict[int, int] | None = None   # while a store read is open (fetched_corpus_blocks)
        self.version = 0

    # ---------------------------------------------------------------- reading the state
    @property
    def memories(self) -> dict[int, LayerMemory]:
        """{layer index: LayerMemory} of the memory layers that hold a memory."""
        return {i: m.memory for i, m in self.layers.items() if m.memory is not None}

    @property
    def corpus_attached(self) -> bool:
        return self.corpus_store is not None or any(m.corpus is not None for m in self.layers.values())

    def corpus_positions(self, layer: int, record: int) -> torch.Tensor:
        """Stream positions [M] that the row ids of layer `layer`'s corpus recording number
        `record` index: the attached in-RAM corpus memory's, or those of the blocks the question
        read under which it was taken fetched from an attached store."""
        m = self.layers[layer].corpus
        if m is not None:
            return m.positions[0]
        return next(pos for first, pos in reversed(self.corpus_fetched.get(layer, [])) if first <= record)

    def size(self) -> int:
        """Tokens currently held per sequence (rows in each layer's memory)."""
        mems = self.memories
        return len(next(iter(mems.values()))) if mems else 0

    def block_memories(self, source: str = "own") -> dict[int, LayerMemory]:
        """The layer memories blocks are read from: the own memory or the attached corpus's."""
        if source == "corpus":
            return {i: m.corpus for i, m in self.layers.items() if m.corpus is not None}
        if source != "own":
            raise ValueError(f"source must be 'own' or 'corpus', got {source!r}")
        return self.memories

    def memory_blocks(self, block_size: int, source: str = "own") -> int:
        """Number of memory blocks (block id = stream position // block_size) of the own memory or
        (source="corpus") of the attached corpus memory."""
        memories = self.block_memories(source)
        if not memories:
            return 0
        mem = next(iter(memories.values()))
        pos = mem.positions[mem.valid]                                      # [rows held]
        return int(pos.max()) // block_size + 1 if pos.numel() else 0

    def with_sink(self, x: torch.Tensor, sink_tokens: int) -> torch.Tensor:
        """[sink ‖ x] for x [B, T]: the sink prefix every memory window was read with (the
        corpus's when only it is there), for a batch of 1 or B."""
        sink = self.sink_ids if self.sink_ids is not None else self.corpus_sink_ids
        if sink_tokens > 0 and sink is not None and sink.shape[0] in (1, x.shape[0]):
            return torch.cat([sink.expand(x.shape[0], -1).to(x.device), x], dim=1)
        return x

    # ---------------------------------------------------------------- memorizing
    def ensure(self, batch: int, pinned: torch.Tensor | None = None) -> None:
        """Give every memory layer an empty memory for `batch` sequences, unless it has one (then
        the batch must match: ValueError). pinned: the block ids [K, n] being read
        (`reading_blocks`, checked against the memory there): a batch of K rows, each reading
        its own blocks of a memory of one sequence, is a match."""
        if pinned is not None and pinned.shape[0] == batch:
            return
        if self.memories:
            have = next(iter(self.memories.values())).batch
            if have != batch:
                raise ValueError(f"memory holds {have} sequence(s) but the input has {batch}; "
                                 f"call reset_memory() first or pass a batch of {have}")
            return
        for m in self.layers.values():
            m.memory = self.new_layer_memory(batch)
        self.seen = [0] * batch
        self.stream, self.doc_starts = [[] for _ in range(batch)], [[] for _ in range(batch)]

    def take_sink(self, ids: torch.Tensor, lengths: list[int], sink_tokens: int) -> int:
        """On the first memorize call, its first `sink_tokens` tokens (of ids [B, L]; fewer when a
        text is shorter) become the sink prefix of every window: always local, never written.
        Returns how many tokens of `ids` it took (0 once a sink is set)."""
        if sink_tokens <= 0 or self.sink_ids is not None:
            return 0
        S = min(sink_tokens, min(lengths))
        self.sink_ids = ids[:, :S].clone()                                  # [B, S]
        return S

    def append(self, ids: torch.Tensor, lengths: list[int], overlap: int) -> None:
        """Record a memorize call whose windows were written: ids [B, L] right-padded, `lengths`
        tokens each. Each sequence's call becomes a new document of its stream; the passages
        are dropped (embedded again on the next question); the last `overlap` tokens are kept as
        the next call's context, when every sequence ends at the same place."""
        L = ids.shape[1]
        for b, n in enumerate(lengths):
            self.doc_starts[b].append(self.seen[b])
            self.stream[b] += ids[b, :n].tolist()
        self.passages = None
        if overlap > 0 and len(set(lengths)) == 1:
            recent = ids if self.tail_ids is None or L >= overlap else torch.cat([self.tail_ids, ids], dim=1)
            self.tail_ids = recent[:, -overlap:].clone()
        else:
            self.tail_ids = None
        self.seen = [s + n for s, n in zip(self.seen, lengths)]
        self.version += 1

    def add_pending(self, positions: torch.Tensor, valid: torch.Tensor, slots: torch.Tensor) -> None:
        """Append what the memory layers kept in the last writing pass (`MemoryAttention.pending`,
        (k, v) [B, Hkv, n, D]) to their memories: at stream `positions` [B, n], `valid` [B, n]
        bool, from window `slots` [B, n]."""
        for m in self.layers.values():
            if m.pending is None:
                continue
            (k, v), mem = m.pending, m.memory
            dt = torch.float32 if mem.keys.dtype == torch.int8 else mem.keys.dtype  # int8: quantised in add
            dev = mem.keys.device
            mem.add(k.to(dt), v.to(dt), positions.to(dev), valid.to(dev), slots.to(dev))

    def begin_shard(self, seen: int, sink_ids: torch.Tensor | None) -> None:
        """Forget everything memorized and continue one sequence's stream at position `seen`, with
        `sink_ids` [1, S] as its sink (None: the next memorize call takes it): a corpus build's
        worker memorizes a document alone where it sits in the corpus. The stream then holds
        only what is memorized from here."""
        self.clear()
        self.ensure(1)
        self.seen = [seen]
        self.sink_ids = None if sink_ids is None else sink_ids.clone()

    def break_context(self) -> None:
        """The next memorize call starts without overlap context (a corpus's next document)."""
        self.tail_ids = None

    def set_passages(self, passages) -> None:
        """The `PassageIndex` of question reads over sequence 0 (or None: embed again)."""
        self.passages = passages

    def recorded_marks(self) -> dict[int, tuple[int, int]]:
        """How many reads each layer has recorded so far (own memory, corpus), for
        `drop_recorded_since`."""
        return {layer: (len(m.reads), len(m.corpus_reads)) for layer, m in self.layers.items()}

    def drop_recorded_since(self, marks: dict[int, tuple[int, int]]) -> None:
        """Forget the reads recorded since `recorded_marks` gave `marks` (an answer generated again)."""
        for layer, m in self.layers.items():
            own, corpus = marks.get(layer, (0, 0))
            del m.reads[own:]
            del m.corpus_reads[corpus:]

    def clear_recorded_reads(self) -> None:
        for m in self.layers.values():
            m.reads.clear()
            m.corpus_reads.clear()
        self.corpus_fetched = {}
        if self.fetch_first is not None:                 # inside a store read: its recordings start at 0
            self.fetch_first = dict.fromkeys(self.fetch_first, 0)

    def clear(self) -> None:
        """Forget everything memorized (all sequences); an attached corpus stays."""
        for m in self.layers.values():
            m.memory = m.pending = None
        self.clear_recorded_reads()
        self.seen, self.sink_ids, self.tail_ids = [], None, None
        self.stream, self.doc_starts, self.passages = [], [], None
        self.version += 1

    @contextlib.contextmanager
    def lent(self, memories: dict | None):
        """Within this block memory layer i holds `memories[i]` (or none) in place of its own
        memory, which is back afterwards (training reads its lanes' memories through the layers:
        `memformer.training.crossbatch.runtime_state`)."""
        own = {i: m.memory for i, m in self.layers.items()}
        for i, m in self.layers.items():
            m.memory, m.pending = (memories or {}).get(i), None
        try:
            yield
        finally:
            for i, m in self.layers.items():
                m.memory = own[i]

    # ---------------------------------------------------------------- a corpus memory
    def attach_corpus(self, memories: dict[int, LayerMemory], documents: list, sink_ids, passages) -> None:
        """Attach a corpus memory read-only (replacing an attached one): `memories` {layer:
        LayerMemory [1, Hkv, M, D]}, its document table, sink prefix [1, S] (or None) and
        `PassageIndex` (or None: the corpus was built without passages)."""
        for i, m in self.layers.items():
            m.corpus = memories[i]
        self.corpus_store, self.corpus_fetched = None, {}
        self.corpus_documents, self.corpus_sink_ids, self.corpus_passages = documents, sink_ids, passages
        self.version += 1

    def attach_corpus_store(self, store, documents, sink_ids, passages) -> None:
        """Attach a Lance corpus store read-only (replacing an attached corpus): nothing of its
        rows is loaded; a question read fetches the blocks it reads (`fetched_corpus_blocks`).
        kNN reads (`generate` without a question) do not search a store."""
        for m in self.layers.values():
            m.corpus = None
        self.corpus_store, self.corpus_fetched = store, {}
        self.corpus_documents, self.corpus_sink_ids, self.corpus_passages = documents, sink_ids, passages
        self.version += 1

    @contextlib.contextmanager
    def fetched_corpus_blocks(self, blocks, device):
        """Within this block each memory layer's corpus is a LayerMemory of just the rows of
        `blocks` [n] or [K, n] (block ids, -1 padding), fetched from the attached store; afterwards they stay readable
        as `corpus_positions` of the recordings taken under them (evidence of the read) and the
        layers hold no corpus again. Without a
        store attached, nothing changes."""
        store = self.corpus_store
        if store is None:
            yield
            return
        ids = sorted({int(b) for b in torch.as_tensor(blocks).reshape(-1).tolist() if b >= 0})   # -1 pads
        if not ids or ids[0] < 0 or ids[-1] >= store.blocks:
            raise ValueError(f"reading_blocks: block ids must be in [0, {store.blocks}) (corpus of {store.blocks} "
                             f"blocks of {store.block_size}), got {ids[:1] + ids[-1:]}")
        fetched = store.fetch_blocks(ids, device)
        # the first recording taken under this read, per layer (0 again if the recordings are
        # cleared inside it: generate(record=True) clears them as it starts)
        self.fetch_first = {i: len(m.corpus_reads) for i, m in self.layers.items()}
        for i, m in self.layers.items():
            m.corpus = fetched[i]
        try:
            yield
        finally:
            for i, m in self.layers.items():
                m.corpus = None
                first = self.fetch_first[i]
                if len(m.corpus_reads) > first:          # recorded under this read: keep what its ids index
                    self.corpus_fetched.setdefault(i, []).append((first, fetched[i].positions[0]))
            self.fetch_first = None

    def set_corpus_passages(self, passages) -> None:
        """The attached corpus's `PassageIndex`, now with a sentence embedder attached."""
        self.corpus_passages = passages

    def detach_corpus(self) -> None:
        for m in self.layers.values():
            m.corpus = None
            m.corpus_reads.clear()
        self.corpus_store, self.corpus_fetched = None, {}
        self.corpus_documents, self.corpus_sink_ids, self.corpus_passages = [], None, None
        self.version += 1

    # ---------------------------------------------------------------- to and from tensors
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Everything a saved memory holds, as CPU tensors: per layer `layers.{i}.*` (keys, values,
        positions, slots, ...), `seen` [B], `sink_ids` / `tail_ids`, the token `stream` [B, max
        seen] (right-padded), `doc_starts` [B, max docs] (-1 padded), and once embedded the
        passages of question reads, `passage_ranges` [C, 2] and `passage_embeddings` [C, E] (with
        sentence ranking also `sentence_ranges` [S, 2] and `sentence_embeddings` [S, E])."""
        tensors = {f"layers.{i}.{k}": t.detach().cpu().contiguous()
                   for i, mem in self.memories.items() for k, t in mem.state_dict().items()}
        tensors["seen"] = torch.tensor(self.seen, dtype=torch.long)
        for name, t in (("sink_ids", self.sink_ids), ("tail_ids", self.tail_ids)):
            if t is not None:
                tensors[name] = t.cpu().contiguous()
        B = len(self.stream)
        stream = torch.zeros(B, max(self.seen), dtype=torch.long)
        starts = torch.full((B, max(len(d) for d in self.doc_starts)), -1, dtype=torch.long)
        for b in range(B):
            stream[b, :len(self.stream[b])] = torch.tensor(self.stream[b], dtype=torch.long)
            starts[b, :len(self.doc_starts[b])] = torch.tensor(self.doc_starts[b], dtype=torch.long)
        tensors.update(stream=stream, doc_starts=starts)
        if self.passages is not None:
            tensors["passage_ranges"] = torch.tensor(self.passages.ranges, dtype=torch.long).view(-1, 2)
            tensors["passage_embeddings"] = self.passages.embeddings.contiguous()
            if self.passages.sentence_embeddings is not None:
                tensors["sentence_ranges"] = torch.tensor(self.passages.sentence_ranges, dtype=torch.long).view(-1, 2)
                tensors["sentence_embeddings"] = self.passages.sentence_embeddings.contiguous()
        return tensors

    def load_tensors(self, tensors: dict, batch: int) -> None:
        """Replace the memory by `to_tensors()` tensors of a memory of `batch` sequences, all or
        nothing: KeyError / ValueError / RuntimeError / IndexError leave the memory as it was."""
        new = {i: self.new_layer_memory(batch) for i in self.layers}
        for i, mem in new.items():
            prefix = f"layers.{i}."
            mem.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        seen = tensors["seen"].tolist()
        stream = [tensors["stream"][b, :n].tolist() for b, n in enumerate(seen)]
        starts = [[x for x in row if x >= 0] for row in tensors["doc_starts"].tolist()]
        if len(seen) != batch or len(stream) != batch or len(starts) != batch:
            raise ValueError(f"the saved stream holds {len(stream)} sequence(s), the memory {batch}")
        passages = saved_passages(tensors)          # the embedder is attached at the first search
        for i, m in self.layers.items():
            m.memory, m.pending = new[i], None
        self.clear_recorded_reads()
        self.seen, self.stream, self.doc_starts, self.passages = seen, stream, starts, passages
        self.sink_ids, self.tail_ids = tensors.get("sink_ids"), tensors.get("tail_ids")
        self.version += 1


def saved_passages(tensors: dict):
    """The `PassageIndex` a saved memory holds (`passage_ranges`, `passage_embeddings`), or None;
    without an embedder: one is attached at the first search."""
    if "passage_embeddings" not in tensors:
        return None
    from memformer.passages import PassageIndex
    sentences = None
    if "sentence_embeddings" in tensors:
        sentences = ([tuple(r) for r in tensors["sentence_ranges"].tolist()], tensors["sentence_embeddings"].float())
    return PassageIndex([tuple(r) for r in tensors["passage_ranges"].tolist()],
                        tensors["passage_embeddings"].float(), None, sentences)
