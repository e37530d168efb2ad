"""Cross-entropy of a frozen vocabulary projection, chunked over tokens (Liger-Kernel's fused
linear cross-entropy, in plain torch).

The plain path, `F.cross_entropy(head(h).float(), y)`, materialises [N, V] logits (SmolLM2:
V = 49152, so 150 MB for the 750 tokens of one training window), then a log-softmax, its
backward and the one-hot gradient, each another pass over [N, V] in memory. Here the logits of `chunk` tokens at a time are
turned into their loss and, when the input needs a gradient, straight into the gradient with
respect to the input, (softmax - onehot) @ W, so no [N, V] tensor ever exists and every
element is touched while it is in cache. Rows are independent, so the saved [N, H] gradient times
the incoming per-token gradient is the exact backward.

Only for a head that trains nothing (memformer's backbone is frozen; SmolLM2 ties the head to the
embeddings): `linear_cross_entropy` falls back to the plain path when the weight needs a gradient
or the head has a bias.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_CHUNK = 256        # tokens per chunk: [256, 49152] float32 logits = 48 MB


class _ChunkedLinearCE(torch.autograd.Function):
    """forward(h [N, H], weight [V, H], targets [N] long, chunk) -> ce [N] float32."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        N = h.shape[0]
        ce = torch.empty(N, dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        for s in range(0, N, chunk):
            y = targets[s:s + chunk]                                           # [c]
            z = F.linear(h[s:s + chunk], weight).float()                       # [c, V]
            lse = torch.logsumexp(z, dim=-1)                                   # [c]
            ce[s:s + chunk] = lse - z.gather(1, y[:, None]).squeeze(1)
            if grad is not None:
                # d ce / d z = softmax(z) - onehot(y), computed in place in the logits' buffer
                z.sub_(lse[:, None]).exp_()
                z[torch.arange(z.shape[0], device=z.device), y] -= 1.0
                grad[s:s + chunk] = z.to(weight.dtype) @ weight                # [c, H]
        if grad is not None:
            ctx.save_for_backward(grad)
        return ce

    @staticmethod
    def backward(ctx, grad_ce):
        (grad,) = ctx.saved_tensors
        return grad * grad_ce[:, None].to(grad.dtype), None, None, None       # [N, H]


def linear_cross_entropy(h: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                         chunk: int = _CHUNK) -> torch.Tensor:
    """Per-token cross-entropy of `head(h)` (logits in float32) against `targets`.

    h: [N, H] hidden states; head: the vocabulary projection (an nn.Linear, weight [V, H]);
    targets: [N] token ids. Returns ce [N] float32, differentiable with respect to h; equal to
    `F.cross_entropy(head(h).float(), targets, reduction="none")` up to float rounding."""
    weight = getattr(head, "weight", None)
    if (not isinstance(head, nn.Linear) or head.bias is not None or weight.requires_grad
            or h.dim() != 2 or chunk < 1):
        return F.cross_entropy(head(h).float(), targets, reduction="none")
    if h.shape[0] == 0:
        return h.new_zeros(0, dtype=torch.float32) + h.sum() * 0.0             # keeps the graph
    return _ChunkedLinearCE.apply(h, weight, targets, chunk)
