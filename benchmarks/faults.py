"""The fault suite: kill -9 at random instants, concurrent writers and readers, a full disk, a
read-only folder, hostile files and arguments, and resident memory over a long session.

    python benchmarks/faults.py                       # everything, results in benchmarks/results/faults/
    python benchmarks/faults.py --parts kill --runs 5 # one part, fewer kills

Each operation runs in a child process (`python benchmarks/faults.py child OP ARGS`) on tiny
random models built in code. After every SIGKILL the parent checks that the last state the child
reported as saved loads intact and equals what an uninterrupted run had at that point; then the
operation is resumed to the end and compared, bit for bit, with an uninterrupted run.
Writes `faults.md` (the tables), `faults.json` (every count) and `rss.png`.

The parts: `faults_kill.py` (SIGKILL; the child-process helpers), `faults_resources.py`
(concurrency, resource faults, resident memory), `faults_hostile.py` (hostile inputs); what the
children run: `faults_fixtures.py`.
"""
import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import faults_fixtures as fx  # noqa: E402

RESULTS = fx.ROOT / "benchmarks" / "results" / "faults"


# ---------------------------------------------------------------- report
def report(results: dict, out: Path) -> str:
    lines = ["# Fault suite", "", f"Command: `python benchmarks/faults.py {' '.join(sys.argv[1:])}`".rstrip(), ""]
    if "kill" in results:
        lines += ["## SIGKILL at random instants", "",
                  "| operation | runs (kills) | aimed at a write | survived | data lost | killed mid-write | resumed = uninterrupted |",
                  "|---|---|---|---|---|---|---|"]
        for r in results["kill"]:
            lines.append(f"| {r['operation']} | {r['runs']} | {r.get('aimed_at_write', 0)} | {r['survived']} | {r['data_lost']} | "
                         f"{r['killed_mid_write']} | {r['resumed_equal']}/{r['resumed']} |")
        lines += ["", "survived: the state after the kill loads and equals the uninterrupted run's state at "
                      "that point; data lost: a state the operation had reported saved is missing or damaged; "
                      "aimed at a write: every second kill lands at a uniform instant inside a folder write "
                      "(the child's k-th, k and its length from the uninterrupted run; `faults_site/`), the "
                      "others at a uniform instant of the whole run; "
                      "killed mid-write: a temporary sibling was left, or (save_memory) the child had announced "
                      "a save it had not finished; resumed: runs finished (after kills, or before their kill) "
                      "and compared bit for bit.", ""]
    if "concurrency" in results:
        lines += ["## Concurrent processes", "", "| processes | what | exit 0 | correct | leftovers |", "|---|---|---|---|---|"]
        for r in results["concurrency"]:
            lines.append(f"| {r['processes']} | {r['what']} | {r['exit_0']}/{r['processes']} | {r['correct']} | "
                         f"{r['leftovers']} |")
        lines.append("")
    if "resources" in results:
        lines += ["## Resource faults", "", "| operation | fault | exit | ok | previous state intact | message |",
                  "|---|---|---|---|---|---|"]
        for r in results["resources"]:
            msg = r["message"].replace("|", "\\|").replace(str(fx.ROOT), ".")
            lines.append(f"| {r['operation']} | {r['fault']} | {r['exit']} | {r['ok']} | "
                         f"{r['previous_state_intact']} | {msg[:160]} |")
        lines.append("")
    if "hostile" in results:
        h = results["hostile"]
        lines += ["## Hostile inputs", "", "| family | cases | clear error | correct result | traceback | hang | "
                  "write outside |", "|---|---|---|---|---|---|---|"]
        for fam, r in h["families"].items():
            lines.append(f"| {fam} | {r['cases']} | {r['clear_error']} | {r['correct']} | {r['traceback']} | "
                         f"{r['hang']} | {r['outside']} |")
        t = h["total"]
        lines += [f"| **all** | **{t['cases']}** | **{t['clear_error']}** | **{t['correct']}** | **{t['traceback']}** "
                  f"| **{t['hang']}** | **{t['outside']}** |", ""]
    if "rss" in results:
        lines += ["## Resident memory over a long session", "", "![RSS](rss.png)", "",
                  "| eviction | tokens | memory tokens at end | RSS start MB | after 16k tokens MB | peak MB | end MB | "
                  "seconds |", "|---|---|---|---|---|---|---|---|"]
        for name, rows in results["rss"].items():
            rss = [r["rss_mb"] for r in rows]
            full = next(r["rss_mb"] for r in rows if r["tokens"] >= 16384)
            lines.append(f"| {name} | {rows[-1]['tokens']} | {rows[-1]['memory_tokens']} | {rss[0]:.1f} | {full:.1f} | "
                         f"{max(rss):.1f} | {rss[-1]:.1f} | {rows[-1]['seconds']} |")
        lines.append("")
    if results.get("errors"):
        lines += ["## Harness errors", ""] + [f"* {e}" for e in results["errors"]] + [""]
    fails = [f"* {r['operation']}: {f}" for r in results.get("kill", []) for f in r["failures"]]
    if fails:
        lines += ["## Kill failures", ""] + fails + [""]
    text = "\n".join(lines)
    (out / "faults.md").write_text(text + "\n")
    return text


