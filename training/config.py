"""The recipe's configuration: a YAML file, `key=value` overrides, validated dataclasses.

    cfg = TrainConfig.load("training/configs/smollm2_cpu.yaml", ["train.max_steps=20", "crossbatch.d=4"])

Sections: model, memory (MemoryConfig fields), data, crossbatch, optim, train, eval, checkpoint.
Every unknown key, bad value or inconsistent pair fails at load time with a message naming it.
`d` and `w` are schedules: a number, a list of [step, value] pairs (piecewise constant from each
step on, FoT's "start small, then raise"), or {choices: [...]} (one drawn per step).
"""
from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from memformer.config import AdapterConfig, MemoryConfig
from memformer.training.data import SYNTHETIC_TASKS, check_source

MIXED_PRECISION = ("no", "bf16", "fp16")
SCHEDULERS = ("constant", "linear", "cosine")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A training configuration that is malformed or inconsistent."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; learning rates are written that way."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "list": (list,)}


def _check_types(obj, section: str) -> None:
    """Each field of a section dataclass holds a value of its annotated type (bools are not ints)."""
    for f in dataclasses.fields(obj):
        ann = str(f.type)
        optional = ann.startswith("Optional[")
        base = ann[len("Optional["):-1] if optional else ann
        if base not in _TYPES:
            continue                       # Any: checked where it is used (schedules, resume)
        v = getattr(obj, f.name)
        if v is None and optional:
            continue
        if not isinstance(v, _TYPES[base]) or (base in ("int", "float") and isinstance(v, bool)):
            raise ConfigError(f"{section}.{f.name} must be {'null or ' if optional else ''}{base}, got {v!r}")


class Schedule:
    """An int-valued schedule over optimizer steps (None allowed where `allow_none`).

    spec: a number (constant) | [[step, value], ...] (value from that step on; the first step
    must be 0) | {"choices": [v, ...]} (drawn uniformly per step from the recipe's generator)."""

    def __init__(self, spec, name: str, minimum: int = 1, allow_none: bool = False):
        self.spec, self.name = spec, name
        if spec is None and allow_none:
            self.points, self.choices = [(0, None)], None
            return
        if isinstance(spec, dict):
            if set(spec) != {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
                raise ConfigError(f"{name}: a choice schedule is {{choices: [v, ...]}}, got {spec!r}")
            self.points, self.choices = None, [self._value(v, minimum, allow_none) for v in spec["choices"]]
            return
        self.choices = None
        if isinstance(spec, list):
            if not spec or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in spec):
                raise ConfigError(f"{name}: a step schedule is [[step, value], ...], got {spec!r}")
            steps = [p[0] for p in spec]
            if steps[0] != 0 or any(not isinstance(s, int) for s in steps) or steps != sorted(set(steps)):
                raise ConfigError(f"{name}: schedule steps must be increasing ints starting at 0, got {steps}")
            self.points = [(int(s), self._value(v, minimum, allow_none)) for s, v in spec]
        else:
            self.points = [(0, self._value(spec, minimum, allow_none))]

    def _value(self, v, minimum: int, allow_none: bool):
        if v is None and allow_none:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ConfigError(f"{self.name}: values must be ints >= {minimum}"
                              f"{' or null' if allow_none else ''}, got {v!r}")
        return v

    def values(self) -> list:
        return list(self.choices) if self.choices else [v for _, v in self.points]

    def at(self, step: int, rng: random.Random):
        """The value at optimizer step `step` (0-based)."""
        if self.choices:
            return rng.choice(self.choices)
        return [v for s, v in self.points if s <= step][-1]


