"""The trainable part of a memory model: LoRA on the memory layers' projections and the memory
gates, found by parameter name (everything else is the frozen backbone)."""
from __future__ import annotations

import torch
import torch.nn as nn

from memformer.adapters import BackboneAdapter
from memformer.config import AdapterConfig


def is_memory_param(name: str) -> bool:
    """Memory-layer parameters, found by structure: gates of MemoryAttention and LoRA weights."""
    return name.endswith("memory_gate") or ".lora_A." in name or ".lora_B." in name


def inject_lora(backbone: nn.Module, adapter: BackboneAdapter, layer_ids: list[int], cfg: AdapterConfig) -> None:
    """PEFT LoRA (rank, alpha; B = 0, so outputs do not change) on q/k/v/o of the memory layers
    `layer_ids`, inside their MemoryAttention wrappers (`.attn`: the names saved adapters use)."""
    from peft import LoraConfig, inject_adapter_in_model
    targets = [f"{adapter.layers_attr}.{i}.{adapter.attn_attr}.attn.{p}" for i in layer_ids
               for p in (adapter.q_proj, adapter.k_proj, adapter.v_proj, adapter.o_proj)]
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=targets, init_lora_weights=True)  # B = 0: identity at start
    # A is random (B = 0): seed it so an untrained adapter, and the fingerprint of memories
    # built with it, are the same in every process
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        inject_adapter_in_model(lora, backbone)
