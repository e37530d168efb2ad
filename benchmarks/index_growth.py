"""IVF defaults as a user gets them: keys arrive a window at a time, the index trains, retrains as
it grows and calibrates nprobe itself; is it fast and does it find the neighbours?

    .venv/bin/python benchmarks/index_growth.py --sizes 300k,1M --data synthetic --threads 1
    .venv/bin/python benchmarks/index_growth.py --sizes 300k,1M --data real --real-layer 2 --threads 1

For each memory size N and each `--nlist-factors` value f (nlist = f*sqrt(N) at every training):
`FaissIndex(kind="ivf", nlist_factor=f)` with every other setting at its default receives the keys
in windows of `--chunk` (as `memorize` adds them); then one window of `--queries` queries is searched
(the first call also calibrates nprobe for recall@k >= 0.95 on its queries), and the same queries
again (best of `--repeats`). The exact top-k comes from `ExactIndex` (FAISS brute force, the
project's default index) and `ExactIndex(backend="torch")`, timed in the same run. Recall is
measured on a second, held-out set of queries (not the calibration set).
Writes index_growth_<data>.csv and index_growth_<data>.md under --out. `--torch-exact` also
times the torch matmul + topk exact path (minutes per call at 1M keys).
"""
from __future__ import annotations

import argparse
import csv
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memformer.eval.passkey import parse_length  # noqa: E402
from memformer.index import ExactIndex, FaissIndex  # noqa: E402


def _index_benchmark():
    """benchmarks/index.py (its key generators and recall), loaded by path: the repository's own
    `index/` package would shadow a plain `import index`."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("index_benchmark", Path(__file__).with_name("index.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_bench = _index_benchmark()
make_keys, make_queries, real_keys, recall = _bench.make_keys, _bench.make_queries, _bench.real_keys, _bench.recall


def best_of(fn, repeats: int):
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="300k,1M")
    ap.add_argument("--data", choices=["real", "synthetic"], default="synthetic")
    ap.add_argument("--real-layer", type=int, default=2)
    ap.add_argument("--clusters", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--queries", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=1024, help="keys per add call (one memorize window)")
    ap.add_argument("--nlist-factors", default="2,4,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--torch-exact", action="store_true",
                    help="also time ExactIndex(backend='torch') (matmul + topk; minutes per search at 1M keys)")
    ap.add_argument("--out", default="benchmarks/results/index_growth")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    factors = [float(x) for x in args.nlist_factors.split(",")]
    fields = ["data", "keys", "index", "add_s", "trainings", "nlist", "nprobe", "first_search_ms",
              "search_ms", "recall", "speedup_vs_exact", "speedup_vs_torch"]
    rows = []
    with open(out / f"index_growth_{args.data}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for n in [parse_length(s) for s in args.sizes.split(",")]:
            if args.data == "real":
                keys, queries = real_keys(n, args.real_layer, 2 * args.queries, args.seed)
            else:
                keys = make_keys(n, args.dim, args.clusters, args.seed)
                queries = make_queries(keys, 2 * args.queries, args.seed)
            calib, held = queries[:args.queries], queries[args.queries:]    # [q, D] each
            n = keys.shape[0]
            exact = ExactIndex((1, 1), keys.shape[1])
            exact.add(keys[None, None])
            exact_s, (_, truth) = best_of(lambda: exact.search(held[None, None], args.k), args.repeats)
            timed = [("exact (FAISS brute force, default)", exact_s)]
            torch_s = math.nan
            if args.torch_exact:
                torch_exact = ExactIndex((1, 1), keys.shape[1], backend="torch")
                torch_exact.add(keys[None, None])
                torch_s, _ = best_of(lambda: torch_exact.search(held[None, None], args.k), args.repeats)
                timed.append(("exact (torch)", torch_s))
                del torch_exact
            base = dict(data=args.data, keys=n, add_s="", trainings="", nlist="", nprobe="", first_search_ms="",
                        recall=1.0)
            for label, sec in timed:
                rows.append({**base, "index": label, "search_ms": round(sec * 1e3, 1),
                             "speedup_vs_exact": round(exact_s / sec, 2), "speedup_vs_torch": round(torch_s / sec, 2)})
                writer.writerow(rows[-1])
            del exact
            for f in factors:
                index = FaissIndex((1, 1), keys.shape[1], kind="ivf", nlist_factor=f)
                trainings, last = 0, 0
                t0 = time.perf_counter()
                for a in range(0, n, args.chunk):
                    index.add(keys[None, None, a:a + args.chunk])
                    trainings += index.nlist_trained != last
                    last = index.nlist_trained
                add_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                index.search(calib[None, None], args.k)                   # calibrates nprobe
                first_s = time.perf_counter() - t0
                sec, (_, ids) = best_of(lambda: index.search(held[None, None], args.k), args.repeats)
                rows.append({**base, "index": f"faiss-ivf nlist_factor={f:g}", "add_s": round(add_s, 1),
                             "trainings": trainings, "nlist": index.nlist_trained, "nprobe": index.nprobes[0],
                             "first_search_ms": round(first_s * 1e3, 1), "search_ms": round(sec * 1e3, 1),
                             "recall": round(recall(ids[0, 0], truth[0, 0]), 4),
                             "speedup_vs_exact": round(exact_s / sec, 2), "speedup_vs_torch": round(torch_s / sec, 2)})
                writer.writerow(rows[-1])
                fh.flush()
                print(rows[-1], flush=True)
                del index
    note = (f"real keys of SmolLM2-135M layer {args.real_layer} (kv head 0), queries = the memory queries of the "
            f"next window" if args.data == "real" else f"synthetic clustered keys ({args.clusters} clusters)")
    md = [f"# IVF defaults as the memory grows: recall@{args.k} and search time\n",
          f"Command: `python benchmarks/index_growth.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n",
          f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), CPU; "
          f"{note}; keys added {args.chunk} at a time; one search call = {args.queries} queries; time = best of "
          f"{args.repeats}; recall on held-out queries (nprobe was calibrated on another set); add = all adds "
          f"with every (re)training.\n",
          "| keys | index | add (s) | trainings | nlist | nprobe | first search (ms) | search (ms) | recall@k | "
          "vs exact |" + (" vs torch exact |" if args.torch_exact else ""),
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.torch_exact else "")]
    for r in rows:
        md.append(f"| {r['keys']:,} | {r['index']} | {r['add_s']} | {r['trainings']} | {r['nlist']} | {r['nprobe']} | "
                  f"{r['first_search_ms']} | {r['search_ms']} | {r['recall']:.3f} | {r['speedup_vs_exact']}x |"
                  + (f" {r['speedup_vs_torch']}x |" if args.torch_exact else ""))
    (out / f"index_growth_{args.data}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
