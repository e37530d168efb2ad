"""Memory index benchmark: search time and recall@k of every backend against exact search.

    .venv/bin/python benchmarks/index.py --sizes 100k,1M,4M --out benchmarks/results/index

For each memory size N (keys of head_dim D in one (sequence, kv head) group) and one window of
queries: time to add all keys (IVF training included), time of one search call for the whole
window (top-k), recall@k against ExactIndex, and bytes per stored token for each memory dtype.

--data real (default): the keys a memory layer of the default backbone (SmolLM2-135M) really
stores while reading Python's documentation and standard-library source, and the memory queries
of the window that follows. Only the first `--real-layer`+1 decoder layers run, so a million
keys take minutes, not an hour; they are cached under ~/.cache/memformer/bench/.
--data synthetic: a mixture of anisotropic Gaussian clusters and noisy, offset copies of keys as
queries (no model needed).
Everything runs through the library's own `ExactIndex` / `FaissIndex` (the code the memory
layers call), in one process, so the ratios are side by side. Writes index.csv, index.md and
index.png under --out.
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
from memformer.index import ExactIndex, FaissIndex, LayerMemory  # noqa: E402
from memformer.eval.passkey import parse_length  # noqa: E402


def make_keys(n: int, dim: int, clusters: int, seed: int) -> torch.Tensor:
    """[n, dim] float32 keys: `clusters` anisotropic Gaussian clusters of random sizes."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, dim, generator=g) * 2.0                      # [C, D]
    spread = torch.rand(clusters, dim, generator=g) + 0.25                       # per-cluster axis scales
    keys = torch.empty(n, dim)
    for a in range(0, n, 1 << 20):                                               # chunks bound peak memory
        b = min(n, a + (1 << 20))
        c = torch.randint(0, clusters, (b - a,), generator=g)
        keys[a:b] = centers[c] + torch.randn(b - a, dim, generator=g) * spread[c]
    return keys


def make_queries(keys: torch.Tensor, nq: int, seed: int) -> torch.Tensor:
    """[nq, dim]: stored keys perturbed, plus a shared offset (a query is not a copy of a key)."""
    g = torch.Generator().manual_seed(seed + 1)
    pick = torch.randint(0, keys.shape[0], (nq,), generator=g)
    offset = torch.randn(keys.shape[1], generator=g) * 0.5
    return keys[pick] + torch.randn(nq, keys.shape[1], generator=g) * 0.7 + offset


def corpus_token_stream(tokenizer):
    """Token ids of Python's documentation, then the standard library's source, file by file."""
    import sysconfig
    from memformer.qa.demo import python_docs_text
    yield from tokenizer(python_docs_text(), add_special_tokens=False)["input_ids"]
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield from tokenizer(f"# file: {path.name}\n{text}", add_special_tokens=False)["input_ids"]


def real_keys(n: int, layer: int, nq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys [n, D], queries [nq, D]) of kv head 0 of decoder layer `layer` of the default
    backbone: the keys memorize() stores for n tokens of real text and the memory queries of the
    next window (what search receives). Cached as safetensors."""
    from safetensors.torch import load_file, save_file
    from memformer import MemformerForCausalLM, MemoryConfig
    from memformer.loading import cache_root, load_backbone
    path = cache_root() / "bench" / f"smollm2_layer{layer}_keys_{n}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        return t["keys"], _subset(t["queries"], nq, seed)
    backbone, tok = load_backbone(None)
    backbone.model.layers = backbone.model.layers[:layer + 1]    # layers above never feed this one
    backbone.config.num_hidden_layers = layer + 1
    cfg = MemoryConfig(memory_layers=[layer])
    model = MemformerForCausalLM(backbone, tok, cfg)
    stream = corpus_token_stream(tok)
    ids = torch.tensor([[next(stream) for _ in range(n + cfg.window)]])         # [1, n + W]
    model.memorize(ids[:, :n], show_progress=True)
    captured = []
    mem = model.memories[layer]
    search = mem.search
    mem.search = lambda q, k: captured.append(q[0, 0].clone()) or search(q, k)   # q [1, Hkv, G*T, D]
    model(ids[:, n:n + cfg.window - cfg.sink_tokens])
    keys = mem.index.float_vectors()[0, 0][mem.valid[0]].contiguous()          # [n', D]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"keys": keys, "queries": captured[0].contiguous()}, str(path))
    return keys, _subset(captured[0], nq, seed)


def _subset(queries: torch.Tensor, nq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return queries[torch.randperm(queries.shape[0], generator=g)[:nq]].contiguous()


def build(backend: str, keys: torch.Tensor, params: dict, chunk: int):
    """Add `keys` window-chunk by chunk to a one-group index; returns (index, seconds)."""
    dim = keys.shape[1]
    t0 = time.perf_counter()
    if backend == "exact":
        index = ExactIndex((1, 1), dim)
    else:
        index = FaissIndex((1, 1), dim, kind=backend.removeprefix("faiss-"), **params)
    for a in range(0, keys.shape[0], chunk):
        index.add(keys[None, None, a:a + chunk])
    return index, time.perf_counter() - t0


def timed_search(index, queries: torch.Tensor, k: int, repeats: int):
    """Best-of-`repeats` seconds of one search call for the whole window, and its ids."""
    best, ids = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, ids = index.search(queries[None, None], k)
        best = min(best, time.perf_counter() - t0)
    return best, ids[0, 0]


def recall(ids: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean fraction of the exact top-k found. ids, truth [q, k]."""
    hit = (ids[:, :, None] == truth[:, None, :]).any(-1)                         # [q, k]
    return float(hit.float().mean())


