"""MemoryConfig: one dataclass that says where memory lives and how it is read.

Validated on construction so a bad setting fails at once with a message that names it, not
deep inside a forward pass. Each field's reason is in docs/config.md. Training-only settings
(LoRA rank and alpha, gate initialisation) live in `AdapterConfig`, below.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional

INDEX_KINDS = ("exact", "faiss-flat", "faiss-ivf")
# removed backends -> why (a config that names one fails with this)
_REMOVED_INDEXES = {"faiss-hnsw": "HNSW lost recall to faiss-ivf at every speed measured",
                    "faiss-ivfpq": "IVF-PQ lost recall to faiss-ivf at every speed measured"}
EVICTIONS = ("fifo", "none")
MEMORY_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
_MAX_SIZE = 1 << 20     # bound on windows, k, blocks, layers, ranks: a corrupt file or a typo, not a config


@dataclass
class MemoryConfig:
    """Settings of the memory layers.

    memory_layers: decoder layers that store memory and read it; None = every layer (a frozen
        backbone needs every layer to read the question's memory blocks).
    knn_layers: the memory layers that search memory themselves when no question is known
        (`generate`, perplexity): None = the upper two thirds of an all-layer memory (kNN reads in
        the lowest third hurt a frozen backbone), or every layer of an explicit `memory_layers`.
    layer_blocks: memory blocks each chunk of `block_size` queries reads when no question is known
        (`generate`, `forward`, perplexity), chosen by the layer's own queries: each block scored by
        its best key against the mean query of the chunk before (so no read depends on a later
        token), the top ones read whole, laid out as question reads lay out theirs. 32 blocks =
        2,048 tokens. 0 = kNN reads instead (`top_k` keys per query and token); an attached corpus
        memory is always read by kNN when no question is known.
    top_k: keys retrieved per query head and token by kNN reads.
    window: local context W; long inputs are read in windows of W tokens.
    sink_tokens: the first tokens of a memory, prepended to every window and to generation as the
        attention sink; they stay local and are never written to memory.
    overlap: tokens before each window's new tokens re-read as context (not written again).
    block_size: tokens per memory block (block b holds stream positions [b*size, (b+1)*size)).
    question_blocks: blocks a question reads (`ask`): those under the passages nearest the question.
    answer_reads: most checked reads a question answers from (`ask`): the best, and each next
        candidate whose check score is within `question_reads.ANSWER_MARGIN` of it and
        `ANSWER_LIFT` above the candidates' median, each answered alone and the distinct answers
        joined one per line (a key with several values, several keys asked at once). 1 = the
        best read only.
    sentence_ranking: rank passages by the best of their own cosine and their sentences' (the
        sentences are embedded too; `memformer.passages`), for question reads and the RAG
        baseline alike, so a one-sentence fact inside dense text is not diluted by its passage;
        False ranks by the passages' cosine alone.
    copy_pointer: while an answer is generated under a question's reads (`ask`,
        `reading_blocks`), each head's memory logit at a row gets + copy_pointer times the share
        of attention it gave the row before at the previous token (`memformer.blocks.CopyPointer`):
        a head copying from memory goes on at the next row instead of jumping to a later row
        that follows the same token, as in numbers with a doubled digit ("3544" copied "354.").
        It follows the answer's first item: once the generated text ends a line, or holds ".",
        "!" or "?" followed by whitespace, it rests (a point inside "10.8.0.254" does not end it).
        An answer to a cue starts under it (its first token is pointed from the cue's token
        before the last). 0 turns it off; prompts, training and layer reads are unaffected.
    index: kNN backend over memory keys: "exact" (torch), or FAISS "faiss-flat", "faiss-ivf".
        index_params go to the backend (e.g. {"nprobe": 32}).
    capacity: max tokens of memory per sequence (None = unbounded); eviction when it is reached:
        "fifo" drops the oldest, "none" raises (MemoryCapacityError) and writes nothing.
    memory_dtype: dtype of stored keys/values ("auto" = backbone dtype; "int8" = int8 rows with a
        float32 scale per row, 3.76x smaller than float32 at head_dim 64).
    storage_dir: None = memory rows in RAM (or on the model's device); a folder = keys and values
        in memory-mapped files there, so a memory can be larger than RAM (CPU, index "exact").
        The files are unlinked at once: nothing to clean up, nothing reusable after the process.
    """

    memory_layers: Optional[list[int]] = None
    knn_layers: Optional[list[int]] = None
    layer_blocks: int = 32
    top_k: int = 32
    window: int = 1024
    sink_tokens: int = 4
    overlap: int = 128
    block_size: int = 64
    question_blocks: int = 4
    answer_reads: int = 4
    sentence_ranking: bool = True
    copy_pointer: float = 3.0
    index: str = "exact"
    index_params: dict = field(default_factory=dict)
    capacity: Optional[int] = None
    eviction: str = "fifo"
    memory_dtype: str = "auto"
    storage_dir: Optional[str] = None

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(f"MemoryConfig: {msg}")

        def whole(name, high=_MAX_SIZE, optional=False):   # an int field, maybe read from a file or flag
            v = getattr(self, name)
            if optional and v is None:
                return
            need(isinstance(v, int) and not isinstance(v, bool), f"{name} must be an integer, got {v!r}")
            need(v <= high, f"{name} must be <= {high}, got {v}")

        for name in ("memory_layers", "knn_layers"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool)
                                                                     and 0 <= i <= _MAX_SIZE for i in v)),
                 f"{name} must be None or a list of layer indices >= 0, got {v!r}")
        for name in ("layer_blocks", "top_k", "window", "sink_tokens", "overlap", "block_size", "question_blocks", "answer_reads"):
            whole(name)                                      # the lower bounds are checked below
        whole("capacity", 1 << 40, optional=True)
        need(isinstance(self.sentence_ranking, bool), f"sentence_ranking must be True or False, got {self.sentence_ranking!r}")
        need(isinstance(self.copy_pointer, (int, float)) and not isinstance(self.copy_pointer, bool)
             and math.isfinite(self.copy_pointer) and 0 <= self.copy_pointer <= 100,
             f"copy_pointer must be a number in [0, 100], got {self.copy_pointer!r}")
        if self.memory_layers is not None:
            self.memory_layers = sorted({int(i) for i in self.memory_layers})
            need(len(self.memory_layers) > 0, "memory_layers is empty; use None for every layer")
            need(all(i >= 0 for i in self.memory_layers), f"negative layer in {self.memory_layers}")
        if self.knn_layers is not None:
            self.knn_layers = sorted({int(i) for i in self.knn_layers})
            need(len(self.knn_layers) > 0, "knn_layers is empty; use None for the default")
            need(self.memory_layers is None or set(self.knn_layers) <= set(self.memory_layers),
                 f"knn_layers {sorted(set(self.knn_layers) - set(self.memory_layers or []))} are not "
                 f"memory layers ({self.memory_layers})")
        need(int(self.layer_blocks) >= 0, f"layer_blocks must be >= 0 (0 = kNN reads), got {self.layer_blocks}")
        need(int(self.top_k) >= 1, f"top_k must be >= 1, got {self.top_k}")
        need(int(self.window) >= 2, f"window must be >= 2, got {self.window}")
        need(0 <= int(self.sink_tokens) < int(self.window),
             f"sink_tokens must be in [0, window), got {self.sink_tokens} with window {self.window}")
        need(0 <= int(self.overlap) and int(self.window) - int(self.sink_tokens) - int(self.overlap) >= 1,
             f"overlap must be >= 0 and leave room for new tokens: window {self.window} - sink_tokens "
             f"{self.sink_tokens} - overlap {self.overlap} < 1")
        need(int(self.block_size) >= 1, f"block_size must be >= 1, got {self.block_size}")
        need(int(self.question_blocks) >= 1, f"question_blocks must be >= 1, got {self.question_blocks}")
        need(int(self.answer_reads) >= 1, f"answer_reads must be >= 1, got {self.answer_reads}")
        need(self.index in INDEX_KINDS,
             f"index {self.index!r} is not one of {', '.join(INDEX_KINDS)}"
             + (f" ({self.index} was removed: {_REMOVED_INDEXES[self.index]}; use faiss-ivf)"
                if self.index in _REMOVED_INDEXES else ""))
        need(isinstance(self.index_params, dict), "index_params must be a dict")
        if "storage_dir" in self.index_params:       # the form before storage_dir was a field
            params = dict(self.index_params)
            old = params.pop("storage_dir")
            need(self.storage_dir is None or old is None or str(old) == str(self.storage_dir),
                 f"storage_dir {self.storage_dir!r} and index_params storage_dir {old!r} differ; "
                 f"give storage_dir only")
            warnings.warn("MemoryConfig: index_params={'storage_dir': ...} is deprecated and will be "
                          "refused in the next release; use MemoryConfig(storage_dir=...)",
                          FutureWarning, stacklevel=3)
            self.index_params = params
            self.storage_dir = self.storage_dir if old is None else (self.storage_dir or old)
        if isinstance(self.storage_dir, os.PathLike):
            self.storage_dir = os.fspath(self.storage_dir)
        need(self.storage_dir is None or (isinstance(self.storage_dir, str) and self.storage_dir.strip() != ""),
             f"storage_dir must be None (memory in RAM) or a folder path, got {self.storage_dir!r}")
        need(self.storage_dir is None or self.index == "exact",
             f"storage_dir (memory-mapped rows) needs index='exact', got {self.index!r}: FAISS keeps "
             f"its own in-RAM copy of the keys")
        need(self.capacity is None or int(self.capacity) >= 1,
             f"capacity must be >= 1 or None, got {self.capacity}")
        need(self.eviction in EVICTIONS,
             f"eviction {self.eviction!r} is not one of {', '.join(EVICTIONS)}"
             + (" (score eviction was removed: never measured to help answers, and it cost a branch "
                "on every attention call; use fifo)" if self.eviction == "score" else ""))
        need(self.memory_dtype in MEMORY_DTYPES,
             f"memory_dtype {self.memory_dtype!r} not in {MEMORY_DTYPES}")

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
            # Training-free all-layer memory: kNN reads from layer L/3 up (on SmolLM2 layers 10-29
            # gave perplexity 10.76 against 11.71 without memory and 17.96 with all 30 layers).
            return layers[num_layers // 3:] if self.memory_layers is None else layers
        bad = [i for i in self.knn_layers if i not in layers]
        if bad:
            raise ValueError(f"MemoryConfig: knn_layers {bad} are not memory layers of a backbone "
                             f"with {num_layers} layers")
        return list(self.knn_layers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "MemoryConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"MemoryConfig: unknown fields {sorted(unknown)} (a config written by "
                             f"an older memformer? read-path switches that lost their ablation were removed)")
        return cls(**d)


@dataclass
class AdapterConfig:
    """Trainable adapters of the memory layers (training only; `MemformerForCausalLM.add_lora`).

    lora_rank / lora_alpha: LoRA on the memory layers' q/k/v/o projections (rank 0 = gates only).
        B starts at zero, so an untrained adapter leaves the backbone's outputs unchanged.
    gate_init: initial per-head memory logit bias (0 = memory competes with local keys in one
        plain softmax, which is what works training-free).
    lora_layers: the memory layers that get LoRA (None = every memory layer); the others train
        their gates only, so their projections, and everything the model computes without
        memory there, stay the backbone's.
    """

    lora_rank: int = 8
    lora_alpha: float = 16.0
    gate_init: float = 0.0
    lora_layers: Optional[list[int]] = None

    def __post_init__(self):
        rank = self.lora_rank
        if not isinstance(rank, int) or isinstance(rank, bool) or rank > _MAX_SIZE:
            raise ValueError(f"AdapterConfig: lora_rank must be an integer <= {_MAX_SIZE}, got {rank!r}")
        if rank < 0:
            raise ValueError(f"AdapterConfig: lora_rank must be >= 0, got {rank}")
        for name in ("lora_alpha", "gate_init"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or abs(v) > 1e6:
                raise ValueError(f"AdapterConfig: {name} must be a finite number, got {v!r}")
        if self.lora_layers is not None:
            ok = isinstance(self.lora_layers, (list, tuple)) and len(self.lora_layers) > 0 and all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < _MAX_SIZE for i in self.lora_layers)
            if not ok:
                raise ValueError(f"AdapterConfig: lora_layers must be a non-empty list of layer numbers "
                                 f"or None (every memory layer), got {self.lora_layers!r}")
            self.lora_layers = sorted(set(self.lora_layers))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"AdapterConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


def parse_length(s: str) -> int:
    """'4k' -> 4096, '16K' -> 16384, '1000' -> 1000, '1m' -> 1048576."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", s)
    if not m:
        raise ValueError(f"not a length: {s!r} (use e.g. 4k, 16k, 32000)")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
