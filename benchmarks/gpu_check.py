"""The GPU parts of `benchmarks/gpu_check.sh` that have no benchmark of their own.

    python benchmarks/gpu_check.py index  --keys 1M --out benchmarks/results/gpu
    python benchmarks/gpu_check.py ingest --tokens 1M --out benchmarks/results/gpu

index: one (sequence, kv head) group of synthetic clustered keys (benchmarks/index.py's generator),
    head_dim 64, added 65,536 at a time on the device: exact search (`ExactIndex` on the GPU: torch
    matmul + top-k) against `FaissIndex(kind="ivf")` with its defaults (faiss-gpu when the `faiss`
    module has GPU support, else the CPU index, said in the row); one window of 2048 queries, top-32,
    recall on the same queries' exact top-32, best of 3 timed calls.
ingest: `memorize` of `--tokens` tokens into the default all-layer memory of a backbone with
    SmolLM2-135M's shape (the embedded default when it is cached locally, else the same config
    with random weights: the speed of reading does not depend on the weights), bf16, on the GPU;
    tokens/s, peak GPU memory and bytes per token of the stored memory.
Each writes gpu_<part>.json and prints one line; the GPU's name is in every file.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memformer.eval.passkey import parse_length  # noqa: E402


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int = 3):
    best, out = math.inf, None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def check_index(args, device) -> dict:
    import importlib.util
    from memformer.index import ExactIndex, FaissIndex
    spec = importlib.util.spec_from_file_location("index_benchmark", Path(__file__).with_name("index.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    n = parse_length(args.keys)
    keys = bench.make_keys(n, 64, 4096, 0)
    queries = bench.make_queries(keys, 2048, 0).to(device)[None, None]        # [1, 1, q, D]
    exact = ExactIndex((1, 1), 64, device=device)
    t0 = time.perf_counter()
    for a in range(0, n, 65536):
        exact.add(keys[None, None, a:a + 65536].to(device))
    exact_add = time.perf_counter() - t0
    exact_s, (_, truth) = timed(lambda: exact.search(queries, 32), device)
    del exact
    import faiss
    gpu_faiss = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    ivf = FaissIndex((1, 1), 64, kind="ivf", device=device)
    t0 = time.perf_counter()
    for a in range(0, n, 65536):
        ivf.add(keys[None, None, a:a + 65536].to(device))
    ivf_add = time.perf_counter() - t0
    t0 = time.perf_counter()
    ivf.search(queries, 32)                                                   # calibrates nprobe
    first = time.perf_counter() - t0
    ivf_s, (_, ids) = timed(lambda: ivf.search(queries, 32), device)
    hit = (ids[0, 0, :, :, None] == truth[0, 0, :, None, :]).any(-1).float().mean().item()
    return dict(part="index", gpu=device_name(device), keys=n, exact_add_s=round(exact_add, 2),
                exact_search_ms=round(exact_s * 1e3, 2), ivf=("faiss-gpu" if gpu_faiss else "faiss-cpu"),
                ivf_add_s=round(ivf_add, 2), nlist=ivf.nlist_trained, nprobe=ivf.nprobes[0],
                ivf_first_search_ms=round(first * 1e3, 1), ivf_search_ms=round(ivf_s * 1e3, 2),
                recall_at_32=round(hit, 4), speedup=round(exact_s / ivf_s, 2))


def smollm2_shaped(device):
    """The embedded default backbone when it is cached, else SmolLM2-135M's config with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from memformer.loading import cache_root
    cached = sorted((cache_root() / "models").glob("*/config.json")) if (cache_root() / "models").is_dir() else []
    if cached:
        from memformer.loading import load_backbone
        backbone, _ = load_backbone(None)
        return backbone.to(device, torch.bfloat16), "SmolLM2-135M-Instruct (embedded default)"
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rope_theta=100000.0, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device, torch.bfloat16).eval(), "SmolLM2-135M shape, random weights"


def check_ingest(args, device) -> dict:
    from memformer import MemformerForCausalLM, MemoryConfig
    n = parse_length(args.tokens)
    backbone, label = smollm2_shaped(device)
    model = MemformerForCausalLM(backbone, None, MemoryConfig())
    ids = torch.randint(0, backbone.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(1))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    model.memorize(ids.to(device), show_progress=True)
    sync(device)
    sec = time.perf_counter() - t0
    stored = sum(t.numel() * t.element_size() for t in model.state.to_tensors().values())
    return dict(part="ingest", gpu=device_name(device), backbone=label, tokens=n, seconds=round(sec, 1),
                tokens_per_s=round(n / sec), memory_bytes_per_token=round(stored / n),
                peak_gpu_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["index", "ingest"])
    ap.add_argument("--keys", default="1M")
    ap.add_argument("--tokens", default="1M")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/gpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    row = check_index(args, device) if args.part == "index" else check_ingest(args, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu_{args.part}.json").write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
