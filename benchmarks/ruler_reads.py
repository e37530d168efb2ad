"""What a RULER question read chooses, sample by sample: where the embedder ranks the needle's
passage, which candidates `ask` checks, how each scores, and which one wins.

    .venv/bin/python benchmarks/ruler_reads.py --length 64k --seed 1000 --samples 5 \
        --tasks niah_single_2,niah_multikey_1 --out runs/ruler_reads_dev_64k.jsonl

For the development split only (the default haystack, your own seeds): a diagnosis chooses
designs, and held-out samples must not be used for that. Memories are cached in --cache-dir, as
`memformer eval ruler` caches them, so a run over samples already memorized only reads.

One JSON line per sample:
- needle_rank: the rank (0 = best) of the first passage holding the first expected value, in
  the embedder's ranking of all passages by the cue; None when no passage holds it whole;
- candidates: per candidate of `QuestionReads.candidates` (best first) its blocks, cosine, mean
  log-probability of the cue's tokens under its read alone, score (`verified_blocks`' rule),
  whether its blocks hold an expected value, and the first 160 characters of its text;
- chosen: the index of the default's winner (among the first `CANDIDATES`); answer: `ask`'s
  answer; score: string_match_all. --candidates N scores N candidates, to see what a deeper
  check would choose.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", default="64k")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--tasks", default="niah_single_2,niah_multikey_1")
    ap.add_argument("--haystack", default=None, help="essay haystack file (default: Python's documentation topics)")
    ap.add_argument("--cache-dir", default="runs/ruler_cache")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=None,
                    help="candidates to score (default: question_reads.CANDIDATES); the answer is always the default's")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from memformer import MemformerForCausalLM
    from memformer.eval import ruler
    from memformer.eval.passkey import parse_length

    torch.set_num_threads(args.threads)
    length = parse_length(args.length)
    model = MemformerForCausalLM.from_pretrained()
    _, text = ruler.haystack_text(args.haystack)
    essay = ruler.essay_words(text)
    with open(args.out, "a") as out:
        run(args, model, essay, length, out)
    return 0


def run(args, model, essay, length: int, out) -> None:
    """One JSON line per sample of every task (the module docstring lists its fields)."""
    from memformer.eval import ruler
    from memformer.qa import longdoc as qa
    from memformer.question_reads import CANDIDATES, candidate_reads, candidate_score, read_query
    tok = model.tokenizer
    for task in args.tasks.split(","):
        for i in range(args.samples):
            s = ruler.make_sample(tok, task, length, ruler.trial_rng(args.seed, task, length, i), essay, i)
            ctx = qa.prepare(model, [s.document], "memory", show_progress=False, cache_dir=args.cache_dir)
            stream = model.state.stream[0]
            B = model.memory_config.block_size
            block_text = lambda blocks: tok.decode([t for b in blocks for t in stream[b * B:(b + 1) * B]])
            holds = lambda t: any(e in t for e in s.expected)
            query = read_query(None, s.cue)
            ranked = model.questions.passages.search(query)                        # every passage, best first
            needle_rank = next((r for r, p in enumerate(ranked) if s.expected[0] in tok.decode(stream[p.start:p.end])), None)
            x = model.questions.prompt_ids(None, cue=s.cue)                         # [1, T]
            cands, source = model.questions.candidates(query, args.candidates or CANDIDATES)
            rows = []
            _, logps = candidate_reads(model, [b for b, _ in cands], source, x)     # [K, T - 1]
            for (blocks, cos), logp in zip(cands, logps):
                t = block_text(blocks)
                rows.append(dict(blocks=blocks, cos=round(cos, 4), prompt_logp=round(logp.mean().item(), 4),
                                 score=round(candidate_score(cos, logp), 4), holds=holds(t), text=t[:160]))
            chosen = max(range(min(len(rows), CANDIDATES)), key=lambda j: (rows[j]["score"], -j))
            ans = qa.answer(model, ctx, cue=s.cue, max_new_tokens=s.max_new_tokens, evidence=0).text
            rec = dict(task=task, length=length, seed=args.seed, index=i, expected=s.expected,
                       needle_depths=s.needle_depths, needle_rank=needle_rank, passages=len(ranked),
                       candidates=rows, chosen=chosen, answer=ans, score=ruler.string_match_all(ans, s.expected))
            out.write(json.dumps(rec) + "\n")
            out.flush()
            print(task, i, "needle rank", needle_rank, "chosen", chosen,
                  [(r["cos"], r["prompt_logp"], r["holds"]) for r in rows], repr(ans[:40]), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
