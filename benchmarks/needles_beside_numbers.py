"""RULER needles planted beside other numbers: the asked needle of a RULER sample (niah_multikey_1 by
default) moved to 0-2 sentences after a sentence that holds a colon before a number ("V:0, I:6",
"ex: 10.1"), where a read of the needle's passage also holds numbers of the haystack's own.

A development set for the first answer token: memory reads the needle's passage and must copy the
needle's value, not a number beside it. The samples are RULER's (`memformer.eval.ruler.make_sample`,
the seed's keys, values and distractor needles) with only the asked needle moved; memory and RAG
answer each, with the shipped defaults. `--diagnose SEED/INDEX` prints one sample's read, its top
first tokens and answer with the copy pointer on and off, and the answer to the needle's own
words up to its value as the cue.

    .venv/bin/python benchmarks/needles_beside_numbers.py --haystack runs/haystacks/debian-reference.txt \\
        --seeds 1000,2000 --samples 8 --out benchmarks/results/needles_beside_numbers/dev_16k
    .venv/bin/python benchmarks/needles_beside_numbers.py --haystack runs/haystacks/debian-reference.txt \\
        --diagnose 1000/6

Results: OUT/trials.jsonl (one record per sample and mode, `--resume`-able) and OUT/beside_numbers.md.
"""
from __future__ import annotations

import argparse
import bisect
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

from memformer.eval import ruler
from memformer.eval.passkey import parse_length

NUMBER_AFTER_COLON = re.compile(r"[^.!?]*:\s?\d[^.!?]*[.!?](?=\s)")   # a sentence with ": 4" or ":4" in it
SENTENCE_END = re.compile(r"[.!?](?=\s)")


def needle_pattern(value: str) -> re.Pattern:
    """RULER's needle sentence (`ruler.NEEDLE`) holding `value`, any value kind and key."""
    return re.compile(re.escape(ruler.NEEDLE).replace(r"\{type_v\}", r"\w+").replace(r"\{key\}", r"[\w-]+")
                      .replace(r"\{value\}", re.escape(value)))


def plant_beside_numbers(sample: ruler.RulerSample, seed: int) -> tuple[int, int]:
    """Move the sample's asked needle (the one holding `expected[0]`) to 0-2 sentences after a
    sentence with a colon before a number, in the middle 90% of the document; no other needle counts
    as such a sentence. Edits `sample.document` in place; returns (character offset of the needle,
    number of places it could go). Raises ValueError when the document has no such place."""
    found = needle_pattern(sample.expected[0]).search(sample.document)
    if found is None:
        raise ValueError(f"sample {sample.task}/{sample.index}: no needle holds {sample.expected[0]!r}")
    needle = found.group(0)
    doc = sample.document[:found.start()] + sample.document[found.end():]
    ends = [m.end() for m in SENTENCE_END.finditer(doc)]
    rng = random.Random(f"{seed}/{sample.index}/k")            # how many sentences after
    places = []
    for m in NUMBER_AFTER_COLON.finditer(doc):
        if "special magic" in m.group(0):              # a distractor needle is not the haystack's number
            continue
        j = bisect.bisect_left(ends, m.end()) + rng.randint(0, 2)
        if j < len(ends) and 0.05 * len(doc) < ends[j] < 0.95 * len(doc):
            places.append(ends[j])
    if not places:
        raise ValueError(f"sample {sample.task}/{sample.index}: the haystack has no sentence with a colon before a number")
    at = random.Random(f"{seed}/{sample.index}/spot").choice(places)
    sample.document = doc[:at] + " " + needle + doc[at:]
    sample.needle_depths = [round((at + 1) / len(sample.document), 4)]     # by characters
    return at + 1, len(places)


def make_samples(tokenizer, essay: list[str], seeds: list[int], samples: int, length: int, task: str):
    """[(seed, sample, needle offset, places)] for every seed and index."""
    out = []
    for seed in seeds:
        for i in range(samples):
            s = ruler.make_sample(tokenizer, task, length, ruler.trial_rng(seed, task, length, i), essay, i)
            at, places = plant_beside_numbers(s, seed)
            out.append((seed, s, at, places))
    return out


