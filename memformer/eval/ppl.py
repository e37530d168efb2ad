"""Perplexity of long real documents read window by window, with and without memory.

The document is cut into the model's own ingest windows (`MemformerForCausalLM.plan_windows`:
[sink ‖ `overlap` tokens of context ‖ new tokens], local positions 0..W-1); every new token is
predicted exactly once, in its window:

* memory   — the window also reads the memory of all earlier windows (the layers' own reads, as
             `generate` reads: no question is known); then it is written to memory. One forward per window
             does both: `memorize(..., read=True)` (the Memorizing Transformer's setting: the
             keys stored are those of a memory-reading pass), its decoder output scored by the
             LM head; the window's keys/values are appended after the forward, so no token sees
             itself or the future.
* truncate — the same windows, the frozen backbone alone (no memory, no LoRA) on each window.

Both modes see identical windows, so any difference is what memory and its adapter add to the
backbone (with a trained adapter the first window differs too: its LoRA applies in mode
memory). Token NLLs are stored per trial (JSONL) and binned by position.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from memformer.eval.plots import TrialLog
from memformer.eval.needle import encode, run_settings, stdlib_source_text

MODES = ("memory", "truncate")


HELDOUT_FRACTION = 0.05     # data.eval_fraction of the shipped training configs


def document_text(name: str) -> str:
    """A long real document: "pydocs" (Python's documentation topics), "pydocs-heldout" (the parts
    of them the training recipe holds out at eval_fraction 0.05, as in the shipped configs: text
    an adapter trained by them never saw; about 19k tokens), "stdlib" (standard-library source
    code), "stdlib-heldout" (the standard-library packages and modules the recipe holds out, for
    held-out lengths beyond pydocs-heldout's), or the path of a document file
    (`memformer.qa.documents.read_document`)."""
    if name == "pydocs":
        from memformer.qa.demo import python_docs_text
        return python_docs_text()
    if name in ("pydocs-heldout", "stdlib-heldout"):
        import random
        from memformer.training.data import held_out, python_docs_documents, stdlib_documents
        source = python_docs_documents if name == "pydocs-heldout" else stdlib_documents
        parts = sorted((d for d in source(random.Random(0)) if held_out(d.name, HELDOUT_FRACTION)),
                       key=lambda d: d.name)
        return "\n\n".join(d.load() for d in parts)
    if name == "stdlib":
        return stdlib_source_text()
    if Path(name).is_file():
        from memformer.qa.documents import read_document
        return read_document(name)
    raise ValueError(f"unknown document {name!r}; choose from {', '.join(DOCUMENTS)} or give a file path")


DOCUMENTS = ("pydocs", "pydocs-heldout", "stdlib", "stdlib-heldout")


def check_documents(names) -> list[str]:
    """The names that are neither a known document nor an existing file."""
    return [d for d in names if d not in DOCUMENTS and not Path(d).is_file()]


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

    Each window is one `model.memorize` call (so the windows, sink and overlap are exactly the
    model's), reading memory (`read=True`) in mode memory and as the frozen backbone alone
    (`backbone_only`: no memory, no LoRA) in mode truncate; its `on_window` callback hands over
    the window's final hidden states, which the LM head turns into the targets'
    log-probabilities. Leaves the model's memory empty."""
    if mode not in MODES:
        raise ValueError(f"unknown ppl mode {mode!r}; choose from {', '.join(MODES)}")
    cfg = model.memory_config
    S, new = cfg.sink_tokens, cfg.window - cfg.sink_tokens - cfg.overlap
    if len(ids) <= S + 1:
        raise ValueError(f"need more than sink_tokens + 1 = {S + 1} tokens, got {len(ids)}")
    # one window per call: the first also holds the sink tokens, later ones get the overlap from
    # the model's carried tail
    bounds = [0] + list(range(S + new, len(ids), new)) + [len(ids)]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    nll: list[float] = []
    model.reset_memory()
    try:
        with model.backbone_only() if mode == "truncate" else contextlib.nullcontext():
            for a, b in tqdm(list(zip(bounds, bounds[1:])), desc=f"ppl {mode}", unit="window",
                             disable=not show_progress):
                seen.clear()
                model.memorize(torch.tensor([ids[a:b]]), read=mode == "memory", show_progress=False,
                               on_window=lambda x, h: seen.append((x, h)))
                (x, h), = seen
                # the new tokens are the last b - a of the window (in the first, all but token 0)
                first = x.shape[1] - (b - a) if a else 1
                nll += (-_target_logprobs(model, x, h, first)).tolist()
    finally:
        model.reset_memory()
    return nll


def _target_logprobs(model, x: torch.Tensor, h: torch.Tensor, first: int) -> torch.Tensor:
    """log p(x[t] | x[:t]) for t = first..T-1 from the decoder's hidden states h [1, T, H], the
    LM head applied in chunks ([256, vocab] logits at a time, not [T, vocab])."""
    head = model.backbone.get_output_embeddings()
    targets = x[0, first:].to(h.device)
    out = []
    for i in range(0, len(targets), 256):
        j = min(i + 256, len(targets))
        logits = head(h[0, first - 1 + i:first - 1 + j]).float()
        out.append(torch.log_softmax(logits, -1).gather(-1, targets[i:j, None])[:, 0])
    return torch.cat(out).cpu()


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


def evaluate(model, documents=DOCUMENTS, tokens: int = 16384, segments: int = 1, modes=MODES,
             out_dir=None, resume: bool = False, show_progress: bool = True) -> list[dict]:
    """Token NLLs of every document segment in every mode. A record per (document, segment,
    mode): id, task (document), length, index (segment), mode, status, nll (per token,
    rounded), ppl, seconds. Streams to out_dir/trials.jsonl (resumable) when out_dir is set.
    Nothing here is random: the same documents and model give the same numbers."""
    documents, modes = list(documents), list(modes)
    bad = check_documents(documents) + [m for m in modes if m not in MODES]
    if bad or not documents or not modes:
        raise ValueError(f"unknown document(s)/mode(s) {bad}; documents: {', '.join(DOCUMENTS)} or a file; "
                         f"modes: {', '.join(MODES)}")
    if tokens <= model.memory_config.window or segments < 1:
        raise ValueError(f"need tokens > window ({model.memory_config.window}) to measure memory, "
                         f"and segments >= 1; got tokens={tokens}, segments={segments}")
    settings = run_settings(model, "ppl", None, segments)
    log = None if out_dir is None else TrialLog(out_dir, settings, resume)
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
    from memformer.eval.plots import plot_ppl_vs_position
    out = Path(out_dir)
    md = out / "ppl.md"
    md.write_text(header + table(records, bin_size, window) + "\n")
    png = plot_ppl_vs_position(curves(records, bin_size), out / "ppl_position.png",
                               title=f"perplexity vs position (bins of {bin_size} tokens)")
    return md, png
