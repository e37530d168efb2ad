"""Read-path ablation, built from the recorded runs (no model is run, nothing is measured anew).

Reads the trial records under --results (needle, perplexity and passkey runs, qa_latency.json)
and writes ablation.md and ablation.json (the same numbers) under --out:

  A. question-time reads (needles at 16k and 32k): each question read alone and both reads with
     the surer kept, all three re-scored from ONE run's records (needle_16k_auto,
     needle_32k_auto: every memory record holds both reads' answers), beside kNN token reads,
     RAG and truncation;
  B. the other read experiments, each against its baseline on the same trials;
  C. continuation-time reads (no question known): perplexity at 16k with and without memory;
  D. answer time per read (qa_latency.json).

Scoring is the needle evaluation's own (`memformer.eval.needle.score_query`), checked against
the records: every needle record's stored score must equal the re-score of its own answers
(section "Checks").

    .venv/bin/python benchmarks/read_ablation.py [--results benchmarks/results] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from memformer.eval import needle, plots

DATE = "2026-12-01"
VARIANTS = ("single-number", "single-word", "single-uuid", "multikey", "multivalue", "multiquery")
TASKS = VARIANTS + ("passkey",)
LENGTHS = {16384: "16k", 32768: "32k"}

# ---------------------------------------------------------------------- scoring (the needle evaluation's)
KIND = {"single-number": "number", "single-word": "word", "single-uuid": "uuid"}   # other tasks: "number"


def score_query(answer: str, expected: list[str], kind: str) -> float:
    """`memformer.eval.needle.score_query` on a record's answer and expected values."""
    return needle.score_query(answer, needle.Query("", expected, kind))


def score_answers(task: str, answers: list[str], expected: list[list[str]]) -> float:
    """A trial's score: the mean over its queries (multiquery: 4 cues; the others: 1)."""
    kind = KIND.get(task, "number")
    return sum(score_query(a, e, kind) for a, e in zip(answers, expected)) / len(expected)


def split_reads(rec: dict) -> dict[str, list[str]]:
    """An auto record's answers per read: "blocks" (no sink prefix) and "sink+blocks"."""
    out = {"blocks": [], "sink+blocks": []}
    for read, kept, other in zip(rec["reads"], rec["answers"], rec["other_answers"]):
        out[read].append(kept)
        out["sink+blocks" if read == "blocks" else "blocks"].append(other or "")
    return out


# ---------------------------------------------------------------------- records
def read_jsonl(path: Path) -> dict[str, dict]:
    """Records by id (a later line with the same id wins, as in the run's own log)."""
    return plots.read_records(path)


def memory_records(results: Path, folder: str) -> dict[str, dict]:
    return {i: r for i, r in read_jsonl(results / folder / "trials.jsonl").items()
            if r["mode"] == "memory" and r["status"] == "ok"}


def same_trial(a: dict, b: dict) -> bool:
    """Same haystack and needles: same id, expected values, measured needle depths and length."""
    return (a["id"], a["expected"], a["needle_depths"], a["tokens"]) == (b["id"], b["expected"], b["needle_depths"], b["tokens"])


def summary(scores: list[float]) -> dict:
    total = round(sum(scores), 4)
    return {"sum": total, "n": len(scores), "mean": round(total / len(scores), 4) if scores else None}


def fmt(s: dict) -> str:
    """'75% (3/4)', as the runs' own needle.md cells; '-' for no trials."""
    return "-" if not s["n"] else f"{100 * s['sum'] / s['n']:.0f}% ({s['sum']:g}/{s['n']})"


def by_task(scored: dict[str, tuple[str, float]]) -> dict[str, dict]:
    """{id: (task, score)} -> {task: summary, ..., "all": summary}, tasks in TASKS order."""
    out = {t: summary([s for task, s in scored.values() if task == t]) for t in TASKS}
    out = {t: s for t, s in out.items() if s["n"]}
    out["all"] = summary([s for _, s in scored.values()])
    return out


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def md_command(results: Path, folder: str) -> str:
    """The `Command:` line of a run's needle.md / ppl.md, or ''."""
    for name in ("needle.md", "ppl.md", "passkey.md"):
        p = results / folder / name
        if p.is_file():
            m = re.search(r"^Command: `(.*)`", p.read_text(), re.M)
            if m:
                return m.group(1)
    return ""


