"""The concurrency, resource-fault and resident-memory parts of the fault suite (`faults.py`)."""
from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import faults_fixtures as fx  # noqa: E402

from faults_kill import (DEFAULT_MODEL, Child, _cache_ok, _cache_with_wheel, _qa_refs,  # noqa: E402
                         leftovers, model_files, sha256, states_equal)


# ---------------------------------------------------------------- concurrency
def concurrency_qa(work: Path, n: int) -> dict:
    """n processes read the same documents into one QA cache at once (all build and write), then
    n/2 rewrite that entry again and again while n/2 load it again and again."""
    ref = work / f"ref_cache{n}"
    if Child("qa_cache", ref, 2).wait(900) != 0:
        raise RuntimeError("the reference QA cache run failed")
    refs = _qa_refs(ref)
    cache = work / f"cache{n}"
    kids = [Child("qa_cache", cache, 2) for _ in range(n)]
    rcs = [c.wait(900) for c in kids]
    ok, entries = _cache_ok(cache, refs)
    first = {"processes": n, "what": "build + write the same QA cache entry", "exit_0": sum(r == 0 for r in rcs),
             "correct": ok and entries == 2 and all(r == 0 for r in rcs), "leftovers": len(leftovers(cache))}
    entry = next(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")
                 and json.loads((p / "qa_documents.json").read_text())["documents"][0]["text"] == fx.text(2000, 150))
    writers = [Child("qa_save_loop", entry, 8) for _ in range(n // 2)]
    readers = [Child("qa_load_loop", entry, 8) for _ in range(n - n // 2)]
    rcs = [c.wait(900) for c in writers + readers]
    loads = sum(x.endswith(" ok") for c in readers for x in c.lines)
    ok2, _ = _cache_ok(cache, refs)
    second = {"processes": n, "what": f"{n // 2} rewrite the entry x8 while {n - n // 2} load it x8",
              "exit_0": sum(r == 0 for r in rcs), "loads_equal": loads,
              "correct": ok2 and all(r == 0 for r in rcs) and loads == 8 * len(readers),
              "leftovers": len(leftovers(cache))}
    for c in writers + readers:
        if c.p.returncode != 0:
            print(f"  concurrency child failed: {c.stderr()[-1500:]}")
    return [first, second]


def concurrency_conversion(work: Path, n: int, wheel: Path, ref_files: dict) -> dict:
    """n processes ask for the default model at once on an empty cache."""
    cache = _cache_with_wheel(work / f"convert{n}", wheel)
    kids = [Child("convert", env={"MEMFORMER_CACHE": str(cache)}) for _ in range(n)]
    rcs = [c.wait(1800) for c in kids]
    conversions = sum("converting" in c.stderr() for c in kids)
    final = cache / "models" / DEFAULT_MODEL
    ok = all(r == 0 for r in rcs) and final.is_dir() and model_files(final) == ref_files
    for c in kids:
        if c.p.returncode != 0:
            print(f"  conversion child failed: {c.stderr()[-1500:]}")
    return {"processes": n, "what": "first use of the default model, same cache", "exit_0": sum(r == 0 for r in rcs),
            "conversions": conversions, "correct": ok and conversions == 1,
            "leftovers": len(list((cache / "models").glob(".*tmp*")))}


# ---------------------------------------------------------------- resources
def _limit_file_size(limit: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)            # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


@contextlib.contextmanager
def read_only(folder: Path):
    """Make `folder` read-only: permissions for a normal user; for root (who ignores them) a
    read-only bind mount of the folder onto itself. Yields False where neither is possible."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield True
        finally:
            folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode == 0
    if mounted and subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True).returncode:
        subprocess.run(["umount", str(folder)], capture_output=True)
        mounted = False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], capture_output=True)


def message(stderr: str) -> str:
    """The line of a child's stderr that reports the fault (an error or warning), else its last line."""
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]
    hits = [x for x in lines if "Error" in x.split(":")[0] or x.startswith("memformer") or "UserWarning" in x]
    return (hits or lines or [""])[-1]


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (sha256(p) if p.is_file() else "dir") for p in sorted(folder.rglob("*"))}


def resource_faults(work: Path) -> list[dict]:
    """Disk full (a file-size limit), a read-only folder and a missing folder for each writer:
    a clear error naming the target, nothing half-written, the previous state intact."""
    rows = []
    folder = fx.tiny_model_folder(work / "tiny_model")
    docs = fx.write_docs(work / "docs", 4, words=80)

    def row(op, fault, child, target: Path, before: dict, root: Path, expect_rc=None, expect_text=None):
        rc = child.wait(900)
        err = child.stderr()
        after = _tree(root)
        msg = message(err)
        named = str(target) in msg
        # the library raises WriteError naming the target; the CLI prints it and exits 2
        clean = rc != 0 and named and msg.startswith("memformer.fileio.WriteError") if expect_rc is None \
            else rc == expect_rc and (expect_text is None or expect_text in msg)
        r = {"operation": op, "fault": fault, "exit": rc, "clear_error_naming_target": named,
             "ok": bool(clean) and after == before, "previous_state_intact": after == before, "message": msg[:240]}
        rows.append(r)
        return r

    faults = (("disk full (RLIMIT_FSIZE 64 KiB)", _limit_file_size(64 << 10)), ("read-only folder", None))

    def guarded(fault, folder):
        return read_only(folder) if fault == "read-only folder" else contextlib.nullcontext(True)

    # save_memory: a memory of 1 chunk exists; the next save must not replace it with a torn one
    for fault, pre in faults:
        root = work / f"save_{len(rows)}"
        root.mkdir(mode=0o755)
        mem = root / "mem"
        m = fx.tiny_model()
        m.memorize(fx.text(0), show_progress=False)
        m.save_memory(mem)
        before = _tree(root)
        with guarded(fault, root) as possible:
            if not possible:
                continue
            c = Child("save_memory", mem, 6, preexec=pre)
            r = row("model.save_memory", fault, c, mem, before, root)
        again = fx.tiny_model()                                  # and the previous memory still loads
        again.load_memory(mem)
        r["ok"] = r["ok"] and states_equal(again.state.to_tensors(), m.state.to_tensors())

    # memory build (CLI) into a folder that cannot be written
    for fault, pre in faults:
        root = work / f"build_{len(rows)}"
        root.mkdir(mode=0o755)
        out = root / "mem"
        before = _tree(root)
        with guarded(fault, root) as possible:
            if not possible:
                continue
            c = Child("", cmd=[sys.executable, "-m", "memformer.cli", "memory", "build", "--model", str(folder),
                               "--window", "256", "--docs", str(docs), "--out", str(out)], preexec=pre)
            row("memformer memory build", fault, c, out, before, root, expect_rc=2, expect_text=str(out))

    # QA cache: a cache that cannot be written is a warning, the answer goes on (exit 0)
    for fault, pre in faults:
        root = work / f"qa_{len(rows)}"
        (root / "cache").mkdir(parents=True, mode=0o755)
        before = _tree(root)
        with guarded(fault, root / "cache") as possible:
            if not possible:
                continue
            c = Child("qa_cache", root / "cache", 1, preexec=pre)
            row("QA cache write", fault, c, root / "cache", before, root, expect_rc=0, expect_text="memory not cached")

    # training checkpoint: steps 2 and 4 are saved; a rerun to step 8 under the limit must fail
    # cleanly at its next checkpoint and leave steps 2 and 4 as they were
    root = work / "train_limit"
    root.mkdir()
    assert Child("train", root / "run", 4).wait(900) == 0
    before = _tree(root / "run" / "checkpoints")
    c = Child("train", root / "run", 8, preexec=_limit_file_size(16 << 10))
    rc = c.wait(900)
    err = c.stderr()
    after = _tree(root / "run" / "checkpoints")
    kept = all(k in after and after[k] == v for k, v in before.items())
    rows.append({"operation": "training checkpoint", "fault": "disk full (RLIMIT_FSIZE 16 KiB)", "exit": rc,
                 "clear_error_naming_target": "could not write" in err and str(root / "run") in err,
                 "previous_state_intact": kept, "ok": rc != 0 and kept and "could not write" in err
                 and not leftovers(root),
                 "message": message(err)[:240]})

    # missing folders: loading names the path; saving creates the parents
    m = fx.tiny_model()
    m.memorize(fx.text(0), show_progress=False)
    missing = work / "no" / "such" / "mem"
    try:
        fx.tiny_model().load_memory(missing)
        msg, ok = "loaded?", False
    except FileNotFoundError as e:
        msg, ok = str(e), str(missing) in str(e)
    rows.append({"operation": "model.load_memory", "fault": "missing folder", "exit": None,
                 "clear_error_naming_target": ok, "previous_state_intact": True, "ok": ok, "message": msg})
    m.save_memory(missing)
    again = fx.tiny_model()
    again.load_memory(missing)
    rows.append({"operation": "model.save_memory", "fault": "missing parent folders", "exit": None,
                 "clear_error_naming_target": None, "previous_state_intact": True,
                 "ok": states_equal(again.state.to_tensors(), m.state.to_tensors()), "message": "parents created, saved"})
    return rows


def resource_conversion(work: Path, wheel: Path) -> dict:
    """First use of the default model with a 50 MB file-size limit (the GGUF alone is larger)."""
    cache = _cache_with_wheel(work / "convert_limit", wheel)
    c = Child("convert", env={"MEMFORMER_CACHE": str(cache)}, preexec=_limit_file_size(50 << 20))
    rc = c.wait(900)
    err = c.stderr()
    models = cache / "models"
    left = [p.name for p in models.iterdir() if not p.name.endswith(".lock")] if models.is_dir() else []
    return {"operation": "first-use model conversion", "fault": "disk full (RLIMIT_FSIZE 50 MB)", "exit": rc,
            "clear_error_naming_target": str(models) in err, "previous_state_intact": not left,
            "ok": rc != 0 and str(models) in err and not left and "could not write" in err,
            "message": message(err)[:240]}


# ---------------------------------------------------------------- resident memory
def rss_session(work: Path, tokens: int, read_tokens: int) -> dict:
    """RSS while memorizing `tokens` into a capacity of 16k (FIFO eviction), windows only
    writing; and `read_tokens` with every window also reading the memory (kNN reads, about 50x
    slower on a CPU)."""
    out = {}
    for name, eviction, n, read in (("fifo", "fifo", tokens, "write"),
                                    ("fifo, windows read memory", "fifo", read_tokens, "read")):
        if n <= 0:
            continue
        f = work / f"rss_{eviction}_{read}.json"
        c = Child("memorize_rss", eviction, n, f, read)
        if c.wait(3600) != 0:
            raise RuntimeError(c.stderr()[-3000:])
        out[name] = json.loads(f.read_text())
    return out


def plot_rss(series: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in series.items():
        ax.plot([r["tokens"] / 1000 for r in rows], [r["rss_mb"] for r in rows], marker=".", label=f"eviction {name}")
    ax.set_xlabel("tokens memorized (thousands)")
    ax.set_ylabel("resident memory (MB)")
    ax.set_title("memorize with capacity 16k tokens: RSS over a long session")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
