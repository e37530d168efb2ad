"""Memory files and adapter files: safetensors + a JSON manifest, never pickles.

A memory directory holds `memory.safetensors` (per layer: keys, valid mask, values, positions,
window slots; the memorized token stream and its document starts; the passage embeddings of
question reads once computed) and `manifest.json` (format version, fingerprints of the backbone / memory config / adapter
weights, sizes, sha256 of the tensor file). Writes go to a temporary sibling and are renamed
into place, so an interrupted save never leaves a directory that looks complete; readers hold the
folder's shared lock, so they never mix files of two saves (memformer/fileio.py). Every field of a
manifest is checked for its type before use: a damaged or hostile manifest is a MemoryFileError.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from memformer.config import AdapterConfig, MemoryConfig
from memformer.fileio import atomic_dir, dir_lock, read_json, recover_for_reading
from memformer.index.base import sha256_file as _sha256

MEMORY_FORMAT = "memformer-memory"
MEMORY_FORMAT_VERSION = 2        # 2: the token stream and passages are kept (question reads)
ADAPTER_FILE, ADAPTER_CONFIG, LORA_CONFIG = "adapter.safetensors", "memory_config.json", "adapter_config.json"


class MemoryFileError(ValueError):
    """A memory/adapter file that is corrupt, of an unknown format, or from another model."""


def fingerprint_backbone(model) -> str:
    from memformer.loading import fingerprint_backbone as fp
    return fp(model)


def adapter_hash(model) -> str:
    """Short hash of the memory-layer weights and of the LoRA scaling (lora_alpha / rank) they are
    applied with: both change the keys that get stored."""
    h = hashlib.sha256()
    if model.adapter_config is not None:
        cfg = model.adapter_config
        h.update(json.dumps({"lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha}).encode())
    for name, t in sorted(model.trainable_state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def memory_fingerprint(model) -> dict:
    """What must match for a saved memory to mean the same thing to this model."""
    cfg = model.memory_config
    return {"backbone": model.backbone_fingerprint, "memory_layers": list(model.memory_layer_ids),
            "window": cfg.window, "sink_tokens": cfg.sink_tokens, "overlap": cfg.overlap,
            "adapter": adapter_hash(model)}


def save_memory(model, path, extra_files: dict[str, str] | None = None) -> Path:
    """Write the model's memory to `path/` atomically; `extra_files` (name -> text) are written
    into the same directory in the same rename (e.g. a corpus's document table)."""
    if not model.memories or model.memory_size() == 0:
        raise ValueError("save_memory: the memory is empty; memorize() something first")
    tensors = model.state.to_tensors()
    first = next(iter(model.memories.values()))

    def fill(tmp: Path):
        save_file(tensors, str(tmp / "memory.safetensors"))
        manifest = {"format": MEMORY_FORMAT, "format_version": MEMORY_FORMAT_VERSION,
                    "fingerprint": memory_fingerprint(model), "batch": first.batch,
                    "kv_heads": first.kv_heads, "head_dim": first.dim, "tokens": model.memory_size(),
                    "seen": list(model.state.seen), "dtype": str(first.keys.dtype).replace("torch.", ""),
                    "sha256": _sha256(tmp / "memory.safetensors")}
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
            manifest.setdefault("extra_files", {})[name] = _sha256(tmp / name)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))

    return atomic_dir(path, fill)