# ---------------------------------------------------------------------- A. question-time reads
def question_time(results: Path) -> tuple[dict, dict]:
    """Per length: {column: {task: summary}}, and the checks behind them."""
    knn_runs = {16384: ["needle_16k"], 32768: ["needle_32k_variants", "needle_32k"]}
    sink_runs = {16384: "needle_16k_sink_prefix", 32768: "needle_32k_sink_prefix"}
    nosink_runs = {16384: "needle_16k_question_local", 32768: "needle_32k_question_local"}
    tables, checks = {}, {}
    for length, label in LENGTHS.items():
        auto_dir = f"needle_{label}_auto"
        auto = read_jsonl(results / auto_dir / "trials.jsonl")
        cols = {c: {} for c in ("no sink", "sink", "auto", "knn", "rag", "truncate")}
        stored_ok = stored_n = 0
        queries = differ = kept_better = 0
        kept_worse = []
        for rid, r in auto.items():
            if r["status"] != "ok":
                continue
            rescored = score_answers(r["task"], r["answers"], r["expected"])
            stored_ok += math.isclose(rescored, r["score"])
            stored_n += 1
            if r["mode"] in ("rag", "truncate"):
                cols[r["mode"]][rid] = (r["task"], r["score"])
                continue
            reads = split_reads(r)
            cols["auto"][rid] = (r["task"], r["score"])
            cols["no sink"][rid] = (r["task"], score_answers(r["task"], reads["blocks"], r["expected"]))
            cols["sink"][rid] = (r["task"], score_answers(r["task"], reads["sink+blocks"], r["expected"]))
            kind = KIND.get(r["task"], "number")
            for q, (read, e) in enumerate(zip(r["reads"], r["expected"])):
                kept = score_query(r["answers"][q], e, kind)
                other = score_query(r["other_answers"][q] or "", e, kind)
                queries += 1
                if kept != other:
                    differ += 1
                    kept_better += kept > other
                    if kept < other:
                        kept_worse.append(f"{rid} query {q}: kept {read} ({kept:g}) over {other:g}")
        # kNN token reads: other runs; same trials as the auto run?
        knn_same = knn_n = 0
        for folder in knn_runs[length]:
            for rid, r in memory_records(results, folder).items():
                cols["knn"][rid] = (r["task"], r["score"])
                knn_n += 1
                knn_same += rid in auto and same_trial(r, auto[rid])
        # the separate one-generation runs of each read: do they answer as the auto run's reads?
        repro = {}
        for read, folder in (("sink+blocks", sink_runs[length]), ("blocks", nosink_runs[length])):
            other = memory_records(results, folder)
            pairs = [(auto[i], o) for i, o in other.items() if i in auto and same_trial(o, auto[i])]
            same_answers = sum(split_reads(a)[read] == o["answers"] for a, o in pairs)
            repro[read] = {"folder": folder, "same_trials": len(pairs), "records": len(other),
                           "identical_answers": same_answers}
        tables[length] = {c: by_task(v) for c, v in cols.items()}
        checks[length] = {"auto_folder": auto_dir, "stored_score_reproduced": [stored_ok, stored_n],
                          "queries": queries, "reads_differ": differ, "kept_the_better": kept_better,
                          "kept_the_worse": kept_worse, "knn_folders": knn_runs[length],
                          "knn_same_trials_as_auto": [knn_same, knn_n], "one_generation_runs": repro,
                          "command": md_command(results, auto_dir)}
    return tables, checks


# ---------------------------------------------------------------------- B. other read experiments
def auto_read(results: Path, folder: str, read: str) -> dict[str, dict]:
    """One read of an auto run's memory records, re-scored, as plain records."""
    out = {}
    for rid, r in memory_records(results, folder).items():
        answers = split_reads(r)[read]
        out[rid] = dict(r, answers=answers, score=score_answers(r["task"], answers, r["expected"]))
    return out


def paired_needles(results: Path, folder: str, base: str) -> tuple[dict, dict]:
    """Memory scores ({task: summary}) of `folder` and `base` on the trials both hold (same trial)."""
    load = lambda f: auto_read(results, *f.split(":")) if ":" in f else memory_records(results, f)
    a, b = load(folder), load(base)
    ids = [i for i in a if i in b and same_trial(a[i], b[i])]
    return tuple(by_task({i: (recs[i]["task"], recs[i]["score"]) for i in ids}) for recs in (a, b))


