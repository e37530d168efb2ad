"""Fused Triton kNN attention vs the torch reference, forward and backward.

Runs on CPU only under TRITON_INTERPRET=1 set before Python starts (`make test` does a second
pytest run with it); on a CUDA machine it runs compiled. Tiny fp32 shapes in the interpreter.
"""
import os

import pytest
import torch

from memformer.kernels import TRITON_AVAILABLE, knn_attention, knn_attention_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not TRITON_AVAILABLE or not (INTERPRET or torch.cuda.is_available()),
                                reason="needs triton and CUDA, or TRITON_INTERPRET=1 set before Python starts")
DEV = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"


def inputs(B, Hq, Hkv, T, S, M, K, D, seed=0, dtype=torch.float32, invalid=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype)
    ids = torch.randint(0, max(M, 1), (B, Hq, T, K), generator=g)
    if invalid:
        ids[..., 0] = -1                                    # an empty slot in every row
    if K > M:
        ids[..., M:] = -1
    return dict(q=r(B, Hq, T, D), k_local=r(B, Hkv, S, D), v_local=r(B, Hkv, S, D),
                k_mem=r(B, Hkv, M, D), v_mem=r(B, Hkv, M, D), mem_ids=ids.to(DEV),
                q_mem=r(B, Hq, T, D), mem_bias=r(Hq))


SHAPES = [  # B, Hq, Hkv, T, S, M, K, D
    (1, 2, 2, 19, 19, 23, 5, 64),      # T not a multiple of the block, MHA
    (2, 3, 1, 7, 12, 9, 1, 64),        # GQA 3, queries = last 7 of 12, K = 1
    (1, 4, 1, 5, 5, 3, 6, 64),         # GQA 4, K larger than the memory
    (1, 4, 2, 3, 3, 10, 4, 128),       # head_dim 128
]


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(shape):
    x = inputs(*shape)
    out, lse = knn_attention(**x)
    ref, ref_lse = knn_attention_reference(**x)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("splits", [2, 5])
def test_decode_split_merges_by_lse(splits):
    from memformer.kernels.triton_knn import knn_attention_triton
    x = inputs(1, 4, 2, 1, 70, 40, 24, 64)                 # T = 1: work split over keys
    out, lse = knn_attention_triton(**x, splits=splits)
    ref, ref_lse = knn_attention_reference(**x)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


def test_all_ids_invalid_or_empty_memory_is_local_attention():
    x = inputs(1, 2, 1, 6, 6, 5, 3, 64)
    x["mem_ids"][:] = -1
    local, _ = knn_attention_reference(x["q"], x["k_local"], x["v_local"])
    torch.testing.assert_close(knn_attention(**x)[0], local, atol=2e-5, rtol=2e-5)
    x["k_mem"], x["v_mem"] = x["k_mem"][:, :, :0], x["v_mem"][:, :, :0]
    torch.testing.assert_close(knn_attention(**x)[0], local, atol=2e-5, rtol=2e-5)


