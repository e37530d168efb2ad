"""Where a crossbatch training episode spends its time: seconds per pass, before and after.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_profile.py                  # memory in all 30 layers
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_profile.py --layers 24,26,28 --ops
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_profile.py --config training/configs/smollm2_cpu_induction.yaml --ops

Builds the recipe of `--config` (default `training/configs/smollm2_cpu.yaml`; real backbone, LoRA + gates), draws one
batch and runs its episode (the schedule's last d and w, one backward per window) `--repeats` times with the `run_episode` of
`--before` (loaded from git) and of this tree, timing every `WindowLM` call by kind: prefix (the
shared frozen layers, after only), read (with gradients), write (no gradients), and backward.
--ops: also the torch profiler's op table of one episode of each, the matmuls' GFLOP and GFLOP/s in it, and
one plain sgemm's GFLOP/s on the same threads (the ceiling they are read against). Prints to stdout.
"""
from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import ROOT, old_crossbatch  # noqa: E402
from memformer.training import CrossbatchRecipe, TrainConfig  # noqa: E402
from memformer.training import crossbatch as after  # noqa: E402


def timed(times: dict, cls) -> None:
    """Wrap cls.forward so every call adds its seconds to times[kind]."""
    forward = cls.forward

    def wrapper(self, *args, **kw):
        kind = "prefix" if kw.get("stop") is not None and not kw.get("start") else (
            "read" if torch.is_grad_enabled() else "write")
        t0 = time.perf_counter()
        out = forward(self, *args, **kw)
        times[kind] += time.perf_counter() - t0
        return out
    cls.forward = wrapper


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="training/configs/smollm2_cpu.yaml")
    ap.add_argument("--layers", default="all", help="'all' (the YAML) or memory layers, e.g. 24,26,28")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--before", default="9b26ee7")
    ap.add_argument("--ops", action="store_true")
    args = ap.parse_args(argv)
    over = [f"output_dir={tempfile.mkdtemp()}", "eval.at_start=false", "eval.every=0", "eval.at_end=false",
            "checkpoint.every=0", "checkpoint.resume=false", f"train.threads={args.threads}"]
    if args.layers != "all":
        over += [f"memory.memory_layers=[{args.layers}]", f"memory.knn_layers=[{args.layers}]"]
    r = CrossbatchRecipe(TrainConfig.load(ROOT / args.config, over))
    r.setup()
    model, batch = r.model, next(r.batches)
    tokens = int(batch.valid.sum())
    before = old_crossbatch(args.before)
    cb = r.cfg.crossbatch
    d = r.d_schedule.at(10**9, random.Random(0))               # the schedule's last d and w
    w = r.w_schedule.at(10**9, random.Random(0))
    times = collections.defaultdict(float)
    timed(times, before.WindowLM)
    timed(times, after.WindowLM)

    def backward(loss, count, t, last):
        t0 = time.perf_counter()
        loss.sum().backward()
        times["backward"] += time.perf_counter() - t0

    def episode(module):
        module.run_episode(model, batch, d=d, w=w, top_k=cb.top_k, generator=random.Random(0),
                           lm=module.WindowLM(model), backward=backward)
        model.zero_grad(set_to_none=True)

    print(f"{args.config}, layers {args.layers}, d {d}, w {w}: batch {tuple(batch.ids.shape)}, {tokens} tokens, {args.threads} thread(s)")
    for rep in range(args.repeats):
        for name, module in (("before", before), ("after", after)):
            times.clear()
            t0 = time.perf_counter()
            episode(module)
            total = time.perf_counter() - t0
            parts = "  ".join(f"{k} {v:.1f}s" for k, v in sorted(times.items()))
            print(f"rep {rep} {name:6s}: episode {total:.1f}s, {tokens / total:.1f} tokens/s | {parts}", flush=True)
    if args.ops:
        from torch.profiler import ProfilerActivity, profile
        from torch.utils.flop_counter import FlopCounterMode
        for name, module in (("before", before), ("after", after)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                episode(module)
            print(f"\n{name}: ops by self CPU time")
            ops = prof.key_averages()
            print(ops.table(sort_by="self_cpu_time_total", row_limit=15))
            with FlopCounterMode(display=False) as counter:         # a separate episode: counting slows it
                episode(module)
            flops = sum(n for op, n in counter.get_flop_counts()["Global"].items() if str(op).split(".")[-1] in MATMULS)
            secs = sum(e.self_cpu_time_total for e in ops if e.key.removeprefix("aten::") in MATMULS) / 1e6
            total = sum(e.self_cpu_time_total for e in ops) / 1e6
            print(f"{name}: matmuls {flops / 1e9:.0f} GFLOP in {secs:.1f} s of {total:.1f} s "
                  f"({flops / max(secs, 1e-9) / 1e9:.1f} GFLOP/s)")
        print(f"one plain sgemm [1024, 576] @ [576, 1536] on {args.threads} thread(s): {sgemm_rate():.1f} GFLOP/s")
    return 0


MATMULS = ("mm", "addmm", "bmm")


def sgemm_rate(m: int = 1024, k: int = 576, n: int = 1536, repeats: int = 20) -> float:
    """GFLOP/s of one float32 matmul of the backbone's MLP shape (a window of 4 x 256 rows): what
    the machine's BLAS reaches outside the episode, the ceiling the episode's matmuls are read against."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n / sorted(times)[repeats // 2] / 1e9


if __name__ == "__main__":
    sys.exit(main())
