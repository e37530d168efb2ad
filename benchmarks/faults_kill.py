"""The kill part of the fault suite (`faults.py`): operations run in child processes and
killed with SIGKILL at random instants, then checked and resumed. Also the child-process
helpers the other parts use."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import faults_fixtures as fx  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent / "faults.py"     # children run `faults.py child OP ARGS`
DEFAULT_MODEL = "SmolLM2-135M-Instruct"


# ---------------------------------------------------------------- child processes
class Child:
    """A child running one operation; its stdout lines are collected as they come."""

    def __init__(self, op: str, *args, env: dict | None = None, preexec=None, cmd: list | None = None, cwd=None):
        argv = cmd or [sys.executable, str(HERE), "child", op, *map(str, args)]
        site = str(Path(__file__).resolve().parent / "faults_site")          # the write-phase hook
        path = os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path,
                    "FAULTS_TRACE": "1", **(env or {})}
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
        return "\n".join(x for x in self.err if not x.startswith("@fault "))

    def writes(self) -> list[float]:
        """Seconds each folder write of this run took, from its temporary sibling to its end."""
        out, begin = [], None
        for x in self.err:
            if x.startswith("@fault begin "):
                begin = float(x.split()[2])
            elif x.startswith("@fault end ") and begin is not None:
                out.append(float(x.split()[2]) - begin)
                begin = None
        return out


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
           reset, ready: str | None = "ready", writes: list[float] | None = None) -> dict:
    """Start the operation (`start(env)` -> Child) and SIGKILL it, then check the state
    (`after_kill(child)` -> (intact, nothing_lost, mid_write)). Odd runs are killed at a uniform
    instant in [0, span] s after the child reports `ready`; even runs inside a folder write: the
    child kills itself (`faults_site/sitecustomize.py`) at a uniform instant of its k-th write, k
    and the write's length `writes[k-1]` taken from the uninterrupted reference run. A run that
    ends before its kill is checked by `after_finish()` and the next run starts afresh
    (`reset()`). After `runs` kills the operation is resumed to its end and compared."""
    row = {"operation": name, "runs": 0, "survived": 0, "data_lost": 0, "killed_mid_write": 0, "aimed_at_write": 0,
           "finished_before_kill": 0, "resumed_equal": 0, "resumed": 0, "failures": []}
    while row["runs"] < runs:
        aimed = bool(writes) and row["runs"] % 2 == 1
        if aimed:
            k = rng.randrange(len(writes))
            c = start({"FAULTS_KILL_AT": f"{k + 1}:{rng.uniform(0, 1.1 * writes[k]):.6f}"})
            rc = c.wait(900)
            finished = rc != -signal.SIGKILL
        else:
            c = start(None)
            if ready and not c.wait_line(ready, 600):
                c.kill()
                raise RuntimeError(f"{name}: the child never got ready:\n{c.stderr()[-3000:]}")
            finished = c.wait(rng.uniform(0, span)) is not None
        if finished:                                            # it finished first
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
        row["aimed_at_write"] += aimed
        intact, kept, mid = after_kill(c)
        row["killed_mid_write"] += bool(mid)
        row["survived"] += intact and kept
        row["data_lost"] += not kept
        if not (intact and kept):
            row["failures"].append(f"run {row['runs']}: intact={intact} kept={kept} lines={c.lines[-3:]}")
    c = start(None)                                                # resume to the end
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
        refs.append(model.state.to_tensors())
    mem = work / "mem"
    ref = Child("save_memory", work / "ref", chunks)
    span = timed(ref)

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
        k = len(check.state.doc_starts[0])
        return states_equal(check.state.to_tensors(), refs[k - 1]), k >= acked, mid

    def after_finish():
        check = fx.tiny_model()
        check.load_memory(mem)
        return states_equal(check.state.to_tensors(), refs[-1])

    return inject("model.save_memory", runs, rng, lambda env: Child("save_memory", mem, chunks, env=env), span,
                  after_kill, after_finish, lambda: shutil.rmtree(mem, ignore_errors=True), writes=ref.writes())


def kill_corpus_build(work: Path, runs: int, rng: random.Random) -> dict:
    """`memformer memory build` (the CLI, saving after every document), resumed by running it again."""
    from memformer import MemformerForCausalLM, MemoryConfig, corpus, persistence
    folder = fx.tiny_model_folder(work / "tiny_model")
    docs = fx.write_docs(work / "docs", 16, words=80)
    flags = ["--model", str(folder), "--window", "256", "--sink-tokens", "2", "--top-k", "4"]

    def cli(out, env=None):
        return Child("", cmd=[sys.executable, "-m", "memformer.cli", "memory", "build", *flags, "--docs", str(docs),
                              "--out", str(out), "--save-every", "1"], env=env)
    ref = cli(work / "ref")
    span = timed(ref, ready=None)
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
    return inject("memformer memory build", runs, rng, lambda env: cli(out, env), span, after_kill, after_finish, reset,
                  ready=None, writes=ref.writes())


def _qa_refs(cache: Path) -> dict:
    """The memories of a complete child run's QA cache, keyed by entry (the cache key). Taken from
    a child, as the killed runs are: the parent's thread count would change the float sums."""
    from memformer.qa.longdoc import LongDocQA
    fx.use_hashed_embedder()
    return {p.name: LongDocQA.load(fx.tiny_model(), p).model.state.to_tensors()
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
        if p.name not in refs or not states_equal(qa.model.state.to_tensors(), refs[p.name]):
            return False, len(entries)
    return True, len(entries)


def kill_qa_cache(work: Path, runs: int, rng: random.Random, sets: int = 5) -> dict:
    """`LongDocQA.read(cache_dir=)` over several document sets: each memory written to the cache."""
    cache = work / "cache"
    ref = Child("qa_cache", work / "ref_cache", sets)
    span = timed(ref)
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
    return inject("QA cache write", runs, rng, lambda env: Child("qa_cache", cache, sets, env=env), span, after_kill,
                  after_finish, lambda: shutil.rmtree(cache, ignore_errors=True), writes=ref.writes())


def kill_checkpoint(work: Path, runs: int, rng: random.Random, steps: int = 8) -> dict:
    """The training recipe checkpointing every 2 steps; resumed runs continue the newest checkpoint."""
    from memformer.training.metrics import read_metrics
    from safetensors.torch import load_file
    ref = Child("train", work / "ref", steps)
    span = timed(ref)
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
    return inject("training checkpoint", runs, rng, lambda env: Child("train", out, steps, env=env), span, after_kill,
                  after_finish, reset, writes=ref.writes())


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
    span, writes = ref_files.pop("_seconds"), ref_files.pop("_writes")

    def after_kill(c):
        mid = [p for p in (cache / "models").glob(f".{DEFAULT_MODEL}.*tmp*")] if (cache / "models").is_dir() else []
        if not final.exists():
            return True, True, mid
        return model_files(final) == ref_files, True, mid      # present means complete and equal

    def after_finish():
        return model_files(final) == ref_files
    return inject("first-use model conversion", runs, rng, lambda e: Child("convert", env={**env, **(e or {})}), span,
                  after_kill, after_finish, lambda: shutil.rmtree(cache / "models", ignore_errors=True), writes=writes)


def reference_conversion(work: Path, wheel: Path) -> dict:
    cache = _cache_with_wheel(work / "ref_cache", wheel)
    ref = Child("convert", env={"MEMFORMER_CACHE": str(cache)})
    span = timed(ref)
    files = model_files(cache / "models" / DEFAULT_MODEL)
    user = Path.home() / ".cache" / "memformer" / "models" / DEFAULT_MODEL
    files["_seconds"], files["_writes"] = span, ref.writes()
    same = user.is_dir() and model_files(user) == {k: v for k, v in files.items() if not k.startswith("_")}
    print(f"  reference conversion: {span:.1f}s; equal to the user's cached conversion: {same}")
    return files
