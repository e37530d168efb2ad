"""Passage ranking for question reads over a Lance store: a LanceDB scan of the passages table
against a FAISS flat index of the same embeddings (loaded at attach), 384-wide, on one core.

    LANCE_CPU_THREADS=1 taskset -c 1 python benchmarks/passage_search.py --work DIR \
        --out benchmarks/results/scale/passage_search.json

It decides `corpus_store.FAISS_MAX_PASSAGES` (docs/scale.md). The FAISS time ranks every passage,
as `PassageIndex.search` does; LanceDB returns the best SEARCH_DEPTH.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import faiss
import lance
import lancedb
import numpy as np
import pyarrow as pa

from memformer.passages import SEARCH_DEPTH


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", default="4096,16384,65536")
    args = ap.parse_args(argv)
    faiss.omp_set_num_threads(1)
    out = {}
    for n in (int(x) for x in args.sizes.split(",")):
        v = np.random.default_rng(0).standard_normal((n, 384)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        uri = Path(args.work) / f"db{n}"
        shutil.rmtree(uri, ignore_errors=True)
        table = pa.table({"start": np.arange(n), "end": np.arange(n) + 1,
                          "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), 384)})
        tbl = lancedb.connect(str(uri)).create_table("passages", table)
        queries = v[:20] + 0.01
        search = lambda q: tbl.search(q, vector_column_name="vector").metric("dot").limit(SEARCH_DEPTH) \
            .select(["start", "end"]).to_arrow()
        search(queries[0])                                     # warm
        t0 = time.perf_counter()
        for q in queries:
            search(q)
        lance_ms = (time.perf_counter() - t0) / len(queries) * 1e3
        t0 = time.perf_counter()
        emb = lance.dataset(str(uri / "passages.lance")).to_table(columns=["vector"])["vector"] \
            .combine_chunks().flatten().to_numpy().reshape(n, -1)
        index = faiss.IndexFlatIP(384)
        index.add(np.ascontiguousarray(emb))
        load_ms = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        for q in queries:
            index.search(q[None], n)
        faiss_ms = (time.perf_counter() - t0) / len(queries) * 1e3
        out[n] = {"lancedb_search_ms": round(lance_ms, 2), "faiss_rank_all_ms": round(faiss_ms, 2),
                  "faiss_load_ms": round(load_ms, 1), "faiss_bytes": n * 384 * 4}
        print(n, out[n], flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