def _is_int(x, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _is_plain_name(name) -> bool:
    """A file name inside the memory folder: no separator, not "." / "..", not hidden."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name \
        and not name.startswith(".") and "\x00" not in name


# field -> (check, what it must be); the fields of a manifest that readers use
_MANIFEST_FIELDS = {
    "fingerprint": (lambda v: isinstance(v, dict), "an object"),
    "batch": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "kv_heads": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "head_dim": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "tokens": (_is_int, "an integer >= 0"),
    "seen": (lambda v: isinstance(v, list) and all(_is_int(x) for x in v), "a list of integers >= 0"),
    "dtype": (lambda v: isinstance(v, str), "a string"),
    "sha256": (lambda v: isinstance(v, str), "a string"),
}
_FINGERPRINT_FIELDS = {
    "memory_layers": (lambda v: isinstance(v, list) and all(_is_int(x) for x in v), "a list of integers >= 0"),
    "window": (_is_int, "an integer >= 0"),
}


def check_manifest(manifest: dict, file) -> dict:
    """`manifest` if every field readers use has the right type; else MemoryFileError naming `file`."""
    def need(table, data, where):
        for key, (ok, what) in table.items():
            if key not in data:
                raise MemoryFileError(f"{file} is corrupt: {where}{key!r} is missing")
            if not ok(data[key]):
                raise MemoryFileError(f"{file} is corrupt: {where}{key!r} must be {what}, got {data[key]!r:.80}")
    need(_MANIFEST_FIELDS, manifest, "")
    need(_FINGERPRINT_FIELDS, manifest["fingerprint"], "fingerprint.")
    extra = manifest.get("extra_files", {})
    if not isinstance(extra, dict) or not all(_is_plain_name(n) and isinstance(d, str) for n, d in extra.items()):
        raise MemoryFileError(f"{file} is corrupt: 'extra_files' must map plain file names inside the "
                              f"folder to checksums, got {extra!r:.120}")
    if len(manifest["seen"]) != manifest["batch"]:
        raise MemoryFileError(f"{file} is corrupt: 'seen' has {len(manifest['seen'])} entries for a batch "
                              f"of {manifest['batch']}")
    return manifest


def read_manifest(path) -> dict:
    path = Path(path)
    recover_for_reading(path)              # a writer killed between its two renames
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"{path} is not a memformer memory directory (no manifest.json)")
    return check_manifest(read_json(path / "manifest.json", error=MemoryFileError, format=MEMORY_FORMAT,
                                    version=MEMORY_FORMAT_VERSION), path / "manifest.json")


def read_memory(model, path) -> tuple[dict, dict]:
    """Check and read a saved memory for this model without touching its own memory.

    Returns (manifest, tensors); MemoryFileError if it is from another model / config or corrupt.
    The folder's shared lock is held while reading, so a concurrent save cannot swap it midway."""
    path = Path(path)
    recover_for_reading(path)
    with dir_lock(path, shared=True):
        return _read_memory_locked(model, path)


def _read_memory_locked(model, path: Path) -> tuple[dict, dict]:
    manifest = read_manifest(path)
    mine = memory_fingerprint(model)
    diff = {k: (manifest["fingerprint"].get(k), v) for k, v in mine.items() if manifest["fingerprint"].get(k) != v}
    if diff:
        raise MemoryFileError(f"memory at {path} was built with another model or memory config; "
                              f"mismatched (saved, this model): {diff}")
    file = path / "memory.safetensors"
    if not file.is_file():
        raise MemoryFileError(f"{path}: memory.safetensors is missing")
    if _sha256(file) != manifest.get("sha256"):
        raise MemoryFileError(f"{file} is corrupt or truncated (checksum mismatch)")
    for name, digest in manifest.get("extra_files", {}).items():
        if not (path / name).is_file() or _sha256(path / name) != digest:
            raise MemoryFileError(f"{path / name} is missing, corrupt or truncated (checksum mismatch)")
    try:
        tensors = load_file(str(file))
    except Exception as e:  # safetensors raises several error types for damaged headers
        raise MemoryFileError(f"{file} cannot be read: {e}") from None
    check_token_tensors(tensors, manifest, model, file)
    return manifest, tensors


def check_token_tensors(tensors: dict, manifest: dict, model, file) -> None:
    """The token ids and stream offsets a memory holds are fed back to the model (the sink and
    overlap context, question reads' passages): refuse ids that are not token ids of this
    backbone and offsets outside the stream, instead of an index error at the next generate."""
    vocab = model.backbone.get_input_embeddings().num_embeddings
    batch, seen = manifest["batch"], manifest["seen"]

    def bad(name, what):
        raise MemoryFileError(f"{file} is corrupt: {name} {what}")
    for name in ("sink_ids", "tail_ids", "stream"):
        t = tensors.get(name)
        if t is None:
            if name == "stream":
                bad(name, "is missing")
            continue
        if t.dtype not in (torch.int64, torch.int32) or t.dim() != 2 or t.shape[0] != batch:
            bad(name, f"must be integer token ids [{batch}, n], got {str(t.dtype)} {tuple(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
            bad(name, f"holds ids outside this backbone's vocabulary of {vocab}")
    t = tensors.get("seen")
    if t is None or t.dtype not in (torch.int64, torch.int32) or t.tolist() != seen:
        bad("seen", f"does not match the manifest's {seen}")
    if tensors["stream"].shape[1] < max(seen, default=0):
        bad("stream", f"holds {tensors['stream'].shape[1]} tokens, the manifest says {max(seen)} were read")
    starts = tensors.get("doc_starts")
    if starts is None or starts.dtype not in (torch.int64, torch.int32) or starts.dim() != 2 \
            or starts.shape[0] != batch:
        bad("doc_starts", "must be integer offsets [batch, documents]")
    if starts.numel() and (int(starts.min()) < -1 or int(starts.max()) > max(seen, default=0)):
        bad("doc_starts", "holds offsets outside the token stream")


def fill_layer_memories(memories: dict, tensors: dict, file) -> None:
    """Load `layers.<i>.*` tensors into each LayerMemory; MemoryFileError if they do not fit."""
    try:
        for i, mem in memories.items():
            prefix = f"layers.{i}."
            mem.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    except (KeyError, ValueError, RuntimeError) as e:
        raise MemoryFileError(f"{file} does not fit this model's memory layers: {e}") from None


def load_memory(model, path) -> None:
    """Replace the model's memory by the one at `path`; on any error the old memory is kept."""
    path = Path(path)
    manifest, tensors = read_memory(model, path)
    try:
        model.state.load_tensors(tensors, int(manifest["batch"]))
    except (KeyError, ValueError, RuntimeError, IndexError, TypeError) as e:
        raise MemoryFileError(f"{path / 'memory.safetensors'} does not fit this model's memory layers: {e}") from None


def save_adapter(model, path, state: dict | None = None) -> Path:
    """state: the adapter tensors when they are not the model's own (gathered from FSDP shards)."""
    state = {n: t.cpu().contiguous() for n, t in (state or model.trainable_state_dict()).items()}

    def fill(tmp: Path):
        save_file(state, str(tmp / ADAPTER_FILE), metadata={"backbone": model.backbone_fingerprint})
        (tmp / ADAPTER_CONFIG).write_text(model.memory_config.to_json())
        if model.adapter_config is not None:
            (tmp / LORA_CONFIG).write_text(model.adapter_config.to_json())

    return atomic_dir(path, fill)


def _read_config(f: Path, cls):
    """A MemoryConfig / AdapterConfig from its JSON file; MemoryFileError when it does not parse."""
    try:
        return cls.from_dict(read_json(f, error=MemoryFileError))
    except MemoryFileError:
        raise
    except (TypeError, ValueError) as e:
        raise MemoryFileError(f"{f} is corrupt: {e}") from None


def read_adapter_config(path) -> MemoryConfig:
    f = Path(path) / ADAPTER_CONFIG
    if not f.is_file():
        raise FileNotFoundError(f"{path} is not a memformer adapter (no {ADAPTER_CONFIG})")
    return _read_config(f, MemoryConfig)


def read_lora_config(path) -> AdapterConfig | None:
    """The AdapterConfig saved beside an adapter (None: gates only, no LoRA was added)."""
    f = Path(path) / LORA_CONFIG
    return _read_config(f, AdapterConfig) if f.is_file() else None


def load_adapter(model, path, *, partial: bool = False) -> list[str]:
    """Load adapter weights (adding the LoRA layers its AdapterConfig names first).

    partial: the file may hold a subset of the model's memory-layer weights (an adapter of fewer
        layers, continued by training with more); the others keep their values. Every tensor in
        the file must still be one of the model's, of the same shape. Returns the names of the
        model's weights the file did not hold."""
    f = Path(path) / ADAPTER_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{path} is not a memformer adapter (no {ADAPTER_FILE})")
    try:
        state = load_file(str(f))
        with safe_open(str(f), "pt") as h:
            trained_on = (h.metadata() or {}).get("backbone")
    except Exception as e:
        raise MemoryFileError(f"{f} cannot be read: {e}") from None
    if trained_on is not None and trained_on != model.backbone_fingerprint:   # checked before any change
        raise MemoryFileError(f"{path} was trained for another backbone (fingerprint {trained_on}, this "
                              f"model's is {model.backbone_fingerprint})")
    lora = read_lora_config(path)
    if lora is not None and model.adapter_config is None:
        model.add_lora(lora)
    params = dict(model.named_parameters())
    mine = set(model.trainable_state_dict())
    if (not set(state) <= mine) if partial else set(state) != mine:
        raise MemoryFileError(f"{f} does not match this model's memory layers "
                              f"(missing {sorted(mine - set(state))[:3]}, unexpected {sorted(set(state) - mine)[:3]})")
    for name, t in state.items():  # check everything before changing anything
        if params[name].shape != t.shape:
            raise MemoryFileError(f"{f}: {name} has shape {tuple(t.shape)}, model has {tuple(params[name].shape)}")
    with torch.no_grad():
        for name, t in state.items():
            params[name].copy_(t)
    return sorted(mine - set(state))
