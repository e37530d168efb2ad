"""A million-token corpus as a Lance store with the shipped default: one process against a local
Ray cluster of 2 workers, then attach and answer (issue 39's figures; docs/scale.md).

    .venv/bin/python benchmarks/corpus_1m_store.py --tokens 1M --workers 2 \
        --out benchmarks/results/corpus_1m_store

1. Documents: the same corpus `corpus_1m.py` writes (Python's standard-library sources, one named
   pass key planted at a random line), under --work/docs.
2. Builds, each `memformer memory build` in a child process, one after the other, nothing else
   running: into --work/single (one process, --threads torch threads) and into --work/ray
   (`--ray --workers N`: a local Ray cluster started by the command, so its start counts; one
   torch thread per worker). Wall time and the child's peak RSS. A finished build is not run
   again: its figures are kept in --work/<name>.json. A build that was interrupted and continued
   is marked `resumed`, since its wall time then covers only the last part.
3. Equal rows: every table of the two stores, compared whole (`pyarrow.Table.equals`), and the
   rows of each table that differ. The rows are a function of the documents, the model and the
   torch thread count of the process that runs it (a matrix product over few rows splits its
   sums by thread count), not of the sharding. So when --threads is not 1, a third build runs
   in one process at the Ray workers' one thread (--work/single_t1): its rows must equal the Ray
   build's bit for bit. Its wall time is recorded but is not part of the comparison.
4. Attach and answer, each store in a fresh process (the shipped default model, --answer-threads
   threads): RSS before and after `attach_corpus`, then the pass-key cue answered 3 times from the
   corpus alone (`CorpusQA`), with its time, and whether the blocks read hold the needle.

Writes corpus_1m_store.json and corpus_1m_store.md under --out; the corpus and the stores stay
under --work (default: the memformer cache), outside the repository.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from corpus_1m import CUE, needle_block, rss_mb, write_corpus  # noqa: E402


def timed_build(name: str, work: Path, flags: list[str]) -> dict:
    """`memformer memory build` of work/docs into work/name, timed (or the figures of a finished one)."""
    figures, store = work / f"{name}.json", work / name
    if figures.is_file():
        return json.loads(figures.read_text())
    resumed = store.exists()                         # a build interrupted earlier continues
    cmd = [sys.executable, "-m", "memformer.cli", "memory", "build", "--docs", str(work / "docs"), "--out", str(store),
           *flags]
    print("$", " ".join(cmd), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    res = {"build_s": round(wall, 1), "flags": flags, "resumed": resumed,
           # ru_maxrss of children is the largest child so far: exact for the first build only
           "peak_rss_mb": round(peak / 1024) if peak > before else None,
           "bytes": sum(f.stat().st_size for f in store.rglob("*") if f.is_file())}
    figures.write_text(json.dumps(res))
    return res


def rows_differing(a, b) -> dict:
    """Per table of stores a and b: the number of rows that differ in any column (0: equal)."""
    from memformer import corpus_store
    x, y = corpus_store.CorpusStore(str(a)), corpus_store.CorpusStore(str(b))
    out = {}
    for t in corpus_store.TABLES:
        ta, tb = x.datasets[t].to_table(), y.datasets[t].to_table()
        if ta.equals(tb):
            out[t] = 0
        elif ta.num_rows != tb.num_rows or ta.schema != tb.schema:
            out[t] = max(ta.num_rows, tb.num_rows)
        else:
            differ = np.zeros(ta.num_rows, dtype=bool)
            for name in ta.schema.names:
                if not ta[name].equals(tb[name]):
                    differ |= np.array([p != q for p, q in zip(ta[name].to_pylist(), tb[name].to_pylist())])
            out[t] = int(differ.sum())
    return out


def attach_and_answer(store: str, key: int, threads: int) -> dict:
    """In this fresh process: load the shipped default, attach the store, answer the cue 3 times."""
    import torch
    from memformer import MemformerForCausalLM
    from memformer.eval.passkey import first_number
    from memformer.qa.corpus_qa import CorpusQA
    torch.set_num_threads(threads)
    model = MemformerForCausalLM.from_pretrained()
    before = rss_mb()
    t0 = time.perf_counter()
    model.attach_corpus(store)
    attach_s = time.perf_counter() - t0
    attached = rss_mb()
    qa = CorpusQA(model)
    answers = [qa.answer(cue=CUE, max_new_tokens=8, evidence=0) for _ in range(3)]
    blocks = [int(b) for b in model.questions.blocks_for(CUE, source="corpus")]
    return {"attach_s": round(attach_s, 2), "rss_before_attach_mb": round(before), "rss_attached_mb": round(attached),
            "attach_rss_growth_mb": round(attached - before), "rss_after_answers_mb": round(rss_mb()),
            "answer_s": [round(a.seconds, 2) for a in answers], "answer": answers[-1].text,
            "correct": first_number(answers[-1].text) == key, "blocks_read": blocks, "threads": threads}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1M")
    ap.add_argument("--workers", type=int, default=2, help="Ray workers of the second build (0: no Ray build)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the single-process build")
    ap.add_argument("--answer-threads", type=int, default=1, help="torch threads while attaching and answering")
    ap.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard of both builds (default: the build's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="corpus + stores (default: <memformer cache>/bench/corpus_store_<tokens>)")
    ap.add_argument("--out", default="benchmarks/results/corpus_1m_store")
    ap.add_argument("--attach", default=None, help=argparse.SUPPRESS)          # child: STORE,KEY,THREADS
    args = ap.parse_args()
    if args.attach:
        store, key, threads = args.attach.rsplit(",", 2)
        print(json.dumps(attach_and_answer(store, int(key), int(threads))))
        return 0
    from memformer import MemformerForCausalLM
    from memformer.eval.passkey import parse_length
    from memformer.loading import cache_root
    work = Path(args.work) if args.work else cache_root() / "bench" / f"corpus_store_{args.tokens}"
    work.mkdir(parents=True, exist_ok=True)
    model = MemformerForCausalLM.from_pretrained()             # the tokenizer and block size, here
    plan = write_corpus(model.tokenizer, work, parse_length(args.tokens), random.Random(args.seed))
    print(f"corpus: {plan['documents']} documents, ~{plan['tokens_estimate']:,} tokens; needle in "
          f"{plan['needle_doc']} (key {plan['key']})", flush=True)

    shards = [] if args.shard_tokens is None else ["--shard-tokens", str(args.shard_tokens)]
    res = {"tokens": args.tokens, "documents": plan["documents"], "key": plan["key"], "cpu": platform.processor()
           or platform.machine(), "single": timed_build("single", work, ["--threads", str(args.threads), *shards])}
    if args.workers:
        res["ray"] = timed_build("ray", work, ["--ray", "--workers", str(args.workers), *shards])
        res["ray_vs_single"] = round(res["ray"]["build_s"] / res["single"]["build_s"], 3)
        res["rows_differing"] = rows_differing(work / "single", work / "ray")
        if args.threads != 1:          # the Ray workers' thread count, in one process
            res["single_t1"] = timed_build("single_t1", work, ["--threads", "1", *shards])
            res["rows_differing_t1"] = rows_differing(work / "single_t1", work / "ray")
    from memformer import corpus
    res["store"] = corpus.corpus_info(str(work / "single"))
    from memformer import corpus_store
    res["needle_block"] = needle_block(model, plan, corpus_store.CorpusStore(str(work / "single")).documents())
    del model
    for name in ["single"] + (["ray"] if args.workers else []):
        child = subprocess.run([sys.executable, __file__, "--attach", f"{work / name},{plan['key']},{args.answer_threads}"],
                               capture_output=True, text=True, check=True)
        res[name]["answer"] = a = json.loads(child.stdout.strip().splitlines()[-1])
        a["needle_block_read"] = res["needle_block"] in a["blocks_read"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus_1m_store.json").write_text(json.dumps(res, indent=1))
    (out / "corpus_1m_store.md").write_text(report(res))
    print(report(res))
    return 0


def report(res: dict) -> str:
    rows = ["| | one process | " + (f"Ray, {res['ray']['flags'][2]} workers |" if "ray" in res else ""),
            "|---|---:|" + ("---:|" if "ray" in res else "")]
    builds = [res["single"]] + ([res["ray"]] if "ray" in res else [])

    def row(label, f):
        rows.append(f"| {label} | " + " | ".join(f(b) for b in builds) + " |")
    row("build wall time", lambda b: f"{b['build_s']:,} s" + (" (resumed)" if b["resumed"] else ""))
    row("build peak RSS (largest process)", lambda b: f"{b['peak_rss_mb']:,} MB" if b["peak_rss_mb"] else "n/a")
    row("bytes on disk", lambda b: f"{b['bytes'] / 2**30:.2f} GiB")
    row("attach time", lambda b: f"{b['answer']['attach_s']} s")
    row("RSS before / after attach", lambda b: f"{b['answer']['rss_before_attach_mb']:,} / "
                                              f"{b['answer']['rss_attached_mb']:,} MB")
    row("answer time, 3 questions", lambda b: ", ".join(f"{s} s" for s in b["answer"]["answer_s"]))
    row("answer (key " + str(res["key"]) + ")", lambda b: f"{b['answer']['answer'][:20]!r}, "
                                                           f"{'correct' if b['answer']['correct'] else 'wrong'}")
    row("the needle's block read", lambda b: "yes" if b["answer"]["needle_block_read"] else "no")
    head = [f"# A {res['tokens']}-token corpus as a Lance store, shipped default", "",
            f"Command: `.venv/bin/python benchmarks/corpus_1m_store.py {' '.join(sys.argv[1:])}` ({res['cpu']}). "
            f"{res['documents']} documents, {res['store'].get('tokens_read', 'n/a')} tokens.", ""]
    tail = []
    if "ray" in res:
        differing = lambda d: ", ".join(f"{t} {n:,}" for t, n in d.items())
        tail = ["", f"Ray build / one-process build: {res['ray_vs_single']}x.", "",
                f"Rows that differ from the Ray build's, per table: one process at {res['single']['flags'][1]} "
                f"threads: {differing(res['rows_differing'])}."]
        if "single_t1" in res:
            tail.append(f"One process at 1 thread (as each Ray worker; built in {res['single_t1']['build_s']:,} s): "
                        f"{differing(res['rows_differing_t1'])}.")
    return "\n".join(head + rows + tail) + "\n"


if __name__ == "__main__":
    sys.exit(main())
