"""Trained block choosers (memformer.training.chooser): the student ranks blocks exactly as layer
block reads choose them, the targets are the chunk's own attention over memory, and a short run
saves an adapter whose choosers load back."""
from types import SimpleNamespace

import torch

from conftest import tiny_backbone
from memformer import MemformerForCausalLM, MemoryConfig, persistence
from memformer.blocks import chosen_blocks
from memformer.training import chooser as ch

BS = 8


def _model():
    torch.manual_seed(0)
    return MemformerForCausalLM(tiny_backbone("llama"), None, MemoryConfig(window=64, sink_tokens=2, overlap=8, top_k=4,
                                                                           block_size=BS, layer_blocks=2))


def _docs(n, tokens=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 100, (tokens,), generator=g).tolist() for _ in range(n)]


def test_the_student_ranks_blocks_as_layer_reads_choose_them():
    model = _model()
    rec = ch.collect(model, _docs(1)[0])
    for i, m in model.memory_modules.items():
        assert rec.examples[i], "every window after the first gives an example"
        for ex in rec.examples[i]:
            keys = rec.keys[i][:, :ex.rows].float()
            mem = SimpleNamespace(keys=keys[None], key_scales=None, valid=torch.ones(1, ex.rows, dtype=torch.bool),
                                  positions=(rec.blocks[:ex.rows] * BS)[None])
            want = chosen_blocks(mem, ex.choosers[None], 3, BS)[0]                     # [C, 3]
            eye = torch.eye(m.head_dim).repeat(m.num_kv_heads, 1, 1)
            s = ch.block_logits(eye, ex.choosers, keys, rec.blocks[:ex.rows], ex.target.shape[1], m.attn.scaling)
            assert torch.equal(s.topk(3, -1).indices, want)


def test_targets_are_each_chunks_memory_attention_per_block():
    """window_example's target for chunk c: the softmax of chunk c's queries over every earlier
    row (per query head, keys of its kv group), summed per block and normalised; its chooser is
    the mean query of chunk c-1."""
    g = torch.Generator().manual_seed(3)
    Hkv, G, T, D, R = 2, 2, 4 * BS, 8, 5 * BS
    q, keys = torch.randn(Hkv * G, T, D, generator=g), torch.randn(Hkv, R, D, generator=g)
    blocks = torch.arange(R) // BS
    ex = ch.window_example(q, keys, blocks, G, BS, 0.5)
    assert ex.target.shape == (3, 5) and torch.allclose(ex.target.sum(1), torch.ones(3))
    c = 2
    mass = torch.zeros(5)
    for h in range(Hkv * G):
        p = (q[h, c * BS:(c + 1) * BS] @ keys[h // G].T * 0.5).softmax(-1)           # [BS, R]
        mass.index_add_(0, blocks, p.sum(0))
    torch.testing.assert_close(ex.target[c - 1], mass / mass.sum())
    torch.testing.assert_close(ex.choosers[:, c - 1], q.view(Hkv, G, T, D)[:, :, (c - 1) * BS:c * BS].mean((1, 2)))


def test_a_short_run_trains_and_saves_choosers_that_load_back(tmp_path, monkeypatch):
    model = _model()
    monkeypatch.setattr(ch, "training_documents", lambda tok, n, tokens, seed: _docs(n, tokens))
    cfg = ch.ChooserConfig(docs=3, val_docs=1, doc_tokens=300, negatives=1, steps=4, batch=2, budget=2,
                           out=str(tmp_path))
    res = ch.train(model, cfg)
    assert set(res["val_recall_best"]) == set(model.memory_modules)
    assert all(res["val_recall_best"][i] >= res["val_recall_identity"][i] for i in model.memory_modules)
    assert (tmp_path / "adapter" / persistence.CHOOSER_FILE).is_file()
    fresh = _model()
    persistence.load_adapter(fresh, tmp_path / "adapter")
    for i, m in model.memory_modules.items():
        assert torch.equal(fresh.memory_modules[i].block_chooser, m.block_chooser)
