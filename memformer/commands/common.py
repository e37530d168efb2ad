"""Arguments and model loading shared by the sub-commands."""
from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF folder, .gguf file or cached hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, help="memory-layer weights saved by save_pretrained")
    p.add_argument("--window", type=int, default=1024, help="local window W in tokens")
    p.add_argument("--top-k", type=int, default=32, help="memory keys retrieved per query head")
    p.add_argument("--memory-layers", default=None, help="comma-separated layer indices (default: all)")
    p.add_argument("--position-mode", default="window", choices=["first", "fixed", "window"])
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--memory-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"])
    p.add_argument("--index", default="exact", help="exact | faiss-flat | faiss-ivf | faiss-hnsw | faiss-ivfpq")
    p.add_argument("--storage-dir", default=None, help="keep memory rows in memory-mapped files here (index exact)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def memory_config_from_args(args):
    from memformer import MemoryConfig
    layers = None if not args.memory_layers else [int(x) for x in args.memory_layers.split(",")]
    return MemoryConfig(window=args.window, top_k=args.top_k, memory_layers=layers, position_mode=args.position_mode,
                        sink_tokens=args.sink_tokens, memory_dtype=args.memory_dtype, index=args.index,
                        storage_dir=args.storage_dir)


def load_model(args):
    """MemformerForCausalLM from the --model/--adapter/memory arguments."""
    import torch
    from memformer import MemformerForCausalLM
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = None if args.adapter else memory_config_from_args(args)
    return MemformerForCausalLM.from_pretrained(args.model, cfg, adapter=args.adapter)
