"""Trained block choosers: each memory layer learns which blocks its next query chunk needs,
against the blocks of other documents (crossbatch negatives).

With no question known, a memory layer reads the `layer_blocks` blocks whose best key scores
highest against the mean query of the chunk before (`memformer.blocks.chosen_blocks`). Here each
layer learns a map W [Hkv, D, D] of that chooser query (`MemoryAttention.block_chooser`):

* target: the attention the chunk's own queries give memory when they see all of it (one
  memory-only softmax per query head over every row written before the window, summed per
  block): what a read of every block would read;
* student: a softmax over the blocks of the document's memory AND of `negatives` other documents,
  block score = sum over kv heads of max_j (W c) . k_j * scale, c the chunk before's mean query;
* loss: cross-entropy of the target (own blocks) against the student (own + other documents'
  blocks): the negatives must score below the blocks the chunk attends to.

Backbone, LoRA and gates stay frozen, so keys and queries do not change while W trains: each
document is memorized once (`collect`), keeping its keys, each window's chooser queries and
targets; training then runs on those tensors (`train`) in seconds per hundred steps.

    python -m memformer.training.chooser --docs 24 --val-docs 4 --steps 400 --out runs/chooser
"""
from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm


@dataclass
class ChooserConfig:
    docs: int = 24               # training documents (standard-library packages, never the held-out split)
    val_docs: int = 4            # documents for validation (chosen from the same pool, not trained on)
    doc_tokens: int = 6144       # tokens memorized per document
    negatives: int = 3           # other documents whose blocks compete in each softmax (d - 1)
    steps: int = 400
    batch: int = 8               # (document, window) pairs per step
    lr: float = 2e-3
    budget: int = 32             # blocks read per chunk: recall is measured at this budget
    seed: int = 0
    out: str = "runs/chooser"


@dataclass
class Example:
    """One window of one document, for one memory layer: choosers [Hkv, C, D] (the chooser query
    of each chunk c >= 1), target [C, nb] (attention mass per own block, rows of each sum to 1),
    rows: memory rows written before the window (the own candidates)."""
    choosers: torch.Tensor
    target: torch.Tensor
    rows: int


@dataclass
class DocRecord:
    """keys {layer: [Hkv, M, D]}, blocks [M] block id of each row, examples {layer: [Example]}."""
    keys: dict
    blocks: torch.Tensor
    examples: dict = field(default_factory=dict)


def training_documents(tokenizer, n: int, tokens: int, seed: int) -> list[list[int]]:
    """n token lists of `tokens` tokens: standard-library packages outside the held-out split (the
    perplexity evaluation's `stdlib-heldout` and `pydocs-heldout` are never among them)."""
    from memformer.training.data import _encode, held_out, stdlib_documents
    from memformer.eval.ppl import HELDOUT_FRACTION
    out = []
    for doc in stdlib_documents(random.Random(seed)):
        if held_out(doc.name, HELDOUT_FRACTION):
            continue
        ids = _encode(tokenizer, doc.load())
        if len(ids) >= tokens:
            out.append(ids[:tokens])
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} standard-library documents hold {tokens} tokens, {n} asked")


