"""Answer time from one corpus held two ways, a memory directory and the Lance store converted from it
(`memformer memory convert`), with the same code and the same questions (issue 39: a store's answers
must not be slower than a directory's).

    memformer memory build --docs DOCS --out DIR.mem --format dir
    memformer memory convert DIR.mem STORE.lance
    .venv/bin/python benchmarks/corpus_answer_latency.py DIR.mem STORE.lance --key 60494 \
        --out benchmarks/results/corpus_1m_store/answer_latency.json

Each memory is attached in a fresh process (the shipped default model, --threads torch threads). It
answers the pass-key cue once to load the sentence embedder, then --repeats times, timed one by
one. The two processes run one after the other, alternating --rounds times, so that a change in
load affects both.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from corpus_1m import CUE, rss_mb  # noqa: E402


def answer_times(memory: str, threads: int, repeats: int) -> dict:
    """In this process: attach `memory`, answer once (warm-up), then `repeats` timed answers."""
    import torch
    from memformer import MemformerForCausalLM
    from memformer.qa.corpus_qa import CorpusQA
    torch.set_num_threads(threads)
    model = MemformerForCausalLM.from_pretrained()
    t0 = time.perf_counter()
    model.attach_corpus(memory)
    attach_s = time.perf_counter() - t0
    attached = rss_mb()
    qa = CorpusQA(model)
    qa.answer(cue=CUE, max_new_tokens=8, evidence=0)
    times, text = [], None
    for _ in range(repeats):
        a = qa.answer(cue=CUE, max_new_tokens=8, evidence=0)
        times.append(round(a.seconds, 3))
        text = a.text
    return {"attach_s": round(attach_s, 2), "rss_attached_mb": round(attached), "answer_s": times, "answer": text}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("directory", help="a memory directory (memformer memory build --format dir)")
    ap.add_argument("store", help="the Lance store converted from it")
    ap.add_argument("--key", type=int, required=True, help="the planted pass key")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)      # child: MEMORY
    args = ap.parse_args()
    if args.child:
        print(json.dumps(answer_times(args.child, args.threads, args.repeats)))
        return 0
    runs = {"directory": [], "store": []}
    for _ in range(args.rounds):
        for name in runs:
            path = getattr(args, name)
            child = subprocess.run([sys.executable, __file__, args.directory, args.store, "--key", str(args.key),
                                    "--threads", str(args.threads), "--repeats", str(args.repeats), "--child", path],
                                   capture_output=True, text=True, check=True)
            runs[name].append(json.loads(child.stdout.strip().splitlines()[-1]))
    res = {"threads": args.threads, "key": args.key}
    for name, rs in runs.items():
        times = [t for r in rs for t in r["answer_s"]]
        res[name] = {"median_answer_s": round(statistics.median(times), 3), "answer_s": times,
                     "attach_s": [r["attach_s"] for r in rs], "rss_attached_mb": [r["rss_attached_mb"] for r in rs],
                     "correct": all(str(args.key) in r["answer"] for r in rs), "answer": rs[-1]["answer"]}
    res["store_vs_directory"] = round(res["store"]["median_answer_s"] / res["directory"]["median_answer_s"], 3)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