def main(argv=None) -> int:
    from faults_kill import (_cache_with_wheel, _wheel, kill_checkpoint, kill_conversion, kill_corpus_build,
                             kill_qa_cache, kill_save_memory, reference_conversion)
    from faults_resources import (concurrency_conversion, concurrency_qa, plot_rss, resource_conversion,
                                  resource_faults, rss_session)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="kill,concurrency,resources,hostile,rss")
    ap.add_argument("--runs", type=int, default=20, help="SIGKILLs per operation")
    ap.add_argument("--ops", default="save_memory,corpus,qa,checkpoint,conversion")
    ap.add_argument("--rss-tokens", type=int, default=200_000)
    ap.add_argument("--rss-read-tokens", type=int, default=49_152, help="the run whose windows also read memory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--merge", nargs="*", default=[], metavar="DIR",
                    help="also take the parts of these earlier runs' results (parts run in parallel)")
    args = ap.parse_args(argv)
    parts, ops = args.parts.split(","), args.ops.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    # a run of some parts updates those parts of an earlier run's results
    results: dict = json.loads((out / "faults.json").read_text()) if (out / "faults.json").is_file() else {}
    results.pop("errors", None)
    for other in args.merge:
        theirs = json.loads((Path(other) / "faults.json").read_text())
        for part in ("kill", "concurrency", "resources"):
            key = "operation" if part == "kill" else "key"
            rows = theirs.get(part, [])
            done = {r[key] for r in rows}
            results[part] = [r for r in results.get(part, []) if r[key] not in done] + rows
        for part in ("hostile", "rss"):
            if theirs.get(part):
                results[part] = theirs[part]
        if (Path(other) / "rss.png").is_file() and theirs.get("rss"):
            shutil.copy(Path(other) / "rss.png", out / "rss.png")
    t0 = time.time()
    errors = []

    def attempt(what, fn, *a):
        """Run one piece; a harness error is recorded (and fails the run) instead of ending it."""
        print(f"{what} ...", flush=True)
        try:
            return fn(*a)
        except Exception as e:                                    # noqa: BLE001
            import traceback
            errors.append(f"{what}: {type(e).__name__}: {e}")
            traceback.print_exc()
            return None

    def put(part, rows, key):
        """Replace the rows of `part` that these rows redo (by `key`), keep the others; the
        results so far are written at once (a long run stopped midway keeps its finished parts)."""
        rows = [r for r in rows if r]
        done = {r[key] for r in rows}
        results[part] = [r for r in results.get(part, []) if r[key] not in done] + rows
        (out / "faults.json").write_text(json.dumps({**results, "errors": errors}, indent=1, default=str))
        for r in rows:
            print(f"  {json.dumps(r, default=str)[:400]}", flush=True)

    with tempfile.TemporaryDirectory(prefix="memformer-faults-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        wheel = _wheel() if "conversion" in ops else None
        ref_files = None
        if "kill" in parts:
            for op, fn in (("save_memory", kill_save_memory), ("corpus", kill_corpus_build), ("qa", kill_qa_cache),
                           ("checkpoint", kill_checkpoint)):
                if op in ops:
                    (work / op).mkdir()
                    put("kill", [attempt(f"kill: {op}", fn, work / op, args.runs, rng)], "operation")
            if wheel is not None:
                ref_files = attempt("reference conversion", reference_conversion, work, wheel)
                if ref_files:
                    _cache_with_wheel(work / "conversion" / "cache", wheel)
                    put("kill", [attempt("kill: conversion", kill_conversion, work / "conversion", args.runs, rng,
                                         dict(ref_files))], "operation")
        if "concurrency" in parts:
            rows = []
            for n in (2, 4):
                rows += attempt(f"concurrency: {n} processes, QA cache", concurrency_qa, work, n) or []
                if wheel is not None:
                    ref_files = ref_files or attempt("reference conversion", reference_conversion, work, wheel)
                    refs = {k: v for k, v in (ref_files or {}).items() if not k.startswith("_")}
                    rows.append(attempt(f"concurrency: {n} processes, default model", concurrency_conversion, work, n,
                                        wheel, refs))
            for r in rows:
                if r:
                    r["key"] = f"{r['processes']} {r['what']}"
            put("concurrency", rows, "key")
        if "resources" in parts:
            (work / "res").mkdir(mode=0o755)
            rows = attempt("resources", resource_faults, work / "res") or []
            if wheel is not None:
                rows.append(attempt("resources: conversion", resource_conversion, work / "res", wheel))
            for r in rows:
                if r:
                    r["key"] = f"{r['operation']} {r['fault']}"
            put("resources", rows, "key")
        if "hostile" in parts:
            import faults_hostile
            (work / "hostile").mkdir()
            results["hostile"] = attempt("hostile inputs", faults_hostile.run_all, work / "hostile")
        if "rss" in parts:
            results["rss"] = attempt("resident memory", rss_session, work, args.rss_tokens, args.rss_read_tokens)
            if results["rss"]:
                plot_rss(results["rss"], out / "rss.png")
    results = {k: v for k, v in results.items() if v}
    results["errors"] = errors
    results["seconds_last_run"] = round(time.time() - t0, 1)
    (out / "faults.json").write_text(json.dumps(results, indent=1, default=str))
    print(report(results, out))
    bad = list(errors)
    bad += [r for r in results.get("kill", []) if r["data_lost"] or r["survived"] < r["runs"] or r["resumed_equal"] < r["resumed"]]
    bad += [r for r in results.get("concurrency", []) if not r["correct"]]
    bad += [r for r in results.get("resources", []) if not r["ok"]]
    if results.get("hostile"):
        t = results["hostile"]["total"]
        bad += [t] if t["traceback"] or t["hang"] or t["outside"] else []
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "child":
        fx.OPS[sys.argv[2]](*sys.argv[3:])
    else:
        sys.exit(main())