def report(records: list[dict], args) -> str:
    modes = list(dict.fromkeys(r["mode"] for r in records))
    lines = ["# RULER needles beside other numbers", "",
             f"Task `{args.task}`, {args.length} tokens, haystack `{Path(args.haystack).name}`, seeds {args.seeds}, "
             f"{args.samples} samples each; the asked needle 0-2 sentences after a sentence with a colon before a number.", "",
             "| mode | score | looping |", "|---|---:|---:|"]
    for m in modes:
        rows = [r for r in records if r["mode"] == m and r["status"] == "ok"]
        lines.append(f"| {m} | {sum(r['score'] for r in rows):g}/{len(rows)} | {sum(bool(r['looping']) for r in rows)} |")
    lines += ["", "| sample | expected | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
    by = {}
    for r in records:
        by.setdefault((r["seed"], r["index"]), {})[r["mode"]] = r
    cell = lambda r: "" if r is None else ("✓ " if r["score"] == 1 else "✗ ") + repr(r["answer"]).replace("|", "\\|")
    for (seed, i), rs in sorted(by.items()):
        lines.append(f"| {seed}/{i} | {next(iter(rs.values()))['expected'][0]} | " + " | ".join(cell(rs.get(m)) for m in modes) + " |")
    return "\n".join(lines) + "\n"


def diagnose(model, sample: ruler.RulerSample, at: int) -> None:
    """Print the read a cue answers from, the top first three tokens and the answer, with the
    copy pointer as shipped and off; then the answer to the needle's own words up to its value."""
    from memformer.loading import encode_text
    from memformer.qa import longdoc as qa
    from memformer.question_reads import read_query
    qa.prepare(model, [sample.document], "memory", show_progress=False)
    ids = encode_text(model.tokenizer, sample.document)["input_ids"]
    B = model.memory_config.block_size
    x = model.questions.prompt_ids(None, cue=sample.cue)
    _, chosen, _ = model._question_reads(read_query(None, sample.cue), x, model.memory_config.answer_reads)
    print(f"needle at token {len(encode_text(model.tokenizer, sample.document[:at])['input_ids'])} "
          f"(block size {B}); expected {sample.expected}")
    for k, blocks in enumerate(chosen or []):
        print(f"read {k}: blocks {blocks}\n  {model.tokenizer.decode([t for b in blocks for t in ids[b * B:(b + 1) * B]])!r}")

    class FirstSteps:                  # log-probabilities of the top tokens at the first 3 steps
        def __init__(self):
            self.steps = []

        def __call__(self, input_ids, scores):
            if len(self.steps) < 3:
                v, ix = scores[0].float().log_softmax(-1).topk(6)
                self.steps.append(", ".join(f"{model.tokenizer.decode([int(t)])!r} {float(p):.2f}" for p, t in zip(v, ix)))
            return scores

    shipped = model.memory_config.copy_pointer
    try:
        for name, beta in (("default", shipped), ("pointer off", 0.0)):
            model.memory_config.copy_pointer = beta
            steps = FirstSteps()
            out = model.ask(cue=sample.cue, max_new_tokens=sample.max_new_tokens, return_dict=True, logits_processor=[steps])
            print(f"{name}: {out.text!r}")
            for k, s in enumerate(steps.steps):
                print(f"  step {k + 1}: {s}")
    finally:
        model.memory_config.copy_pointer = shipped
    # the same memory asked with the needle's own words up to its value: RULER's answer prefix puts
    # "mentioned in the provided text" between the key and "is"
    needle = needle_pattern(sample.expected[0]).search(sample.document).group(0)
    own = needle[:needle.index(sample.expected[0])].strip()
    print(f"the needle's own words {own!r}: {model.ask(cue=own, max_new_tokens=sample.max_new_tokens)!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--haystack", required=True, help="a text file (the development haystack)")
    ap.add_argument("--seeds", default="1000,2000")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--length", default="16k")
    ap.add_argument("--task", default="niah_multikey_1", choices=[t for t, s in ruler.TASKS.items() if s.kind != "vt"])
    ap.add_argument("--modes", default="memory,rag")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--resume", action="store_true", help="keep the records in OUT/trials.jsonl and run the rest")
    ap.add_argument("--diagnose", default=None, metavar="SEED/INDEX", help="diagnose one sample (no records written)")
    args = ap.parse_args(argv)
    if args.diagnose is None and args.out is None:
        ap.error("--out is required unless --diagnose is given")
    if args.diagnose is not None and not re.fullmatch(r"\d+/\d+", args.diagnose):
        ap.error(f"--diagnose takes SEED/INDEX, e.g. 1000/6, not {args.diagnose!r}")
    args.length = parse_length(args.length)
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    from memformer import MemformerForCausalLM
    model = MemformerForCausalLM.from_pretrained()
    _, text = ruler.haystack_text(args.haystack)
    essay = ruler.essay_words(text)
    if args.diagnose is not None:
        seed, i = map(int, args.diagnose.split("/"))
        s = ruler.make_sample(model.tokenizer, args.task, args.length, ruler.trial_rng(seed, args.task, args.length, i), essay, i)
        at, _ = plant_beside_numbers(s, seed)
        diagnose(model, s, at)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "trials.jsonl"
    records = [json.loads(l) for l in log.read_text().splitlines()] if args.resume and log.is_file() else []
    done = {(r["seed"], r["index"], r["mode"]) for r in records}
    with log.open("a" if args.resume else "w") as f:
        for seed, s, at, places in make_samples(model.tokenizer, essay, seeds, args.samples, args.length, args.task):
            for mode in args.modes.split(","):
                if (seed, s.index, mode) in done:
                    continue
                t0 = time.time()
                rec = ruler.run_sample(model, s, mode)
                rec.update(seed=seed, places=places, context=s.document[max(0, at - 300):at + 300])
                f.write(json.dumps(rec) + "\n")
                f.flush()
                records.append(rec)
                print(f"{seed}/{s.index} {mode}: {rec['score']} {rec['answer']!r} ({time.time() - t0:.0f} s)", flush=True)
    (out / "beside_numbers.md").write_text(report(records, args))
    print((out / "beside_numbers.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