def needle_cell(s: dict) -> str:
    return f"{fmt(s['all'])}: " + ", ".join(f"{t} {v['sum']:g}/{v['n']}" for t, v in s.items() if t != "all")


def passkey_records(path: Path) -> dict[tuple, bool]:
    """Memory-mode passkey trials (the older `eval passkey` format) by (length, depth, key)."""
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["mode"] == "memory":
            out[(r["length"], r["depth"], r["key"])] = r["correct"]
    return out


def paired_passkeys(results: Path, file: str, base: str) -> tuple[dict, dict]:
    """Memory-mode passkey accuracy ({length label: summary, "all": summary}) of `file` and
    `base` on the prompts both hold."""
    a, b = passkey_records(results / file), passkey_records(results / base)
    keys = [k for k in a if k in b]

    def cell(recs):
        out = {label: summary([float(recs[k]) for k in keys if k[0] == length])
               for length, label in ((4096, "4k"), (8192, "8k"), (16384, "16k"), (32768, "32k"))}
        out = {label: s for label, s in out.items() if s["n"]}
        out["all"] = summary([float(recs[k]) for k in keys])
        return out
    return cell(a), cell(b)


NEEDLE_EXPERIMENTS = [
    # (experiment, what it measured, folder, baseline folder ("run:read" = one read of an auto run), baseline)
    ("neighbours r = 1", "needles 16k, memory only: kNN token reads + the row each side of every hit",
     "needle_16k_neighbors/r1", "needle_16k", "kNN token reads, r = 0"),
    ("neighbours r = 3", "the same, 3 rows each side (run stopped after 11 trials)",
     "needle_16k_neighbors/r3", "needle_16k", "kNN token reads, r = 0"),
    ("voted block reads 4 x 64, window positions", "needles 16k, memory only: top-k hits vote for 4 blocks read by every head",
     "needle_16k_blocks/window", "needle_16k", "kNN token reads"),
    ("voted block reads 4 x 64, contiguous (position mode fixed)", "the same, keys un-rotated, blocks laid out at -256..-1",
     "needle_16k_blocks/contiguous", "needle_16k", "kNN token reads"),
    ("voted block reads 8 x 64", "the same, 8 blocks", "needle_16k_blocks/window_8_blocks", "needle_16k", "kNN token reads"),
    ("voted block reads 16 x 16", "the same, 16 blocks of 16 tokens", "needle_16k_blocks/window_16x16", "needle_16k", "kNN token reads"),
    ("voted block reads, memory only in layers 10..29", "block reads 4 x 64 with memory layers 10..29",
     "needle_16k_blocks/window_layers_10_29", "needle_16k_blocks/window", "the same block reads in all 30 layers"),
    ("question reads, \"stored\" layout (window positions), no margin", "needles 16k, question reads, tail local",
     "needle_16k_question", "needle_16k_contiguous", "contiguous layout, margin 32, tail local"),
    ("question reads, \"stored\" layout, no margin (32k)", "needles 32k, question reads, tail local",
     "needle_32k_question", "needle_32k_contiguous", "contiguous layout, margin 32, tail local"),
    ("question reads with the sink prefix, one generation", "needles 16k, question reads, tail memorized, kNN layers 10..29",
     "needle_16k_sink_prefix", "needle_16k_question_local", "no sink prefix, one generation (separate run)"),
    ("question reads with the sink prefix, one generation (32k)", "needles 32k, the same settings",
     "needle_32k_sink_prefix", "needle_32k_auto:blocks", "no-sink read of needle_32k_auto (same trials)"),
    ("memory_reads=\"knn\" as the QA read", "needles 16k: kNN token reads, tail local",
     "needle_16k", "needle_16k_question_local", "question reads, one generation, no sink"),
    ("memory_reads=\"knn\" as the QA read (32k)", "needles 32k: kNN token reads, tail local",
     "needle_32k_variants", "needle_32k_question_local", "question reads, one generation, no sink"),
]
PASSKEY_EXPERIMENTS = [
    ("position mode \"first\", overlap 0", "passkey 4k-32k, kNN token reads, all layers",
     "passkey_ablation/first_mode_no_overlap_trials.jsonl", "passkey/trials.jsonl", "position mode \"window\", overlap 128"),
    ("position mode \"first\", overlap 128", "the same, with overlap 128 (32k stopped after 3 trials)",
     "passkey_ablation/first_mode_overlap128_trials.jsonl", "passkey/trials.jsonl", "position mode \"window\", overlap 128"),
]


