"""Perplexity of long real documents read window by window, with and without memory.

The document is cut into the model's own ingest windows (`MemformerForCausalLM.plan_windows`:
[sink ‖ `overlap` tokens of context ‖ new tokens], local positions 0..W-1); every new token is
predicted exactly once, in its window:

* memory   — the window also reads the memory of all earlier windows; then it is written to
             memory. One forward per window does both: the memory layers read memory and hand
             the window's keys/values over, the LM head scores the tokens, and the keys/values
             are appended after the forward (so no token sees itself or the future). The keys
             stored are thus those of a memory-reading pass, as with
             `MemoryConfig.read_during_ingest=True` (the Memorizing Transformer's setting).
* truncate — the same windows with memory disabled: the frozen backbone on each window alone.

Both modes see identical windows, so the first window scores the same and any difference
after it is memory's. Token NLLs are stored per trial (JSONL) and binned by position.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from memformer.evalplots import TrialLog
from memformer.needle import encode, run_settings, stdlib_source_text

MODES = ("memory", "truncate")


def document_text(name: str) -> str:
    """A long real document: "pydocs" (Python's documentation topics) or "stdlib" (standard-library
    source code)."""
    if name == "pydocs":
        from memformer.qa import python_docs_text
        return python_docs_text()
    if name == "stdlib":
        return stdlib_source_text()
    raise ValueError(f"unknown document {name!r}; choose from {', '.join(DOCUMENTS)}")


DOCUMENTS = ("pydocs", "stdlib")


def segment_ids(tokenizer, name: str, tokens: int, segment: int = 0, segments: int = 1) -> list[int]:
    """`tokens` token ids of document `name`, from the line start at or after segment/segments of
    its text (segments spread evenly through the document)."""
    if not 0 <= segment < segments:
        raise ValueError(f"segment {segment} not in [0, {segments})")
    text = document_text(name)
    at = len(text) * segment // segments
    if at:
        nl = text.find("\n", at)
        at = len(text) if nl < 0 else nl + 1
    # tokens are rarely shorter than a character, so a slice of 8 chars per token is plenty
    ids = encode(tokenizer, text[at:at + 8 * tokens + 64])[:tokens]
    if len(ids) < tokens:
        raise ValueError(f"document {name!r} segment {segment}/{segments} has only {len(ids)} tokens, "
                         f"fewer than the {tokens} asked; ask fewer tokens or segments")
    return ids


@torch.no_grad()
def window_nll(model, ids: list[int], mode: str, show_progress: bool = False) -> list[float]:
    """NLL (nats) of tokens 1..N-1 of `ids` (index t-1 = token t) read window by window in `mode`.

    Leaves the model's memory empty."""
    if mode not in MODES:
        raise ValueError(f"unknown ppl mode {mode!r}; choose from {', '.join(MODES)}")
    cfg = model.memory_config
    S = cfg.sink_tokens
    x_all = torch.tensor([ids])
    if len(ids) <= S + 1:
        raise ValueError(f"need more than sink_tokens + 1 = {S + 1} tokens, got {len(ids)}")
    nll = torch.full((len(ids) - 1,), float("nan"))
    model.reset_memory()
    windows = list(model.plan_windows(x_all, [len(ids)], S, x_all[:, :S] if S else None, None))
    try:
        for k, (x, mask, p, start, end) in enumerate(tqdm(windows, desc=f"ppl {mode}", unit="window",
                                                          disable=not show_progress)):
            # targets: the window's new tokens, and in the first window also the sink tokens 1..S-1
            first = 1 if k == 0 else p
            if mode == "memory":
                logp = _read_write_window(model, x, mask, p, start, end, first)
            else:
                with model.memory_disabled():
                    logp = _target_logprobs(model, x, mask, first)
            doc_pos = torch.cat([torch.arange(S), torch.arange(start - (p - S), end)])   # x index -> token
            nll[doc_pos[first:] - 1] = -logp
    finally:
        model.reset_memory()
    return nll.tolist()


def _target_logprobs(model, x, mask, first: int) -> torch.Tensor:
    """log p(x[t] | x[:t]) for t = first..T-1, from one decoder pass and the LM head in chunks."""
    dev = model.device
    decoder = model.backbone.get_decoder()
    h = decoder(input_ids=x.to(dev), attention_mask=mask.long().to(dev),
                position_ids=torch.arange(x.shape[1], device=dev)[None], use_cache=False).last_hidden_state
    head = model.backbone.get_output_embeddings()
    targets = x[0, first:].to(dev)
    out = []
    for i in range(0, len(targets), 256):      # [256, vocab] logits at a time, not [T, vocab]
        j = min(i + 256, len(targets))
        logits = head(h[0, first - 1 + i:first - 1 + j]).float()
        out.append(torch.log_softmax(logits, -1).gather(-1, targets[i:j, None])[:, 0])
    return torch.cat(out).cpu()


def _read_write_window(model, x, mask, p, start, end, first) -> torch.Tensor:
    """One forward that reads memory, scores the targets and writes the new tokens to memory.

    Uses the model's runtime the way `MemformerForCausalLM._write_window` does, with reading
    on; a public model method for it would let this go (see the module docstring)."""
    model._ensure_memory(1)
    with model._mode(read=True, write=True) as rt:
        rt.write_slice = slice(p, None)
        logp = _target_logprobs(model, x, mask, first)
        positions = torch.arange(start, end)[None]
        for i, (k, v) in rt.pending.items():
            mem = model.memories[i]
            mem.add(k.to(mem.keys.dtype), v.to(mem.keys.dtype), positions.to(mem.keys.device),
                    mask[:, p:].to(mem.keys.device))
    return logp


