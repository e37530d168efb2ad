"""Trained memory adapters that ship with the package, one folder per backbone.

Each folder is what `save_pretrained` writes (adapter.safetensors, memory_config.json,
adapter_config.json); the safetensors metadata names the backbone fingerprint it was trained on,
which is how `MemformerForCausalLM.from_pretrained` finds the adapter for a loaded backbone.

smollm2-135m-instruct: SmolLM2-135M-Instruct (the embedded default), memory in layers 17, 18 and
20..23 (the backbone's induction-head layers), LoRA rank 8 + memory gates, trained with crossbatch
negatives by training/configs/smollm2_cpu_induction.yaml (300 steps, benchmarks/results/
train_induction_cpu/), then by training/configs/smollm2_cpu_induction_qa.yaml (150 more steps with
natural facts asked as questions; its curves and evaluations are in benchmarks/results/
train_induction_qa_cpu/). It was trained at window 256 and ships at window 1024 with overlap 128,
the setting its measurements were taken at.
"""
from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent
DEFAULT_ADAPTER = WEIGHTS_DIR / "smollm2-135m-instruct"     # the embedded default backbone's


def adapter_backbone(path) -> str | None:
    """The backbone fingerprint stored in an adapter's safetensors metadata (None if absent)."""
    from safetensors import safe_open
    with safe_open(str(Path(path) / "adapter.safetensors"), "pt") as f:
        return (f.metadata() or {}).get("backbone")


def packaged_adapter(fingerprint: str) -> Path | None:
    """The shipped adapter trained for the backbone with this fingerprint, or None."""
    for folder in sorted(p for p in WEIGHTS_DIR.iterdir() if (p / "adapter.safetensors").is_file()):
        if adapter_backbone(folder) == fingerprint:
            return folder
    return None
