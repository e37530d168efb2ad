"""Lance corpus stores at growing size with a tiny random backbone: bytes, build time, attach RSS
and answer latency (docs/scale.md).

    python benchmarks/scale_store.py --tokens 1M,10M --ray-workers 2 --work DIR --out benchmarks/results/scale

The backbone is a 2-layer hidden-64 random Llama (the tests' tiny model, int8 memory in both
layers, window 1024), the tokenizer one token per character, the sentence embedder hashed word
counts (384 wide): what grows with the corpus (rows, passages, documents) grows as with the
shipped default, at a fraction of the build time. Each attach and its questions run in a fresh
process, so its RSS is that of attaching alone. Passage search is timed both ways: FAISS (the
embeddings loaded at attach) and LanceDB (the table scanned at each question).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import resource
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut "
         "labore et dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco").split()


class CharTokenizer:
    eos_token_id = pad_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 127 for c in text]}

    def decode(self, ids, **kw):
        return "".join(chr(i - 1) for i in ids if i > 0)


class HashedWords:
    """Hashed word counts, L2-normalised: a deterministic sentence embedder."""

    def __init__(self, dim: int = 384):
        self.dim = dim

    def encode(self, texts, convert_to_tensor=True, normalize_embeddings=True, **kw):
        import torch
        out = torch.zeros(len(texts), self.dim)
        for i, t in enumerate(texts):
            for w in re.findall(r"[a-z0-9]+", t.lower()):
                out[i, zlib.crc32(w.encode()) % self.dim] += 1
        return torch.nn.functional.normalize(out + 1e-3, dim=1)

    def get_sentence_embedding_dimension(self):
        return self.dim


def tiny_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from memformer import MemformerForCausalLM, MemoryConfig
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"
    backbone = LlamaForCausalLM(cfg).eval()
    return MemformerForCausalLM(backbone, CharTokenizer(), MemoryConfig(window=1024, memory_dtype="int8"),
                                embedder=HashedWords())


def write_docs(folder: Path, tokens: int, doc_tokens: int = 20_000, seed: int = 0) -> str:
    """Documents of random words, one token per character, with a pass key planted in the middle
    one; returns the key."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    n = max(1, tokens // doc_tokens)
    key = str(rng.randrange(10_000, 99_999))
    for i in range(n):
        words, size = [], 0
        while size < doc_tokens:
            w = rng.choice(WORDS)
            words.append(w)
            size += len(w) + 1
        text = " ".join(words)
        if i == n // 2:
            cut = len(text) // 2
            text = text[:cut] + f" The pass key of the archive is {key}. " + text[cut:]
        (folder / f"d{i:05d}.txt").write_text(text)
    return key


def attach_and_ask(store: str, key: str, faiss_max: int) -> dict:
    """In this (fresh) process: attach the store, ask for the key 3 times."""
    import torch
    from memformer import corpus_store
    corpus_store.FAISS_MAX_PASSAGES = faiss_max
    torch.set_num_threads(1)
    model = tiny_model()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    statm = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
    before = statm()
    t0 = time.perf_counter()
    model.attach_corpus(store)
    attach_s = time.perf_counter() - t0
    after = statm()
    cue = f"The pass key of the archive is"
    times, search = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        model.questions.blocks_for(cue, source="corpus")
        search.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        model.ask(cue=cue, max_new_tokens=8)
        times.append(time.perf_counter() - t0)
    return {"attach_s": round(attach_s, 3), "rss_before_mb": round(before / 2**20, 1),
            "rss_attached_mb": round(after / 2**20, 1), "attach_rss_growth_mb": round((after - before) / 2**20, 1),
            "rss_after_questions_mb": round(statm() / 2**20, 1), "peak_rss_mb": round(rss0 / 2**20, 1),
            "passage_search_s": [round(x, 4) for x in search], "answer_s": [round(x, 4) for x in times],
            "passages_by": "faiss" if faiss_max > 0 else "lancedb"}


def ray_compare(docs: Path, single: Path, out: Path, workers: int, single_s: float) -> dict:
    """Build `docs` again on a local Ray cluster of `workers` workers (started here, so its start
    counts); wall time against the single-process build, and whether every table is equal."""
    from corpus_1m_store import rows_differing
    from memformer import corpus_build
    t0 = time.perf_counter()
    corpus_build.build_store(tiny_model(), docs, out, ray_address="local", workers=workers,
                             model_factory=tiny_model, show_progress=False)
    wall = time.perf_counter() - t0
    same = {t: n == 0 for t, n in rows_differing(single, out).items()}
    return {"workers": workers, "build_s": round(wall, 1), "vs_single": round(wall / single_s, 3), "same_rows": same}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1M,10M")
    ap.add_argument("--work", required=True, help="scratch folder for documents and stores")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/scale"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ray-workers", type=int, default=0,
                    help="also build the first size on a local Ray cluster of this many workers and compare")
    ap.add_argument("--build-on-ray", type=int, default=0,
                    help="build every size on a local Ray cluster of this many workers (the same rows, faster)")
    ap.add_argument("--attach", default=None, help=argparse.SUPPRESS)      # child: STORE,KEY,FAISS_MAX
    args = ap.parse_args(argv)
    if args.attach:
        store, key, faiss_max = args.attach.split(",")
        print(json.dumps(attach_and_ask(store, key, int(faiss_max))))
        return 0
    import torch
    from memformer import corpus_build
    torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for label in args.tokens.split(","):
        n = int(float(label[:-1]) * {"K": 1e3, "M": 1e6}[label[-1].upper()])
        docs, store = work / f"docs_{label}", work / f"store_{label}"
        key = write_docs(docs, n)
        t0 = time.perf_counter()
        ray = dict(ray_address="local", workers=args.build_on_ray, model_factory=tiny_model) if args.build_on_ray else {}
        manifest = corpus_build.build_store(tiny_model(), docs, store, show_progress=False, **ray)
        build_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        row = {"tokens": manifest["tokens"], "documents": manifest["documents"], "passages": manifest["passages"],
               "block_rows": manifest["block_rows"], "build_s": round(build_s, 1),
               "built_by": f"ray, {args.build_on_ray} workers" if args.build_on_ray else "one process", "bytes": size,
               "bytes_per_token": round(size / manifest["tokens"], 1), "key": key}
        for faiss_max in (1 << 40, 0):
            child = subprocess.run([sys.executable, __file__, "--work", str(work), "--attach",
                                    f"{store},{key},{faiss_max}"], capture_output=True, text=True, check=True)
            row["faiss" if faiss_max else "lancedb"] = json.loads(child.stdout.strip().splitlines()[-1])
        if args.ray_workers and not results:
            row["ray"] = ray_compare(docs, store, work / f"store_{label}_ray", args.ray_workers, build_s)
        results[label] = row
        print(label, json.dumps(row), flush=True)
    (out / "scale_store.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
