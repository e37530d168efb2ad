"""What a read of each variable-tracking statement answers: the memory's read against the same text in the prompt.

RULER's vt asks for the 5 variables of a chain ("VAR A = 12345", "VAR B = VAR A ", ...) hidden in
noise. The shipped default answers it with 0 names at every length. This benchmark separates the
two causes a miss can have: the read chosen, and what a read gives once chosen. For each sample
and each statement of its chain it

- reads the `question_blocks` blocks around the statement alone under the cue (`reading_blocks`,
  the way `ask` reads its chosen blocks) and generates the answer;
- puts the text of the same blocks before the cue in the frozen backbone's prompt (the RAG
  baseline's prompt and decoding, `LongDocQA` mode "rag", with this one passage) and generates;
- does both again with the check's best read (what the default answers from) and the statement's
  blocks together, in document order;
- records the rank the check gives that read among the question's candidates
  (`question_reads.checked_reads` over the embedder's candidates plus the statements' reads).

Names found are scored by RULER's `string_match_all` over the chain's names.

    python benchmarks/vt_reads.py --seeds 1000,2000 --samples 3 --length 16k \
        --out benchmarks/results/vt_reads_dev
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from memformer import MemformerForCausalLM
from memformer.eval.ruler import essay_words, haystack_text, make_sample, string_match_all, trial_rng
from memformer.qa.longdoc import LongDocQA
from memformer.question_reads import checked_reads, read_query


def statement_blocks(tokenizer, stream: list[int], name: str, block_size: int, n: int,
                     lookahead: int = 8) -> list[int] | None:
    """The n consecutive blocks of a read that holds the statement "VAR name = ...": the first block
    whose tokens, with the next `lookahead`, hold it, one block before and the rest after (None if
    the statement is not in the stream). A statement of up to `lookahead` tokens lies within them."""
    for b in range(len(stream) // block_size + 1):
        if f"VAR {name} =" in tokenizer.decode(stream[b * block_size:(b + 1) * block_size + lookahead]):
            first = max(0, b - 1)
            return list(range(first, first + n))
    return None


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    model = MemformerForCausalLM.from_pretrained()
    tok, cfg = model.tokenizer, model.memory_config
    essay = essay_words(haystack_text(args.haystack)[1])
    length = int(args.length.rstrip("k")) * 1024
    records = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for i in range(args.samples):
            s = make_sample(tok, "vt", length, trial_rng(seed, "vt", length, i), essay, i)
            ctx = LongDocQA(model, "memory")
            ctx.read([s.document], cache_dir=args.cache_dir, show_progress=False)
            default = model.ask(cue=s.cue, max_new_tokens=s.max_new_tokens)
            x = model.questions.prompt_ids(None, cue=s.cue)                              # [1, T]
            cands, source = model.questions.candidates(read_query(None, s.cue))
            stream = list(model.state.stream[0])
            reads = [statement_blocks(tok, stream, name, cfg.block_size, cfg.question_blocks) for name in s.expected]
            scored, _ = checked_reads(model, cands + [(b, 0.0) for b in reads if b], source, x, keep=1)
            rank = {tuple(b): r for r, (b, _) in enumerate(scored)}
            for k, (name, blocks) in enumerate(zip(s.expected, reads)):
                if blocks is None:
                    continue
                with model.reading_blocks(blocks):
                    out = model.generate(x, max_new_tokens=s.max_new_tokens, do_sample=False)
                from_memory = tok.decode(out[0, x.shape[1]:], skip_special_tokens=True).strip()
                passage = stream[blocks[0] * cfg.block_size:(blocks[-1] + 1) * cfg.block_size]
                in_prompt, _ = ctx._generate(ctx._prompt(passage, None, s.cue), s.max_new_tokens, s.cue)
                # the check's best read and the statement's blocks read together, in document order
                both = sorted(set(scored[0][0]) | set(blocks))
                with model.reading_blocks(both):
                    out = model.generate(x, max_new_tokens=s.max_new_tokens, do_sample=False)
                with_best = tok.decode(out[0, x.shape[1]:], skip_special_tokens=True).strip()
                joined = [t for b in both for t in stream[b * cfg.block_size:(b + 1) * cfg.block_size]]
                with_best_prompt, _ = ctx._generate(ctx._prompt(joined, None, s.cue), s.max_new_tokens, s.cue)
                records.append(dict(seed=seed, index=i, statement=k, kind="value" if k == 0 else "hop",
                                    expected=s.expected, blocks=blocks, check_rank=rank[tuple(blocks)],
                                    candidates=len(scored), best_read=scored[0][0], default_answer=default,
                                    memory=from_memory, memory_score=string_match_all(from_memory, s.expected),
                                    prompt=in_prompt, prompt_score=string_match_all(in_prompt, s.expected),
                                    with_best=with_best, with_best_score=string_match_all(with_best, s.expected),
                                    with_best_prompt=with_best_prompt,
                                    with_best_prompt_score=string_match_all(with_best_prompt, s.expected)))
                r = records[-1]
                print(f"seed {seed} #{i} statement {k} rank {r['check_rank']}/{r['candidates']}: "
                      f"memory {from_memory[:40]!r} ({r['memory_score']:.1f})  "
                      f"in the prompt {in_prompt[:40]!r} ({r['prompt_score']:.1f})  with the best read: memory "
                      f"{with_best[:30]!r} ({r['with_best_score']:.1f}), prompt {with_best_prompt[:30]!r} "
                      f"({r['with_best_prompt_score']:.1f})", flush=True)
    return records


def report(records: list[dict], args, seconds: float) -> str:
    n = len(records)
    lines = [
        "# What a read of each vt statement answers",
        "",
        f"Command: `python benchmarks/vt_reads.py --seeds {args.seeds} --samples {args.samples} "
        f"--length {args.length} --threads {args.threads}"
        + (f" --haystack {args.haystack}" if args.haystack else "")
        + (f" --cache-dir {args.cache_dir}" if args.cache_dir else "") + f" --out {args.out}` ({seconds:.0f} s)",
        "",
        f"{n} statements ({len({(r['seed'], r['index']) for r in records})} samples x 5). Names found: "
        "RULER's `string_match_all` over the chain's 5 names (0.2 per name). Check rank: the read's place "
        "among the candidates the check scores (0 = the best, the read the default answers from).",
        "",
        "Names found, of 5 per statement:",
        "",
        "| statement | reads | memory read | its text in the prompt | memory read with the check's best read "
        "| both texts in the prompt | check rank (median) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in ("value", "hop"):
        rs = [r for r in records if r["kind"] == kind]
        if rs:
            ranks = sorted(r["check_rank"] for r in rs)
            found = lambda key: f"{sum(r[key] for r in rs) * 5:.0f}"
            lines.append(f"| {kind} | {len(rs)} | {found('memory_score')} | {found('prompt_score')} "
                         f"| {found('with_best_score')} | {found('with_best_prompt_score')} | {ranks[len(ranks) // 2]} |")
    lines += ["", "| seed | sample | statement | check rank | memory read | in the prompt | with the best read "
              "| both in the prompt | default answer |", "|---:|---:|---:|---:|---|---|---|---|---|"]
    for r in records:
        clip = lambda t: repr(t[:36]).replace("|", "\\|")
        lines.append(f"| {r['seed']} | {r['index']} | {r['statement']} | {r['check_rank']}/{r['candidates']} "
                     f"| {clip(r['memory'])} | {clip(r['prompt'])} | {clip(r['with_best'])} "
                     f"| {clip(r['with_best_prompt'])} | {clip(r['default_answer'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="1000,2000")
    ap.add_argument("--samples", type=int, default=3, help="samples per seed")
    ap.add_argument("--length", default="16k")
    ap.add_argument("--haystack", default=None, help="essay haystack file (vt itself uses the noise haystack)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=None, help="memorized documents kept between runs")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.samples < 1:
        ap.error("--samples must be >= 1")
    t0 = time.perf_counter()
    records = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "reads.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    (out / "vt_reads.md").write_text(report(records, args, time.perf_counter() - t0))
    print(report(records, args, time.perf_counter() - t0))


if __name__ == "__main__":
    main()
