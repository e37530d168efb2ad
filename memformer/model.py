"""MemformerForCausalLM: a frozen pretrained causal LM whose attention layers read a kNN memory.

    model = MemformerForCausalLM.from_pretrained()          # embedded default backbone
    model.memorize(long_text)                                # windows of W tokens -> memory
    model.ask("What is the pass key?")                       # question reads while generating
    model.generate(ids)                                      # layer block reads (no question known)

Data flow per window (see docs/architecture.md): every layer attends causally inside the
window [sink ‖ overlap context ‖ new tokens]; after the window, the new tokens' keys and values
are appended to memory. Reading: a question pins the memory blocks under the passages nearest to
it and every memory layer reads them (`ask`); without a question each chunk of queries reads the
blocks its layer chooses (`generate`, `forward`; kNN reads of top-k keys with `layer_blocks=0`).

The model is the Hugging Face-facing surface; the rest lives beside it: what is memorized in
`model.state` (memory_state.py), question reads and prompts in `model.questions`
(question_reads.py), window planning in windows.py, memory and adapter files in persistence.py,
corpus memories in corpus.py.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from memformer import persistence
from memformer.adapters import get_adapter
from memformer.blocks import pinned_block_ids, prompt_read_start, seeded_pointers
from memformer.config import AdapterConfig, MemoryConfig
from memformer.context_cache import cache_argument, make_context_cache, reuse_context
from memformer.decoding import ITEM_BREAK, ITEM_MARKS, strip_padding
from memformer.index import LayerMemory
from memformer.item_choice import ForcedPrefix, content_step, ended, item_score, runner_ups
from memformer.lora import inject_lora, is_memory_param
from memformer.memory_layer import MemoryAttention, MemoryRuntime, memory_pass, pinned_reads
from memformer.memory_state import MemoryState, empty_layer_memory
from memformer.question_reads import (QuestionReads, answer_reads, checked_reads, padded_rows, prompt_pointer_shares,
                                      read_query, stack_rows)
from memformer.windows import as_batch, base_decoder, decoder_span, plan_windows

logger = logging.getLogger(__name__)

# Chunks of a fresh `generate` prompt that read memory with trained memory layers, counted from its
# end. The earlier chunks' reads took about 0.5 of the 0.84 s reading added to generate over a
# 1,020-token prompt at 16k, and barely change what follows (benchmarks/results/prompt_reads_dev).
# Training-free memory reads every chunk: its pass-key answers need the whole prompt's reads.
PROMPT_READS = 2


class MemformerForCausalLM(nn.Module):
    """A backbone (frozen) + memory layers (trainable adapters) + one memory per sequence.

    backbone, tokenizer, memory_config, adapter (the backbone's `BackboneAdapter` row);
    memory_modules: {layer index: MemoryAttention}, each holding its layer's memory;
    runtime: the `MemoryRuntime` mode of the current pass, shared by those layers;
    state: the `MemoryState` of what is memorized (stream, seen counts, sink, passages, corpus);
    questions: the `QuestionReads` (sentence embedder, passages, prompts) `ask` reads with."""

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
        self.memory_trained = False                         # trained memory-layer weights loaded (load_adapter)
        self._set_trainable()
        self.runtime.q_rotation = self.rotation_at(cfg.window)
        cos, sin = self.rotation_at(*range(cfg.window))                      # [1, W, D]
        unit = cos[0, 0, 0]                      # position 0: cos = the rotary's attention scaling
        self.runtime.slot_rotation = (cos / unit, sin / unit)
        if cfg.layer_blocks:                     # the layout of the blocks a layer chooses: -R .. -1
            self.runtime.layer_blocks = cfg.layer_blocks
            self.runtime.layer_rotation = self.rotation_at(*range(-cfg.layer_blocks * cfg.block_size, 0))
        # what is memorized, per sequence (the layer memories live on memory_modules)
        self.state = MemoryState(self.memory_modules, functools.partial(empty_layer_memory, cfg, backbone))
        # question reads: the sentence embedder (None: MiniLM), passages, prompts
        self.questions = QuestionReads(self.state, tokenizer, cfg, embedder)

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
        lora_layers = self.memory_layer_ids if cfg.lora_layers is None else cfg.lora_layers
        stray = sorted(set(lora_layers) - set(self.memory_layer_ids))
        if stray:
            raise ValueError(f"AdapterConfig.lora_layers {stray} are not memory layers "
                             f"(memory layers: {self.memory_layer_ids})")
        if cfg.lora_rank > 0:
            inject_lora(self.backbone, self.adapter, lora_layers, cfg)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, MemoryAttention):
                    m.memory_gate.fill_(cfg.gate_init)
        self.adapter_config = cfg
        self._set_trainable()

    def _set_trainable(self) -> None:
        for name, p in self.named_parameters():            # trainable = found by structure
            p.requires_grad_(is_memory_param(name))

    def rotation_at(self, *positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's RoPE (cos, sin) [1, len(positions), D] at `positions`."""
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

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad token id (0 without a tokenizer or a pad token)."""
        pad = getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None
        return 0 if pad is None else int(pad)

    @property
    def local_window(self) -> int:
        """Tokens a prompt may hold locally: the window less the sink prefix put before it."""
        S, W = self.memory_config.sink_tokens, self.memory_config.window
        return W - S if S > 0 else W

    # ---------------------------------------------------------------- memory
    @property
    def memories(self) -> dict[int, LayerMemory]:
        """{layer index: LayerMemory [B, Hkv, M, D]} of the memory layers that hold a memory."""
        return self.state.memories

    @property
    def knn_layer_ids(self) -> list[int]:
        """The memory layers that run kNN reads when no blocks are pinned."""
        return [i for i, m in self.memory_modules.items() if m.knn]

    def memory_size(self) -> int:
        """Tokens currently held per sequence (rows in each layer's memory)."""
        return self.state.size()

    def reset_memory(self) -> None:
        """Forget everything memorized (all sequences)."""
        self.state.clear()

    def save_memory(self, path) -> Path:
        """Write memory to `path/` (safetensors + manifest.json), atomically."""
        return persistence.save_memory(self, path)

    def load_memory(self, path) -> None:
        """Replace memory by the one saved at `path/`; refuses another model's or a corrupt file."""
        persistence.load_memory(self, path)

    def attach_corpus(self, path) -> list:
        """Attach a corpus memory (built by `memformer memory build`) read-only: questions read its
        blocks; a memory directory is also searched by kNN reads (every memory layer then
        retrieves its top-k from the own memory and the corpus together), a Lance store (a folder
        or object-storage URI) is read by question reads only, a few blocks fetched at a time.
        Returns the corpus's document table. See memformer/corpus.py, memformer/corpus_store.py."""
        from memformer.corpus import attach_corpus
        return attach_corpus(self, path)

    def detach_corpus(self) -> None:
        self.state.detach_corpus()

    def corpus_evidence(self, top: int = 3) -> list[dict]:
        """Corpus documents the last `generate(..., record=True)` drew on, most attention first."""
        from memformer.corpus import corpus_evidence
        return corpus_evidence(self, top)

    def recorded_reads(self, corpus: bool = False) -> dict[int, list]:
        """What each memory layer read while `record` was on (`generate(..., record=True)`, `ask`):
        {layer: [(row ids, probs) [B, Hq or 1, T, K] per forward call]}, of its own memory or of
        the attached corpus (slots from the other source are -1)."""
        return {i: (m.corpus_reads if corpus else m.reads) for i, m in self.memory_modules.items()
                if (m.corpus_reads if corpus else m.reads)}

    def clear_recorded_reads(self) -> None:
        self.state.clear_recorded_reads()

    def memory_disabled(self):
        """Context manager: within it memory is neither read nor written, and every memory layer
        runs the backbone's attention (a trained adapter's LoRA, where it has one, still applies;
        `backbone_only` switches it off too)."""
        return memory_pass(self.runtime, self.memory_modules, enabled=False)

    @contextlib.contextmanager
    def backbone_only(self):
        """Context manager: within it the model is the frozen backbone exactly, as loaded without
        memformer: memory is neither read nor written and the adapter's LoRA is switched off. The
        baselines (RAG, truncation, the whole document, perplexity without memory) run this way:
        the LoRA was trained to work with memory, and what it does to the backbone's reading of
        its own context is no part of a baseline."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        lora = [m for m in self.backbone.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
        # peft's switch also sets the adapter weights' requires_grad: put it back as it was
        grads = {n: p.requires_grad for n, p in self.named_parameters() if is_memory_param(n)}
        for m in lora:
            m.enable_adapters(False)
        try:
            with self.memory_disabled():
                yield
        finally:
            for m in lora:
                m.enable_adapters(True)
            for n, p in self.named_parameters():
                if n in grads:
                    p.requires_grad_(grads[n])

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
        ids, lengths = as_batch(inputs, self.tokenizer, self.pad_token_id, self.backbone.config.vocab_size)  # [B, L]
        B, L = ids.shape
        state = self.state
        state.ensure(B)
        for mem in state.memories.values():                     # refuse before writing anything
            mem.check_room(L)
        base = torch.tensor(state.seen, dtype=torch.long)[:, None]  # [B, 1]
        # (a first text shorter than the sink is all sink: kept local, nothing written)
        first = state.take_sink(ids, lengths, self.memory_config.sink_tokens)
        windows = list(self.plan_windows(ids, lengths, first, state.sink_ids, state.tail_ids))
        for x, mask, p, start, end in tqdm(windows, desc="memorize", unit="window", disable=not show_progress):
            self._write_window(x, mask, p, base + torch.arange(start, end)[None, :], read, on_window)
        state.append(ids, lengths, self.memory_config.overlap)
        return sum(lengths)

    def plan_windows(self, ids, lengths, first, sink_ids, tail_ids):
        """The windows a memorize call reads with this model's MemoryConfig: yields (x [B, p + n],
        mask [B, p + n] bool, p, start, end) (`memformer.windows.plan_windows`)."""
        return plan_windows(ids, lengths, first, sink_ids, tail_ids, self.memory_config)

    def _write_window(self, x, mask, p, positions, read: bool = False, on_window=None) -> None:
        """One forward over x = [prefix ‖ new tokens] [B, T]; then the new tokens' k/v go to memory
        at stream `positions` [B, T - p]."""
        valid = mask[:, p:]
        dev = self.device
        with memory_pass(self.runtime, self.memory_modules, read=read, write=True, write_slice=slice(p, None)):
            # The base model only: memory needs keys/values, not next-token logits; and only up
            # to the last memory layer (nothing above it is stored), unless the caller wants the
            # window's final hidden states
            decoder = base_decoder(self.backbone)
            stop = None if on_window is not None else max(self.memory_modules) + 1
            with decoder_span(decoder, 0, stop):
                out = decoder(input_ids=x.to(dev), attention_mask=mask.long().to(dev),
                              position_ids=torch.arange(x.shape[1], device=dev)[None].expand(x.shape[0], -1),
                              use_cache=False)
            if on_window is not None:
                on_window(x, out.last_hidden_state)                            # [B, T], [B, T, H]
            slots = torch.arange(p, x.shape[1]).expand(x.shape[0], -1)         # [B, n] place in the window
            self.state.add_pending(positions, valid, slots)

    # ---------------------------------------------------------------- reading from memory
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        """The backbone's forward (logits, loss, cache) with memory layers reading memory.

        input_ids [B, T] are one local window (positions 0..T-1); memory is not written."""
        if self.memories and input_ids is not None:
            self.state.ensure(input_ids.shape[0], self.runtime.pinned_blocks)
        with memory_pass(self.runtime, self.memory_modules, read=True, write=False):
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask=None, *, show_progress: bool = False,
                 record: bool = False, prompt_reads: int | str | None = "auto", _keep_records: bool = False,
                 **generate_kwargs) -> torch.Tensor:
        """Hugging Face `generate` with memory read in every memory layer.

        input_ids [B, T]: if T is longer than the local window, the overflow (all but the last
        window) is memorized first, then generation runs on the last window. Returns [B, T + new]
        (with return_dict_in_generate, Hugging Face's output whose `sequences` are those).
        cache (past_key_values before transformers 5.24): a `context_cache(ctx)`; input_ids must
        then start with ctx, and only the tokens after it are run (the cache itself is left
        unchanged for the next call).
        prompt_reads: with layer block reads, only the last `prompt_reads` chunks of `block_size`
        positions of the prompt read memory (the new tokens always read); None: every chunk, as
        `forward` reads; "auto": `PROMPT_READS` (2) with trained memory layers (`load_adapter`),
        every chunk with training-free memory. Ignored with a context cache, whose context was
        read when it was made, and by question reads.
        record: keep the attention each memory row drew, for this generation only (`ask` keeps
        them over all the reads it answers from: `_keep_records`).
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        # a context cache under the KV cache's name since / before transformers 5.24, else None
        cache_name = next((n for n in ("cache", "past_key_values") if hasattr(generate_kwargs.get(n), "memformer_ids")), None)
        cache = None
        if cache_name is not None:
            cache = generate_kwargs[cache_name]
            generate_kwargs = dict(generate_kwargs, **{cache_name: reuse_context(self, cache, input_ids)})
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
            self.state.ensure(B, self.runtime.pinned_blocks)
        n = x.shape[1]
        x = self.state.with_sink(x, self.memory_config.sink_tokens)
        if mask is not None and x.shape[1] > n:
            mask = torch.cat([torch.ones(B, x.shape[1] - n, dtype=mask.dtype, device=mask.device), mask], dim=1)
        if mask is None:
            mask = torch.ones_like(x)
        kw = dict(generate_kwargs)
        kw.setdefault("pad_token_id", self.pad_token_id)
        if record and not _keep_records:  # evidence is about this generation only
            self.clear_recorded_reads()
        read_from = 0
        if isinstance(prompt_reads, str) and prompt_reads == "auto":
            prompt_reads = PROMPT_READS if self.memory_trained else None
        if prompt_reads is not None:
            if not isinstance(prompt_reads, int) or isinstance(prompt_reads, bool) or prompt_reads < 1:
                raise ValueError(f"prompt_reads must be 'auto', None or an integer >= 1, got {prompt_reads!r}")
            if cache is None:
                read_from = prompt_read_start(x.shape[1], self.memory_config.block_size, prompt_reads)
        if self.runtime.pointers is not None:          # each generation's copy pointer starts afresh,
            self.runtime.pointers.clear()              # or from the shares a check's prompt cache kept
            self.runtime.pointer_rest = None
            shares = getattr(cache, "memformer_pointer", None)
            if shares and self.runtime.pinned_blocks is not None:
                R = self.runtime.pinned_blocks.shape[-1] * self.memory_config.block_size
                self.runtime.pointers.update(seeded_pointers(self.runtime.copy_pointer, shares, R))
        with memory_pass(self.runtime, self.memory_modules, read=True, write=False, record=record or None,
                         read_from=read_from):
            out = self.backbone.generate(input_ids=x.to(self.device), attention_mask=mask.to(self.device), **kw)
        seq = out if torch.is_tensor(out) else out.sequences                  # return_dict_in_generate
        full = torch.cat([input_ids, seq[:, x.shape[1]:].to(input_ids.device)], dim=1)   # [B, T + new]
        if torch.is_tensor(out):
            return full
        out.sequences = full
        return out

    def context_cache(self, input_ids: torch.Tensor):
        """The KV cache of reading input_ids [B, T] as generate's prompt, for
        `generate(torch.cat([input_ids, more], 1), cache=cache)` (`memformer.context_cache`)."""
        return make_context_cache(self, input_ids)

    @torch.no_grad()
    def ask(self, question: str | None = None, *, cue: str | None = None, max_new_tokens: int = 64,
            system: str | None = None, record: bool = False, return_dict: bool = False, **generate_kwargs):
        """Answer a question from memory (greedy); returns the decoded answer text.

        Question reads: the passages of the memorized text nearest to the question (or cue) pick
        `MemoryConfig.question_blocks` memory blocks, and every memory layer reads them while the
        answer is generated (`question_read`). With the prompt known, the layers check the
        candidate reads first (`question_reads.checked_reads`); besides the best, each read within
        `ANSWER_MARGIN` of its score that stands out of the field (`ANSWER_LIFT` above the
        candidates' median) is answered from alone, `MemoryConfig.answer_reads` in all
        (one key's several values, several keys asked at once). The reads answer side by side as
        one batch of `generate`, row k reading its own blocks and continuing its own row of the
        check's prompt cache (`question_reads.stack_rows`); each answers one item, its first
        sentence or line (`decoding.LoopStop(one_item=True)`, `first_item`), and the distinct
        items are joined one per line, best read first (`decoding.join_answers`). An answer to a
        cue ends with its first item too, from one read or several: the cue opens the answer, and
        its first sentence or line completes it. At an answer's first letter or digit, each
        runner-up token within `item_choice.ITEM_MARGIN` is continued under the same read and the
        answer likeliest per token is kept (`memformer.item_choice`). Generation stops at a
        degenerate loop, which is cut back to one copy of its unit, or where the answer states
        its cue again (`memformer.decoding`). record: keep the attention each memory row drew
        (`memformer.qa.evidence`; over all the reads answered from). return_dict: return an
        `AskOutput` (text, loop_cut, reads and each read's answer) instead."""
        from transformers import LogitsProcessorList, StoppingCriteriaList
        from memformer.decoding import (CueWordBar, LoopStop, cut_loop, end_at_cue, first_item, join_answers,
                                        restates_cue, strip_padding)
        x = self.questions.prompt_ids(question, cue=cue, system=system)              # [1, T]
        T = x.shape[1]
        prompt_len = self.state.with_sink(x, self.memory_config.sink_tokens).shape[1]   # as generate runs it
        extra_stops = list(generate_kwargs.pop("stopping_criteria", []))
        extra_processors = list(generate_kwargs.pop("logits_processor", []))
        # the checked reads (best first), each with its prompt cache from the check: its answer
        # does not run the prompt again (a recorded answer runs it, so that the recordings cover
        # the prompt)
        source, chosen, caches = self._question_reads(read_query(question, cue), x, self.memory_config.answer_reads)
        is_cue = bool(cue and cue.strip())
        if not is_cue:
            # a question's prompt ends with the chat template, which no memorized sentence leads
            # up to: its answer's copy pointer starts afresh (a cue's starts from the check's shares)
            for c in caches:
                if c is not None:
                    c.memformer_pointer = None
        several = chosen is not None and len(chosen) > 1         # several reads make a list: each answers one item
        # a read's answer is one item: the list is made of several reads' items, and after a cue's
        # item one read has nothing more to give (what follows is the memorized text read on)
        one_item = several or is_cue
        stops = lambda: StoppingCriteriaList([*extra_stops, LoopStop(self.tokenizer, prompt_len, cue, one_item=one_item)])
        # a read whose answer only says a phrase of the cue back answers again, the cue's words
        # barred from its first word (`decoding.restates_cue`)
        barred = lambda: LogitsProcessorList([*extra_processors, CueWordBar(self.tokenizer, cue, prompt_len)])

        def finish(raw: str) -> tuple[str, bool]:
            text, cut = cut_loop(end_at_cue(raw.strip(), cue))
            return (first_item(text) if one_item else text), cut

        def again(text: str) -> bool:
            return is_cue and chosen is not None and restates_cue(text, cue)

        if several and not record:
            # the reads answer side by side in one generate: row k reads chosen[k] of the one memory
            # and continues its own row of the check's prompt cache
            def side_by_side(rows: list[int], processors, choose: bool = False) -> list[str]:
                kwargs = dict(generate_kwargs)
                if all(caches[k] is not None for k in rows):
                    kwargs[cache_argument(self.backbone)] = stack_rows([caches[k] for k in rows])
                with self.reading_blocks(padded_rows([chosen[k] for k in rows]), source):
                    out = self.generate(x.expand(len(rows), -1), max_new_tokens=max_new_tokens, do_sample=False,
                                        stopping_criteria=stops(), logits_processor=processors,
                                        return_dict_in_generate=True, output_scores=True, **kwargs)
                texts = []
                for r, k in enumerate(rows):
                    ids = strip_padding(out.sequences[r, T:].tolist(), self.pad_token_id)
                    if choose:            # the first content token, chosen by the item it begins
                        logps = [step[r].float().log_softmax(-1) for step in out.scores]
                        ids = self._item_choice(x, chosen[k], source, caches[k], ids, logps, max_new_tokens,
                                                stops, processors, generate_kwargs, one_item) or ids
                    texts.append(self.tokenizer.decode(ids, skip_special_tokens=True))
                return texts

            answers = [finish(r) for r in side_by_side(list(range(len(chosen))), LogitsProcessorList(extra_processors), True)]
            redo = [k for k, (text, _) in enumerate(answers) if again(text)]
            if redo:
                for k, r in zip(redo, side_by_side(redo, barred())):
                    answers[k] = finish(r)
        else:
            # one read, or a recorded answer (the recordings cover each read in turn, its prompt run again)
            def read(k: int):           # entered afresh for each generation: runner-up items read apart
                return contextlib.nullcontext() if chosen is None else self.reading_blocks(chosen[k], source)

            def copied(kwargs: dict) -> dict:   # generate extends the cache it is given: give it a copy
                kwargs, key = dict(kwargs), cache_argument(self.backbone)
                if kwargs.get(key) is not None:
                    kwargs[key] = stack_rows([kwargs[key]])
                return kwargs

            answers = []
            for k, cache in enumerate(caches):
                kwargs, keep = dict(generate_kwargs), bool(answers)
                if cache is not None and not record:
                    kwargs[cache_argument(self.backbone)] = cache
                if record and getattr(cache, "memformer_pointer", None) is not None:
                    # a cue's: the prompt but its last token first, recorded, leaving the shares
                    # the answer's first step is pointed from, as the check's cache holds them
                    if not answers:
                        self.clear_recorded_reads()
                    with read(k), memory_pass(self.runtime, self.memory_modules, read=True, write=False, record=True):
                        again_cache = make_context_cache(self, x[:, :-1])
                        again_cache.memformer_pointer = prompt_pointer_shares(self.runtime)
                    kwargs[cache_argument(self.backbone)], keep = again_cache, True
                if record and not keep:                     # evidence is about this answer only
                    self.clear_recorded_reads()
                    keep = True
                marks = self.state.recorded_marks()
                answer = None
                for processors in (LogitsProcessorList(extra_processors), barred()):
                    first = answer is None
                    if not first:
                        self.state.drop_recorded_since(marks)       # the answer said again: its reads only
                    with read(k):
                        out = self.generate(x, max_new_tokens=max_new_tokens, do_sample=False, record=record,
                                            stopping_criteria=stops(), logits_processor=processors, _keep_records=keep,
                                            return_dict_in_generate=True, output_scores=True, **copied(kwargs))
                    ids = out.sequences[0, T:].tolist()
                    if first and chosen is not None:       # the first content token, chosen by the item it begins
                        logps = [step[0].float().log_softmax(-1) for step in out.scores]
                        better = self._item_choice(x, chosen[k], source, cache, ids, logps, max_new_tokens,
                                                   stops, processors, generate_kwargs, one_item)
                        if better is not None:
                            ids = better
                            if record:                     # the reads of the answer kept, recorded instead
                                self.state.drop_recorded_since(marks)
                                with read(k):
                                    self.generate(torch.cat([x, torch.tensor([ids[:-1]], dtype=x.dtype)], 1),
                                                  max_new_tokens=1, do_sample=False, record=True,
                                                  _keep_records=keep, **copied(kwargs))
                    answer = finish(self.tokenizer.decode(ids, skip_special_tokens=True))
                    if not again(answer[0]):
                        break
                answers.append(answer)
        texts, cuts = [t for t, _ in answers], [c for _, c in answers]
        text = join_answers(texts) if len(texts) > 1 else texts[0]
        return AskOutput(text, any(cuts), len(texts), texts, cuts) if return_dict else text

    def _item_choice(self, x, blocks, source, cache, ids: list[int], logps: list[torch.Tensor], max_new_tokens: int,
                     stops, processors, generate_kwargs, one_item: bool = False) -> list[int] | None:
        """The generated ids of a better answer than `ids` (greedy under the read `blocks`, with
        log-probabilities logps [V] per step) from the runner-ups of its first content token
        (`memformer.item_choice`), or None. x: the prompt [1, T]; cache: the read's prompt cache
        from the check (not yet extended), or None; one_item: the answer is its first item."""
        from transformers import LogitsProcessorList
        s = content_step(self.tokenizer, ids)
        if s is None or s >= len(logps) or s + 1 >= max_new_tokens:
            return None
        alts = runner_ups(logps[s], ids[s], self.tokenizer)
        if not alts:
            return None
        n = len(alts)
        # each runner-up continued as greedy decoding goes on once it has taken it: row r's first
        # s + 1 tokens forced (the greedy ones, then alts[r]), one step at a time as the answer was
        forced = ForcedPrefix([ids[:s] + [a] for a in alts])
        kwargs = dict(generate_kwargs)
        if cache is not None:
            kwargs[cache_argument(self.backbone)] = stack_rows([cache] * n)
        with self.reading_blocks(padded_rows([blocks] * n), source):                            # [n, blocks]
            out = self.generate(x.expand(n, -1), max_new_tokens=max_new_tokens, do_sample=False,
                                stopping_criteria=stops(), logits_processor=LogitsProcessorList([*processors, forced]),
                                return_dict_in_generate=True, output_scores=True, **kwargs)
        T = x.shape[1]
        eos = generate_kwargs.get("eos_token_id", getattr(self.backbone.generation_config, "eos_token_id", None))
        eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        best, score = None, item_score(self.tokenizer, logps, ids, one_item)
        log = [f"greedy {self.tokenizer.decode(ids)!r} {score:.3f}"] if logger.isEnabledFor(logging.DEBUG) else None
        for r in range(n):
            alt = strip_padding(out.sequences[r, T:].tolist(), self.pad_token_id)
            steps = logps[:s + 1] + [step[r].float().log_softmax(-1) for step in out.scores[s + 1:]]
            alt_score = item_score(self.tokenizer, steps, alt, one_item)
            done = ended(alt, max_new_tokens, eos)         # an item cut by the limit has no whole score
            if log is not None:
                log.append(f"runner-up {self.tokenizer.decode(alt)!r} {alt_score:.3f}{'' if done else ' (cut by the limit)'}")
            if alt[:s + 1] == ids[:s] + [alts[r]] and done and alt_score > score:
                best, score = alt, alt_score
        if log is not None:
            logger.debug("item choice: %s -> %s", "; ".join(log), "greedy" if best is None else self.tokenizer.decode(best))
        return best

    def question_read(self, query: str, prompt_ids: torch.Tensor | None = None):
        """Context manager: every memory layer reads the blocks the passages nearest to `query`
        choose (`QuestionReads.candidates`: the own memory's or an attached corpus's). With the
        prompt ids [1, T] that will be continued, the memory layers check the candidates first
        (`question_reads.checked_reads`) and the best one is read. It changes nothing (generation
        then uses the layers' own reads) with nothing memorized, or beside a corpus memory built
        without passages."""
        source, chosen, _ = self._question_reads(query, prompt_ids, 1)
        return contextlib.nullcontext() if chosen is None else self.reading_blocks(chosen[0], source)

    def _question_reads(self, query: str, prompt_ids: torch.Tensor | None, limit: int):
        """(source, [blocks of each read a question answers from, best first: up to `limit`,
        `question_reads.answer_reads`], [each one's prompt cache from the check, or None]);
        the reads are None when there is nothing to read them from (the layers' own reads)."""
        found = self.questions.candidates(query)
        if found is None:
            return None, None, [None]
        candidates, source = found
        if prompt_ids is None or len(candidates) == 1:
            return source, [candidates[0][0]], [None]
        scored, caches = checked_reads(self, candidates, source, prompt_ids, keep=limit)
        chosen = answer_reads(scored, limit)                 # a prefix of `scored`: the best reads
        return source, chosen, [None] * len(chosen) if caches is None else caches[:len(chosen)]

    def block_memories(self, source: str = "own") -> dict[int, LayerMemory]:
        """The layer memories blocks are read from: the own memory or the attached corpus's."""
        return self.state.block_memories(source)

    def memory_blocks(self, source: str = "own") -> int:
        """Number of memory blocks (block id = stream position // MemoryConfig.block_size) of the
        own memory or (source="corpus") of the attached corpus memory."""
        return self.state.memory_blocks(self.memory_config.block_size, source)

    @contextlib.contextmanager
    def reading_blocks(self, blocks, source: str = "own"):
        """Within this block every memory layer reads exactly `blocks`, whole, in document order,
        at every query (prompt and generated tokens alike), laid out contiguously at positions
        -R .. -1 just before the local window (R = n * block_size), as a RAG prompt's passages.

        blocks: [n] block ids for every sequence, or [B, n]; block b holds stream positions
        [b*block_size, (b+1)*block_size). Rows evicted or never memorized are simply not read.
        A memory of one sequence (and the corpus) also takes [K, n]: a batch of K inputs, each
        reading its own blocks of that one memory (a question's candidates, scored in one
        forward); -1 pads a row that reads fewer blocks.
        source: "own" (the sequences' memory) or "corpus" (the attached corpus memory, one
        stream read by every sequence)."""
        # an attached Lance store: its layers hold just these blocks' rows while they are read
        fetched = self.state.fetched_corpus_blocks(blocks, self.device) if source == "corpus" else contextlib.nullcontext()
        with fetched:
            ids = pinned_block_ids(self, blocks, source)                    # [batch or K, n]
            R = ids.shape[1] * self.memory_config.block_size
            beta = self.memory_config.copy_pointer
            with pinned_reads(self.runtime, ids, source, self.rotation_at(*range(-R, 0)), beta), \
                    self._item_ends_noted(beta > 0):                        # [1, R, D] rotation
                yield

    @contextlib.contextmanager
    def _item_ends_noted(self, on: bool):
        """Within this block each forward after the first (the prompt's; `generate` starts again
        from there) notes, per row, whether its generated text has ended an item as
        `decoding.first_item` ends one: a line break, or ".", "!" or "?" followed by whitespace
        (`runtime.pointer_rest` [B], kept once set). From then on the copy pointer rests, so a
        copied item ("4607177.") does not run on into the memory's next sentence, while a point
        inside a value ("172.31.48.209", "4.12.7") leaves it copying. Nothing without a tokenizer."""
        kinds = self.item_end_tokens() if on else None
        if kinds is None:
            yield
            return
        rt = self.runtime
        breaks, closes, spaced = (k.to(self.device) for k in kinds)           # on the device once, not per token
        closed = None                                                          # [B]: the last token ended in ".!?"

        def note(module, args):
            nonlocal closed
            last = args[0][:, -1].clamp(0, len(breaks) - 1)                   # [B] last input ids
            fresh = rt.pointer_rest is None
            if fresh or rt.pointer_rest.shape != last.shape:                  # the prompt, or another batch
                rt.pointer_rest = closed = torch.zeros(last.shape, dtype=torch.bool, device=last.device)
            if fresh:                                                          # the prompt: no item copied yet
                return
            rt.pointer_rest = rt.pointer_rest | breaks[last] | (closed & spaced[last])
            closed = closes[last]
        handle = self.backbone.get_input_embeddings().register_forward_pre_hook(note)
        try:
            yield
        finally:
            handle.remove()
            rt.pointer_rest = None

    def item_end_tokens(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """([V] bool each) the tokens that end an item themselves (their text holds a line break,
        or ".", "!" or "?" followed by whitespace), that end in ".", "!" or "?" (an item ends if
        whitespace follows), and that start with whitespace; None without a tokenizer. Built once."""
        if self.tokenizer is None:
            return None
        if getattr(self, "_item_ends", None) is None:
            V = self.backbone.get_input_embeddings().weight.shape[0]
            decode = getattr(self.tokenizer, "batch_decode", None)
            texts = decode([[i] for i in range(V)]) if decode else [self.tokenizer.decode([i]) for i in range(V)]
            self._item_ends = (torch.tensor([ITEM_BREAK.search(t) is not None for t in texts]),
                               torch.tensor([t.endswith(ITEM_MARKS) for t in texts]),
                               torch.tensor([t[:1].isspace() for t in texts]))
        return self._item_ends

    # ---------------------------------------------------------------- adapter weights
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if is_memory_param(n)}

    def save_pretrained(self, path) -> Path:
        """Save the memory-layer weights only (adapter.safetensors), the AdapterConfig and the
        MemoryConfig."""
        return persistence.save_adapter(self, path)

    def load_adapter(self, path, *, partial: bool = False) -> list[str]:
        """Load trained memory-layer weights (`save_pretrained`'s folder). partial: the folder may
        hold a subset of this model's memory-layer weights (training continued with more layers);
        returns the names it did not hold, which keep their values."""
        missing = persistence.load_adapter(self, path, partial=partial)
        self.memory_trained = True
        return missing


@dataclass
class AskOutput:
    """`ask(..., return_dict=True)`: the answer text, whether a degenerate loop was cut from it
    (from any of its reads' answers), how many checked reads it was answered from, and each
    read's own answer (best read first, before `decoding.join_answers`) with whether a loop was
    cut from it."""
    text: str
    loop_cut: bool
    reads: int = 1
    read_answers: list[str] = field(default_factory=list)
    read_loops: list[bool] = field(default_factory=list)

