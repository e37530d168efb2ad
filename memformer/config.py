"""MemoryConfig: one dataclass that says where memory lives and how it is read.

Validated on construction so a bad setting fails at once with a message that names it,
not deep inside a forward pass.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

INDEX_KINDS = ("exact", "faiss-flat", "faiss-ivf", "faiss-hnsw", "faiss-ivfpq")
POSITION_MODES = ("first", "fixed", "window")
EVICTIONS = ("fifo", "score", "none")
MEMORY_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")


@dataclass
class MemoryConfig:
    """Settings of the memory layers.

    memory_layers: indices of decoder layers that read memory; None = every layer (what a
        training-free frozen backbone needs, see docs/architecture.md).
    knn_layers: the memory layers that search memory themselves (kNN token reads, voted block
        reads); None = every memory layer. The other memory layers still store memory and read
        it when blocks are pinned from outside (`reading_blocks`, question reads), which every
        memory layer does. Training-free, kNN reads in the lowest layers hurt real-text
        prediction (measured on SmolLM2: perplexity 17.96 with all 30, 10.76 with layers
        10-29, 11.71 without memory), while pinned reads need every layer.
    top_k: keys retrieved per query head and token.
    neighbors: also read the r rows on each side of every retrieved row (same document, contiguous
        positions; each row once), as InfLLM reads whole blocks: a multi-token value (a UUID, a
        number split into pieces) arrives whole next to the key that matched. 0 = top-k rows only.
    read_blocks: > 0 = block reads (`memformer.blocks`, as InfLLM's memory units): the top-k hits
        of every head vote, weighted by the attention they would draw, for blocks of `block_size`
        consecutive document positions; each chunk of `block_size` queries then attends to all
        rows of its `read_blocks` best blocks, the same contiguous text for every head. 0 = token
        reads (top-k rows per head and query). Read-time only: stored memory is the same.
    block_size: tokens per memory block and queries per selection chunk in block reads.
    window: local context W; long inputs are read in windows of W tokens.
    sink_tokens: the first `sink_tokens` tokens of a sequence are prepended to every window
        (and to generation) so each window keeps the same attention sink; they stay local and
        are never written to memory. 0 = each window's own first token acts as the sink; that
        sink's key then lands in memory once per window and, measured on SmolLM2, drowns the
        retrieved needle by 8k tokens, hence the default of 4.
    overlap: each window re-reads the last `overlap` tokens before its new tokens as context
        (not written again), so no token enters memory with less than `overlap` tokens of
        context; a needle cut by a window boundary is otherwise stored without its sentence.
    read_during_ingest: if False (default), `memorize` only *writes* memory and only the final
        window / generated tokens read it, so ingest costs about a plain windowed forward.
        If True, every window also reads all earlier windows (quadratic search cost).
    position_mode: "first" = memory keys stored un-rotated enter at relative position 0 ("as if
        first", FoT) and the query keeps its real local rotation; "fixed" = every memory key
        looks `fixed_distance` tokens away (InfLLM); "window" = keys are stored rotated at their
        position in their own window and the query is moved `fixed_distance` further, so every
        memory window looks like the window just before the current one: memory keys keep
        their order, which copying a multi-token needle (digit by digit) relies on.
    fixed_distance: the distance used by position_mode "fixed" and "window"; None = `window`.
    index: kNN backend over memory keys: "exact" (torch matmul + top-k, chunked), or a FAISS one
        (needs faiss-cpu / faiss-gpu): "faiss-flat" (exact), "faiss-ivf", "faiss-hnsw", "faiss-ivfpq"
        (approximate; IVF ones search exactly until trained). `index_params` go to the backend
        (ExactIndex / FaissIndex keyword arguments, e.g. {"nprobe": 32}).
    index_device: device that holds memory and runs search (None = the backbone's device).
    storage_dir: keep memory rows (keys, values) in memory-mapped files under this directory
        instead of RAM, for memories larger than RAM (CPU, index "exact"; the files are unlinked
        at once, so nothing is left behind). None = RAM.
    capacity: max tokens of memory per sequence (None = unbounded); eviction says what happens
        when it is reached: "fifo" drops the oldest tokens, "score" (H2O) drops the tokens that
        received the least attention mass so far (oldest first among equals), "none" raises.
    memory_dtype: dtype of stored keys/values ("auto" = backbone dtype; "int8" = int8 rows with a
        float32 scale per row, 3.76x smaller than float32 at head_dim 64).
    lora_rank / lora_alpha: LoRA adapters on the memory layers' q/k/v/o (0 = none). LoRA B is
        zero-initialised, so an untrained adapter leaves the backbone's outputs unchanged.
    gate_init: initial per-head memory logit bias (0 = memory competes with local keys in one
        plain softmax, which is what works training-free).
    """

    memory_layers: Optional[list[int]] = None
    knn_layers: Optional[list[int]] = None
    top_k: int = 32
    neighbors: int = 0
    read_blocks: int = 0
    block_size: int = 64
    window: int = 1024
    sink_tokens: int = 4
    overlap: int = 128
    read_during_ingest: bool = False
    position_mode: str = "window"
    fixed_distance: Optional[int] = None
    index: str = "exact"
    index_params: dict = field(default_factory=dict)
    index_device: Optional[str] = None
    storage_dir: Optional[str] = None
    capacity: Optional[int] = None
    eviction: str = "fifo"
    memory_dtype: str = "auto"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    gate_init: float = 0.0

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(f"MemoryConfig: {msg}")

        if self.memory_layers is not None:
            self.memory_layers = sorted({int(i) for i in self.memory_layers})
            need(len(self.memory_layers) > 0, "memory_layers is empty; use None for every layer")
            need(all(i >= 0 for i in self.memory_layers), f"negative layer in {self.memory_layers}")
        if self.knn_layers is not None:
            self.knn_layers = sorted({int(i) for i in self.knn_layers})
            need(len(self.knn_layers) > 0, "knn_layers is empty; use None for every memory layer")
            need(self.memory_layers is None or set(self.knn_layers) <= set(self.memory_layers),
                 f"knn_layers {sorted(set(self.knn_layers) - set(self.memory_layers or []))} are not "
                 f"memory layers ({self.memory_layers})")
        need(int(self.top_k) >= 1, f"top_k must be >= 1, got {self.top_k}")
        need(int(self.neighbors) >= 0, f"neighbors must be >= 0, got {self.neighbors}")
        need(int(self.read_blocks) >= 0, f"read_blocks must be >= 0, got {self.read_blocks}")
        need(int(self.block_size) >= 1, f"block_size must be >= 1, got {self.block_size}")
        need(not (self.read_blocks and self.neighbors),
             "neighbors and read_blocks are two ways of reading context around a hit; set one")
        need(int(self.window) >= 2, f"window must be >= 2, got {self.window}")
        need(0 <= int(self.sink_tokens) < int(self.window),
             f"sink_tokens must be in [0, window), got {self.sink_tokens} with window {self.window}")
        need(0 <= int(self.overlap) and int(self.window) - int(self.sink_tokens) - int(self.overlap) >= 1,
             f"overlap must be >= 0 and leave room for new tokens: window {self.window} - sink_tokens "
             f"{self.sink_tokens} - overlap {self.overlap} < 1")
        need(self.position_mode in POSITION_MODES,
             f"position_mode {self.position_mode!r} not in {POSITION_MODES}")
        need(self.fixed_distance is None or int(self.fixed_distance) >= 0,
             f"fixed_distance must be >= 0, got {self.fixed_distance}")
        need(self.index in INDEX_KINDS, f"index {self.index!r} not in {INDEX_KINDS}")
        need(self.storage_dir is None or self.index == "exact",
             f"storage_dir (memory-mapped rows) needs index='exact', got {self.index!r}")
        need(isinstance(self.index_params, dict), "index_params must be a dict")
        need(self.capacity is None or int(self.capacity) >= 1,
             f"capacity must be >= 1 or None, got {self.capacity}")
        need(self.eviction in EVICTIONS, f"eviction {self.eviction!r} not in {EVICTIONS}")
        need(self.memory_dtype in MEMORY_DTYPES,
             f"memory_dtype {self.memory_dtype!r} not in {MEMORY_DTYPES}")
        need(int(self.lora_rank) >= 0, f"lora_rank must be >= 0, got {self.lora_rank}")

    def resolve_layers(self, num_layers: int) -> list[int]:
        """The memory layer indices for a backbone with `num_layers` decoder layers."""
        if self.memory_layers is None:
            return list(range(num_layers))
        bad = [i for i in self.memory_layers if i >= num_layers]
        if bad:
            raise ValueError(f"MemoryConfig: memory_layers {bad} out of range for a backbone "
                             f"with {num_layers} layers")
        return list(self.memory_layers)

    def resolve_knn_layers(self, num_layers: int) -> list[int]:
        """The memory layers that run kNN reads, for a backbone with `num_layers` decoder layers."""
        layers = self.resolve_layers(num_layers)
        if self.knn_layers is None:
            return layers
        bad = [i for i in self.knn_layers if i not in layers]
        if bad:
            raise ValueError(f"MemoryConfig: knn_layers {bad} are not memory layers of a backbone "
                             f"with {num_layers} layers")
        return list(self.knn_layers)

    @property
    def memory_distance(self) -> int:
        """Extra query rotation for memory in position_mode "fixed" / "window"."""
        return self.window if self.fixed_distance is None else int(self.fixed_distance)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "MemoryConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"MemoryConfig: unknown fields {sorted(unknown)}")
        return cls(**d)