def bin_ppl(segments: list[list[float]], bin_size: int) -> tuple[list[int], list[float]]:
    """(first position of each bin, perplexity of its tokens), the NLLs of `segments` (lists as
    returned by `window_nll`: index t-1 = token t) pooled; bin b holds tokens b..b+bin_size-1."""
    n = max(len(s) for s in segments) + 1
    starts, ppl = [], []
    for b in range(0, n, bin_size):
        value = pooled_ppl(segments, max(b, 1), b + bin_size)
        if not math.isnan(value):
            starts.append(b)
            ppl.append(value)
    return starts, ppl


def pooled_ppl(segments: list[list[float]], lo: int = 1, hi: int | None = None) -> float:
    """Perplexity of tokens lo..hi-1 (positions in the document) over all `segments`."""
    vals = [v for s in segments for v in s[max(lo, 1) - 1:None if hi is None else hi - 1] if not math.isnan(v)]
    return math.exp(sum(vals) / len(vals)) if vals else float("nan")


def evaluate(model, documents=DOCUMENTS, tokens: int = 16384, segments: int = 1, modes=MODES, seed: int = 0,
             out_dir=None, resume: bool = False, show_progress: bool = True) -> list[dict]:
    """Token NLLs of every document segment in every mode. A record per (document, segment,
    mode): id, task (document), length, index (segment), mode, status, nll (per token,
    rounded), ppl, seconds. Streams to out_dir/trials.jsonl (resumable) when out_dir is set.
    seed is recorded only: nothing here is random."""
    documents, modes = list(documents), list(modes)
    bad = [d for d in documents if d not in DOCUMENTS] + [m for m in modes if m not in MODES]
    if bad or not documents or not modes:
        raise ValueError(f"unknown document(s)/mode(s) {bad}; documents: {', '.join(DOCUMENTS)}; "
                         f"modes: {', '.join(MODES)}")
    if tokens <= model.memory_config.window or segments < 1:
        raise ValueError(f"need tokens > window ({model.memory_config.window}) to measure memory, "
                         f"and segments >= 1; got tokens={tokens}, segments={segments}")
    log = None if out_dir is None else TrialLog(out_dir, run_settings(model, "ppl", seed, segments), resume)
    results = []
    try:
        for doc in documents:
            for s in range(segments):
                ids = None
                for mode in modes:
                    rid = f"{doc}/{tokens}/{s}/{mode}"
                    if log is not None and rid in log:
                        results.append(log.get(rid))
                        continue
                    ids = ids or segment_ids(model.tokenizer, doc, tokens, s, segments)
                    t0 = time.perf_counter()
                    nll = window_nll(model, ids, mode, show_progress)
                    rec = dict(id=rid, task=doc, length=tokens, index=s, mode=mode, status="ok",
                               ppl=pooled_ppl([nll]), nll=[round(v, 4) for v in nll],
                               seconds=round(time.perf_counter() - t0, 2))
                    if log is not None:
                        log.append(rec)
                    results.append(rec)
    finally:
        if log is not None:
            log.close()
    return results


def curves(records, bin_size: int) -> dict:
    """{document: {mode: (bin starts, perplexity)}}, the token NLLs of a document's segments pooled."""
    out: dict = {}
    for doc, mode, segs in _groups(records):
        out.setdefault(doc, {})[mode] = bin_ppl(segs, bin_size)
    return out


def _groups(records):
    """(document, mode, [token NLLs of each segment]) in first-seen order."""
    for doc in dict.fromkeys(r["task"] for r in records):
        for mode in dict.fromkeys(r["mode"] for r in records if r["task"] == doc):
            yield doc, mode, [r["nll"] for r in records if r["task"] == doc and r["mode"] == mode]


def table(records, bin_size: int, window: int) -> str:
    """Markdown: perplexity per position bin (rows) and mode (columns), per document, plus the
    whole document and the part after the first window (where memory can matter)."""
    lines = []
    for doc, by_mode in curves(records, bin_size).items():
        modes = list(by_mode)
        segs = {m: s for d, m, s in _groups(records) if d == doc}
        lines += ["", f"### {doc}", "", "| positions | " + " | ".join(modes) + " |",
                  "|---" * (len(modes) + 1) + "|"]
        for j, b in enumerate(by_mode[modes[0]][0]):
            lines.append(f"| {b}-{b + bin_size - 1} | " + " | ".join(f"{by_mode[m][1][j]:.2f}" for m in modes) + " |")
        for label, lo in (("all", 1), (f">= {window}", window)):
            lines.append(f"| {label} | " + " | ".join(f"**{pooled_ppl(segs[m], lo):.2f}**" for m in modes) + " |")
    return "\n".join(lines).lstrip("\n")


def write_report(records, out_dir, bin_size: int, window: int, header: str = "") -> tuple[Path, Path]:
    """ppl.md (the table) and ppl_position.png (perplexity vs position per mode) in out_dir."""
    from memformer.evalplots import plot_ppl_vs_position
    out = Path(out_dir)
    md = out / "ppl.md"
    md.write_text(header + table(records, bin_size, window) + "\n")
    png = plot_ppl_vs_position(curves(records, bin_size), out / "ppl_position.png",
                               title=f"perplexity vs position (bins of {bin_size} tokens)")
    return md, png
