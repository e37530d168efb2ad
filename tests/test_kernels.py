"""knn_attention_reference against a naive per-query loop and against SDPA."""
import math

import pytest
import torch
import torch.nn.functional as F

from memformer.kernels import gather_memory, knn_attention, knn_attention_reference
from memformer.kernels import reference as ref_module


@pytest.fixture(params=["fused-local", "explicit-local"], autouse=True)
def local_path(request, monkeypatch):
    """Run every test with torch's fused CPU local attention and with the explicit fallback."""
    if request.param == "explicit-local":
        monkeypatch.setattr(ref_module, "_CPU_FLASH", None)
    return request.param


def naive(q, k_loc, v_loc, k_mem, v_mem, ids, q_mem, scale, bias):
    """One query at a time: explicit list of (logit, value) pairs, one softmax."""
    B, Hq, T, D = q.shape
    Hkv, S = k_loc.shape[1], k_loc.shape[2]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for t in range(T):
                logits, vals = [], []
                for s in range(S - T + t + 1):           # causal: key position <= query position
                    logits.append(float(q[b, h, t] @ k_loc[b, h // G, s]) * scale)
                    vals.append(v_loc[b, h // G, s])
                for j in ids[b, h, t].tolist():
                    if j >= 0:
                        logits.append(float(q_mem[b, h, t] @ k_mem[b, h // G, j]) * scale + bias[h])
                        vals.append(v_mem[b, h // G, j])
                p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
                out[b, h, t] = sum(pi * vi.double() for pi, vi in zip(p, vals))
    return out


@pytest.mark.parametrize("B,Hq,Hkv,T,S,M,K,D", [
    (1, 2, 2, 5, 5, 7, 3, 8),      # MHA
    (2, 3, 1, 4, 9, 6, 1, 16),     # GQA 3, queries are the last 4 of 9 cached keys, K = 1
    (1, 4, 1, 3, 3, 2, 5, 8),      # GQA 4, K larger than the memory -> -1 ids
    (1, 4, 2, 1, 6, 10, 4, 64),    # decode (T = 1)
])
def test_reference_matches_naive(B, Hq, Hkv, T, S, M, K, D):
    torch.manual_seed(0)
    q, q_mem = torch.randn(B, Hq, T, D), torch.randn(B, Hq, T, D)
    k_loc, v_loc = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    k_mem, v_mem = torch.randn(B, Hkv, M, D), torch.randn(B, Hkv, M, D)
    ids = torch.randint(0, M, (B, Hq, T, K))
    ids[..., -1] = -1 if K > 1 else ids[..., -1]             # some invalid slots
    if K > M:
        ids[..., M:] = -1
    bias = torch.randn(Hq)
    scale = 1 / math.sqrt(D)
    out, lse = knn_attention_reference(q, k_loc, v_loc, k_mem, v_mem, ids, q_mem=q_mem, scale=scale, mem_bias=bias)
    want = naive(q, k_loc, v_loc, k_mem, v_mem, ids, q_mem, scale, bias.tolist())
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert lse.shape == (B, Hq, T)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (6, 2), (4, 1)])
def test_no_memory_equals_sdpa(Hq, Hkv):
    torch.manual_seed(1)
    q, k, v = torch.randn(2, Hq, 7, 16), torch.randn(2, Hkv, 7, 16), torch.randn(2, Hkv, 7, 16)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for k_mem, ids in [(None, None), (torch.randn(2, Hkv, 0, 16), torch.full((2, Hq, 7, 3), -1)),
                       (torch.randn(2, Hkv, 5, 16), torch.full((2, Hq, 7, 3), -1))]:
        out, lse = knn_attention(q, k, v, k_mem, k_mem, ids)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_lse_merges_partials():
    """lse lets partial attentions merge: local-only and memory-only halves recombine exactly."""
    torch.manual_seed(2)
    B, H, T, D, M, K = 1, 2, 4, 8, 6, 3
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    k_mem, v_mem = torch.randn(B, H, M, D), torch.randn(B, H, M, D)
    ids = torch.randint(0, M, (B, H, T, K))
    full, lse_full = knn_attention(q, k, v, k_mem, v_mem, ids)
    loc, lse_loc = knn_attention(q, k, v)
    no_local = torch.zeros(T, T, dtype=torch.bool)
    mem, lse_mem = knn_attention(q, k, v, k_mem, v_mem, ids, local_mask=no_local)
    m = torch.maximum(lse_loc, lse_mem)
    wa, wb = torch.exp(lse_loc - m)[..., None], torch.exp(lse_mem - m)[..., None]
    torch.testing.assert_close((wa * loc + wb * mem) / (wa + wb), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.logaddexp(lse_loc, lse_mem), lse_full, atol=1e-5, rtol=1e-5)


def test_gather_memory_groups_query_heads():
    mem = torch.arange(2 * 2 * 5 * 1, dtype=torch.float32).view(2, 2, 5, 1)   # [B=2, Hkv=2, M=5, D=1]
    ids = torch.tensor([0, 4]).view(1, 1, 1, 2).expand(2, 4, 1, 2)           # Hq = 4 -> groups of 2
    g = gather_memory(mem, ids)                                              # [2, 4, 1, 2, 1]
    for b in range(2):
        for h in range(4):
            assert g[b, h, 0, :, 0].tolist() == [mem[b, h // 2, 0, 0].item(), mem[b, h // 2, 4, 0].item()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_rows_equals_gather_then_sum(dtype):
    """The embedding_bag path (float32 rows) and the gather path give sum_k p_k v[ids_k], with -1
    ids carrying p = 0, rows that are a slice of a larger buffer, and the gradient w.r.t. p."""
    torch.manual_seed(5)
    buf = torch.randn(2, 3, 40, 16).to(dtype)
    mem = buf[:, :, :33]                                                     # [B, Hkv, M, D], a view
    ids = torch.randint(-1, 33, (2, 6, 7, 5))                                # [B, Hq, T, K]
    p = torch.rand(2, 6, 7, 5).masked_fill(ids < 0, 0.0).requires_grad_(True)
    out = ref_module.weighted_rows(mem, ids, p)                              # [B, Hq, T, D]
    p2 = p.detach().clone().requires_grad_(True)
    want = torch.einsum("bhtk,bhtkd->bhtd", p2, gather_memory(mem, ids).float())
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(p.grad, p2.grad, atol=1e-5, rtol=1e-5)


def test_memory_probs_sum_with_local_to_one():
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    k_mem, v_mem = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    ids = torch.tensor([0, 1, 2, -1]).view(1, 1, 1, 4).expand(1, 2, 3, 4)
    _, _, p = knn_attention(q, k, v, k_mem, v_mem, ids, return_mem_probs=True)
    assert p.shape == (1, 2, 3, 4)
    assert torch.all(p[..., 3] == 0) and torch.all(p.sum(-1) < 1)


def test_kernel_benchmark_baselines_compute_the_same_attention():
    """benchmarks/kernel_speed.py's SDPA-over-pregathered-keys baseline is the same attention (CPU, tiny)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).parents[1] / "benchmarks" / "kernel_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    x = bench.make_case(1, 4, 2, 5, 7, 30, 3, 16, torch.float32, "cpu")
    want, _ = knn_attention_reference(**x)
    got = bench.sdpa_pregathered(x)().view(1, 4, 5, 16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert bench.bytes_moved(1, 4, 2, 5, 7, 3, 16, 2) > 0


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("Hq,Hkv,S", [(9, 3, 1), (9, 3, 37), (4, 1, 12), (2, 2, 5)])
def test_one_query_local_attention_matches_the_explicit_softmax(mask_kind, Hq, Hkv, S, local_path):
    """A generated token's local attention (T = 1): the fused path groups a kv group's query heads
    on one axis instead of copying the keys per head; out and lse equal the explicit softmax."""
    torch.manual_seed(3)
    B, D = 2, 16
    q, k, v = torch.randn(B, Hq, 1, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    mask = None
    if mask_kind != "none":
        keep = torch.rand(B, 1, 1, S) > 0.4
        keep[..., -1] = True                                      # the token itself
        mask = keep if mask_kind == "bool" else torch.zeros(B, 1, 1, S).masked_fill(~keep, float("-inf"))
    out, lse = ref_module.local_attention(q, k, v, 0.25, mask)
    s = torch.einsum("bhd,bhsd->bhs", q[:, :, 0], k.repeat_interleave(Hq // Hkv, 1)) * 0.25   # [B, Hq, S]
    if mask is not None:
        s = s + ref_module._additive_mask(mask, 1, S, q.device)[:, :, 0]
    want_lse = torch.logsumexp(s, -1)                                                         # [B, Hq]
    want = torch.einsum("bhs,bhsd->bhd", torch.softmax(s, -1), v.repeat_interleave(Hq // Hkv, 1))
    torch.testing.assert_close(out[:, :, 0], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[:, :, 0], want_lse, atol=1e-5, rtol=1e-5)