# ---------------------------------------------------------------------- C. continuation-time reads
PPL_RUNS = [
    # (read, folder)
    ("kNN token reads in all 30 layers", "ppl_16k_all_layers"),
    ("kNN token reads in layers 10..29, memory stored in all 30", "ppl_16k_knn_layers_10_29"),
    ("memory (stored and read) only in layers 10..29", "ppl_16k_layers_10_29"),
    ("voted block reads 4 x 64, contiguous (position mode fixed), all layers", "ppl_16k_blocks_contiguous"),
    ("context blocks 4 x 64 (RETRO-style), window positions, all layers", "ppl_16k_context_blocks"),
    ("context blocks 4 x 64, contiguous layout, all layers", "ppl_16k_context_blocks_contiguous"),
    ("context blocks 4 x 64, memory layers 10..29", "ppl_16k_context_blocks_layers_10_29"),
]


def pooled_ppl(nll: list[float], lo: int = 1, hi: int | None = None) -> float:
    """Perplexity of tokens lo..hi-1 (nll[t-1] = token t), as memformer's ppl evaluation pools them."""
    vals = [v for v in nll[max(lo, 1) - 1:None if hi is None else hi - 1] if not math.isnan(v)]
    return math.exp(sum(vals) / len(vals))


def perplexity(results: Path, folder: str) -> dict:
    recs = {r["mode"]: r for r in read_jsonl(results / folder / "trials.jsonl").values()}
    mem, off = recs["memory"]["nll"], recs["truncate"]["nll"]
    bins = range(1024, len(mem) + 1, 1024)       # the 1024-token bins after the first window
    lower = sum(pooled_ppl(mem, b, b + 1024) < pooled_ppl(off, b, b + 1024) for b in bins)
    out = {"memory": round(pooled_ppl(mem), 2), "no memory": round(pooled_ppl(off), 2),
           "memory >= 1024": round(pooled_ppl(mem, 1024), 2), "no memory >= 1024": round(pooled_ppl(off, 1024), 2),
           "bins lower with memory": [lower, len(bins)], "tokens": len(mem) + 1}
    md = re.search(r"^\| all \| \*\*([\d.]+)\*\* \| \*\*([\d.]+)\*\* \|", (results / folder / "ppl.md").read_text(), re.M)
    out["matches ppl.md"] = bool(md) and (float(md.group(1)), float(md.group(2))) == (out["memory"], out["no memory"])
    return out