def bytes_per_token(dim: int, kv_heads: int) -> dict[str, tuple[float, float]]:
    """(values only, whole memory) bytes per token of one layer for each memory dtype, from the
    tensors a save writes: values (+ int8 scales), and all of keys, values, scales, positions,
    window slots and padding flags."""
    out = {}
    for name, dt in [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("int8", torch.int8)]:
        mem = LayerMemory(1, kv_heads, dim, dtype=dt)
        n = 4096
        mem.add(torch.randn(1, kv_heads, n, dim), torch.randn(1, kv_heads, n, dim), torch.arange(n)[None])
        state = mem.state_dict()
        size = lambda names: sum(t.numel() * t.element_size() for k, t in state.items() if k in names) / n
        out[name] = (size({"values", "values_scales"}), size(set(state)))
    return out


def configs(n: int, args) -> list[tuple[str, dict, list[tuple[str, dict]]]]:
    """(backend, build params, [(label, search params)]) to measure at memory size n: each index is
    built once and searched at every setting of its search effort."""
    nlist = args.nlist or int(args.nlist_factor * math.sqrt(n))
    ivf = {"nlist": nlist, "train_threshold": n}
    rows = [("exact", {}, [("exact (torch)", {})]), ("faiss-flat", {}, [("faiss-flat", {})]),
            ("faiss-ivf", ivf, [(f"faiss-ivf nlist={nlist} nprobe={p}", {"nprobe": p}) for p in args.nprobe])]
    return [r for r in rows if r[0] in args.backends]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import re
    series = lambda r: re.sub(r" nlist=\d+", "", r["config"])   # nlist grows with N: one line per setting
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = list(dict.fromkeys(series(r) for r in rows))
    for ax in (ax1, ax2):                                        # more series than the default 10 colours
        ax.set_prop_cycle(color=[plt.cm.tab20(i % 20) for i in range(len(labels))])
    for label in labels:
        rs = [r for r in rows if series(r) == label]
        ns = [r["keys"] for r in rs]
        ax1.plot(ns, [r["search_ms"] for r in rs], marker="o", label=label)
        ax2.plot(ns, [r["recall"] for r in rs], marker="o", label=label)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("keys in memory (one kv head)")
        ax.grid(alpha=0.3)
    ax1.set_yscale("log")
    ax1.set_ylabel("search time of one window (ms)")
    ax2.set_ylabel("recall@k vs exact")
    ax2.axhline(0.95, color="grey", ls="--", lw=1)
    ax1.legend(fontsize=7, loc="upper left")
    fig.suptitle("memformer index backends (CPU)" if not torch.cuda.is_available() else "memformer index backends")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100k,1M,4M")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=3, help="kv heads for the bytes-per-token table")
    ap.add_argument("--queries", type=int, default=2048, help="queries per search call (one window)")
    ap.add_argument("--data", choices=["real", "synthetic"], default="real")
    ap.add_argument("--real-layer", type=int, default=2, help="decoder layer whose keys are used (--data real)")
    ap.add_argument("--clusters", type=int, default=4096, help="clusters of --data synthetic")
    ap.add_argument("--nlist", type=int, default=None, help="IVF lists (default: --nlist-factor * sqrt(N))")
    # on real SmolLM2 keys at 1M, 16*sqrt(N) lists reached recall 0.957 at 10.9x less time than
    # exact (nprobe 256) where 4*sqrt(N) needed nprobe 256 for 0.972 at 4.5x (both measured)
    ap.add_argument("--nlist-factor", type=float, default=16.0)
    ap.add_argument("--nprobe", default="64,128,256,512", help="IVF lists visited per query (comma list)")
    ap.add_argument("--chunk", type=int, default=65536, help="keys per add call")
    ap.add_argument("--backends", default="exact,faiss-flat,faiss-ivf",
                    help="comma list; exact is always measured first (it is the reference)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/index")
    ap.add_argument("--replot", action="store_true", help="only redraw index.png from --out/index.csv")
    args = ap.parse_args(argv)
    args.nprobe = [int(x) for x in args.nprobe.split(",")]
    args.backends = {"exact", *args.backends.split(",")}
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        with open(out / "index.csv") as fh:
            plot([{**r, "keys": int(r["keys"]), "search_ms": float(r["search_ms"]), "recall": float(r["recall"])}
                  for r in csv.DictReader(fh)], out / "index.png")
        return 0
    rows: list[dict] = []
    csv_path = out / "index.csv"
    fields = ["keys", "config", "add_s", "search_ms", "recall", "speedup_vs_exact"]
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for n in [parse_length(s) for s in args.sizes.split(",")]:
            if args.data == "real":
                keys, queries = real_keys(n, args.real_layer, args.queries, args.seed)
            else:
                keys = make_keys(n, args.dim, args.clusters, args.seed)
                queries = make_queries(keys, args.queries, args.seed)
            truth, exact_ms = None, None
            for backend, params, searches in configs(keys.shape[0], args):
                index, add_s = build(backend, keys, params, args.chunk)
                for label, search_params in searches:
                    if search_params:
                        index.set_search_params(**search_params)
                    sec, ids = timed_search(index, queries, args.k, args.repeats)
                    if truth is None:
                        truth, exact_ms = ids, sec * 1000
                    row = {"keys": keys.shape[0], "config": label, "add_s": round(add_s, 2),
                           "search_ms": round(sec * 1000, 2), "recall": round(recall(ids, truth), 4),
                           "speedup_vs_exact": round(exact_ms / (sec * 1000), 2)}
                    rows.append(row)
                    writer.writerow(row)
                    fh.flush()
                    print(row, flush=True)
                del index
            del keys
    bpt = bytes_per_token(args.dim, args.kv_heads)
    data_note = (f"real keys of SmolLM2-135M layer {args.real_layer} (kv head 0) over Python's docs and "
                 f"stdlib source, queries = the memory queries of the next window" if args.data == "real"
                 else f"synthetic clustered keys ({args.clusters} clusters)")
    md = [f"# Index backends: search time and recall@{args.k}\n",
          f"Command: `python benchmarks/index.py {' '.join(sys.argv[1:])}`\n",
          f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}; "
          f"head_dim {args.dim}, one window of {args.queries} queries per search call, "
          f"{data_note}, seed {args.seed}. Search time = best of {args.repeats} calls; "
          f"recall = fraction of the exact top-{args.k} found; add = adding all keys in chunks of "
          f"{args.chunk} (IVF: training on all keys included).\n",
          "| keys | backend | add (s) | search (ms) | recall@k | speed-up vs exact |",
          "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['keys']:,} | {r['config']} | {r['add_s']} | {r['search_ms']} | {r['recall']:.3f} | "
                  f"{r['speedup_vs_exact']}x |")
    md += ["", f"Bytes per stored token of one memory layer with {args.kv_heads} kv heads of dim {args.dim} "
           f"(SmolLM2-135M's shape), as saved: values alone (int8: + a float32 scale per row), and the "
           f"whole memory (keys, values, scales, positions, window slots, padding flags):", "",
           "| memory dtype | values B/token | vs float32 | whole memory B/token | vs float32 |",
           "|---|---:|---:|---:|---:|"]
    f32v, f32a = bpt["float32"]
    for name, (v, a) in bpt.items():
        md.append(f"| {name} | {v:.0f} | {f32v / v:.2f}x smaller | {a:.0f} | {f32a / a:.2f}x smaller |")
    (out / "index.md").write_text("\n".join(md) + "\n")
    plot(rows, out / "index.png")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
