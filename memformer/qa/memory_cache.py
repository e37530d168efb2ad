"""A folder of cached memories (`LongDocQA.read(cache_dir=...)`), kept under a size limit.

    entries(cache_dir)                 # [CacheEntry(path, last_used, nbytes)], least recently used first
    mark_used(cache_dir / key)         # a cache hit: the entry becomes the most recently used
    trim(cache_dir, limit, keep=path)  # remove least recently used entries until <= limit bytes

An entry is a memory folder written by `LongDocQA.save` (it holds `manifest.json`), named by
`memory_key`. Its last use is its folder's modification time, set when it is written and on each
cache hit. A memory costs about 9.4 KB per token with the shipped adapter (47 KB training-free), so
an unbounded cache of long documents fills a disk: after each new entry the least recently used
ones are removed until the folder holds at most `limit` bytes, and a memory larger than the limit
on its own is not kept. Other files and folders in the cache folder are never touched. An entry is
removed under its writers' lock (`fileio.dir_lock`), after any reader of it has finished, and is
renamed aside (`.NAME.trash-*`) before it is deleted, so no reader sees half of one; what a killed
removal leaves there is deleted by the next trim.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from memformer.fileio import dir_lock

DEFAULT_LIMIT = 20 * 2**30          # bytes; about 2M tokens of memory with the shipped adapter
DEFAULT_DIR = Path.home() / ".cache" / "memformer" / "memories"     # `memformer qa`'s cache
MANIFEST = "manifest.json"          # what marks a folder as a saved memory
_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30,
          "T": 2**40, "TB": 2**40}


@dataclass
class CacheEntry:
    path: Path
    last_used: float                # seconds since the epoch (the folder's mtime)
    nbytes: int


def parse_size(text) -> int | None:
    """Bytes of a size such as "20GB", "500M", "1.5T" or 1024 (binary units: 1 GB = 2**30 bytes);
    "none" / "unlimited" (any case) or None is no limit."""
    if text is None:
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"a cache limit must be >= 0 bytes, got {text}")
        return text
    s = str(text).strip()
    if s.lower() in ("none", "unlimited"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)", s)
    unit = m and m.group(2).upper().replace("IB", "B")
    if m is None or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 20GB, 500MB, none)")
    return int(float(m.group(1)) * _UNITS[unit])


def folder_bytes(path) -> int:
    """Bytes of the files under `path` (links not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:             # removed meanwhile
                pass
    return total


def entries(cache_dir) -> list[CacheEntry]:
    """The saved memories directly under `cache_dir`, least recently used first ([] when the
    folder does not exist). Hidden folders (a write or a removal in progress) are not entries."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    found = []
    for p in cache_dir.iterdir():
        if p.name.startswith(".") or p.is_symlink() or not p.is_dir() or not (p / MANIFEST).is_file():
            continue
        try:
            found.append(CacheEntry(p, p.stat().st_mtime, folder_bytes(p)))
        except OSError:                 # removed meanwhile
            continue
    return sorted(found, key=lambda e: (e.last_used, e.path.name))


def mark_used(path) -> None:
    """Make the entry at `path` the most recently used (a read-only cache is left as it is)."""
    try:
        os.utime(path)
    except OSError:
        pass


def describe(entry: CacheEntry) -> dict:
    """What `memformer memory cache` lists for an entry: key, bytes, last use, and the documents
    and tokens its `qa_documents.json` names (None where that file cannot be read)."""
    from datetime import datetime, timezone
    from memformer.qa.longdoc import read_qa_file
    row = {"key": entry.path.name, "bytes": entry.nbytes,
           "last_used": datetime.fromtimestamp(entry.last_used, timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "documents": None, "tokens": None}
    try:
        saved = read_qa_file(entry.path)
    except (OSError, ValueError):          # a memory saved without documents, or a corrupt file
        return row
    return dict(row, documents=[d["name"] for d in saved["documents"]], tokens=saved["tokens"])


def remove_entry(path) -> None:
    """Delete the entry at `path` under its writers' lock: renamed to a hidden sibling, then removed."""
    path = Path(path)
    with dir_lock(path):                         # waits for readers of this entry to finish
        trash = path.parent / f".{path.name}.trash-{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:                # another process removed it first
            return
    shutil.rmtree(trash, ignore_errors=True)


def trim(cache_dir, limit: int | None, keep=None) -> list[Path]:
    """Remove the least recently used entries of `cache_dir` until its entries hold at most `limit`
    bytes, never the entry `keep` (the one just written). Returns the folders removed; None is no
    limit (what a killed removal left is still deleted). Raises nothing on an entry another
    process removed first."""
    for left in Path(cache_dir).glob(".*.trash-*"):    # from a removal killed half-way
        shutil.rmtree(left, ignore_errors=True)
    if limit is None:
        return []
    keep = None if keep is None else Path(keep).resolve()
    found = entries(cache_dir)
    total = sum(e.nbytes for e in found)
    removed = []
    for e in found:                              # least recently used first
        if total <= limit:
            break
        if keep is not None and e.path.resolve() == keep:
            continue
        remove_entry(e.path)
        total -= e.nbytes
        removed.append(e.path)
    return removed
