"""MemformerForCausalLM: a frozen pretrained causal LM whose attention layers read a kNN memory.

    model = MemformerForCausalLM.from_pretrained()          # embedded default backbone
    model.memorize(long_text)                                # windows of W tokens -> memory
    model.ask("What is the pass key?")                       # question reads while generating
    model.generate(ids)                                      # kNN reads (no question known)

Data flow per window (see docs/architecture.md): every layer attends causally inside the
window [sink ‖ overlap context ‖ new tokens]; after the window, the new tokens' keys and values
are appended to memory. Reading: a question pins the memory blocks under the passages nearest to
it and every memory layer reads them (`ask`); without a question the kNN layers retrieve their
top-k keys per query (`generate`, `forward`).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from memformer.adapters import get_adapter
from memformer.blocks import pinned_block_ids
from memformer.config import AdapterConfig, MemoryConfig
from memformer.index import LayerMemory
from memformer.loading import encode_text
from memformer.memory_layer import MemoryAttention, MemoryRuntime
from memformer import persistence

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}


@contextlib.contextmanager
def decoder_span(decoder: nn.Module, start: int, stop: int | None):
    """Within this block `decoder` runs only its layers [start, stop) (stop None = to the top), and
    its final norm only when the span reaches the top: its forward then maps the state entering
    layer `start` (given as inputs_embeds) to the state entering layer `stop`. The decoder's own
    forward still builds the causal mask and the RoPE tables, so a span runs exactly the
    operations the same layers run inside a whole forward."""
    layers, norm = decoder.layers, decoder.norm
    stop = len(layers) if stop is None else stop
    if (start, stop) == (0, len(layers)):
        yield
        return
    decoder.layers = nn.ModuleList(list(layers)[start:stop])
    if stop < len(layers):
        decoder.norm = nn.Identity()
    try:
        yield
    finally:
        decoder.layers, decoder.norm = layers, norm



class MemformerForCausalLM(nn.Module):
    """A backbone (frozen) + memory layers (trainable adapters) + one memory per sequence."""

    def __init__(self, backbone: nn.Module, tokenizer=None, memory_config: MemoryConfig | None = None,
                 *, embedder=None):
        super().__init__()
        self.memory_config = cfg = memory_config or MemoryConfig()
        self.adapter = get_adapter(backbone.config)          # clear ValueError for unknown types
        self.backbone = backbone
        self.tokenizer = tokenizer
        layers = self.adapter.layers(backbone)
        if any(isinstance(getattr(layer, self.adapter.attn_attr), MemoryAttention) for layer in layers):
            raise ValueError("this backbone already has memory layers (it belongs to another "
                             "MemformerForCausalLM); load a fresh backbone")
        self.memory_layer_ids = cfg.resolve_layers(len(layers))
        # Taken before injection so it names the frozen weights only.
        self.backbone_fingerprint = persistence.fingerprint_backbone(backbone)
        backbone.requires_grad_(False)
        backbone.eval()
        knn = cfg.resolve_knn_layers(len(layers))           # clear ValueError when out of range
        self.runtime = MemoryRuntime(top_k=cfg.top_k, block_size=cfg.block_size)
        rotary, eager = self.adapter.apply_rotary(), self.adapter.eager_attention()
        # {layer index: MemoryAttention}; a plain dict, so the wrappers are registered once (in the backbone)
        self.memory_modules: dict[int, MemoryAttention] = {}
        for i in self.memory_layer_ids:
            attn_attr = self.adapter.attn_attr
            self.memory_modules[i] = MemoryAttention(getattr(layers[i], attn_attr), i, rotary, eager,
                                                     self.runtime, knn=i in knn)
            setattr(layers[i], attn_attr, self.memory_modules[i])
        self.adapter_config: AdapterConfig | None = None    # LoRA on the memory layers: add_lora()
        self._set_trainable()
        self.runtime.q_rotation = self._rotation_at(cfg.window)
        cos, sin = self._rotation_at(*range(cfg.window))                      # [1, W, D]
        unit = cos[0, 0, 0]                      # position 0: cos = the rotary's attention scaling
        self.runtime.slot_rotation = (cos / unit, sin / unit)
        self.embedder = embedder                 # sentence embedder of question reads (None: MiniLM)
        self.seen: list[int] = []          # tokens memorized so far, per sequence
        self.stream: list[list[int]] = []        # those tokens, per sequence (question reads' passages)
        self.doc_starts: list[list[int]] = []    # where each memorize() call began, per sequence
        self._passages = None                    # PassageIndex over stream[0] (built on first ask)
        self.sink_ids: torch.Tensor | None = None
        self.tail_ids: torch.Tensor | None = None    # last `overlap` tokens of the previous call
        self.corpus_documents: list = []             # table of an attached corpus memory
        self.corpus_sink_ids: torch.Tensor | None = None
        self.corpus_passages = None                  # its PassageIndex (question reads over it)
        self.memory_version = 0                      # +1 whenever what memory reads can find changes

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, model=None, memory_config: MemoryConfig | None = None, *, adapter="auto",
                        tokenizer=None, embedder=None, torch_dtype=None, device_map=None,
                        configure=None, **kwargs) -> "MemformerForCausalLM":
        """Load a backbone (local folder, GGUF file, cached hub id, model instance, or None for the
        embedded default SmolLM2-135M-Instruct), freeze it and add memory layers.

        adapter: "auto" (default) loads the trained adapter shipped for this backbone, with the
        memory config it was trained for, when there is one and no `memory_config` is given (the
        embedded default has one: memory in 6 of its 30 layers); otherwise memory is
        training-free. None: always training-free (`memory_config`, or MemoryConfig(): memory in
        every layer). A folder written by `save_pretrained`: those memory-layer weights.
        embedder: a sentence-transformers model for question reads (None: MiniLM).
        configure: a function MemoryConfig -> MemoryConfig applied to the config chosen above
        (the `memformer` command's memory flags over the adapter's or the default config)."""
        from memformer.loading import load_backbone
        from memformer.weights import packaged_adapter
        auto = isinstance(adapter, str) and adapter == "auto"
        if adapter is not None and not auto and memory_config is None:
            memory_config = persistence.read_adapter_config(adapter)    # a bad folder fails before loading
        backbone, tok = load_backbone(model, torch_dtype=torch_dtype, device_map=device_map,
                                      tokenizer=tokenizer, **kwargs)
        if auto:
            adapter = None if memory_config is not None else \
                packaged_adapter(persistence.fingerprint_backbone(backbone))
            if adapter is not None:
                memory_config = persistence.read_adapter_config(adapter)
        if configure is not None:
            memory_config = configure(memory_config or MemoryConfig())
        self = cls(backbone, tokenizer or tok, memory_config, embedder=embedder)
        if adapter is not None:
            self.load_adapter(adapter)
        return self

    def add_lora(self, cfg: AdapterConfig | None = None) -> None:
        """Add trainable LoRA adapters (rank, alpha) to the memory layers' q/k/v/o and set the
        memory gates to `cfg.gate_init` (PEFT-style; B = 0, so the outputs do not change)."""
        cfg = cfg or AdapterConfig()
        if self.adapter_config is not None:
            raise ValueError("this model already has LoRA adapters")
        if cfg.lora_rank > 0:
            self._inject_lora(cfg)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, MemoryAttention):
                    m.memory_gate.fill_(cfg.gate_init)
        self.adapter_config = cfg
        self._set_trainable()

    def _set_trainable(self) -> None:
        for name, p in self.named_parameters():            # trainable = found by structure
            p.requires_grad_(_is_memory_param(name))

    def _inject_lora(self, cfg: AdapterConfig) -> None:
        from peft import LoraConfig, inject_adapter_in_model
        prefix = self.adapter.layers_attr
        # the projections inside the MemoryAttention wrappers (`.attn`): the names saved adapters use
        targets = [f"{prefix}.{i}.{self.adapter.attn_attr}.attn.{p}" for i in self.memory_layer_ids
                   for p in (self.adapter.q_proj, self.adapter.k_proj, self.adapter.v_proj, self.adapter.o_proj)]
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=targets, init_lora_weights=True)  # B = 0: identity at start
        # A is random (B = 0): seed it so an untrained adapter, and the fingerprint of memories
        # built with it, are the same in every process
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            inject_adapter_in_model(lora, self.backbone)

    def _rotation_at(self, *positions: int):
        rotary = self.adapter.rotary_emb(self.backbone)
        dev = next(self.backbone.parameters()).device
        x = torch.zeros(1, 1, 1, dtype=torch.float32, device=dev)
        return rotary(x, torch.tensor([list(positions)], device=dev))   # (cos, sin) [1, len(positions), D]

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def config(self):
        return self.backbone.config

    # ---------------------------------------------------------------- memory state
    @property
    def memories(self) -> dict[int, LayerMemory]:
        """{layer index: LayerMemory} of the memory layers that hold a memory (a view: the memories
        live on the layers, `memory_modules[i].memory`)."""
        return {i: m.memory for i, m in self.memory_modules.items() if m.memory is not None}

    @property
    def knn_layer_ids(self) -> list[int]:
        """The memory layers that run kNN reads when no blocks are pinned."""
        return [i for i, m in self.memory_modules.items() if m.knn]

    @property
    def corpus_attached(self) -> bool:
        return any(m.corpus is not None for m in self.memory_modules.values())

    def memory_size(self) -> int:
        """Tokens currently held per sequence (rows in each layer's memory)."""
        mems = self.memories
        return len(next(iter(mems.values()))) if mems else 0

    def recorded_reads(self, corpus: bool = False) -> dict[int, list]:
        """What each memory layer read while `record` was on (`generate(..., record=True)`, `ask`):
        {layer: [(row ids, probs) [B, Hq or 1, T, K] per forward call]}, of its own memory or of
        the attached corpus (slots from the other source are -1)."""
        return {i: (m.corpus_reads if corpus else m.reads) for i, m in self.memory_modules.items()
                if (m.corpus_reads if corpus else m.reads)}

    def clear_recorded_reads(self) -> None:
        for m in self.memory_modules.values():
            m.reads.clear()
            m.corpus_reads.clear()

    def reset_memory(self) -> None:
        """Forget everything memorized (all sequences)."""
        for m in self.memory_modules.values():
            m.memory = m.pending = None
        self.clear_recorded_reads()
        self.seen, self.sink_ids, self.tail_ids = [], None, None
        self.stream, self.doc_starts, self._passages = [], [], None
        self.memory_version += 1

    def attach_corpus(self, path) -> list:
        """Attach a corpus memory (built by `memformer memory build`) read-only: every memory layer
        then retrieves its top-k from the sequence's own memory and the corpus together. Returns
        the corpus's document table. See memformer/corpus.py."""
        from memformer.corpus import attach_corpus
        table = attach_corpus(self, path)
        self.memory_version += 1
        return table

    def detach_corpus(self) -> None:
        from memformer.corpus import detach_corpus
        detach_corpus(self)
        self.memory_version += 1

    def corpus_evidence(self, top: int = 3) -> list[dict]:
        """Corpus documents the last `generate(..., record=True)` drew on, most attention first."""
        from memformer.corpus import corpus_evidence
        return corpus_evidence(self, top)

    def new_layer_memory(self, batch: int, *, bounded: bool = True) -> LayerMemory:
        """An empty LayerMemory [batch, Hkv, 0, D] as this model's MemoryConfig asks (dtype, index,
        storage; with `bounded`, its capacity and eviction: a read-only corpus has none)."""
        cfg, bcfg = self.memory_config, self.backbone.config
        head_dim = getattr(bcfg, "head_dim", None) or bcfg.hidden_size // bcfg.num_attention_heads
        dtype = next(self.backbone.parameters()).dtype if cfg.memory_dtype == "auto" else _DTYPES[cfg.memory_dtype]
        return LayerMemory(batch, bcfg.num_key_value_heads, head_dim, dtype=dtype, device=self.device,
                           index=cfg.index, index_params=cfg.index_params,
                           mmap_dir=cfg.storage_dir if bounded else None,
                           capacity=cfg.capacity if bounded else None, eviction=cfg.eviction if bounded else "fifo")

    def ensure_memory(self, batch: int) -> None:
        """Give every memory layer an empty memory for `batch` sequences, unless it has one (then
        the batch must match: ValueError)."""
        if self.memories:
            have = next(iter(self.memories.values())).batch
            if have != batch:
                raise ValueError(f"memory holds {have} sequence(s) but the input has {batch}; "
                                 f"call reset_memory() first or pass a batch of {have}")
            return
        for m in self.memory_modules.values():
            m.memory = self.new_layer_memory(batch)
        self.seen = [0] * batch
        self.stream, self.doc_starts = [[] for _ in range(batch)], [[] for _ in range(batch)]

    @contextlib.contextmanager
    def _mode(self, read: bool, write: bool, record: bool | None = None):
        rt = self.runtime
        old = (rt.read, rt.write, rt.record)
        rt.read, rt.write = read, write
        rt.record = rt.record if record is None else record
        try:
            yield rt
        finally:
            rt.read, rt.write, rt.record = old
            for m in self.memory_modules.values():
                m.pending = None

    @contextlib.contextmanager
    def memory_disabled(self):
        """Within this block the model is exactly the frozen backbone (memory neither read nor written)."""
        rt = self.runtime
        old, rt.enabled = rt.enabled, False
        try:
            yield
        finally:
            rt.enabled = old

    # ---------------------------------------------------------------- inputs
    def _as_batch(self, inputs) -> tuple[torch.Tensor, list[int]]:
        """str | list[str] | ids [T] | ids [B, T] | list[list[int]] -> (ids [B, L] right-padded, lengths)."""
        if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)):
            texts = [inputs] if isinstance(inputs, str) else list(inputs)
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass token ids instead of text")
            seqs = [encode_text(self.tokenizer, t)["input_ids"] for t in texts]
        elif torch.is_tensor(inputs):
            seqs = [inputs.tolist()] if inputs.dim() == 1 else inputs.tolist()
        elif isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], int):
            seqs = [list(inputs)]
        elif isinstance(inputs, (list, tuple)) and inputs:
            seqs = [list(s) for s in inputs]
        else:
            raise ValueError("memorize: empty input (nothing to read)")
        lengths = [len(s) for s in seqs]
        if min(lengths) == 0:
            raise ValueError(f"memorize: sequence {lengths.index(0)} is empty (no tokens to memorize)")
        ids = torch.full((len(seqs), max(lengths)), self._pad_id(), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        vocab = self.backbone.config.vocab_size
        if int(ids.max()) >= vocab or int(ids.min()) < 0:
            raise ValueError(f"token ids out of range for a vocabulary of {vocab}")
        return ids, lengths

    def _pad_id(self) -> int:
        tok = self.tokenizer
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        return 0 if pad is None else int(pad)

    # ---------------------------------------------------------------- reading into memory
    @torch.no_grad()
    def memorize(self, inputs, *, read: bool = False, show_progress: bool = True, on_window=None) -> int:
        """Stream `inputs` through the model window by window, writing every window to memory.

        inputs: text, list of texts (one memory each), ids [T] / [B, T], or lists of ids.
        Calls accumulate: a second call continues each sequence's memory (and starts a new
        document for question reads' passages). Returns tokens read.
        read: windows also read the memory of earlier windows (kNN reads, as `generate` does; the
        perplexity evaluation); by default they only write, at about a plain windowed forward.
        on_window: called as on_window(x [B, T], hidden [B, T, H]) after each window's forward with
        the window's ids and the decoder's final hidden states (the perplexity evaluation scores
        them). Without it the forward stops at the last memory layer, whose output nothing needs.
        """
        if on_window is not None and not callable(on_window):   # refuse before writing anything
            raise TypeError(f"memorize: on_window must be callable(x, hidden), got {type(on_window).__name__}")
        ids, lengths = self._as_batch(inputs)                   # [B, L]
        B, L = ids.shape
        self.ensure_memory(B)
        cfg = self.memory_config
        S = cfg.sink_tokens
        for mem in self.memories.values():                      # refuse before writing anything
            mem.check_room(L)
        base = torch.tensor(self.seen, dtype=torch.long)[:, None]  # [B, 1]
        first = 0
        if S > 0 and self.sink_ids is None:
            # The first S tokens become the sink prefix of every window; being always local,
            # they are never written to memory.
            # (a first text shorter than that is all sink: kept local, nothing written)
            S = min(S, min(lengths))
            self.sink_ids, first = ids[:, :S].clone(), S
        windows = list(self.plan_windows(ids, lengths, first, self.sink_ids, self.tail_ids))
        for x, mask, p, start, end in tqdm(windows, desc="memorize", unit="window", disable=not show_progress):
            self._write_window(x, mask, p, base + torch.arange(start, end)[None, :], read, on_window)
        for b, n in enumerate(lengths):
            self.doc_starts[b].append(self.seen[b])
            self.stream[b] += ids[b, :n].tolist()
        self._passages = None                                   # the question reads' passages grew
        ov = cfg.overlap
        # context for the next call (only when every sequence ends at the same place)
        if ov > 0 and len(set(lengths)) == 1:
            recent = ids if self.tail_ids is None or L >= ov else torch.cat([self.tail_ids, ids], dim=1)
            self.tail_ids = recent[:, -ov:].clone()
        else:
            self.tail_ids = None
        self.seen = [s + n for s, n in zip(self.seen, lengths)]
        self.memory_version += 1
        return sum(lengths)

    def plan_windows(self, ids, lengths, first, sink_ids, tail_ids):
        """The windows a memorize call reads, in order: yields (x [B, p + n], mask [B, p + n] bool,
        p, start, end) where x = [sink ‖ up to `overlap` earlier tokens (context, not written
        again) ‖ ids[:, start:end] (new, written)] and p is the length of the prefix."""
        cfg = self.memory_config
        S, W, ov = cfg.sink_tokens, cfg.window, cfg.overlap
        B, L = ids.shape
        lengths_t = torch.tensor(lengths)[:, None]                               # [B, 1]
        for start in range(first, L, W - S - ov):
            end = min(L, start + W - S - ov)
            ctx = ids[:, max(first, start - ov):start]
            ctx_valid = torch.arange(start - ctx.shape[1], start)[None, :] < lengths_t
            if ctx.shape[1] == 0 and tail_ids is not None:                     # continue the previous call
                ctx, ctx_valid = tail_ids, torch.ones_like(tail_ids, dtype=torch.bool)
            prefix = ctx if S == 0 else torch.cat([sink_ids, ctx], dim=1)
            valid = torch.cat([torch.ones(B, prefix.shape[1] - ctx.shape[1], dtype=torch.bool), ctx_valid,
                               torch.arange(start, end)[None, :] < lengths_t], dim=1)
            yield torch.cat([prefix, ids[:, start:end]], dim=1), valid, prefix.shape[1], start, end

    def _write_window(self, x, mask, p, positions, read: bool = False, on_window=None) -> None:
        """One forward over x = [prefix ‖ new tokens]; then the new tokens' k/v go to memory."""
        valid = mask[:, p:]
        dev = self.device
        with self._mode(read=read, write=True) as rt:
            rt.write_slice = slice(p, None)
            # The base model only: memory needs keys/values, not next-token logits.
            base_model = self.backbone.get_decoder() if hasattr(self.backbone, "get_decoder") else self.backbone.model
            # and only up to the last memory layer (nothing above it is stored), unless the
            # caller wants the window's final hidden states
            stop = None if on_window is not None else max(self.memory_modules) + 1
            with decoder_span(base_model, 0, stop):
                out = base_model(input_ids=x.to(dev), attention_mask=mask.long().to(dev),
                                 position_ids=torch.arange(x.shape[1], device=dev)[None].expand(x.shape[0], -1),
                                 use_cache=False)
            if on_window is not None:
                on_window(x, out.last_hidden_state)                            # [B, T], [B, T, H]
            slots = torch.arange(p, x.shape[1]).expand(x.shape[0], -1)         # [B, n] place in the window
            for m in self.memory_modules.values():
                if m.pending is None:
                    continue
                (k, v), mem = m.pending, m.memory
                dt = torch.float32 if mem.keys.dtype == torch.int8 else mem.keys.dtype  # int8: quantised in add
                mem.add(k.to(dt), v.to(dt), positions.to(mem.keys.device), valid.to(mem.keys.device),
                        slots.to(mem.keys.device))

    # ---------------------------------------------------------------- reading from memory
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        """The backbone's forward (logits, loss, cache) with memory layers reading memory.

        input_ids [B, T] are one local window (positions 0..T-1); memory is not written."""
        if self.memories and input_ids is not None:
            self.ensure_memory(input_ids.shape[0])
        with self._mode(read=True, write=False):
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask=None, *, show_progress: bool = False,
                 record: bool = False, **generate_kwargs) -> torch.Tensor:
        """Hugging Face `generate` with memory read in every memory layer.

        input_ids [B, T]: if T is longer than the local window, the overflow (all but the last
        window) is memorized first, then generation runs on the last window. Returns [B, T + new]
        (with return_dict_in_generate, Hugging Face's output whose `sequences` are those).
        cache (past_key_values before transformers 5.24): a `context_cache(ctx)`; input_ids must
        then start with ctx, and only the tokens after it are run (the cache itself is left
        unchanged for the next call).
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        for name in ("cache", "past_key_values"):         # the KV cache's name since / before transformers 5.24
            if hasattr(generate_kwargs.get(name), "memformer_ids"):
                generate_kwargs = dict(generate_kwargs, **{name: self._reuse_context(generate_kwargs[name], input_ids)})
        B, T = input_ids.shape
        local = self.local_window
        x, mask = input_ids, attention_mask
        if T > local:
            if attention_mask is not None and not bool(attention_mask.all()):
                raise ValueError("generate: a padded batch longer than the window cannot be split; "
                                 "memorize() the long part of each sequence first")
            self.memorize(input_ids[:, :T - local], show_progress=show_progress)
            x = input_ids[:, T - local:]
            mask = None if mask is None else mask[:, T - local:]
        if self.memories:
            self.ensure_memory(B)
        n = x.shape[1]
        x = self._with_sink(x)
        if mask is not None and x.shape[1] > n:
            mask = torch.cat([torch.ones(B, x.shape[1] - n, dtype=mask.dtype, device=mask.device), mask], dim=1)
        if mask is None:
            mask = torch.ones_like(x)
        kw = dict(generate_kwargs)
        kw.setdefault("pad_token_id", self._pad_id())
        if record:  # evidence is about this generation only
            self.clear_recorded_reads()
        with self._mode(read=True, write=False, record=record or None):
            out = self.backbone.generate(input_ids=x.to(self.device), attention_mask=mask.to(self.device), **kw)
        seq = out if torch.is_tensor(out) else out.sequences                  # return_dict_in_generate
        full = torch.cat([input_ids, seq[:, x.shape[1]:].to(input_ids.device)], dim=1)   # [B, T + new]
        if torch.is_tensor(out):
            return full
        out.sequences = full
        return out

    @property
    def local_window(self) -> int:
        """Tokens a prompt may hold locally: the window less the sink prefix put before it."""
        S, W = self.memory_config.sink_tokens, self.memory_config.window
        return W - S if S > 0 else W

    @torch.no_grad()
    def context_cache(self, input_ids: torch.Tensor):
        """The KV cache of reading input_ids [B, T] as generate's prompt (memory read as in its
        prefill): pass it as `generate(torch.cat([input_ids, more], 1), cache=cache)` and
        only `more` and the new tokens are run, so the reads of a long prompt's shared part are
        paid once for any number of continuations. T + more + new tokens must fit the local window
        (window - sink_tokens). The cache keeps the memory as it was read: re-create it after
        memorizing more. Returns a transformers `DynamicCache`."""
        from transformers import DynamicCache
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        B, T = input_ids.shape
        local = self.local_window
        if not 0 < T < local:
            raise ValueError(f"context_cache: the context must hold 1 to {local - 1} tokens (the local window "
                             f"less room for the continuation), got {T}")
        if self.memories:
            self.ensure_memory(B)
        x = self._with_sink(input_ids)                                         # [B, S + T]
        cache = DynamicCache(config=self.backbone.config)
        name = "cache" if "cache" in inspect.signature(self.backbone.forward).parameters else "past_key_values"
        with self._mode(read=True, write=False):
            self.backbone(input_ids=x.to(self.device), attention_mask=torch.ones_like(x).to(self.device),
                          use_cache=True, logits_to_keep=1, **{name: cache})
        cache.memformer_ids = x.cpu().clone()              # [sink ‖ context]: checked at reuse
        cache.memformer_version = self.memory_version      # the memory it read
        return cache

    def _reuse_context(self, context, input_ids: torch.Tensor):
        """A copy of a `context_cache` for one generate call (the call extends the cache it gets),
        after checking that input_ids continue exactly the context it was made from, over the
        same memory."""
        import copy
        ctx, x = context.memformer_ids, self._with_sink(input_ids).cpu()
        P = ctx.shape[1]
        if x.shape[0] != ctx.shape[0] or x.shape[1] <= P or not torch.equal(x[:, :P], ctx):
            raise ValueError("generate: input_ids must start with the context tokens the cache was made "
                             "from, for the same batch, and add at least one token")
        if input_ids.shape[1] > self.local_window:
            raise ValueError(f"generate: with a context cache the input must fit the local window "
                             f"({self.local_window} tokens), got {input_ids.shape[1]}")
        if context.memformer_version != self.memory_version:
            raise ValueError("generate: the memory changed since this context cache was made (memorize, "
                             "reset, load or a corpus attached); make a new one with context_cache()")
        return copy.deepcopy(context)

    def _with_sink(self, x: torch.Tensor) -> torch.Tensor:
        """[sink ‖ x]: the sink prefix every memory window was read with (the corpus's when only
        it is there), for a batch of 1 or B."""
        S = self.memory_config.sink_tokens
        sink = self.sink_ids if self.sink_ids is not None else self.corpus_sink_ids
        if S > 0 and sink is not None and sink.shape[0] in (1, x.shape[0]):
            return torch.cat([sink.expand(x.shape[0], -1).to(x.device), x], dim=1)
        return x

    def chat_ids(self, question: str, system: str | None = None) -> torch.Tensor:
        """Token ids [1, T] of a question, in the tokenizer's chat template when it has one."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            text = (system + "\n" if system else "") + question
        return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])

    def prompt_ids(self, question: str | None = None, *, cue: str | None = None,
                   system: str | None = None) -> torch.Tensor:
        """[1, T] ids that `ask` generates after: the question in the chat template, or a cue (a
        sentence for the model to complete, "The code is") as plain text after a blank line."""
        if self.tokenizer is None:
            raise ValueError("ask() needs a tokenizer")
        if cue is not None and cue.strip():
            return torch.tensor([self.tokenizer("\n\n" + cue, add_special_tokens=False)["input_ids"]])
        if question is None or not question.strip():
            raise ValueError("ask: give a question or a cue")
        return self.chat_ids(question, system)

    @torch.no_grad()
    def ask(self, question: str | None = None, *, cue: str | None = None, max_new_tokens: int = 64,
            system: str | None = None, record: bool = False, return_dict: bool = False, **generate_kwargs):
        """Answer a question from memory (greedy); returns the decoded answer text.

        Question reads: the passages of the memorized text nearest to the question (or cue) pick
        `MemoryConfig.question_blocks` memory blocks, and every memory layer reads them while the
        answer is generated (`question_read`). Generation stops at a degenerate loop, which is cut back to one
        copy of its unit (`memformer.decoding`). record: keep the attention each memory row drew
        (`memformer.qa.evidence`). return_dict: return an `AskOutput` (text, loop_cut) instead."""
        from transformers import StoppingCriteriaList
        from memformer.decoding import LoopStop, cut_loop
        x = self.prompt_ids(question, cue=cue, system=system)
        stops = StoppingCriteriaList([*generate_kwargs.pop("stopping_criteria", []), LoopStop(self.tokenizer)])
        with self.question_read(question if cue is None or not cue.strip() else cue):
            out = self.generate(x, max_new_tokens=max_new_tokens, do_sample=False, record=record,
                                stopping_criteria=stops, **generate_kwargs)
        text, cut = cut_loop(self.tokenizer.decode(out[0, x.shape[1]:], skip_special_tokens=True).strip())
        return AskOutput(text, cut) if return_dict else text

    def question_read(self, query: str):
        """Context manager: every memory layer reads the blocks the passages nearest to `query`
        choose (`blocks_for`). With a corpus memory attached, its passages are ranked too and the
        blocks come from the memory (own or corpus) holding the best passage. It changes nothing
        (generation then uses kNN reads) with nothing memorized, or beside a corpus memory built
        without passages."""
        own = bool(self.memories) and self.memory_size() > 0
        if self.corpus_attached and self.corpus_passages is None:
            return contextlib.nullcontext()
        ranked = {}                                    # each source's passages, ranked once
        if self.corpus_attached:
            ranked["corpus"] = self.corpus_passage_index.search(query)
        if own:
            ranked["own"] = self._own_passages().search(query)
        if not ranked:
            return contextlib.nullcontext()
        source = max(ranked, key=lambda s: (ranked[s][0].score, s == "own"))   # a tie reads the own memory
        return self.reading_blocks(self._blocks_under(ranked[source], source), source=source)

    def blocks_for(self, query: str, source: str = "own") -> list[int]:
        """The memory blocks a question reads: those under the passages nearest to `query`
        (`memformer.passages.question_blocks`), in document order. source: "own" (the memorized
        text; needs a memory of one sequence) or "corpus" (the attached corpus memory's passages)."""
        if source == "corpus":
            return self._blocks_under(self.corpus_passage_index.search(query), source)
        if source != "own":
            raise ValueError(f"source must be 'own' or 'corpus', got {source!r}")
        return self._blocks_under(self._own_passages().search(query), source)

    def _own_passages(self):
        if len(self.stream) != 1:
            raise ValueError(f"question reads need a memory of one sequence, this one holds {len(self.stream)}; "
                             f"use generate() for a batch")
        return self.passages

    def _blocks_under(self, ranked, source: str) -> list[int]:
        """`question_blocks` of ranked passages of the own memory or of the attached corpus."""
        from memformer.passages import question_blocks
        cfg = self.memory_config
        limit = self.corpus_documents[-1].end if source == "corpus" else self.seen[0]
        return question_blocks(ranked, cfg.question_blocks, cfg.block_size, limit)

    @property
    def corpus_passage_index(self):
        """The attached corpus's `PassageIndex` with this model's sentence embedder attached (its
        width must be the one the corpus was built with)."""
        from memformer.passages import default_embedder, with_embedder
        if self.corpus_passages is None:
            raise ValueError("no corpus memory with passages is attached")
        if self.embedder is None:
            self.embedder = default_embedder()
        bound = with_embedder(self.corpus_passages, self.embedder)
        if bound is None:
            raise ValueError(f"the corpus's passages were embedded {self.corpus_passages.embeddings.shape[1]}-wide, "
                             f"this model's sentence embedder gives another width; use the embedder it was built with")
        self.corpus_passages = bound
        return bound

    @property
    def passages(self):
        """`memformer.passages.PassageIndex` over the memorized text (sequence 0), embedded on first
        use (or loaded with the memory, when it was embedded by an embedder of the same width)."""
        from memformer.passages import PassageIndex, default_embedder, with_embedder
        if self.embedder is None:
            self.embedder = default_embedder()
        if self._passages is not None:                 # saved passages of another width are re-embedded
            self._passages = with_embedder(self._passages, self.embedder)
        if self._passages is None:
            if not self.stream or not self.stream[0]:
                raise ValueError("nothing is memorized")
            self._passages = PassageIndex.from_stream(self.stream[0], self.doc_starts[0], self.tokenizer,
                                                      self.embedder)
        return self._passages

    def memory_state(self) -> dict[str, torch.Tensor]:
        """Everything a saved memory holds, as CPU tensors: per layer `layers.{i}.*` (keys, values,
        positions, slots, ...), `seen` [B], `sink_ids` / `tail_ids`, the token `stream` [B, max
        seen] (right-padded), `doc_starts` [B, max docs] (-1 padded), and once embedded the
        passages of question reads, `passage_ranges` [C, 2] and `passage_embeddings` [C, E]."""
        tensors = {f"layers.{i}.{k}": t.detach().cpu().contiguous()
                   for i, mem in self.memories.items() for k, t in mem.state_dict().items()}
        tensors["seen"] = torch.tensor(self.seen, dtype=torch.long)
        for name in ("sink_ids", "tail_ids"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name).cpu().contiguous()
        B = len(self.stream)
        stream = torch.zeros(B, max(self.seen), dtype=torch.long)
        starts = torch.full((B, max(len(d) for d in self.doc_starts)), -1, dtype=torch.long)
        for b in range(B):
            stream[b, :len(self.stream[b])] = torch.tensor(self.stream[b], dtype=torch.long)
            starts[b, :len(self.doc_starts[b])] = torch.tensor(self.doc_starts[b], dtype=torch.long)
        tensors.update(stream=stream, doc_starts=starts)
        if self._passages is not None:
            tensors["passage_ranges"] = torch.tensor(self._passages.ranges, dtype=torch.long).view(-1, 2)
            tensors["passage_embeddings"] = self._passages.embeddings.contiguous()
        return tensors

    def load_memory_state(self, tensors: dict, batch: int) -> None:
        """Replace the memory by `memory_state()` tensors of a memory of `batch` sequences, all or
        nothing: KeyError / ValueError / RuntimeError / IndexError leave the memory as it was."""
        from memformer.passages import PassageIndex
        new = {i: self.new_layer_memory(batch) for i in self.memory_modules}
        for i, mem in new.items():
            prefix = f"layers.{i}."
            mem.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        seen = tensors["seen"].tolist()
        stream = [tensors["stream"][b, :n].tolist() for b, n in enumerate(seen)]
        starts = [[x for x in row if x >= 0] for row in tensors["doc_starts"].tolist()]
        if len(seen) != batch or len(stream) != batch or len(starts) != batch:
            raise ValueError(f"the saved stream holds {len(stream)} sequence(s), the memory {batch}")
        passages = None
        if "passage_embeddings" in tensors:       # the embedder is attached at the first search
            passages = PassageIndex([tuple(r) for r in tensors["passage_ranges"].tolist()],
                                    tensors["passage_embeddings"].float(), None)
        for i, m in self.memory_modules.items():
            m.memory, m.pending = new[i], None
        self.clear_recorded_reads()
        self.seen, self.stream, self.doc_starts, self._passages = seen, stream, starts, passages
        self.sink_ids, self.tail_ids = tensors.get("sink_ids"), tensors.get("tail_ids")
        self.memory_version += 1

    # ---------------------------------------------------------------- persistence
    def save_memory(self, path) -> Path:
        """Write memory to `path/` (safetensors + manifest.json), atomically."""
        return persistence.save_memory(self, path)

    def load_memory(self, path) -> None:
        """Replace memory by the one saved at `path/`; refuses another model's or a corrupt file."""
        persistence.load_memory(self, path)

    def block_memories(self, source: str = "own") -> dict[int, LayerMemory]:
        """The layer memories blocks are read from: the own memory or the attached corpus's."""
        if source == "corpus":
            return {i: m.corpus for i, m in self.memory_modules.items() if m.corpus is not None}
        if source != "own":
            raise ValueError(f"source must be 'own' or 'corpus', got {source!r}")
        return self.memories

    def memory_blocks(self, source: str = "own") -> int:
        """Number of memory blocks (block id = stream position // MemoryConfig.block_size) of the
        own memory or (source="corpus") of the attached corpus memory."""
        memories = self.block_memories(source)
        if not memories:
            return 0
        mem = next(iter(memories.values()))
        pos = mem.positions[mem.valid]                                      # [rows held]
        return int(pos.max()) // self.memory_config.block_size + 1 if pos.numel() else 0

    @contextlib.contextmanager
    def reading_blocks(self, blocks, source: str = "own"):
        """Within this block every memory layer reads exactly `blocks`, whole, in document order,
        at every query (prompt and generated tokens alike), laid out contiguously at positions
        -R .. -1 just before the local window (R = n * block_size), as a RAG prompt's passages.

        blocks: [n] block ids for every sequence, or [B, n]; block b holds stream positions
        [b*block_size, (b+1)*block_size). Rows evicted or never memorized are simply not read.
        source: "own" (the sequences' memory) or "corpus" (the attached corpus memory, one
        stream read by every sequence; blocks [n])."""
        ids = pinned_block_ids(self, blocks, source)                        # [batch, n]
        rt = self.runtime
        R = ids.shape[1] * self.memory_config.block_size
        rt.row_rotation = self._rotation_at(*range(-R, 0))                 # [1, R, D]
        rt.pinned_blocks, rt.pinned_source = ids, source
        try:
            yield
        finally:
            rt.pinned_blocks = rt.row_rotation = None
            rt.pinned_source = "own"

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if _is_memory_param(n)}

    def save_pretrained(self, path) -> Path:
        """Save the memory-layer weights only (adapter.safetensors), the AdapterConfig and the
        MemoryConfig."""
        return persistence.save_adapter(self, path)

    def load_adapter(self, path) -> None:
        persistence.load_adapter(self, path)


@dataclass
class AskOutput:
    """`ask(..., return_dict=True)`: the answer text and whether a degenerate loop was cut from it."""
    text: str
    loop_cut: bool


def _is_memory_param(name: str) -> bool:
    """Memory-layer parameters, found by structure: gates of MemoryAttention and LoRA weights."""
    return name.endswith("memory_gate") or ".lora_A." in name or ".lora_B." in name
