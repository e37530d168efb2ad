"""Exact copies of numbers that end in a doubled digit, through `model.ask`, per adapter.

Across the stored RULER runs, the shipped adapter's short copies of a 7-digit needle drop the
number's last digit, and almost every such number ends in a doubled digit ("962234." for
9622344). This benchmark measures that directly on the development haystack (Python's
documentation topics): each document of `--tokens` tokens holds `--needles` statements "The
catalogue number for <key> is <value>.", at spread depths, half of whose 7-digit values end in a
doubled digit and half of which repeat no digit at all. Each is asked on its own with the cue "The
catalogue number for <key> is" after one read of the document. An answer is exact when its first
number is the value, short when that number is the value less its last digit.

Models (`--models`): `auto` (the shipped adapter), `none` (training-free memory) or an adapter
folder. Records go to OUT/trials.jsonl as they finish; `--resume` skips those already there.

    .venv/bin/python benchmarks/copy_repeats.py --models auto,benchmarks/results/train_repeats_cpu/run/adapter \\
        --tokens 16k --docs 4 --seed 0 --threads 2 --out benchmarks/results/copy_repeats_dev

writes OUT/copy_repeats.md beside the records.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from memformer import MemformerForCausalLM
from memformer.eval import ruler
from memformer.eval.passkey import parse_length

STATEMENT = "The catalogue number for {key} is {value}."
CUE = "The catalogue number for {key} is"
QUESTION = "What is the catalogue number for {key}?"


def value(rng: random.Random, ends_double: bool) -> str:
    """A 7-digit number that ends in a doubled digit (and repeats no other), or repeats no digit."""
    if ends_double:
        digits = rng.sample("0123456789", 6)
        digits = digits if digits[0] != "0" else digits[1:] + digits[:1]
        return "".join(digits + [digits[-1]])
    digits = rng.sample("0123456789", 7)
    return "".join(digits if digits[0] != "0" else digits[1:] + digits[:1])


def make_document(tokenizer, words: list[str], tokens: int, needles: int, rng: random.Random):
    """(document text, [(key, value, ends_double, depth)]) of about `tokens` tokens."""
    start = rng.randrange(max(1, len(words) - 2 * tokens))
    body = words[start:start + 2 * tokens]
    ids = tokenizer(" ".join(body), add_special_tokens=False)["input_ids"][:tokens - 30 * needles]
    body = tokenizer.decode(ids).split(" ")
    keys = rng.sample(ruler.key_words(), needles)
    facts = [(k, value(rng, i % 2 == 0), i % 2 == 0) for i, k in enumerate(keys)]
    rng.shuffle(facts)
    depths = [(i + 0.5) / needles + rng.uniform(-0.3, 0.3) / needles for i in range(needles)]
    at = [int(d * len(body)) for d in depths]
    for (key, val, _), pos in sorted(zip(facts, at), key=lambda t: -t[1]):
        body.insert(pos, STATEMENT.format(key=key, value=val))
    return " ".join(body), [(k, v, dbl, round(d, 3)) for (k, v, dbl), d in zip(facts, depths)]


def verdict(answer: str, expected: str) -> str:
    """'exact', 'short' (the value less its last digit) or 'other', by the answer's first number."""
    nums = re.findall(r"\d+", answer)
    got = nums[0] if nums else ""
    return "exact" if got == expected else "short" if got == expected[:-1] else "other"


def summary(records: list[dict]) -> str:
    models = list(dict.fromkeys(r["model"] for r in records))
    lines = ["| model | ends in a doubled digit: exact | short | no repeated digit: exact | short |",
             "|---|---:|---:|---:|---:|"]
    for m in models:
        cells = []
        for dbl in (True, False):
            rs = [r for r in records if r["model"] == m and r["ends_double"] == dbl]
            cells += [f"{sum(r['verdict'] == 'exact' for r in rs)}/{len(rs)}", f"{sum(r['verdict'] == 'short' for r in rs)}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="auto", help="comma-separated: auto, none or adapter folders")
    p.add_argument("--tokens", default="16k")
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--needles", type=int, default=8, help="per document, an even number")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    if args.needles < 2 or args.needles % 2 or args.docs < 1:
        print("copy_repeats: --needles must be an even number >= 2 and --docs >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    tokens = parse_length(args.tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "trials.jsonl"
    if log.exists() and not args.resume:
        print(f"copy_repeats: {log} exists; pass --resume to continue it", file=sys.stderr)
        return 2
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue                                      # a line cut off by an interruption
            done[r["id"]] = r
    words = ruler.essay_words(ruler.haystack_text(None)[1])
    with log.open("a") as f:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            adapter = "auto" if name == "auto" else None if name == "none" else name
            model = MemformerForCausalLM.from_pretrained(adapter=adapter)
            for d in tqdm(range(args.docs), desc=name):
                rng = random.Random(f"{args.seed}/{tokens}/{d}")
                text, facts = make_document(model.tokenizer, words, tokens, args.needles, rng)
                ids = [f"{name}/{d}/{i}" for i in range(len(facts))]
                if all(i in done for i in ids):
                    continue
                model.reset_memory()
                model.memorize(text, show_progress=False)
                for rid, (key, val, dbl, depth) in zip(ids, facts):
                    if rid in done:
                        continue
                    t0 = time.perf_counter()
                    answer = model.ask(QUESTION.format(key=key), cue=CUE.format(key=key), max_new_tokens=12)
                    r = dict(id=rid, model=name, doc=d, key=key, expected=val, ends_double=dbl, depth=depth,
                             answer=answer, verdict=verdict(answer, val), seconds=round(time.perf_counter() - t0, 2))
                    f.write(json.dumps(r) + "\n")
                    f.flush()
                    done[rid] = r
    records = list(done.values())
    cmd = "python benchmarks/copy_repeats.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"# Copies of numbers that end in a doubled digit\n\nCommand: `{cmd}`\n\n{args.docs} documents of "
            f"{args.tokens} tokens (Python's documentation topics), {args.needles} needles each, seed {args.seed}.\n\n"
            + summary(records) + "\n")
    (args.out / "copy_repeats.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
