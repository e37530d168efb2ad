"""What the fault suite runs on: tiny random models built in code, a byte tokenizer, documents,
and the operations a child process performs while the parent kills it (`python
benchmarks/faults.py child OP ...`).

Every operation is deterministic (seeded models, fixed texts), so an interrupted and resumed run
can be compared bit for bit with an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MEMORY = dict(window=48, sink_tokens=2, overlap=8, top_k=4)
VOCAB = 260                     # 256 bytes + end of text, room to spare


class ByteTokenizer:
    """UTF-8 bytes shifted by one; 0 is end-of-text and padding."""
    eos_token_id = pad_token_id = 0
    eos_token = pad_token = "<eos>"
    chat_template = None

    def __call__(self, text, add_special_tokens=False, **kw):
        return {"input_ids": [b + 1 for b in text.encode()]}

    def decode(self, ids, skip_special_tokens=True, **kw):
        ids = ids.tolist() if torch.is_tensor(ids) else ids
        return bytes(i - 1 for i in ids if 0 < i < 257).decode(errors="replace")


def tiny_backbone(seed: int = 0, vocab: int = VOCAB):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def tiny_model(**memory):
    from memformer import MemformerForCausalLM, MemoryConfig
    return MemformerForCausalLM(tiny_backbone(), ByteTokenizer(), MemoryConfig(**{**MEMORY, **memory}))


def hashed_embedder():
    from tests.conftest import HashedWords
    return HashedWords()


def use_hashed_embedder() -> None:
    """Question reads and RAG use the hashed-words stand-in instead of MiniLM (no download)."""
    import memformer.passages
    import memformer.qa.rag
    emb = hashed_embedder()
    memformer.passages.default_embedder = lambda: emb
    memformer.qa.rag.default_embedder = lambda: emb


def text(i: int, words: int = 120) -> str:
    rng = random.Random(i)
    vocab = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "river", "stone", "lamp", "north"]
    return f"Chunk {i}. " + " ".join(rng.choice(vocab) for _ in range(words)) + "."


def write_docs(folder: Path, n: int, words: int = 60) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"doc{i:03d}.txt").write_text(text(1000 + i, words))
    return folder


def tiny_model_folder(folder: Path) -> Path:
    """A Hugging Face folder the CLI can load with --model: the tiny backbone and a byte-level
    tokenizer (fast tokenizer, one token per byte, id 0 = end of text)."""
    if (folder / "config.json").is_file():
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<eos>": 0, **{ch: i + 1 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    tiny_backbone().save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- child operations
def _say(msg: str) -> None:
    print(msg, flush=True)


def op_save_memory(out: str, chunks: str) -> None:
    """Memorize chunk after chunk, saving the memory after each (`model.save_memory`); an
    existing memory at `out` is loaded first and continued (resume)."""
    model = tiny_model()
    n, out = int(chunks), Path(out)
    done = 0
    if (out / "manifest.json").is_file() or any(out.parent.glob(f".{out.name}.old-*")):
        model.load_memory(out)
        done = len(model.state.doc_starts[0])
    _say(f"ready {done}")
    for i in range(done, n):
        model.memorize(text(i), show_progress=False)
        _say(f"saving {i + 1}")
        model.save_memory(out)
        _say(f"saved {i + 1}")


def op_qa_cache(cache: str, sets: str) -> None:
    """Read document set after document set with a QA cache (`LongDocQA.read(cache_dir=)`):
    each set is memorized and written to the cache, or loaded from it."""
    from memformer.qa.longdoc import LongDocQA
    use_hashed_embedder()
    model = tiny_model()
    _say("ready")
    for s in range(int(sets)):
        qa = LongDocQA(model).read([text(2000 + 10 * s + j, 150) for j in range(3)], cache_dir=cache,
                                   show_progress=False)
        _say(f"read {s} {'cached' if qa.from_cache else 'built'}")


def op_qa_save_loop(path: str, rounds: str) -> None:
    """Write the same QA memory to `path` again and again (a concurrent writer)."""
    from memformer.qa.longdoc import LongDocQA
    use_hashed_embedder()
    qa = LongDocQA(tiny_model()).read([text(2000 + j, 150) for j in range(3)], show_progress=False)
    _say("ready")
    for r in range(int(rounds)):
        qa.save(path)
        _say(f"saved {r}")


def op_qa_load_loop(path: str, rounds: str) -> None:
    """Load the QA memory at `path` again and again and check it (a concurrent reader)."""
    from memformer.qa.longdoc import LongDocQA
    use_hashed_embedder()
    model = tiny_model()
    ref = LongDocQA(tiny_model()).read([text(2000 + j, 150) for j in range(3)], show_progress=False)
    want = ref.model.state.to_tensors()
    _say("ready")
    for r in range(int(rounds)):
        qa = LongDocQA.load(model, path)
        got = qa.model.state.to_tensors()
        same = got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want
                                                 if not k.startswith("passage"))
        _say(f"loaded {r} {'ok' if same else 'MISMATCH'}")
        if not same:
            sys.exit(3)


def op_train(out: str, steps: str) -> None:
    """The crossbatch recipe on the tiny model, checkpointing every 2 steps, resuming any
    checkpoint in `out` (checkpoint.resume=auto)."""
    from memformer.training import CrossbatchRecipe, TrainConfig
    from memformer.training.config import apply_overrides
    out = Path(out)
    src = out.parent / "train_docs.jsonl"
    if not src.is_file():
        with open(src, "w") as f:
            for i in range(24):
                f.write(json.dumps({"text": text(3000 + i, 140)}) + "\n")
    raw = {"output_dir": str(out), "seed": 0,
           "memory": {"window": 32, "top_k": 8, "overlap": 4, "sink_tokens": 2},
           "adapter": {"lora_rank": 4},
           "data": {"sources": [{"type": "jsonl", "path": str(src)}], "seq_len": 128, "min_doc_tokens": 64,
                    "eval_fraction": 0.25, "shuffle_buffer": 4, "synthetic_rate": 0.2, "synthetic_tasks": ["kv"]},
           "crossbatch": {"batch_size": 3, "d": 2, "w": 2, "top_k": 8},
           "optim": {"lr": 1e-2, "warmup_steps": 2},
           "train": {"max_steps": int(steps), "gradient_checkpointing": False, "threads": 1},
           "eval": {"every": 0, "at_start": False, "at_end": False, "batch_size": 2, "batches": 1, "passkey_trials": 0},
           "checkpoint": {"every": 2, "keep": 2}}
    cfg = TrainConfig.from_dict(apply_overrides(raw, []))
    r = CrossbatchRecipe(cfg, backbone=tiny_backbone(vocab=VOCAB), tokenizer=ByteTokenizer())
    r.setup()
    _say(f"ready {r.step}")
    r.train()
    r.cleanup()
    _say("done")


def op_convert(_: str = "") -> None:
    """First use of the default model: `default_model_dir()` under $MEMFORMER_CACHE."""
    from memformer.loading import default_model_dir
    _say("ready")
    _say(f"done {default_model_dir()}")


def op_memorize_rss(eviction: str, tokens: str, out: str, read: str = "write") -> None:
    """Memorize `tokens` random tokens in 4k calls into a memory of capacity 16k (with read="read"
    every window also reads the memory); RSS after each call."""
    torch.set_num_threads(1)
    model = tiny_model(capacity=16384, eviction=eviction, window=256, overlap=32)
    g = torch.Generator().manual_seed(0)
    rows, total = [{"tokens": 0, "rss_mb": rss_mb(), "memory_tokens": 0, "seconds": 0.0}], 0
    t0 = time.monotonic()
    while total < int(tokens):
        ids = torch.randint(1, VOCAB, (1, 4096), generator=g)
        model.memorize(ids, read=(read == "read"), show_progress=False)
        total += ids.shape[1]
        rows.append({"tokens": total, "rss_mb": rss_mb(), "memory_tokens": model.memory_size(),
                     "seconds": round(time.monotonic() - t0, 1)})
    Path(out).write_text(json.dumps(rows))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


OPS = {"save_memory": op_save_memory, "qa_cache": op_qa_cache, "qa_save_loop": op_qa_save_loop,
       "qa_load_loop": op_qa_load_loop, "train": op_train, "convert": op_convert,
       "memorize_rss": op_memorize_rss}
