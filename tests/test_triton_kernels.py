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


def assert_grads_match(x: dict, names: list[str], mem_grad: bool) -> None:
    """Gradients of the fused kernel w.r.t. x[names] equal the torch reference's."""
    for n in names:
        x[n].requires_grad_(True)
    out, _ = knn_attention(**x, mem_grad=mem_grad)
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, [x[n] for n in names], go)
    ref, _ = knn_attention_reference(**x)
    want = torch.autograd.grad(ref, [x[n] for n in names], go)
    for n, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5, msg=f"grad of {n}")


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("mem_grad", [False, True])
def test_backward_matches_reference(shape, mem_grad):
    x = inputs(*shape)
    names = ["q", "k_local", "v_local", "q_mem", "mem_bias"] + (["k_mem", "v_mem"] if mem_grad else [])
    assert_grads_match(x, names, mem_grad)


# Several row blocks (G*T > 64) and key tiles (S > 64): causal tile skipping, mask-free tiles, the
# last partial tile, rows of one block spanning tokens of several heads (G = 3 does not divide 64).
BLOCK_SHAPES = [  # B, Hq, Hkv, T, S, M, K, D
    (1, 3, 1, 37, 100, 20, 3, 32),     # queries the last 37 of 100 keys, GQA 3
    (1, 2, 2, 70, 70, 9, 2, 16),       # T = S, MHA, 70 rows per head
    (2, 4, 1, 23, 129, 11, 5, 32),     # GQA 4, one key past two whole tiles
]


@pytest.mark.parametrize("shape", BLOCK_SHAPES)
@pytest.mark.parametrize("q_mem", [True, False])
def test_prefill_blocks_and_causal_skipping(shape, q_mem):
    x = inputs(*shape)
    if not q_mem:
        x.pop("q_mem")
    out, lse = knn_attention(**x)
    ref, ref_lse = knn_attention_reference(**x)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("shape", [(1, 4, 2, 1, 300, 40, 24, 32), (1, 3, 3, 1, 20, 50, 17, 16),
                                   (1, 8, 1, 2, 129, 7, 9, 32)])
def test_decode_default_splits(shape):
    """Decoding picks several splits by itself (more than the key tiles when K is large: some
    programs read only memory slots); the merge kernel combines them."""
    from memformer.kernels.triton_knn import _fwd_launch
    x = inputs(*shape)
    grid = _fwd_launch(**x)[0]
    assert grid[2] > 1
    out, lse = knn_attention(**x)
    ref, ref_lse = knn_attention_reference(**x)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("shape", [SHAPES[0], BLOCK_SHAPES[0], (1, 4, 2, 1, 100, 5, 1, 64)])
def test_without_memory_compiles_the_loop_out(shape):
    from memformer.kernels.triton_knn import _fwd_launch
    x = inputs(*shape)
    x = {k: x[k] for k in ("q", "k_local", "v_local")}
    assert _fwd_launch(**x)[2]["HAS_MEMORY"] is False
    out, lse = knn_attention(**x)
    ref, ref_lse = knn_attention_reference(**x)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


def test_kv_head_ids_and_strided_views_are_read_in_place():
    """ids per kv head are shared by the group's query heads; q as a [B, T, H, D] transpose and a
    memory bank that is a slice of a larger one are read through their strides."""
    from memformer.kernels.triton_knn import _fwd_launch
    B, Hq, Hkv, T, S, M, K, D = 1, 6, 2, 5, 9, 12, 4, 32
    x = inputs(B, Hq, Hkv, T, S, M, K, D)
    x["mem_ids"] = x["mem_ids"][:, ::3].contiguous()                      # [B, Hkv, T, K]
    x["q"] = x["q"].transpose(1, 2).contiguous().transpose(1, 2)          # strides of [B, T, Hq, D]
    big = torch.randn(B, Hkv, 2 * M, D, generator=torch.Generator().manual_seed(3)).to(DEV)
    x["k_mem"] = big[:, :, M:]                                             # not contiguous
    args = _fwd_launch(**x)[1]
    assert args[4].data_ptr() == x["k_mem"].data_ptr()                    # no copy of the bank
    out, lse = knn_attention(**x)
    ref, ref_lse = knn_attention_reference(**x)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("shape", BLOCK_SHAPES + [(1, 2, 1, 1, 70, 5, 7, 16)])
@pytest.mark.parametrize("mem_grad,q_mem,bias", [(True, True, True), (False, False, False), (True, False, True)])
def test_backward_blocks(shape, mem_grad, q_mem, bias):
    """Key-major dK/dV over several row blocks (masked, then mask-free), row-major dQ, the memory
    scatter with repeated rows (M small against T*K), q_mem = q, no gate."""
    x = inputs(*shape)
    if not q_mem:
        x.pop("q_mem")
    if not bias:
        x.pop("mem_bias")
    names = ["q", "k_local", "v_local"] + (["q_mem"] if q_mem else []) + (["mem_bias"] if bias else [])
    names += ["k_mem", "v_mem"] if mem_grad else []
    assert_grads_match(x, names, mem_grad)


def test_backward_without_memory_gradients_allocates_no_memory_buffers():
    from memformer.kernels.triton_knn import _bwd_launches
    x = inputs(1, 2, 1, 4, 4, 1000, 3, 16)
    out, lse = knn_attention(**x)
    launches, grads = _bwd_launches(x["q"], x["k_local"], x["v_local"], x["k_mem"], x["v_mem"], x["mem_ids"],
                                    x["q_mem"], x["mem_bias"], out, lse, torch.ones_like(out), None, False)
    assert grads["k_mem"] is None and grads["v_mem"] is None
    assert len(launches) == 3                                            # no scatter kernel
    inputs_ = {t.data_ptr() for t in x.values()}
    made = [a for _, _, args, _ in launches for a in args if torch.is_tensor(a) and a.data_ptr() not in inputs_]
    assert made and all(a.numel() < x["k_mem"].numel() for a in made)   # nothing memory-sized


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
    model = MemformerForCausalLM(tiny_backbone(head_dim=16), None, MemoryConfig(window=16, top_k=4, overlap=3, layer_blocks=0))   # kNN reads: the kernel
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


def test_kernel_benchmark_sweep_runs_end_to_end(tmp_path):
    """benchmarks/kernel_speed.py's sweep (prefill, forward+backward, decode) on tiny shapes with a
    stand-in timer, so the GPU script's code paths are exercised before a GPU runs them."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).parents[1] / "benchmarks" / "kernel_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []
    timer = lambda fn: (fn(), calls.append(1), 1.0)[2]
    tiny = dict(heads=[(2, 1, 64)], mems=[40], prefill=9, decode_s=20, batches=(1, 2), K=3)
    rows = bench.sweep(tiny, torch.float32, DEV, timer, "test", 1e12, 1e14, None, log=lambda r: None)
    assert [r["phase"] for r in rows] == ["prefill", "forward+backward", "forward+backward", "decode", "decode"]
    assert len(calls) == 3 + 2 * 2 + 2 * 3
    md = bench.write(rows, tmp_path, "# test\n")
    assert md.read_text().count("\n| ") == len(rows) + 1