@torch.no_grad()
def collect(model, ids: list[int]) -> DocRecord:
    """Memorize one document (its memory replaces the model's) and keep, per memory layer, its keys
    and every window's chooser queries and attention targets."""
    rt, bs = model.runtime, model.memory_config.block_size
    seen = {i: [] for i in model.memory_modules}

    def hook(i):
        def pre(module, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)               # [1, T, H]
            cos, sin = kwargs["position_embeddings"]
            B, T, _ = h.shape
            q = module.attn.q_proj(h).view(B, T, module.num_heads, module.head_dim).transpose(1, 2)   # [1, Hq, T, D]
            q_rot = module.rotary_fn(q, q, cos, sin)[0]
            q_mem = module.rotary_fn(q_rot, q_rot, *rt.q_rotation)[0]                 # as layer reads rotate them
            seen[i].append((q_mem[0].float(), len(module.memory) if module.memory is not None else 0))
        return pre
    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in model.memory_modules.items()]
    try:
        model.reset_memory()
        model.memorize(torch.tensor([ids]), show_progress=False)
    finally:
        for h in handles:
            h.remove()
    first = next(iter(model.memory_modules.values())).memory
    blocks = (first.positions[0] // bs).clone()                                       # [M]
    rec = DocRecord(keys={}, blocks=blocks)
    for i, m in model.memory_modules.items():
        mem = m.memory
        keys = mem.keys[0].float()
        if mem.key_scales is not None:
            keys = keys * mem.key_scales[0][..., None]
        rec.keys[i] = keys                                                             # [Hkv, M, D]
        G = m.num_heads // m.num_kv_heads
        rec.examples[i] = [ex for q, rows in seen[i] if rows > 0
                           for ex in [window_example(q, keys[:, :rows], blocks[:rows], G, bs, m.attn.scaling)]
                           if ex is not None]
    return rec


def window_example(q_mem, keys, blocks, G: int, bs: int, scale: float) -> Example | None:
    """q_mem [Hq, T, D] of one window; keys [Hkv, R, D] and blocks [R] of the rows before it."""
    Hq, T, D = q_mem.shape
    Hkv = keys.shape[0]
    C = T // bs                                                                        # whole chunks
    if C < 2:
        return None
    nb = int(blocks.max()) + 1
    qg = q_mem.view(Hkv, G, T, D)
    choosers = qg[:, :, :(C - 1) * bs].mean(1).view(Hkv, C - 1, bs, D).mean(2)        # [Hkv, C-1, D]: chunks 0..C-2
    # each chunk's queries over every earlier row: one memory-only softmax per query head
    logits = torch.einsum("hgtd,hrd->hgtr", qg[:, :, bs:C * bs], keys) * scale          # [Hkv, G, (C-1)*bs, R]
    p = logits.softmax(-1).view(Hkv, G, C - 1, bs, -1).sum((0, 1, 3))                 # [C-1, R]
    target = torch.zeros(C - 1, nb).index_add_(1, blocks, p)
    target = target / target.sum(1, keepdim=True)
    return Example(choosers, target, keys.shape[1])


def block_logits(W, choosers, keys, blocks, nb: int, scale: float):
    """choosers [Hkv, C, D] mapped by W [Hkv, D, D] against keys [Hkv, R, D] of blocks [R] ->
    [C, nb]: sum over kv heads of each block's best key."""
    c = torch.einsum("hcd,hde->hce", choosers, W)
    s = torch.einsum("hce,hre->hcr", c, keys) * scale                                  # [Hkv, C, R]
    out = torch.full((*s.shape[:2], nb), float("-inf")).scatter_reduce(2, blocks.expand_as(s), s, "amax")
    return out.sum(0)                                                                  # [C, nb]


def example_loss(W, ex: Example, own: DocRecord, layer: int, others: list[DocRecord], scale: float):
    """Cross-entropy of the target (own blocks) against the softmax over own + other documents' blocks."""
    keys = [own.keys[layer][:, :ex.rows].float()] + [o.keys[layer].float() for o in others]
    nb_own = ex.target.shape[1]
    blocks, offset = [own.blocks[:ex.rows]], nb_own
    for o in others:
        blocks.append(o.blocks + offset)
        offset += int(o.blocks.max()) + 1
    s = block_logits(W, ex.choosers, torch.cat(keys, 1), torch.cat(blocks), offset, scale)   # [C, all blocks]
    logp = s.log_softmax(-1)[:, :nb_own]
    return -(ex.target * torch.nan_to_num(logp, neginf=0.0)).sum(1).mean()


@torch.no_grad()
def recall(W, docs: list[DocRecord], layer: int, budget: int, scale: float) -> float:
    """Mean attention mass (target) on the `budget` blocks the chooser picks from the own memory."""
    got = []
    for d in docs:
        for ex in d.examples[layer]:
            s = block_logits(W, ex.choosers, d.keys[layer][:, :ex.rows].float(), d.blocks[:ex.rows],
                             ex.target.shape[1], scale)
            top = s.topk(min(budget, s.shape[1]), -1).indices
            got.append(ex.target.gather(1, top).sum(1).mean())
    return float(torch.stack(got).mean())


def train(model, cfg: ChooserConfig) -> dict:
    """Collect the documents, train one W per memory layer, keep the best by validation recall,
    and save the adapter (shipped weights + chooser.safetensors) under cfg.out/adapter."""
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    ids = training_documents(model.tokenizer, cfg.docs + cfg.val_docs, cfg.doc_tokens, cfg.seed)
    t0 = time.perf_counter()
    records = [collect(model, d) for d in tqdm(ids, desc="collect", unit="doc")]
    model.reset_memory()
    collect_s = time.perf_counter() - t0
    train_docs, val_docs = records[:cfg.docs], records[cfg.docs:]
    layers = list(model.memory_modules)
    m0 = model.memory_modules[layers[0]]
    Hkv, D, scale = m0.num_kv_heads, m0.head_dim, m0.attn.scaling
    W = {i: torch.nn.Parameter(torch.eye(D).repeat(Hkv, 1, 1)) for i in layers}
    opt = torch.optim.Adam(W.values(), lr=cfg.lr)
    start = {i: recall(W[i].detach(), val_docs, i, cfg.budget, scale) for i in layers}
    best = {i: (start[i], W[i].detach().clone()) for i in layers}
    pairs = [(d, i) for d in range(len(train_docs)) for i in range(len(train_docs[d].examples[layers[0]]))]
    log = []
    bar = tqdm(range(cfg.steps), desc="train chooser", unit="step")
    for step in bar:
        opt.zero_grad()
        total = 0.0
        for d, e in rng.sample(pairs, min(cfg.batch, len(pairs))):
            others = [train_docs[o] for o in rng.sample([o for o in range(len(train_docs)) if o != d], cfg.negatives)]
            for i in layers:
                loss = example_loss(W[i], train_docs[d].examples[i][e], train_docs[d], i, others, scale) / cfg.batch
                loss.backward()
                total += float(loss.detach())
        opt.step()
        bar.set_postfix(loss=f"{total / len(layers):.3f}")
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            val = {i: recall(W[i].detach(), val_docs, i, cfg.budget, scale) for i in layers}
            for i in layers:
                if val[i] > best[i][0]:
                    best[i] = (val[i], W[i].detach().clone())
            log.append({"step": step + 1, "loss": total / len(layers), "val_recall": val})
            print(json.dumps(log[-1]), flush=True)
    for i in layers:
        model.memory_modules[i].block_chooser = best[i][1]
    out = Path(cfg.out)
    model.save_pretrained(out / "adapter")
    res = {"config": asdict(cfg), "collect_s": round(collect_s, 1), "examples": len(pairs),
           "val_recall_identity": start, "val_recall_best": {i: best[i][0] for i in layers}, "log": log}
    (out / "chooser_train.json").write_text(json.dumps(res, indent=1))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f, v in asdict(ChooserConfig()).items():
        ap.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from memformer import MemformerForCausalLM
    model = MemformerForCausalLM.from_pretrained()
    res = train(model, ChooserConfig(**{k: getattr(args, k) for k in asdict(ChooserConfig())}))
    print(json.dumps({k: res[k] for k in ("collect_s", "examples", "val_recall_identity", "val_recall_best")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
