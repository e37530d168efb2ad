"""memformer.kernels: kNN attention (local causal window + retrieved memory in one softmax).

`knn_attention` is the one entry point the memory layers call. Today it runs the pure-torch
reference; the fused Triton kernel plugs in here (chosen for CUDA tensors) without the callers
changing. Nothing here touches CUDA at import.
"""
from .reference import gather_memory, knn_attention_reference


def knn_attention(q, k_local, v_local, k_mem=None, v_mem=None, mem_ids=None, **kwargs):
    """Dispatch kNN attention; see `knn_attention_reference` for shapes and arguments."""
    return knn_attention_reference(q, k_local, v_local, k_mem, v_mem, mem_ids, **kwargs)


__all__ = ["knn_attention", "knn_attention_reference", "gather_memory"]
