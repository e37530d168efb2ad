"""Training-step speed of the crossbatch recipe, before and after the fast episode, side by side.

    OMP_NUM_THREADS=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 \
        .venv/bin/python benchmarks/train_speed.py --repeats 3
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_speed.py --configs sparse --sparse-layers 24,26,28
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_speed.py --config training/configs/smollm2_cpu_induction.yaml \
        --configs shipped --out benchmarks/results/train_speed/induction_yaml

One process builds the recipe from `--config` (default `training/configs/smollm2_cpu.yaml`; the real SmolLM2-135M
backbone, LoRA + gates, `setup()` as `memformer train` runs it; evaluation and checkpoints off)
for each configuration, draws `--repeats` batches, and times one full training step
(`CrossbatchRecipe._train_step`: episode with one backward per window, gradient clipping,
optimizer step) per batch and path, alternating which path runs first, so load from other
processes hits both paths alike:
  before: `run_episode` and `WindowLM` of the commit `--before` (loaded from git), the code as
          it was;
  after:  this tree's `run_episode` (fast=True).
`--before-config` times the before path on another YAML (the training as it was configured
before), each path on batches of its own recipe.
tokens/s = document tokens read per step (B x seq_len, padding excluded) / step seconds; the
median over repeats is reported. Configurations: `shipped` (the YAML as it is: memory in all 30
layers) and `sparse` (memory and kNN reads only in `--sparse-layers`).
Writes train_speed.csv and README.md under --out.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from memformer.training import CrossbatchRecipe, TrainConfig  # noqa: E402
from memformer.training import recipe as recipe_module  # noqa: E402


def old_crossbatch(rev: str):
    """training/crossbatch.py as it was at `rev`, imported as its own module."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:training/crossbatch.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "crossbatch_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("crossbatch_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module              # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def build(yaml: Path, config: str, sparse_layers: list[int], threads: int, out: Path) -> CrossbatchRecipe:
    over = [f"output_dir={out / config}", "eval.at_start=false", "eval.every=0", "eval.at_end=false",
            "checkpoint.every=0", "checkpoint.resume=false", f"train.threads={threads}"]
    if config == "sparse":
        over += [f"memory.memory_layers={sparse_layers}", f"memory.knn_layers={sparse_layers}"]
    r = CrossbatchRecipe(TrainConfig.load(yaml, over))
    r.setup()
    return r


def timed_step(r: CrossbatchRecipe, batch, path: str, before, lm_before) -> float:
    """Seconds of one `_train_step` on `batch` with the before or after episode."""
    r.batches = iter([batch])
    fresh = recipe_module.run_episode, r.lm
    if path == "before":
        recipe_module.run_episode, r.lm = before.run_episode, lm_before
    try:
        t0 = time.perf_counter()
        r._train_step()
        return time.perf_counter() - t0
    finally:
        recipe_module.run_episode, r.lm = fresh


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "training/configs/smollm2_cpu.yaml"), help="the training YAML")
    ap.add_argument("--configs", default="shipped,sparse", help="shipped = the YAML as it is; sparse = with --sparse-layers")
    ap.add_argument("--sparse-layers", default="24,26,28")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--before", default="9b26ee7", help="git revision of the code before")
    ap.add_argument("--before-config", default=None,
                    help="the before path trains this YAML as it is (default: the same configuration as after)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/train_speed"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sparse = [int(x) for x in args.sparse_layers.split(",")]
    before = old_crossbatch(args.before)
    rows, layers_of = [], {}
    for config in args.configs.split(","):
        r = build(Path(args.config), config, sparse, args.threads, Path(tempfile.mkdtemp()))
        # the before path: the same recipe, or (--before-config) the recipe of another YAML as it is
        rb = r if not args.before_config else build(Path(args.before_config), "shipped", sparse, args.threads,
                                                    Path(tempfile.mkdtemp()))
        layers_of[config] = (rb.cfg.memory.memory_layers, r.cfg.memory.memory_layers)   # None = every layer
        lm_before = before.WindowLM(rb.model)
        batches = [next(r.batches) for _ in range(args.repeats)]
        batches_before = batches if rb is r else [next(rb.batches) for _ in range(args.repeats)]
        for path in ("before", "after"):                                 # warm-up (allocator, first calls)
            timed_step(rb if path == "before" else r, (batches_before if path == "before" else batches)[0],
                       path, before, lm_before)
        for i in range(args.repeats):
            order = ("before", "after") if i % 2 == 0 else ("after", "before")
            for path in order:
                rr, batch = (rb, batches_before[i]) if path == "before" else (r, batches[i])
                tokens = int(batch.valid.sum())
                s = timed_step(rr, batch, path, before, lm_before)
                rows.append({"config": config, "repeat": i, "path": path, "tokens": tokens, "seconds": round(s, 3),
                             "tokens_per_s": round(tokens / s, 2), "load1": round(os.getloadavg()[0], 2)})
                print(rows[-1], flush=True)
        r.cleanup()
        if rb is not r:
            rb.cleanup()
    with open(out / "train_speed.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_readme(out, rows, args, layers_of, argv if argv is not None else sys.argv[1:])
    return 0


def write_readme(out: Path, rows: list[dict], args, layers_of: dict, argv) -> None:
    lines = ["# Training-step speed: before and after the fast episode", "",
             f"Date: {datetime.date.today()}. Machine: {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s). "
             f"Config: `{Path(args.config).resolve().relative_to(ROOT)}`"
             + (f" (before: `{Path(args.before_config).resolve().relative_to(ROOT)}` as it is)" if args.before_config else "")
             + ". "
             f"Before: `training/crossbatch.py` at {args.before}; after: this tree.", "",
             "    " + " ".join(f"{k}={os.environ[k]}" for k in ENV if k in os.environ)
             + " .venv/bin/python benchmarks/train_speed.py " + " ".join(argv), "",
             "| config | memory layers | before tokens/s | after tokens/s | speed-up | paired speed-ups | step s before / after | load (1 min) |",
             "|---|---|---|---|---|---|---|---|"]
    for config in dict.fromkeys(r["config"] for r in rows):
        got = {p: [r for r in rows if r["config"] == config and r["path"] == p] for p in ("before", "after")}
        tps = {p: statistics.median(r["tokens_per_s"] for r in got[p]) for p in got}
        sec = {p: statistics.median(r["seconds"] for r in got[p]) for p in got}
        load = [r["load1"] for r in got["before"] + got["after"]]
        # each repeat ran both paths back to back on one batch: its ratio shares that repeat's load
        pairs = sorted(a["tokens_per_s"] / b["tokens_per_s"] for b, a in zip(got["before"], got["after"]))
        name = lambda ls: ", ".join(map(str, ls)) if ls else "all 30"
        lb, la = layers_of[config]
        layers = name(la) if lb == la else f"{name(lb)} (before) / {name(la)} (after)"
        lines.append(f"| {config} | {layers} | {tps['before']:.1f} | {tps['after']:.1f} | "
                     f"{tps['after'] / tps['before']:.2f}x | {', '.join(f'{x:.2f}' for x in pairs)} | "
                     f"{sec['before']:.1f} / {sec['after']:.1f} | "
                     f"{min(load):.1f}-{max(load):.1f} |")
    lines += ["", "tokens/s and step seconds: medians over the repeats; paired speed-ups: after / before "
              "tokens/s of each repeat (both paths back to back, on the same batch unless --before-config), "
              "sorted. Every step is in train_speed.csv.", ""]
    # notes written by hand below the marker (profiles, conclusions) survive a re-run
    readme = out / "README.md"
    notes = readme.read_text().split(NOTES, 1)[1] if readme.exists() and NOTES in readme.read_text() else "\n"
    readme.write_text("\n".join(lines) + "\n" + NOTES + notes)


ENV = ("OMP_NUM_THREADS", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")     # shown in the command line
NOTES = "<!-- notes: kept when the benchmark rewrites the table above -->"


if __name__ == "__main__":
    sys.exit(main())
