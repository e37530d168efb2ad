"""memformer.kernels: kNN attention (local causal window + retrieved memory in one softmax).

`knn_attention` is the one entry point the memory layers call. It runs the fused Triton kernel
(`triton_knn.py`) for CUDA tensors — and for CPU tensors under TRITON_INTERPRET=1, which is how
the tests check it — and the pure-torch reference (`reference.py`) otherwise, or when a call
needs something only the reference does (a padding mask, the per-slot memory probabilities,
reusing search scores on CPU). Nothing here imports triton or touches CUDA at import time.
"""
import importlib.util
import os

from .reference import gather_memory, knn_attention_reference

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def _use_triton(q, local_mask, return_mem_probs) -> bool:
    if not TRITON_AVAILABLE or local_mask is not None or return_mem_probs:
        return False
    if q.shape[-1] not in (16, 32, 64, 128):
        return False
    return q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def knn_attention(q, k_local, v_local, k_mem=None, v_mem=None, mem_ids=None, *, q_mem=None, mem_scores=None,
                  scale=None, local_mask=None, mem_bias=None, k_scale=None, v_scale=None,
                  return_mem_probs: bool = False, mem_grad: bool = False):
    """Dispatch kNN attention; shapes and arguments as in `knn_attention_reference`.

    mem_grad: with the Triton path, also return gradients for the memory rows read.
    """
    if _use_triton(q, local_mask, return_mem_probs):
        from .triton_knn import KNNAttentionFunction, knn_attention_triton
        import torch
        if torch.is_grad_enabled() and k_scale is None and any(
                x is not None and x.requires_grad for x in (q, k_local, v_local, k_mem, v_mem, q_mem, mem_bias)):
            return KNNAttentionFunction.apply(q, k_local, v_local, k_mem, v_mem, mem_ids, q_mem, mem_bias,
                                              scale, mem_grad)
        return knn_attention_triton(q, k_local, v_local, k_mem, v_mem, mem_ids, q_mem=q_mem, scale=scale,
                                    mem_bias=mem_bias, k_scale=k_scale, v_scale=v_scale)
    return knn_attention_reference(q, k_local, v_local, k_mem, v_mem, mem_ids, q_mem=q_mem, mem_scores=mem_scores,
                                   scale=scale, local_mask=local_mask, mem_bias=mem_bias, k_scale=k_scale,
                                   v_scale=v_scale, return_mem_probs=return_mem_probs)


__all__ = ["knn_attention", "knn_attention_reference", "gather_memory", "TRITON_AVAILABLE"]
