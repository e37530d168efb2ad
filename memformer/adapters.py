"""Per-model-type table: where a backbone keeps its decoder layers, attention projections and RoPE.

Memory layers wrap the backbone's own attention modules (PEFT-style injection); nothing here
forks a modeling file. To support another architecture, add one row to `ADAPTERS`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn


@dataclass(frozen=True)
class BackboneAdapter:
    model_type: str
    modeling_module: str            # transformers module that defines apply_rotary_pos_emb
    layers_attr: str = "model.layers"
    attn_attr: str = "self_attn"
    rotary_attr: str = "model.rotary_emb"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    rotary_fn: str = "apply_rotary_pos_emb"
    eager_fn: str = "eager_attention_forward"

    def apply_rotary(self) -> Callable:
        """(q, k, cos, sin) -> (q_rot, k_rot), the backbone's own RoPE function."""
        return getattr(importlib.import_module(self.modeling_module), self.rotary_fn)

    def eager_attention(self) -> Callable:
        """The backbone's plain (eager) attention function, used when no fused one is set."""
        return getattr(importlib.import_module(self.modeling_module), self.eager_fn)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _get_attr(model, self.layers_attr)

    def rotary_emb(self, model: nn.Module) -> nn.Module:
        return _get_attr(model, self.rotary_attr)


ADAPTERS: dict[str, BackboneAdapter] = {
    "llama": BackboneAdapter("llama", "transformers.models.llama.modeling_llama"),
    "mistral": BackboneAdapter("mistral", "transformers.models.mistral.modeling_mistral"),
    "qwen2": BackboneAdapter("qwen2", "transformers.models.qwen2.modeling_qwen2"),
}


def get_adapter(config_or_type) -> BackboneAdapter:
    """The adapter row for a config (or model_type string); clear ValueError for unknown types."""
    model_type = getattr(config_or_type, "model_type", config_or_type)
    if model_type not in ADAPTERS:
        raise ValueError(f"memformer has no backbone adapter for model_type {model_type!r}; "
                         f"supported: {sorted(ADAPTERS)}. Add a row to memformer.adapters.ADAPTERS.")
    return ADAPTERS[model_type]


def _get_attr(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