# ---------------------------------------------------------------------- report
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="benchmarks/results", help="folder of the recorded runs")
    ap.add_argument("--out", default="benchmarks/results/read_path_ablation", help="where ablation.md/.json go")
    args = ap.parse_args()
    results, out = Path(args.results), Path(args.out)

    qa, checks = question_time(results)
    # (experiment, what, folder, baseline folder, baseline, {task: summary} of the run, of the baseline)
    experiments = ([(e, what, f, b, bl, *paired_needles(results, f, b)) for e, what, f, b, bl in NEEDLE_EXPERIMENTS]
                   + [(e, what, f, b, bl, *paired_passkeys(results, f, b)) for e, what, f, b, bl in PASSKEY_EXPERIMENTS])
    ppl = {folder: dict(read=read, **perplexity(results, folder)) for read, folder in PPL_RUNS}
    latency = json.loads((results / "read_path_ablation" / "qa_latency_2026-11.json").read_text())

    md = [f"# Read-path ablation ({DATE})", "",
          "Built from the recorded runs only (no model was run): `.venv/bin/python benchmarks/read_ablation.py`. "
          "Cells: mean per-trial score (sum/trials), as the runs' own needle.md tables; a multiquery trial "
          "scores the fraction of its 4 cues answered, a multivalue trial the fraction of its 4 values among "
          "the first 4 numbers. Scores are re-computed with the needle evaluation's `score_query` "
          "(memformer/eval/needle.py), checked below against every record's stored score.", ""]

    # A
    md += ["## A. Question-time reads (needles)", "",
           "\"no sink\", \"sink\" and \"auto\" are the same memory trials of one run per length "
           "(`needle_16k_auto`, `needle_32k_auto`; question reads: 4 memory blocks x 64 tokens under the "
           "passages MiniLM ranks nearest the question, +-32 tokens, read by every memory layer, laid out "
           "contiguously before the question, the whole document memorized): every record holds both reads' "
           "answers, each re-scored alone here. \"no sink\" = one generation without the sink prefix, "
           "\"sink\" = one generation with it, \"auto\" = both generated, the answer with the higher "
           "first-line mean log-probability kept. RAG and truncate: the same run's records. "
           "kNN token reads (`memory_reads=\"knn\"`): other runs (see the trial notes under each table).", ""]
    cols = [("no sink", "question reads, no sink (1 gen.)"), ("sink", "question reads, sink prefix (1 gen.)"),
            ("auto", "both reads, surer kept (auto, 2 gen.)"), ("knn", "kNN token reads"),
            ("rag", "RAG"), ("truncate", "truncate")]
    for length, label in LENGTHS.items():
        t, c = qa[length], checks[length]
        rows = [[task, label] + [fmt(t[k].get(task, {"n": 0})) for k, _ in cols] for task in list(TASKS) + ["all"]]
        md += [f"### {label}", "", table(["task", "length"] + [h for _, h in cols], rows), ""]
        knn_same, knn_n = c["knn_same_trials_as_auto"]
        md += [f"Trials per cell: the number after the slash. Sources: `{c['auto_folder']}` (all columns but kNN; "
               f"command `{c['command']}`), kNN: " + ", ".join(f"`{f}`" for f in c["knn_folders"]) +
               f" ({knn_same} of {knn_n} kNN trials are the same trials as the auto run's"
               + ("" if knn_same == knn_n else "; the others are other trials: other trial counts give other "
                  "needle depths, so compare that column with care") + ").", ""]

    md += ["### Checks", ""]
    for length, label in LENGTHS.items():
        c = checks[length]
        ok, n = c["stored_score_reproduced"]
        md.append(f"* {label}: the copied scoring reproduces the stored score of {ok}/{n} records of "
                  f"`{c['auto_folder']}`. Of {c['queries']} memory queries, the two reads scored differently on "
                  f"{c['reads_differ']}; the kept answer was the better one on {c['kept_the_better']}"
                  + (" (kept the worse: " + "; ".join(c["kept_the_worse"]) + ")" if c["kept_the_worse"] else "") + ".")
        for read, r in c["one_generation_runs"].items():
            name = "with the sink prefix" if read == "sink+blocks" else "without the sink prefix"
            if r["same_trials"]:
                md.append(f"  The separate one-generation run {name} (`{r['folder']}`) holds {r['same_trials']} of "
                          f"the same trials; on {r['identical_answers']} of them it gave exactly the answers of "
                          f"the auto run's read {name}.")
            else:
                md.append(f"  The separate one-generation run {name} (`{r['folder']}`, {r['records']} memory "
                          f"trials) holds other trials (other trial count), so it is not compared here.")
    md.append("")

    # B
    md += ["## B. Other read experiments (each against its baseline on the same trials)", "",
           "Needle and passkey rows: memory mode only, scored on the trials both runs hold (same id, needles and "
           "depths; passkey: same length, depth and key). Perplexity rows: the 16k Python-docs document, all "
           "tokens (table C).", ""]
    rows = [[e, what, f"{x['all']['n']} trials", needle_cell(x), needle_cell(y), bl, f"`{f}` vs `{b}`"]
            for e, what, f, b, bl, x, y in experiments]
    base = ppl["ppl_16k_knn_layers_10_29"]
    for read, folder in PPL_RUNS:
        if folder == "ppl_16k_knn_layers_10_29":
            continue
        p = ppl[folder]
        rows.append([read, "perplexity at 16k (continuation, no question)", "1 document",
                     f"{p['memory']:.2f}", f"{p['no memory']:.2f} no memory; {base['memory']:.2f} kNN reads 10..29",
                     "no memory (same run); kNN token reads in layers 10..29", f"`{folder}`"])
    rows.append(["read_during_ingest", "passkey (probe)", "-", "no trial records kept",
                 "-", "-", "`passkey_ablation/README.md` (text only: 0/1 at 8k)"])
    rows.append(["position mode \"fixed\"", "-", "-", "no run of its own kept",
                 "-", "-", "used only by the voted block reads laid out contiguously (rows above); a seed-1 "
                 "scratch run with question reads was described in an earlier docs/architecture.md, not kept"])
    md += [table(["experiment", "what it measured", "trials", "number", "baseline number", "baseline", "source"], rows), ""]

    # C
    md += ["## C. Continuation-time reads (perplexity at 16k, no question known)", "",
           "One 16384-token segment of the Python docs (`--docs pydocs`), read in the model's ingest windows; "
           "\"no memory\" = the same windows with memory off, from the same run's records. Recomputed from the "
           "token NLLs in each run's trials.jsonl (`matches ppl.md`: equal to the run's own table).", ""]
    rows = [[p["read"], f"**{p['memory']:.2f}**", f"{p['no memory']:.2f}", f"{p['memory >= 1024']:.2f}", f"{p['no memory >= 1024']:.2f}",
             f"{p['bins lower with memory'][0]}/{p['bins lower with memory'][1]}", "yes" if p["matches ppl.md"] else "NO",
             f"`{folder}`"] for folder, p in ppl.items()]
    md += [table(["read", "ppl with memory", "without", "with (tokens >= 1024)", "without (>= 1024)",
                  "1024-token bins lower with memory", "matches ppl.md", "source"], rows), ""]

    # D
    m = latency["meta"]
    md += ["## D. Answer time per read", "",
           f"One single-number needle trial at {m['tokens']} tokens; median of {m['repeats']} answers, "
           f"{m['threads']} torch thread, torch {m['torch']}; after the document was read once. Source: "
           "`read_path_ablation/qa_latency_2026-11.json` (the qa_latency run of the two-read default; "
           "the current one is `qa_latency.md`).", ""]
    rows = [[r["mode"], str(r["prompt_tokens"]), f"{r['answer_s']:.2f}", f"{r['read_s']:.1f}",
             "yes" if r["correct"] else "no"] for r in latency["rows"]]
    md += [table(["mode", "prompt tokens", "answer (s)", "read once (s)", "correct"], rows), ""]

    # note: the numbers come from the tables above; the decisions are the ones taken
    a16, a32 = qa[16384], qa[32768]
    pct = fmt
    both = lambda col: f"{pct(a16[col]['all'])} at 16k, {pct(a32[col]['all'])} at 32k"
    lat = {r["mode"]: r["answer_s"] for r in latency["rows"]}

    def compare(a: str, b: str) -> str:
        """'89% vs 83% at 16k (single-uuid 5 vs 4, ...), ...': column a vs b, tasks that differ."""
        parts = []
        for t, label in ((a16, "16k"), (a32, "32k")):
            d = [f"{k} {t[a][k]['sum']:g} vs {t[b][k]['sum']:g}" for k in TASKS if t[a][k]["sum"] != t[b][k]["sum"]]
            parts.append(f"{pct(t[a]['all'])} vs {pct(t[b]['all'])} at {label}" + (f" ({', '.join(d)})" if d else ""))
        return "; ".join(parts)

    def word(a: str, b: str) -> str:
        ups = [t[a]["all"]["mean"] - t[b]["all"]["mean"] for t in (a16, a32)]
        return ("higher at both lengths" if min(ups) > 0 else "lower at both lengths" if max(ups) < 0
                else "equal at both lengths" if ups == [0, 0] else "higher at one length, not at the other")

    # experiments above their baseline, with the chosen read (auto run, no sink) on the same trials
    beaten = [f"{e} ({fmt(x['all'])} vs {fmt(y['all'])}; question reads without the sink on the same trials: "
              f"{fmt(paired_needles(results, 'needle_16k_auto:blocks', f)[0]['all'])})"
              for e, _, f, _, _, x, y in experiments if x["all"]["mean"] > y["all"]["mean"]]
    kept = ", ".join(f"{checks[L]['kept_the_better']} of {checks[L]['reads_differ']} at {LENGTHS[L]}" for L in LENGTHS)
    worse = "; ".join(w for L in LENGTHS for w in checks[L]["kept_the_worse"])
    k10 = ppl["ppl_16k_knn_layers_10_29"]
    note = [
        f"## Note, {DATE}", "",
        "**Question.** Which ONE memory read per situation: at question time (the question is known before "
        "generation) and at continuation time (no question known)? Every read path measured so far, compared "
        "on the same trials, from the records already in `benchmarks/results`.", "",
        "**Command.** `.venv/bin/python benchmarks/read_ablation.py` (reads the records, runs no model; writes this file "
        "and `ablation.json`).", "",
        "**Result.**", "",
        f"* Question time, all needle tasks (table A, one run per length, 5 trials per task at 16k, 3 at 32k): "
        f"question reads without the sink prefix {both('no sink')}; with it {both('sink')}; both reads, the surer "
        f"kept (auto) {both('auto')}; RAG {both('rag')}; truncate {both('truncate')}; kNN token reads "
        f"{pct(a16['knn']['all'])} at 16k (same trials), {pct(a32['knn']['all'])} at 32k (other trials).",
        f"* Auto vs no sink: auto scores {word('auto', 'no sink')}: {compare('auto', 'no sink')}. Of the queries on "
        f"which the two reads scored differently, the choice kept the better read on {kept}"
        + (f" (kept the worse: {worse})" if worse else "") + f". Cost: two generations, {lat['memory (question reads, with and without the sink)']:.2f} s "
        f"vs {lat['memory (question reads, one read)']:.2f} s per answer (table D, one trial at 16k).",
        f"* No sink vs RAG: {compare('no sink', 'rag')}.",
        f"* Sink read vs no-sink read, one generation each: {compare('sink', 'no sink')}. It loses every passkey; why the "
        "blocks read after their sink miss the passkey and read without it answer it is not understood "
        "(`needle_16k_sink_prefix/README.md`).",
        f"* Continuation time (table C, one 16k document): kNN token reads in layers 10..29 {k10['memory']:.2f} vs "
        f"{k10['no memory']:.2f} without memory (lower in {k10['bins lower with memory'][0]} of "
        f"{k10['bins lower with memory'][1]} bins after the first window); in all 30 layers "
        f"{ppl['ppl_16k_all_layers']['memory']:.2f}; voted block reads {ppl['ppl_16k_blocks_contiguous']['memory']:.2f}; "
        f"context blocks {ppl['ppl_16k_context_blocks']['memory']:.2f} (window positions), "
        f"{ppl['ppl_16k_context_blocks_contiguous']['memory']:.2f} (contiguous), "
        f"{ppl['ppl_16k_context_blocks_layers_10_29']['memory']:.2f} (layers 10..29). Only the kNN token reads in "
        f"layers 10..29 are below no memory. Memory stored in layers 0..9 as well leaves that number unchanged "
        f"({ppl['ppl_16k_layers_10_29']['memory']:.2f} with memory only in layers 10..29); layers 0..9 keep memory "
        "for the question reads, which every memory layer reads.",
        "* Table B, against the baseline on the same trials: higher only for " + "; ".join(beaten)
        + ".", "",
        "**Decision.**", "",
        "* Question-time read: question reads (MiniLM-chosen memory blocks read by every memory layer, laid out "
        "contiguously before the question), ONE generation, NO sink prefix. The double generation (\"auto\") is "
        f"removed although it scores {word('auto', 'no sink')} (numbers above): its second read is the sink read, "
        "and the condition the project set for keeping the sink prefix, that the reason it loses the passkey be "
        "understood, is not met.",
        "* Continuation-time read: kNN token reads in the upper two thirds of the layers (layers 10..29 of "
        "SmolLM2's 30), memory stored in all layers.",
        "* Deleted from the code: neighbours, voted block reads, position modes \"first\" and \"fixed\" (kept: "
        "\"window\"), the \"stored\" layout of pinned blocks, context blocks, read_during_ingest, "
        "memory_reads=\"knn\" as a QA option, the sink prefix (and with it \"auto\"). Their result folders keep "
        "their records, each with a dated note.",
    ]
    md += note

    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text("\n".join(md) + "\n")
    data = {"date": DATE, "command": "python benchmarks/read_ablation.py",
            "question_time": {LENGTHS[L]: qa[L] for L in qa}, "question_time_checks": {LENGTHS[L]: checks[L] for L in checks},
            "experiments": [dict(experiment=e, measured=what, folder=f, baseline_folder=b, baseline=bl,
                                 score=x, baseline_score=y) for e, what, f, b, bl, x, y in experiments],
            "perplexity_16k": ppl, "answer_time": latency}
    (out / "ablation.json").write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out / 'ablation.md'} and {out / 'ablation.json'}")


if __name__ == "__main__":
    main()
