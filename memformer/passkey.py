"""Passkey retrieval (LongLLaMA / landmark-attention prompt): memory vs truncation, side by side.

The prompt: a task line, the filler "The grass is green. ..." repeated, the needle "The pass
key is K. Remember it. K is the pass key." at a chosen depth, and "What is the pass key? The
pass key is". Greedy decoding; a trial is correct when the first number generated equals K.
"""
from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


def parse_length(s: str) -> int:
    """'4k' -> 4096, '16K' -> 16384, '1000' -> 1000, '1m' -> 1048576."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", s)
    if not m:
        raise ValueError(f"not a length: {s!r} (use e.g. 4k, 16k, 32000)")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]


def make_prompt(tokenizer, length: int, depth: float, key: int) -> tuple[list[int], int]:
    """Token ids of a passkey prompt of about `length` tokens with the needle at `depth` in [0, 1].

    Returns (ids, needle_token_index)."""
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]
    head, filler = enc(TASK + " "), enc(" " + FILLER)
    needle, tail = enc(" " + NEEDLE.format(key=key)), enc(" " + QUESTION)
    n = max(1, (length - len(head) - len(needle) - len(tail)) // len(filler))
    before = int(round(depth * n))
    ids = head + filler * before
    at = len(ids)
    ids += needle + filler * (n - before) + tail
    return ids, at


def first_number(text: str) -> int | None:
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


@dataclass
class Trial:
    length: int
    tokens: int
    depth: float
    key: int
    mode: str
    answer: str
    correct: bool
    seconds: float


def run_trial(model, ids: list[int], key: int, mode: str, max_new_tokens: int = 8) -> tuple[str, bool]:
    """mode "memory": everything but the last window goes to memory; "truncate": last window only."""
    x = torch.tensor([ids])
    model.reset_memory()
    if mode == "memory":
        out = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False)
    elif mode == "truncate":
        x = x[:, -model.memory_config.window:]
        with model.memory_disabled():
            out = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False)
    else:
        raise ValueError(f"unknown passkey mode {mode!r}")
    answer = model.tokenizer.decode(out[0, x.shape[1]:], skip_special_tokens=True)
    model.reset_memory()
    return answer.strip(), first_number(answer) == key


def evaluate(model, lengths: list[int], trials: int, modes=("memory", "truncate"), seed: int = 0,
             out_dir: str | Path | None = None) -> list[Trial]:
    """Run every (length, depth) trial in every mode; depths are spread evenly over [0, 1]."""
    rng = random.Random(seed)
    results: list[Trial] = []
    jobs = [(L, (i + 0.5) / trials, rng.randint(10000, 99999)) for L in lengths for i in range(trials)]
    log = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        log = open(out_dir / "trials.jsonl", "w")
    for L, depth, key in tqdm(jobs, desc="passkey", unit="trial"):
        ids, _ = make_prompt(model.tokenizer, L, depth, key)
        for mode in modes:
            t0 = time.perf_counter()
            answer, ok = run_trial(model, ids, key, mode)
            tr = Trial(L, len(ids), round(depth, 4), key, mode, answer, ok, round(time.perf_counter() - t0, 2))
            results.append(tr)
            if log:
                log.write(json.dumps(asdict(tr)) + "\n")
                log.flush()
    if log:
        log.close()
    return results


def summary_table(results: list[Trial]) -> str:
    """Markdown: one row per length, accuracy (correct/total) per mode."""
    modes = sorted({r.mode for r in results}, key=lambda m: (m != "memory", m))
    lengths = sorted({r.length for r in results})
    lines = ["| length | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
    for L in lengths:
        cells = []
        for m in modes:
            rs = [r for r in results if r.length == L and r.mode == m]
            ok = sum(r.correct for r in rs)
            cells.append(f"{100 * ok / len(rs):.0f}% ({ok}/{len(rs)})")
        lines.append(f"| {L // 1024}k | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_heatmap(results: list[Trial], path: str | Path, bins: int = 5) -> Path:
    """Depth (rows, binned) x length (columns) accuracy heatmap, one panel per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    modes = sorted({r.mode for r in results}, key=lambda m: (m != "memory", m))
    lengths = sorted({r.length for r in results})
    fig, axes = plt.subplots(1, len(modes), figsize=(3 + 1.6 * len(lengths) * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        acc = np.full((bins, len(lengths)), np.nan)
        for j, L in enumerate(lengths):
            for b in range(bins):
                rs = [r for r in results if r.mode == mode and r.length == L
                      and min(int(r.depth * bins), bins - 1) == b]
                if rs:
                    acc[b, j] = sum(r.correct for r in rs) / len(rs)
        im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (b, j), v in np.ndenumerate(acc):
            if not np.isnan(v):
                ax.text(j, b, f"{v:.0%}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [f"{L // 1024}k" for L in lengths])
        ax.set_yticks(range(bins), [f"{b / bins:.1f}-{(b + 1) / bins:.1f}" for b in range(bins)])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"passkey accuracy: {mode}")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
