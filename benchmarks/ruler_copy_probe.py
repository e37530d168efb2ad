"""Short copies of RULER needles that end in a doubled digit, and why, per adapter and LoRA scale.

The held-out RULER misses of the needle tasks are mostly copies one digit short where the value
ends in a doubled digit ("962234." for 9622344). This probe takes niah_single_2 samples of the
development split (Python's documentation topics; seeds from `--seed` upward, kept while the
value's last two digits match), reads and asks each as `memformer eval ruler` does
(`memformer.eval.ruler.run_sample`), and counts answers whose first number is the value (exact),
the value less its last digit (short) or anything else (other). It also generates the same answer
again with the scores kept, and at the step where the last digit is due (the answer so far is
the value less its last digit) records the probability of that digit and of "." under the
question read, and with memory disabled.

`--lora-scales` multiplies each adapter's LoRA output (its B matrices) by each factor, so one
run compares scales of the same trained weights; 1 is the adapter as trained.

    .venv/bin/python benchmarks/ruler_copy_probe.py --adapters auto --lora-scales 1,0.75,0.5 \\
        --samples 12 --length 4k --seed 5000 --threads 2 --out runs/copy_probe

writes OUT/trials.jsonl (one record per sample and setting; `--resume` skips those there) and
OUT/copy_probe.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from memformer import MemformerForCausalLM
from memformer.eval import ruler
from memformer.eval.passkey import parse_length
from memformer.qa import longdoc as qa
from memformer.question_reads import read_query

from copy_repeats import verdict   # benchmarks/ is on the path of a script started from it

TASK = "niah_single_2"


def doubled_samples(tokenizer, essay: list[str], length: int, seed: int, n: int):
    """The first n niah_single_2 samples from seed + 1 upward whose value ends in a doubled digit."""
    s = seed
    while n:
        s += 1
        sample = ruler.make_sample(tokenizer, TASK, length, ruler.trial_rng(s, TASK, length, 0), essay)
        if sample.expected[0][-1] == sample.expected[0][-2]:
            n -= 1
            yield s, sample


def last_digit_odds(model, sample) -> dict:
    """Probabilities of the value's last digit and of '.' at the step where it is due, under the
    question read the answer uses and with memory disabled (empty when the answer never reaches
    that step)."""
    tok, value = model.tokenizer, sample.expected[0]
    x = model.questions.prompt_ids(None, cue=sample.cue)                                 # [1, T]
    with model.question_read(read_query(None, sample.cue), x), torch.no_grad():
        out = model.generate(x, max_new_tokens=10, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    new = out.sequences[0, x.shape[1]:].tolist()
    step = next((i for i in range(len(new)) if tok.decode(new[:i]).strip() == value[:-1]), None)
    if step is None:
        return {}
    p = torch.softmax(out.scores[step][0].float(), -1)                                   # [V]
    with model.memory_disabled(), torch.no_grad():
        q = torch.softmax(model(out.sequences[:, : x.shape[1] + step]).logits[0, -1].float(), -1)
    digit, dot = tok.convert_tokens_to_ids(value[-1]), tok.convert_tokens_to_ids(".")
    return dict(p_digit=round(p[digit].item(), 4), p_dot=round(p[dot].item(), 4),
                p_digit_off=round(q[digit].item(), 4), p_dot_off=round(q[dot].item(), 4))


def load(adapter: str, scale: float):
    """The model with `adapter` ("auto" or a folder), its LoRA output (the B matrices) times scale."""
    model = MemformerForCausalLM.from_pretrained(adapter=adapter)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    return model


def scales(text: str) -> list[float]:
    """`--lora-scales`: comma-separated factors >= 0 (0 = LoRA off, gates kept)."""
    try:
        out = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if any(not v >= 0 for v in out):
        raise argparse.ArgumentTypeError(f"LoRA scales must be >= 0, got {text!r}")
    return out


def table(records: list[dict]) -> str:
    rows = ["| adapter | LoRA scale | exact | short | other | p(digit) / p('.') where due, mean |",
            "|---|---:|---:|---:|---:|---|"]
    for key in dict.fromkeys((r["adapter"], r["lora_scale"]) for r in records):
        rs = [r for r in records if (r["adapter"], r["lora_scale"]) == key]
        count = {v: sum(r["verdict"] == v for r in rs) for v in ("exact", "short", "other")}
        due = [r for r in rs if "p_digit" in r]
        odds = (f"{sum(r['p_digit'] for r in due) / len(due):.2f} / {sum(r['p_dot'] for r in due) / len(due):.2f}"
                f" ({len(due)} answers)") if due else "—"
        rows.append(f"| {key[0]} | {key[1]:g} | {count['exact']} | {count['short']} | {count['other']} | {odds} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", default="auto", help="comma-separated: auto (the shipped adapter) or adapter folders")
    ap.add_argument("--lora-scales", type=scales, default=[1.0], help="comma-separated factors on each adapter's LoRA output")
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--length", default="4k")
    ap.add_argument("--seed", type=int, default=5000)
    ap.add_argument("--haystack", default=None, help="essay haystack file (default Python's documentation topics)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "trials.jsonl"
    records = [json.loads(line) for line in path.open()] if args.resume and path.exists() else []
    done = {(r["adapter"], r["lora_scale"], r["seed"]) for r in records}
    _, text = ruler.haystack_text(args.haystack)
    essay, length = ruler.essay_words(text), parse_length(args.length)
    with path.open("a" if args.resume else "w") as f:
        for adapter in args.adapters.split(","):
            for scale in args.lora_scales:
                model = load(adapter, scale)
                todo = doubled_samples(model.tokenizer, essay, length, args.seed, args.samples)
                for s, sample in tqdm(list(todo), desc=f"{adapter} x{scale:g}"):
                    if (adapter, scale, s) in done:
                        continue
                    rec = ruler.run_sample(model, sample, "memory")
                    # the memory run_sample read is the model's state now: the odds reuse it
                    r = dict(adapter=adapter, lora_scale=scale, seed=s, length=length, expected=sample.expected[0],
                             answer=rec["answer"], verdict=verdict(rec["answer"] or "", sample.expected[0]),
                             **last_digit_odds(model, sample))
                    f.write(json.dumps(r) + "\n")
                    f.flush()
                    records.append(r)
    (args.out / "copy_probe.md").write_text(
        f"# RULER copy probe\n\n{args.samples} {TASK} samples of {args.length} tokens, seeds above {args.seed}, "
        f"values ending in a doubled digit.\n\n{table(records)}\n")
    print(table(records))


if __name__ == "__main__":
    main()