def _build(cls, raw, section: str):
    """A section dataclass from a mapping, refusing unknown keys."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: expected a mapping, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{section}: unknown keys {sorted(unknown)} (allowed: {sorted(known)})")
    out = cls(**raw)
    _check_types(out, section)
    return out


@dataclass
class ModelSection:
    backbone: Optional[str] = None      # HF folder, .gguf, cached hub id; None = default SmolLM2-135M
    dtype: str = "float32"              # backbone weights dtype
    init_adapter: Optional[str] = None  # start from these adapter weights (a save_pretrained folder)


@dataclass
class DataSection:
    sources: list = field(default_factory=lambda: [{"type": "stdlib"}, {"type": "python_docs"}])
    seq_len: int = 2048                 # tokens per sample (one document each), read in windows
    min_doc_tokens: int = 1024          # shorter documents / last chunks are dropped
    eval_fraction: float = 0.05         # share of documents held out (by a hash of their name)
    shuffle_buffer: int = 64
    synthetic_rate: float = 0.25        # share of samples that are synthetic retrieval tasks
    synthetic_tasks: list = field(default_factory=lambda: list(SYNTHETIC_TASKS))
    synthetic_loss: str = "answer"      # "answer": only the answer tokens are targets; "all"


@dataclass
class CrossbatchSection:
    batch_size: int = 2                 # documents read in lockstep (lanes) per episode
    d: Any = 2                          # lanes each lane reads (1 = own document only); schedule
    w: Any = 2                          # earlier windows kept per lane (null = all); schedule
    top_k: Optional[int] = 32           # rows attended per query (null = dense, tiny models only)
    first_loss_window: int = 1          # windows before it only write memory (FoT's C_prev)


@dataclass
class OptimSection:
    lr: float = 1e-3
    gate_lr: Optional[float] = None     # memory gates (logit biases); None = lr. Adam moves a
                                        # parameter ~lr per step: a gate needs ~1/lr steps per nat
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0
    scheduler: str = "cosine"
    min_lr_ratio: float = 0.1
    max_grad_norm: Optional[float] = 1.0


@dataclass
class TrainSection:
    max_steps: int = 100                # optimizer steps
    gradient_accumulation_steps: int = 1  # episodes per optimizer step
    mixed_precision: str = "no"         # "no" | "bf16" | "fp16" (accelerate autocast)
    gradient_checkpointing: bool = True
    log_every: int = 1
    cpu: bool = False                   # force CPU even when an accelerator is present
    threads: Optional[int] = None       # torch CPU threads
    fsdp: bool = False                  # shard with FSDP2 across processes (training/sharding.py)


@dataclass
class EvalSection:
    every: int = 100                    # steps between evaluations (0 = only at start/end)
    at_start: bool = True
    at_end: bool = True
    batch_size: int = 4
    batches: int = 2
    per_doc: int = 2                    # held-out chunks taken per document
    passkey_lengths: list = field(default_factory=lambda: ["2k", "4k"])
    passkey_trials: int = 5
    passkey_seed: int = 0


@dataclass
class CheckpointSection:
    every: int = 50                     # steps between checkpoints (0 = only at the end)
    keep: int = 2                       # newest checkpoints kept
    resume: Any = "auto"                # "auto" (newest in output_dir if any) | true | false | a path


@dataclass
class TrainConfig:
    output_dir: str = "runs/crossbatch"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataSection = field(default_factory=DataSection)
    crossbatch: CrossbatchSection = field(default_factory=CrossbatchSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)

    # ------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, raw: dict) -> "TrainConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"a training config is a mapping, got {type(raw).__name__}")
        sections = {"model": ModelSection, "data": DataSection, "crossbatch": CrossbatchSection,
                    "optim": OptimSection, "train": TrainSection, "eval": EvalSection,
                    "checkpoint": CheckpointSection}
        unknown = set(raw) - set(sections) - {"memory", "adapter", "output_dir", "seed"}
        if unknown:
            raise ConfigError(f"unknown top-level keys {sorted(unknown)} (allowed: output_dir, seed, memory, "
                              f"adapter, {', '.join(sections)})")
        try:
            memory = MemoryConfig.from_dict(raw.get("memory") or {})
        except (ValueError, TypeError) as e:
            raise ConfigError(f"memory: {e}") from None
        try:
            adapter = AdapterConfig.from_dict(raw.get("adapter") or {})
        except (ValueError, TypeError) as e:
            raise ConfigError(f"adapter: {e}") from None
        cfg = cls(output_dir=str(raw.get("output_dir", cls.output_dir)), seed=raw.get("seed", 0), memory=memory,
                  adapter=adapter, **{k: _build(c, raw.get(k), k) for k, c in sections.items()})
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path, overrides: list[str] = ()) -> "TrainConfig":
        """Read a YAML file and apply `key=value` overrides (values parsed as YAML)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config file {path}")
        try:
            raw = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        return cls.from_dict(apply_overrides(raw, overrides))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------ checks
    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        need(isinstance(self.seed, int), f"seed must be an int, got {self.seed!r}")
        need(self.model.dtype in DTYPES, f"model.dtype {self.model.dtype!r} not in {DTYPES}")
        need(self.model.init_adapter is None or (Path(self.model.init_adapter) / "adapter.safetensors").is_file(),
             f"model.init_adapter {self.model.init_adapter!r} is not an adapter folder (no adapter.safetensors)")
        d, m, cb, o, t, e = self.data, self.memory, self.crossbatch, self.optim, self.train, self.eval
        need(isinstance(d.sources, list) and d.sources, "data.sources must be a non-empty list")
        for spec in d.sources:
            try:
                check_source(spec)
            except ValueError as err:
                raise ConfigError(f"data.sources: {err}") from None
        new = m.window - m.sink_tokens - m.overlap            # new tokens per window
        need(d.min_doc_tokens > m.sink_tokens + new,
             f"data.min_doc_tokens {d.min_doc_tokens} must exceed one window's sink + new tokens "
             f"({m.sink_tokens} + {new}) so every sample reaches a second window that reads memory")
        need(d.seq_len >= d.min_doc_tokens, f"data.seq_len {d.seq_len} < data.min_doc_tokens {d.min_doc_tokens}")
        need(0.0 < d.eval_fraction < 1.0, f"data.eval_fraction must be in (0, 1), got {d.eval_fraction}")
        need(d.shuffle_buffer >= 1, f"data.shuffle_buffer must be >= 1, got {d.shuffle_buffer}")
        need(0.0 <= d.synthetic_rate < 1.0, f"data.synthetic_rate must be in [0, 1), got {d.synthetic_rate}")
        need(bool(d.synthetic_tasks) and set(d.synthetic_tasks) <= set(SYNTHETIC_TASKS),
             f"data.synthetic_tasks must be a non-empty subset of {SYNTHETIC_TASKS}, got {d.synthetic_tasks}")
        need(d.synthetic_loss in ("answer", "all"), "data.synthetic_loss must be 'answer' or 'all'")
        lora = self.adapter.lora_layers
        need(lora is None or m.memory_layers is None or set(lora) <= set(m.memory_layers),
             f"adapter.lora_layers {lora} must be memory layers (memory.memory_layers: {m.memory_layers})")
        need(cb.batch_size >= 1, f"crossbatch.batch_size must be >= 1, got {cb.batch_size}")
        dsched = self.d_schedule()
        need(max(dsched.values()) <= cb.batch_size,
             f"crossbatch.d reaches {max(dsched.values())} but a batch holds only {cb.batch_size} documents "
             f"(negatives come from the other documents of the batch)")
        self.w_schedule()
        need(cb.top_k is None or (isinstance(cb.top_k, int) and cb.top_k >= 1),
             f"crossbatch.top_k must be an int >= 1 or null (dense), got {cb.top_k!r}")
        need(cb.first_loss_window >= 0, "crossbatch.first_loss_window must be >= 0")
        need(o.lr > 0 and (o.gate_lr is None or o.gate_lr > 0), "optim.lr and gate_lr must be > 0")
        need(o.scheduler in SCHEDULERS, f"optim.scheduler {o.scheduler!r} not in {SCHEDULERS}")
        need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas must be two numbers in [0, 1)")
        need(o.warmup_steps >= 0 and 0 <= o.min_lr_ratio <= 1, "optim.warmup_steps >= 0, min_lr_ratio in [0, 1]")
        need(o.max_grad_norm is None or o.max_grad_norm > 0, "optim.max_grad_norm must be > 0 or null")
        need(t.max_steps >= 1, f"train.max_steps must be >= 1, got {t.max_steps}")
        need(t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps must be >= 1")
        need(t.mixed_precision in MIXED_PRECISION, f"train.mixed_precision {t.mixed_precision!r} not in {MIXED_PRECISION}")
        need(t.log_every >= 1, "train.log_every must be >= 1")
        need(e.every >= 0 and e.batch_size >= 1 and e.batches >= 1 and e.per_doc >= 1 and e.passkey_trials >= 0,
             "eval: every >= 0, batch_size/batches/per_doc >= 1, passkey_trials >= 0")
        from memformer.config import parse_length
        for length in e.passkey_lengths:
            try:
                parse_length(str(length))
            except ValueError as err:
                raise ConfigError(f"eval.passkey_lengths: {err}") from None
        c = self.checkpoint
        need(c.every >= 0 and c.keep >= 1, "checkpoint: every >= 0 and keep >= 1")
        need(c.resume in ("auto", True, False) or isinstance(c.resume, str),
             f"checkpoint.resume must be auto, true, false or a path, got {c.resume!r}")

    def d_schedule(self) -> Schedule:
        return Schedule(self.crossbatch.d, "crossbatch.d", minimum=1)

    def w_schedule(self) -> Schedule:
        return Schedule(self.crossbatch.w, "crossbatch.w", minimum=1, allow_none=True)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set nested keys from `a.b.c=value` strings; values are parsed as YAML (`1e-4`, `null`,
    `[[0, 2], [100, 8]]`). Unknown keys are caught by the section's validation."""
    out = yaml.safe_load(yaml.safe_dump(raw))               # a deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.max_steps=20)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key part")
        try:
            parsed = parse_yaml(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
        node = out
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
            node = child
        node[parts[-1]] = parsed
    return out
