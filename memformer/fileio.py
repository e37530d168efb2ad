"""Files written atomically and JSON read with its format checked: the two ways memformer touches
disk, in one place.

Writes go to a temporary sibling that is renamed into place, so an interrupted write never
leaves a file or folder that looks complete; a reader gets the old version or the new one.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path


def atomic_dir(path, fill) -> Path:
    """Create the folder `path` by calling `fill(tmp)` on a temporary sibling and renaming it into
    place (an existing `path` is moved aside first, then deleted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        fill(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    """Write `text` to the file `path` through a temporary sibling renamed into place."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_json(path, *, error=ValueError, format: str | None = None, version=None,
              version_key: str = "format_version") -> dict:
    """The JSON object in the file `path`. FileNotFoundError when it is missing; `error` (naming
    the file) when it is not valid UTF-8 JSON, not an object, or when `format` / `version` are
    given and its "format" / `version_key` fields differ."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is corrupt: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{path} is corrupt: a JSON object was expected, got {type(data).__name__}")
    if format is not None and data.get("format") != format:
        raise error(f"{path}: not a {format} file (format {data.get('format')!r})")
    if version is not None and data.get(version_key) != version:
        raise error(f"{path}: {format or 'file'} version {data.get(version_key)!r} is not supported "
                    f"(this memformer reads version {version})")
    return data


def jsonl_objects(path, *, error=ValueError):
    """(line number, object) for each non-blank line of the JSONL file `path`, streamed; `error`
    naming the file and line when a line is not a JSON object."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise error(f"{path}:{n}: a JSON object was expected, got {type(row).__name__}")
            yield n, row
