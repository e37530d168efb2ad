"""A corpus memory of a million tokens on one CPU machine: build, size, search, answer.

    .venv/bin/python benchmarks/corpus_1m.py --tokens 1M --adapter DIR --threads 2 \
        --out benchmarks/results/corpus_1m

1. Documents: Python's standard-library source (`.py` files, sorted by path, tests excluded)
   copied as `.txt` into `--work`/docs until `--tokens` tokens; one named pass key
   ("The pass key of the archive is K. ...") is planted at a random line of a random document.
2. Build: `memformer memory build --docs ... --out ...` as a child process with the given model
   flags (resumable: re-running the same command continues it); wall time, tokens/s, the child's
   peak resident memory, bytes on disk per token. A finished build is not run again: its
   figures, kept in --work/build.json, are reported.
3. Questions: a fresh process-local model attaches the corpus read-only (time, resident memory),
   then the pass-key question is answered from the corpus alone (`CorpusQA`, cue "The pass key of
   the archive is": question reads of the corpus blocks under the nearest passages), whether
   those blocks hold the needle is checked, and one corpus kNN search of a window's queries is
   timed per memory layer (what `generate` without a question pays).

Memory: int8 (--memory-dtype; float32 would take 3.7x the disk and RAM) and the model's default
index unless --index names one.

Writes corpus_1m.md and corpus_1m.json under --out. The corpus and memory stay under --work
(default: the memformer cache), outside the repository.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memformer.eval.passkey import first_number, parse_length  # noqa: E402

NEEDLE = "The pass key of the archive is {key}. Remember it. {key} is the pass key of the archive."
CUE = "The pass key of the archive is"


def write_corpus(tokenizer, root: Path, tokens: int, rng: random.Random) -> dict:
    """Stdlib sources as .txt under root/docs until `tokens` tokens (EOS per document counted);
    the needle planted in one of them. Returns what was written (idempotent: an existing folder
    with its plan is reused, so a resumed build reads the same documents)."""
    plan = root / "plan.json"
    if plan.is_file():
        return json.loads(plan.read_text())
    base = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in base.rglob("*.py")
                   if not ({"test", "tests", "idle_test", "site-packages"} & set(p.relative_to(base).parts)))
    docs, total = [], 0
    for p in paths:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
        if not text.strip():
            continue
        docs.append((p.relative_to(base).as_posix(), text, n))
        total += n
        if total >= tokens:
            break
    key = rng.randrange(10000, 100000)
    at = rng.randrange(len(docs))
    name, text, _ = docs[at]
    lines = text.split("\n")
    line = rng.randrange(len(lines) + 1)
    docs[at] = (name, "\n".join(lines[:line] + ["# " + NEEDLE.format(key=key)] + lines[line:]), None)
    out = root / "docs"
    for doc_name, doc_text, _ in docs:          # `name` stays the needle's document
        f = out / (doc_name + ".txt")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(doc_text)
    info = {"documents": len(docs), "tokens_estimate": total, "key": key, "needle_doc": name + ".txt",
            "needle_line": line, "source": str(base)}
    plan.write_text(json.dumps(info, indent=1))
    return info


def model_flags(args) -> list[str]:
    flags = []
    for name in ("adapter", "memory_dtype", "index", "threads"):
        v = getattr(args, name)
        if v is not None:
            flags += [f"--{name.replace('_', '-')}", str(v)]
    return flags


def needle_block(model, plan: dict, docs) -> int:
    """The memory block of the planted needle's first token in the corpus stream (docs: the
    corpus's document table, entries with name, start and text)."""
    doc = next(d for d in docs if d.name == plan["needle_doc"])
    at = doc.text.index(NEEDLE.format(key=plan["key"]))
    return (doc.start + len(model.tokenizer(doc.text[:at], add_special_tokens=False)["input_ids"])) \
        // model.memory_config.block_size


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1M")
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--memory-dtype", default="int8")
    ap.add_argument("--index", default=None, help="kNN index (default: the memory config's)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="corpus + memory folder (default: <memformer cache>/bench/corpus_1m)")
    ap.add_argument("--out", default="benchmarks/results/corpus_1m")
    args = ap.parse_args()
    from memformer.cli.common import add_model_args, load_model
    from memformer.loading import cache_root
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work) if args.work else cache_root() / "bench" / f"corpus_{args.tokens}"
    work.mkdir(parents=True, exist_ok=True)

    model_args = argparse.ArgumentParser()
    add_model_args(model_args)                   # the flags `memformer memory build` takes
    model = load_model(model_args.parse_args(model_flags(args)))
    plan = write_corpus(model.tokenizer, work, parse_length(args.tokens), random.Random(args.seed))
    print(f"corpus: {plan['documents']} documents, ~{plan['tokens_estimate']:,} tokens; needle in "
          f"{plan['needle_doc']} (key {plan['key']})", flush=True)

    mem = work / "memory"
    # a memory directory (loaded whole at attach, searched by kNN reads): the format this benchmark
    # measures; corpus_1m_store.py measures the Lance store `memory build` writes by default
    cmd = [sys.executable, "-m", "memformer.cli", "memory", "build", "--docs", str(work / "docs"), "--out", str(mem),
           "--format", "dir", *model_flags(args)]
    from memformer import corpus
    # a finished build is not timed again: its figures were kept when it finished
    figures = work / "build.json"
    finished = (mem / corpus.CORPUS_FILE).is_file() and figures.is_file() \
        and len(corpus.read_corpus_table(mem)) == plan["documents"]
    if finished:
        build_s, build_rss = (json.loads(figures.read_text())[k] for k in ("build_s", "build_peak_rss_mb"))
    else:
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        build_s = time.perf_counter() - t0
        build_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024      # MB, peak of the child
        figures.write_text(json.dumps({"build_s": build_s, "build_peak_rss_mb": build_rss}))
    info = corpus.corpus_info(mem)

    rss0 = rss_mb()
    t0 = time.perf_counter()
    docs = model.attach_corpus(mem)
    attach_s = time.perf_counter() - t0
    rss_attached = rss_mb()
    from memformer.qa.corpus_qa import CorpusQA
    qa = CorpusQA(model)
    answers = [qa.answer(cue=CUE, max_new_tokens=8, evidence=3) for _ in range(3)]
    ans = answers[-1]
    correct = first_number(ans.text) == plan["key"]
    top_doc = ans.corpus_evidence[0]["doc"] if ans.corpus_evidence else None
    # the blocks the question read, and the block of the needle's first token
    blocks = model.questions.blocks_for(CUE, source="corpus") if model.state.corpus_passages is not None else []
    nb = needle_block(model, plan, docs)

    # one corpus search of a window's queries (G*T per kv head) in each memory layer
    cfg = model.memory_config
    layer = next(iter(model.memory_modules.values()))
    Hkv, D = layer.corpus.kv_heads, layer.corpus.dim
    G = layer.num_heads // Hkv
    q = torch.randn(1, Hkv, G * (cfg.window - cfg.sink_tokens), D) * 0.1
    search = []
    for m in model.memory_modules.values():
        t0 = time.perf_counter()
        m.corpus.search(q, cfg.top_k)
        search.append(time.perf_counter() - t0)

    tokens_read = info["tokens_read"]
    res = dict(documents=info["documents"], tokens_read=tokens_read, tokens_in_memory=info["tokens_in_memory"],
               memory_layers=info["memory_layers"], dtype=info["dtype"], index=args.index, adapter=args.adapter,
               build_s=round(build_s, 1), tokens_per_s=round(tokens_read / build_s, 1) if build_s else None,
               build_peak_rss_mb=round(build_rss), bytes_on_disk=info["bytes_on_disk"],
               disk_bytes_per_token=round(info["bytes_on_disk"] / max(1, tokens_read), 1),
               attach_s=round(attach_s, 1), rss_before_attach_mb=round(rss0), rss_attached_mb=round(rss_attached),
               ram_bytes_per_token=round((rss_attached - rss0) * 2**20 / max(1, tokens_read), 1),
               window_search_s_per_layer=round(sum(search) / len(search), 3), window_queries=G * (cfg.window - cfg.sink_tokens),
               answer_s=[round(a.seconds, 2) for a in answers], answer=ans.text, key=plan["key"], correct=correct,
               top_evidence=top_doc, needle_doc=plan["needle_doc"], threads=torch.get_num_threads(),
               blocks_read=blocks, needle_block=nb, needle_block_read=nb in blocks,
               passages=len(model.state.corpus_passages.ranges) if model.state.corpus_passages is not None else 0,
               cpu=platform.processor() or platform.machine(), documents_attached=len(docs))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus_1m.json").write_text(json.dumps(res, indent=1))
    md = ["# A million-token corpus memory on one CPU machine", "",
          f"Command: `.venv/bin/python benchmarks/corpus_1m.py {' '.join(sys.argv[1:])}`; {res['threads']} torch "
          f"thread(s), {res['cpu']}. Documents: Python {sys.version.split()[0]} standard-library sources (tests "
          f"excluded), one named pass key planted at a random line.", "",
          "| what | value |", "|---|---|",
          f"| documents / tokens read | {res['documents']:,} / {tokens_read:,} |",
          f"| memory | layers {res['memory_layers']}, {res['dtype']}, index {args.index or model.memory_config.index}"
          f"{', adapter ' + args.adapter if args.adapter else ''} |",
          f"| build (`memformer memory build`) | {res['build_s']:,} s, {res['tokens_per_s']:,} tokens/s, peak RSS "
          f"{res['build_peak_rss_mb']:,} MB |",
          f"| on disk | {res['bytes_on_disk'] / 2**30:.2f} GiB, {res['disk_bytes_per_token']:,} B/token |",
          f"| attach (load + index) | {res['attach_s']} s; RSS {res['rss_before_attach_mb']:,} -> "
          f"{res['rss_attached_mb']:,} MB ({res['ram_bytes_per_token']:,} B/token) |",
          f"| corpus search, one window ({res['window_queries']} queries per kv head), per layer | "
          f"{res['window_search_s_per_layer']} s |",
          f"| answer from the corpus alone (cue \"{CUE}\", 8 tokens) | {res['answer_s']} s |",
          f"| answer / key | {ans.text[:24]!r} / {plan['key']}: {'correct' if correct else 'wrong'} |",
          f"| top evidence document / planted in | {top_doc} / {plan['needle_doc']} |",
          f"| passages / blocks the question read / the needle's block | {res['passages']:,} / {blocks} / "
          f"{nb} ({'read' if res['needle_block_read'] else 'not read'}) |", ""]
    (out / "corpus_1m.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