def test_int8_memory_with_scales():
    x = inputs(1, 3, 1, 4, 4, 8, 3, 64)
    scale_k = x["k_mem"].abs().amax(-1) / 127                                # [B, Hkv, M]
    scale_v = x["v_mem"].abs().amax(-1) / 127
    k8 = torch.round(x["k_mem"] / scale_k[..., None]).to(torch.int8)
    v8 = torch.round(x["v_mem"] / scale_v[..., None]).to(torch.int8)
    x8 = {**x, "k_mem": k8, "v_mem": v8, "k_scale": scale_k, "v_scale": scale_v}
    out, _ = knn_attention(**x8)
    ref, _ = knn_attention_reference(**x8)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    full, _ = knn_attention_reference(**x)                                   # close to unquantised
    assert (out - full).abs().max() < 0.05


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("mem_grad", [False, True])
def test_backward_matches_reference(shape, mem_grad):
    x = inputs(*shape)
    names = ["q", "k_local", "v_local", "q_mem", "mem_bias"] + (["k_mem", "v_mem"] if mem_grad else [])
    for n in names:
        x[n].requires_grad_(True)
    out, _ = knn_attention(**x, mem_grad=mem_grad)
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, [x[n] for n in names], go)
    ref, _ = knn_attention_reference(**x)
    want = torch.autograd.grad(ref, [x[n] for n in names], go)
    for n, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5, msg=f"grad of {n}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="compiled kernel needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_gpu(dtype):
    x = inputs(2, 9, 3, 300, 300, 5000, 32, 64, dtype=dtype)
    out, _ = knn_attention(**x)
    ref, _ = knn_attention_reference(**{k: (v.float() if v.is_floating_point() else v) for k, v in x.items()})
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_memory_layers_dispatch_to_the_kernel(monkeypatch):
    """A tiny model reading memory gives the same logits through the kernel as through torch."""
    import memformer.kernels as kernels
    from conftest import tiny_backbone
    from memformer import MemformerForCausalLM, MemoryConfig
    model = MemformerForCausalLM(tiny_backbone(head_dim=16), None, MemoryConfig(window=16, top_k=4, overlap=3))
    model.memorize(torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0)), show_progress=False)
    x = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    calls = []
    real = kernels._use_triton
    monkeypatch.setattr(kernels, "_use_triton", lambda *a: calls.append(real(*a)) or calls[-1])
    with torch.no_grad():
        fused = model(x).logits
    assert calls and all(calls)
    monkeypatch.setattr(kernels, "_use_triton", lambda *a: False)
    with torch.no_grad():
        torch.testing.assert_close(fused, model(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not INTERPRET, reason="uses a lazily backed CPU tensor larger than 2^31 elements")
@pytest.mark.parametrize("B,Hkv,M", [
    (1, 3, (1 << 23) + 64),        # kv head 2 starts at 2 * M * 128 > 2^31 elements (int32 stride)
    (1, 1, (1 << 24) + 64),        # rows past 2^24 start beyond 2^31 elements
])
def test_memory_offsets_beyond_2_31(B, Hkv, M):
    """Memory rows read at element offsets beyond 2^31 in an int8 bank of 2-3 GiB that is never
    written except at the rows read (torch.empty maps it lazily): an int32 offset would wrap and
    read other rows (or fault)."""
    from memformer.kernels.triton_knn import knn_attention_triton
    D, T, K = 128, 3, 4
    Hq = 2 * Hkv
    try:
        bank = torch.empty(B, Hkv, M, D, dtype=torch.int8)     # k_mem and v_mem: the same bank
        scales = torch.empty(B, Hkv, M)
    except RuntimeError as e:                                   # no address space for it
        pytest.skip(f"cannot map a {B * Hkv * M * D / 2**30:.1f} GiB bank: {e}")
    assert (Hkv - 1) * M * D + (M - 1) * D >= 2 ** 31
    g = torch.Generator().manual_seed(7)
    ids = (M - 1 - torch.randint(0, 48, (B, Hq, T, K), generator=g))       # rows at the end
    ids[..., 0] = torch.randint(0, 16, (B, Hq, T), generator=g)             # and at the start
    used = torch.unique(ids)
    small_k = torch.randint(-127, 128, (B, Hkv, used.numel(), D), generator=g, dtype=torch.int8)
    small_s = torch.rand(B, Hkv, used.numel(), generator=g) / 100 + 1e-3
    bank[:, :, used] = small_k                                  # touches only these rows' pages
    scales[:, :, used] = small_s
    x = dict(q=torch.randn(B, Hq, T, D, generator=g), k_local=torch.randn(B, Hkv, T, D, generator=g),
             v_local=torch.randn(B, Hkv, T, D, generator=g))
    out, lse = knn_attention_triton(**x, k_mem=bank, v_mem=bank, mem_ids=ids, k_scale=scales, v_scale=scales)
    compact = torch.searchsorted(used, ids)                     # the same rows in a small bank
    ref, ref_lse = knn_attention_reference(**x, k_mem=small_k, v_mem=small_k, mem_ids=compact,
                                           k_scale=small_s, v_scale=small_s)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)
