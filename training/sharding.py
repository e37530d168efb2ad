"""FSDP for the recipe: torch's `fully_shard` (FSDP2) over the decoder layers, then the root.

Why not accelerate's FSDP plugin: accelerate turns FSDP on only for GPU-type devices, so that path
could not run anywhere without GPUs (CI, this project's tests). `fully_shard` runs over gloo on CPU
and NCCL on GPU alike, so the path the tests exercise is the one a multi-GPU run takes. Accelerate
still owns the process group, the device, autocast, backward and reductions.

Layout: every decoder layer (with its memory-attention adapters) is one FSDP unit; the root unit
(the WindowLM) keeps what is left: embeddings, final norm and the LM head, which SmolLM2 ties to the
embeddings, so they must share a unit. Frozen bf16 backbone weights and fp32 adapters may share a
unit: FSDP2 shards each parameter on its own (dim 0), so dtypes and requires_grad may differ.

Checkpoints stay in the unsharded format (adapter safetensors + a full optimizer state), so an FSDP
checkpoint holds the same files as a single-process one; gathering them is cheap because only the
adapters (a few MB) are trainable.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def is_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor")         # a DTensor (FSDP2 shards parameters into DTensors)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a (possibly sharded) parameter or gradient norm. A collective when
    sharded: every process must call it, in the same order."""
    return t.full_tensor() if is_sharded(t) else t


def decoder_layers(model) -> nn.ModuleList:
    """The backbone's decoder layers (Llama-style `model.layers`)."""
    bb = model.backbone
    dec = bb.get_decoder() if hasattr(bb, "get_decoder") else bb.model
    layers = getattr(dec, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"FSDP: cannot find the decoder layers of {type(bb).__name__} (no .layers)")
    return layers


def shard(lm: nn.Module, model, reshard_after_forward: bool = True) -> nn.Module:
    """Shard `lm` (a WindowLM over `model`) in place across the default process group: one FSDP
    unit per decoder layer, then the root. The process group must already exist (accelerate made
    it). Returns `lm`, now also an FSDPModule."""
    from torch.distributed.fsdp import fully_shard
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    fully_shard(lm, reshard_after_forward=reshard_after_forward)
    # FSDP2 makes the first unit to run forward the root; passkey evaluation may call a decoder
    # layer before any lm.forward, so initialise now, as lm's first forward would
    lm._get_fsdp_state()._lazy_init()
    return lm


@contextlib.contextmanager
def gradient_sync(lm: nn.Module, enabled: bool):
    """FSDP's counterpart of DDP's `no_sync`: with enabled=False, backward keeps unsharded
    gradients locally (accumulating) instead of reduce-scattering them."""
    lm.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        lm.set_requires_gradient_sync(True)


@contextlib.contextmanager
def unsharded_root(lm: nn.Module):
    """Keep the root unit's parameters (embeddings, norm, LM head) gathered while code calls the
    model directly, not through `lm` (passkey generation): the decoder layers gather their own in
    their forward hooks, the root's hooks fire only on lm.forward."""
    lm.unshard()
    try:
        yield
    finally:
        lm.reshard()


def gather_trainable(model) -> dict[str, torch.Tensor]:
    """{name: full CPU tensor} of the memory-layer weights; every process gets them."""
    return {n: full(t).detach().cpu().contiguous() for n, t in model.trainable_state_dict().items()}


def load_trainable(lm: nn.Module, state: dict[str, torch.Tensor], prefix: str = "model.") -> None:
    """Copy full adapter tensors (named as in `model.trainable_state_dict()`) into the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    result = set_model_state_dict(lm, {prefix + n: t for n, t in state.items()},
                                  options=StateDictOptions(full_state_dict=True, strict=False))
    missing = [k for k in result.missing_keys if k[len(prefix):] in state]
    if missing or result.unexpected_keys:
        raise ValueError(f"FSDP adapter load: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")


def optimizer_state(lm: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full (unsharded) state, keyed by parameter name; every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(lm, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(lm: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Shard a full optimizer state (from `optimizer_state`) back into `optimizer`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(lm, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
