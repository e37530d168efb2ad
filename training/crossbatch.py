"""Crossbatch training (Focused Transformer): B documents read window by window, in lockstep.

In every memory layer a window of document i attends, in one softmax, to
  * its local causal context (the backbone's own attention over [sink ‖ overlap ‖ new tokens]);
  * memory = the keys/values of the last `w` windows of its own document (positives) and of
    `d - 1` other documents of the batch (negatives, FoT's distractors).
The memory is a `DenseMemory`, duck-typed as the `LayerMemory` that `MemoryAttention` reads at
inference, so training runs the exact inference code path: same window layout
(`MemformerForCausalLM.plan_windows`), memory keys rotated at their own in-window position and
queries moved to the fixed memory position, the memory gate, `knn_attention`.


Memory keys and values carry no gradient (Memorizing Transformer practice): they are the keys the
write pass stores, detached, exactly what `memorize` stores at inference. Gradients reach the
memory layers through the queries (LoRA q), the attention output (LoRA o, memory gate) and the
local keys/values (LoRA k/v). Making memory differentiable would keep the graphs of the last `w`
windows alive and back-propagate through them: w times the activation memory for a term FoT's own
ablations do not need for fine-tuning. Memory is rebuilt from the current adapter every episode,
so it is never stale by more than the windows of one episode.

Write pass: inference (`memorize`) stores the keys of a forward that does not read memory, so
training runs a separate no-grad write-only forward per window, which also scores the window
without memory for free.

Shared frozen layers (`run_episode(fast=True)`, the default): the decoder layers below the first
memory layer hold no memory and no trainable weight, so their output for a window is the same in
the read and the write pass and needs no autograd. They run once per window, without a graph
(`WindowLM(..., stop=first)`); both passes start from that state (`start=first, hidden=...`,
`decoder_span`). The write pass stops after the last memory layer (nothing above it is stored),
and the last window is not written (no later window reads it). A window's read pass runs only on
the lanes with a target in it (answer-only retrieval samples score only their last window). Losses and gradients are those of
the reference (`fast=False`: every pass through the whole decoder from the tokens); the saving
grows with the number of layers below the first memory layer (none for all-layer memory).
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from memformer.memory_layer import memory_pass
from memformer.windows import base_decoder, decoder_span
from memformer.training.linear_ce import linear_cross_entropy

# Score blocks of the top-k selection are kept under this many elements (fp32: 16 MB): on CPU,
# glibc serves blocks over 32 MB by a fresh mmap each time, whose page faults cost more than the
# matmul that fills them (measured: a 75 MB block took 5x longer to fill than the search itself).
_SCORE_BLOCK = 4 * 1024 * 1024


class DenseMemory:
    """One memory layer's crossbatch memory, read by `MemoryAttention` like a `LayerMemory`.

    keys, values: [B, Hkv, M, D] the rows lane b may read (its own earlier windows and those of
        its negatives), detached; or, with `lanes = (lane [B, M], row [B, M])`, a pool
        [C, Hkv, R, D] of every lane's rows, lane b reading pool row (lane[b, m], row[b, m]).
        The pool form gathers a layer's rows only while that layer runs, so the B x M copies
        of all memory layers never exist at once (with d = 64 they would not fit on a GPU).
    valid: [B, M] bool, False = padding row (never attended).
    top_k: None = dense (every valid row is returned by `search`, FoT); an int = the top_k rows by
        score (what inference retrieves; the reference kernel gathers [B, Hq, T, K, D] values, so
        dense attention over thousands of rows does not fit in memory outside tiny models).
    """

    key_scales = None        # full-precision rows: no int8 scales
    value_scales = None

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, top_k: int | None = None,
                 lanes: tuple | None = None):
        B, M = valid.shape
        fits = (keys.shape[0], keys.shape[2]) == (B, M) if lanes is None else (
            lanes[0].shape == lanes[1].shape == valid.shape)
        if keys.dim() != 4 or keys.shape != values.shape or not fits:
            raise ValueError(f"DenseMemory: keys {tuple(keys.shape)}, values {tuple(values.shape)}, valid "
                             f"{tuple(valid.shape)} are not [B, Hkv, M, D], [B, Hkv, M, D], [B, M]"
                             f"{'' if lanes is None else ' (or a pool with lanes of shape [B, M])'}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"DenseMemory: top_k must be >= 1 or None (dense), got {top_k}")
        self._keys, self._values, self.valid, self.top_k, self.lanes = keys, values, valid, top_k, lanes

    def for_lanes(self, sel: torch.Tensor) -> "DenseMemory":
        """The memory of the reading lanes `sel` [B'] only (a pool is shared, not copied)."""
        if self.lanes is None:
            return DenseMemory(self._keys[sel], self._values[sel], self.valid[sel], self.top_k)
        return DenseMemory(self._keys, self._values, self.valid[sel], self.top_k,
                           lanes=(self.lanes[0][sel], self.lanes[1][sel]))

    def _rows(self, pool: torch.Tensor) -> torch.Tensor:
        if self.lanes is None:
            return pool
        lane, row = self.lanes
        # [C, R, Hkv, D] indexed -> [B, M, Hkv, D] -> [B, Hkv, M, D], contiguous: the search matmul
        # and the kernel's row gather are several times slower on the strided view
        return pool.permute(0, 2, 1, 3)[lane, row].permute(0, 2, 1, 3).contiguous()

    @property
    def keys(self) -> torch.Tensor:
        """[B, Hkv, M, D]"""
        return self._rows(self._keys)

    @property
    def values(self) -> torch.Tensor:
        """[B, Hkv, M, D]"""
        return self._rows(self._values)

    def __len__(self) -> int:
        return self.valid.shape[1]

    def search(self, queries: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, Hkv, Q, D] -> (scores, ids) [B, Hkv, Q, K]; id -1 = padding row.

        `k` (the runtime's inference top-k) is ignored: `self.top_k` decides. Scores are
        q . k, differentiable with respect to the queries (the kernel reuses them as logits)."""
        B, H, Q, D = queries.shape
        keys = self.keys.to(queries.dtype)                                        # [B, H, M, D]
        M = keys.shape[2]
        dead = ~self.valid[:, None, None, :]                                       # [B, 1, 1, M]
        if self.top_k is None or self.top_k >= M:
            scores = queries @ keys.transpose(-1, -2)                              # [B, H, Q, M]
            ids = torch.arange(M, device=queries.device).expand(B, H, Q, M).masked_fill(dead, -1)
            return scores, ids
        K = self.top_k
        scores, local = [], []
        step = max(1, _SCORE_BLOCK // max(1, B * H * M))
        for q0 in range(0, Q, step):
            # one matmul gives both the selection (no gradient) and the chosen logits (gradient
            # to the queries through the gather), so picked keys are never materialised
            s = queries[:, :, q0:q0 + step] @ keys.transpose(-1, -2)                # [B, H, q, M]
            with torch.no_grad():
                top = s.detach().float().masked_fill(dead, float("-inf")).topk(K, dim=-1)
            scores.append(s.gather(-1, top.indices))
            local.append(top.indices.masked_fill(top.values == float("-inf"), -1))
        return torch.cat(scores, dim=2), torch.cat(local, dim=2)


def negative_groups(doc_ids: torch.Tensor, d: int, generator: random.Random) -> torch.Tensor:
    """Which lanes each lane reads: itself plus up to d - 1 lanes holding *other* documents.

    doc_ids: [B] source-document id of each lane (chunks of one document share it).
    Returns group [B, B] bool, group[b, c] = lane b reads lane c's earlier windows."""
    if d < 1:
        raise ValueError(f"crossbatch d must be >= 1, got {d}")
    B = doc_ids.shape[0]
    group = torch.eye(B, dtype=torch.bool)
    ids = doc_ids.tolist()
    for b in range(B):
        others = [c for c in range(B) if ids[c] != ids[b]]       # never another chunk of the same document
        for c in generator.sample(others, min(d - 1, len(others))):
            group[b, c] = True
    return group


@dataclass
class WrittenWindow:
    """Keys/values one window wrote, per memory layer: k, v [B, Hkv, n, D]; valid [B, n]; the
    window's index; and start (the document position of its first new token)."""
    kv: dict
    valid: torch.Tensor
    index: int
    start: int


def lane_memory(written: list[WrittenWindow], group: torch.Tensor, top_k: int | None):
    """Per-lane memories from the windows written so far.

    Returns ({layer: DenseMemory}, rows) where rows [B, M, 3] long = (lane, window index, document
    position) of every memory row (-1 for padding), the map the tests check masks against."""
    B = group.shape[0]
    valid = torch.cat([w.valid for w in written], dim=1)                          # [B, R]
    R = valid.shape[1]
    # row r of lane c in the pool is c * R + r; lane b may read it if b's group holds c
    allowed = (group[:, :, None] & valid[None, :, :]).reshape(B, B * R)           # [B, B*R]
    count = allowed.sum(1)
    M = max(1, int(count.max()))
    order = torch.sort((~allowed).to(torch.int8), dim=1, stable=True).indices[:, :M]   # allowed rows first
    row_ok = torch.arange(M)[None, :] < count[:, None]                            # [B, M]
    pool_rows = order.masked_fill(~row_ok, 0)
    lane_of, r_of = pool_rows // R, pool_rows % R                                  # [B, M]
    window = torch.cat([torch.full((w.valid.shape[1],), w.index) for w in written])          # [R]
    pos = torch.cat([torch.arange(w.start, w.start + w.valid.shape[1]) for w in written])    # [R]
    rows = torch.stack([lane_of, window[r_of], pos[r_of]], dim=-1).masked_fill(~row_ok[..., None], -1)
    memories, lanes = {}, None
    for layer in written[0].kv:
        k = torch.cat([w.kv[layer][0] for w in written], dim=2)                   # [B, Hkv, R, D]
        v = torch.cat([w.kv[layer][1] for w in written], dim=2)
        if lanes is None:
            lanes = (lane_of.to(k.device), r_of.to(k.device))
        memories[layer] = DenseMemory(k, v, row_ok.to(k.device), top_k, lanes=lanes)
    return memories, rows


class WindowLM(nn.Module):
    """The read forward of one window, as a module (so DDP/FSDP can wrap it): the memory model's
    decoder over x, then the language-modelling loss of the window's new tokens only.

    forward(x [B, T], mask [B, T] bool, p, targets [B, T] bool) -> (loss_sum [B], count [B]):
    summed cross-entropy of the tokens x[:, p:] where `targets`, each predicted from the position
    before it (tokens before p are context already scored by an earlier window). score=False runs
    the decoder only (the write pass) and returns None.

    A span of the decoder: start, hidden [B, T, H] = begin at decoder layer `start` with `hidden`
    the state entering it (what an earlier call with stop=start returned); stop = end before
    decoder layer `stop` and return the state entering it, [B, T, H] (no final norm, no loss)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def decoder(self):
        return base_decoder(self.model.backbone)

    def forward(self, x, mask, p: int, targets, score: bool = True, *, start: int = 0, hidden=None,
                stop: int | None = None):
        B, T = x.shape
        dev = self.model.device
        x, mask, targets = x.to(dev), mask.to(dev), targets.to(dev)
        tokens = dict(input_ids=x) if hidden is None else dict(inputs_embeds=hidden)
        dec = self.decoder()
        with decoder_span(dec, start, stop):
            hidden = dec(**tokens, attention_mask=mask.long(), position_ids=torch.arange(T, device=dev)[None].expand(B, -1),
                         use_cache=False).last_hidden_state                       # [B, T, H]
        if stop is not None:                                 # a lower span: the state entering layer `stop`
            return hidden
        if not score:                                        # write pass: the memory layers' k/v only
            return None
        first = max(p, 1)                                    # token 0 of a window has no predictor
        tmask = (targets & mask)[:, first:]                                        # [B, T-first]
        # the vocabulary projection only at scored positions (answer-only samples score a few)
        h = hidden[:, first - 1:T - 1][tmask]                                      # [N, H]
        # [N, V] logits a chunk of tokens at a time (never all at once), straight into loss and grad
        ce = linear_cross_entropy(h, self.model.backbone.get_output_embeddings(), x[:, first:][tmask])  # [N]
        lane = torch.arange(B, device=dev)[:, None].expand_as(tmask)[tmask]        # [N]
        return torch.zeros(B, device=dev, dtype=ce.dtype).index_add(0, lane, ce), tmask.sum(1)


@contextlib.contextmanager
def runtime_state(model, *, read: bool, write: bool, memories: dict | None = None, write_slice=slice(None)):
    """The memory runtime set for one pass (and its backward, which recomputes layers under
    gradient checkpointing) by `memory_pass`, as the model's own passes set it, each memory layer
    holding `memories[i]` (or none); yields the {layer: (k, v)} the pass wrote (filled once it
    has run); restores the model's own memories (`MemoryState.lent`)."""
    layers = model.memory_modules
    written: dict = {}
    # layer_blocks=0: a training pass reads its lanes' rows by kNN (FoT: the batch's other
    # documents are the negatives), whatever the model's own reads with no question are
    with model.state.lent(memories), \
            memory_pass(model.runtime, layers, read=read, write=write, enabled=True, write_slice=write_slice,
                        layer_blocks=0):
        yield written
        written.update({i: m.pending for i, m in layers.items() if m.pending is not None})


@dataclass
class EpisodeResult:
    """Per-window, per-lane loss sums and target counts of one episode (windows x lanes)."""
    loss: list = field(default_factory=list)             # [B] float tensors, with memory
    count: list = field(default_factory=list)            # [B] long tensors
    loss_no_memory: list = field(default_factory=list)   # [B] (only when measured)
    rows: list = field(default_factory=list)             # [B, M, 3] memory rows read by each window

    def total(self, no_memory: bool = False) -> tuple[float, int]:
        """(summed loss, tokens) over the scored windows."""
        losses = self.loss_no_memory if no_memory else self.loss
        return float(sum(x.sum() for x in losses)), int(sum(c.sum() for c in self.count))


def run_episode(model, batch, *, d: int, w: int | None, top_k: int | None, generator: random.Random,
                first_loss_window: int = 1, lm: nn.Module | None = None, backward=None,
                window_context=None, measure_no_memory: bool = False, keep_rows: bool = False,
                fast: bool = True) -> EpisodeResult:
    """Read one batch of documents window by window with crossbatch memory.

    model: MemformerForCausalLM. batch: `memformer.training.data.Batch` (ids, valid, targets
        [B, L]; doc_ids [B]). d: lanes read per lane (1 = no negatives); w: last windows kept
        (None = all earlier windows, as at inference). lm: the (possibly DDP-wrapped) WindowLM.
    backward(loss_sum [B], count [B], window, is_last): called after each scored window's read
        forward while the runtime still holds its memory (gradient checkpointing recomputes
        layers inside it); None = no gradient (evaluation, run under torch.no_grad()).
    window_context(window, is_last): a context manager entered around each scored window's read
        forward and backward (autocast, DDP's no_sync on all but the last backward).
    measure_no_memory: also score each window without memory (free when the write pass does
        not read memory, since it is exactly that forward).
    fast: compute the frozen layers below the first memory layer once per window, shared by the
        read and the write pass, stop the write pass after the last memory layer, skip the
        last window's write (nothing reads it) and run a window's read pass only on the lanes
        that have a target in it. False = the reference: every pass runs the whole
        decoder from the tokens. Both give the same losses and gradients (tests check it).
    """
    lm = lm if lm is not None else WindowLM(model)
    S = model.memory_config.sink_tokens
    lengths = batch.valid.sum(1).tolist()
    group = negative_groups(batch.doc_ids, d, generator)
    windows = list(model.plan_windows(batch.ids, lengths, S, batch.ids[:, :S] if S > 0 else None, None))
    # Decoder layers below `split` hold no memory and no trainable parameter: their output is the
    # same in the read and the write pass and needs no autograd. Layers from `top` on store nothing.
    n_layers, first, final = len(model.adapter.layers(model.backbone)), min(model.memory_layer_ids), max(model.memory_layer_ids)
    split = first if fast else 0
    top = final + 1 if fast and final + 1 < n_layers else None
    written: list[WrittenWindow] = []
    res = EpisodeResult()
    for t, (x, mask, p, start, end) in enumerate(windows):
        targets = torch.zeros_like(mask)
        targets[:, p:] = batch.targets[:, start:end]
        scored = t >= first_loss_window
        last = t == len(windows) - 1
        # a scored window's passes run in window_context (autocast, gradient sync)
        context = (lambda: window_context(t, last)) if window_context is not None and scored else contextlib.nullcontext
        low = None                                       # the state entering layer `split` [B, T, H]
        if split > 0:
            # in the read pass's context, so the read pass sees what a whole forward would give it
            # (under autocast the write pass then starts from this autocast state too)
            with context(), torch.no_grad():
                low = lm(x, mask, p, targets, stop=split)
        memories, rows = {}, None
        if written and scored:
            memories, rows = lane_memory(written, group, top_k)
        if scored:
            # Only lanes with a target in this window need the read pass: an answer-only sample
            # (passkey, needles) scores nothing before its last window. Their loss and gradient
            # are zero anyway, so `fast` runs the read pass on the other lanes alone (none: skip).
            lanes = (targets & mask.bool())[:, max(p, 1):].any(1).nonzero().squeeze(1)    # [B']
            B = x.shape[0]
            subset = fast and len(lanes) < B and (len(lanes) > 0 or not last)
            if subset and len(lanes) == 0:
                loss, count = torch.zeros(B), torch.zeros(B, dtype=torch.long)
            else:
                sub = (lambda v: v[lanes]) if subset else (lambda v: v)
                mems = {i: m.for_lanes(lanes) for i, m in memories.items()} if subset else memories
                with context(), runtime_state(model, read=True, write=False, memories=mems):
                    loss, count = lm(sub(x), sub(mask), p, sub(targets), start=split,
                                     hidden=None if low is None else sub(low))
                    if subset:                           # back to [B], zeros for the skipped lanes
                        loss = torch.zeros(B, dtype=loss.dtype, device=loss.device).index_add(0, lanes.to(loss.device), loss)
                        count = torch.zeros(B, dtype=count.dtype, device=count.device).index_add(0, lanes.to(count.device), count)
                    if backward is not None:
                        backward(loss, count, t, last)
            res.loss.append(loss.detach().float().cpu())
            res.count.append(count.detach().cpu())
            if keep_rows:
                res.rows.append(rows)
        # The write pass: the keys and values memory stores, from a forward without memory (as
        # `memorize` writes them), which is also the window scored without memory.
        score = scored and measure_no_memory
        if fast and last and not score:
            continue                                     # the last window's keys are never read
        with torch.no_grad(), runtime_state(model, read=False, write=True, write_slice=slice(p, None)) as kv:
            out = lm(x, mask, p, targets, score=score, start=split, hidden=low, stop=None if score else top)
        if score:
            res.loss_no_memory.append(out[0].float().cpu())
        if not last:
            written.append(WrittenWindow(kv, mask[:, p:].clone(), t, start))
            if w:
                written = written[-w:]
    return res


def scored_counts(model, batch, first_loss_window: int = 1) -> torch.Tensor:
    """[B] target tokens `run_episode` will score per lane (the loss normaliser, known before the
    first backward): targets of the windows from `first_loss_window` on, less a window's first
    token when nothing precedes it."""
    S = model.memory_config.sink_tokens
    lengths = batch.valid.sum(1).tolist()
    total = torch.zeros(batch.ids.shape[0], dtype=torch.long)
    for t, (x, mask, p, start, end) in enumerate(model.plan_windows(batch.ids, lengths, S, batch.ids[:, :S], None)):
        if t >= first_loss_window:
            first = start + (1 if p == 0 else 0)
            total += (batch.targets[:, first:end] & mask[:, p + first - start:]).sum(1)
    return total
