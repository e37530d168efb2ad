"""Loaded at start-up by the fault suite's child processes (their PYTHONPATH holds this folder).

memformer writes every folder through a temporary sibling (`.NAME.tmp-*`, made by os.mkdir)
that ends in a rename, or an exchange after which the sibling (now the replaced version) is
removed.
An audit hook sees those steps without touching memformer:

  FAULTS_TRACE=1           print "@fault begin T" / "@fault end T" (monotonic seconds) on stderr
                           when a folder write begins (the temporary sibling is made) and ends
                           (it is renamed into place, or the replaced version is removed);
  FAULTS_KILL_AT="k:s"     SIGKILL this process s seconds after its k-th folder write began.
"""
import os
import sys

_trace = bool(os.environ.get("FAULTS_TRACE"))
_kill_at = os.environ.get("FAULTS_KILL_AT")

if _trace or _kill_at:
    import signal
    import threading
    import time

    _k, _delay = (int(_kill_at.split(":")[0]), float(_kill_at.split(":")[1])) if _kill_at else (0, 0.0)
    _begun = [0]

    def _kill():
        os.kill(os.getpid(), signal.SIGKILL)

    def _hook(event, args):
        if event == "os.mkdir" and isinstance(args[0], (str, bytes, os.PathLike)) \
                and ".tmp-" in os.path.basename(os.fsdecode(args[0])):
            _begun[0] += 1
            if _trace:
                print(f"@fault begin {time.monotonic():.6f}", file=sys.stderr, flush=True)
            if _begun[0] == _k:
                if _delay <= 0:
                    _kill()
                threading.Timer(_delay, _kill).start()
        elif _trace and ((event in ("os.rename", "os.replace") and ".tmp-" in os.fsdecode(args[0]))
                         or (event == "shutil.rmtree" and any(m in os.fsdecode(args[0]) for m in (".tmp-", ".old-")))):
            print(f"@fault end {time.monotonic():.6f}", file=sys.stderr, flush=True)

    sys.addaudithook(_hook)
