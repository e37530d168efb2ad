"""Where the sentence embedder ranks a RULER needle's passage, by passage cosines alone and with
sentence ranking (`MemoryConfig.sentence_ranking`), sample by sample. Embedder only: no memory
is built, so 128k documents take about 1.5 minutes each on 2 cores.

For the development split only (your own haystack and seeds), to choose how passages are ranked:

    .venv/bin/python benchmarks/passage_ranks.py --haystack runs/haystacks/debian-reference.txt \
        --length 128k --seed 1000 --samples 4 --tasks niah_multikey_1,niah_single_2 \
        --out benchmarks/results/sentence_ranking_dev/passage_ranks_128k.jsonl

One JSON line per sample: the rank (0 = best) of the first passage holding the first expected
value, by passage cosine (`passage`) and with sentence ranking (`sentences`), among `passages`;
`sentence_count` sentences were embedded.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def needle_rank(scores: torch.Tensor, holds: torch.Tensor) -> int | None:
    """Rank (0 = best) of the best-scored passage that holds the value, or None."""
    order = torch.argsort(scores, descending=True)                     # [C] passages, best first
    hits = holds[order].nonzero().flatten()
    return int(hits[0]) if len(hits) else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--haystack", default=None, help="essay haystack file (default: Python's documentation topics)")
    ap.add_argument("--length", default="128k")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--tasks", default="niah_multikey_1,niah_single_2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from memformer.eval import ruler
    from memformer.eval.passkey import parse_length
    from transformers import AutoTokenizer
    from memformer.loading import default_model_dir
    from memformer.passages import PassageIndex, default_embedder, encode_texts
    from memformer.question_reads import read_query

    torch.set_num_threads(args.threads)
    length = parse_length(args.length)
    tok, emb = AutoTokenizer.from_pretrained(str(default_model_dir())), default_embedder()
    essay = ruler.essay_words(ruler.haystack_text(args.haystack)[1])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as out:
        for task in args.tasks.split(","):
            for i in range(args.samples):
                t0 = time.perf_counter()
                s = ruler.make_sample(tok, task, length, ruler.trial_rng(args.seed, task, length, i), essay, i)
                ids = tok(s.document, add_special_tokens=False)["input_ids"]
                index = PassageIndex.from_stream(ids, [0], tok, emb, sentences=True)
                holds = torch.tensor([s.expected[0] in tok.decode(ids[a:b]) for a, b in index.ranges])
                query = read_query(None, s.cue)
                q = encode_texts(emb, [query])[0]                                     # [E]
                rec = dict(task=task, length=length, seed=args.seed, index=i, haystack=ruler.haystack_text(args.haystack)[0],
                           passages=len(index.ranges), sentence_count=len(index.sentence_ranges),
                           passage=needle_rank(index.embeddings @ q, holds), sentences=needle_rank(index.scores(query), holds),
                           seconds=round(time.perf_counter() - t0, 1))
                out.write(json.dumps(rec) + "\n")
                out.flush()
                print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
