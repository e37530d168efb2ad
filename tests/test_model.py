"""Invariants of DESIGN.md on tiny random llama / mistral / qwen2 backbones."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import clone_backbone, tiny_backbone
from memformer import MemformerForCausalLM, MemoryCapacityError, MemoryConfig


def make(model_type="llama", seed=0, **cfg):
    """(memory model, an untouched copy of its frozen backbone)."""
    bb = tiny_backbone(model_type, seed=seed)
    oracle = clone_backbone(bb)
    return MemformerForCausalLM(bb, None, MemoryConfig(**{"window": 16, "top_k": 4, "overlap": 3, **cfg})), oracle


def ids(n, b=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (b, n), generator=g)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_empty_memory_logits_equal_frozen_backbone(model_type):
    bb = tiny_backbone(model_type)
    oracle = clone_backbone(bb)
    model = MemformerForCausalLM(bb, None, MemoryConfig(window=16, top_k=4, overlap=3))
    x = ids(16)
    with torch.no_grad():
        want = oracle(x).logits
        torch.testing.assert_close(model(x).logits, want, atol=1e-6, rtol=0)   # no memory yet
        model.memorize(ids(40, seed=2), show_progress=False)
        got = model(x).logits
        assert (got - want).abs().max() > 1e-4                                 # memory is read ...
        with model.memory_disabled():
            torch.testing.assert_close(model(x).logits, want, atol=1e-6, rtol=0)  # ... unless disabled


def test_closed_gate_equals_backbone():
    model, oracle = make()
    model.memorize(ids(40), show_progress=False)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "memory_gate"):
                m.memory_gate.fill_(-float("inf"))
        x = ids(10, seed=5)
        torch.testing.assert_close(model(x).logits, oracle(x).logits, atol=1e-5, rtol=0)


def test_unknown_model_type_is_a_clear_error():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"no backbone adapter for model_type 'gpt2'.*llama"):
        MemformerForCausalLM(gpt2, None, MemoryConfig())


def test_only_memory_layer_parameters_train():
    model, _ = make(memory_layers=[1], lora_rank=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.1." in n for n in trainable)
    assert all("memory_gate" in n or "lora_" in n for n in trainable)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".layers.0." in n)


@pytest.mark.parametrize("sinks", [0, 4])
def test_no_token_retrieves_itself_or_the_future(sinks):
    model, _ = make(read_during_ingest=True, top_k=64, sink_tokens=sinks)
    model.runtime.record = True
    model.memorize(ids(64), show_progress=False)                  # windows read while being written
    model.runtime.record = False
    step = 16 - sinks - model.memory_config.overlap
    starts = list(range(sinks, 64, step))                          # first token of each window
    for layer, calls in model.runtime.retrieved.items():
        assert len(calls) == len(starts) - 1                       # the first window finds memory empty
        for w, (rows, probs) in enumerate(calls, start=1):
            held = w * step                                        # memory size when window w ran
            pos = model.memories[layer].positions[0][rows.clamp(min=0)]
            valid = rows >= 0
            assert (valid.sum(-1) == min(64, held)).all()          # every earlier key is reachable ...
            assert (pos[valid] < starts[w]).all()                  # ... nothing of this window or later
            assert (pos[valid] >= sinks).all()                     # sink tokens never enter memory
    assert model.memory_size() == 64 - sinks                       # everything written after reading


def test_batch_memories_are_isolated():
    """Sequence 0 of a batch behaves exactly as when memorized alone, whatever sequence 1 holds."""
    model, _ = make()
    docs = torch.cat([ids(48, seed=3), ids(48, seed=4)])
    model.memorize(docs, show_progress=False)
    q = torch.cat([ids(8, seed=9), ids(8, seed=9)])
    with torch.no_grad():
        batch_logits = model(q).logits
    model.reset_memory()
    model.memorize(docs[:1], show_progress=False)
    with torch.no_grad():
        alone = model(q[:1]).logits
    torch.testing.assert_close(batch_logits[:1], alone, atol=1e-5, rtol=1e-5)
    assert (batch_logits[0] - batch_logits[1]).abs().max() > 1e-4


def test_ragged_batch_writes_only_real_tokens():
    model, _ = make()
    model.memorize([list(range(1, 30)), list(range(1, 12))], show_progress=False)
    mem = next(iter(model.memories.values()))
    assert model.seen == [29, 11]
    S = model.memory_config.sink_tokens                         # the first S stay local as the sink
    assert mem.valid[0].sum() == 29 - S and mem.valid[1].sum() == 11 - S
    assert mem.positions[1][mem.valid[1]].tolist() == list(range(S, 11))


@pytest.mark.parametrize("mode", ["first", "fixed", "window"])
def test_search_score_equals_attention_logit(mode):
    """Search ranks keys by exactly the logit the attention then uses, for every query head (GQA)."""
    model, bb = make(position_mode=mode, top_k=5)
    model.memorize(ids(32), show_progress=False)
    layer = 1
    attn = model.backbone.model.layers[layer].self_attn
    captured = {}
    hook = attn.register_forward_pre_hook(lambda m, a, kw: captured.update(h=a[0] if a else kw["hidden_states"],
                                                                       pe=kw["position_embeddings"]), with_kwargs=True)
    model.runtime.record = True
    with torch.no_grad():
        model(ids(6, seed=7))
    model.runtime.record = False
    hook.remove()
    rows, probs = model.runtime.retrieved[layer][0]                     # [1, Hq, T, K]
    # recompute, independently of the layer: q from the hidden states, RoPE by position mode
    inner = attn.attn
    B, T, _ = captured["h"].shape
    q = inner.q_proj(captured["h"]).view(B, T, 4, 16).transpose(1, 2)   # [1, Hq, T, D]
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    shift = model._rotation_at(model.memory_config.memory_distance)
    if mode == "first":        # real local position
        q_rot, _ = apply_rotary_pos_emb(q, q, *captured["pe"])
    elif mode == "fixed":      # a fixed distance from un-rotated keys
        q_rot, _ = apply_rotary_pos_emb(q, q, *shift)
    else:                      # real position + one window, against keys rotated in their window
        q_rot, _ = apply_rotary_pos_emb(apply_rotary_pos_emb(q, q, *captured["pe"])[0], q, *shift)
    keys = model.memories[layer].keys                                   # [1, Hkv, M, D]
    for h in range(4):
        logits = q_rot[0, h] @ keys[0, h // 2].float().T * inner.scaling  # [T, M], kv head of the group
        want = logits.topk(5, dim=-1)
        got = torch.gather(logits, 1, rows[0, h])
        torch.testing.assert_close(got, want.values, atol=1e-4, rtol=1e-4)
        # and the attention used exactly these logits: probability ratios = exp(logit differences)
        p = probs[0, h]
        torch.testing.assert_close(torch.log(p[:, 0] / p[:, 1]), got[:, 0] - got[:, 1], atol=1e-4, rtol=1e-4)


def test_save_load_round_trip_and_refusals(tmp_path):
    model, _ = make()
    model.memorize(ids(40), show_progress=False)
    x = ids(8, seed=11)
    with torch.no_grad():
        want = model(x).logits
    path = model.save_memory(tmp_path / "mem")
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "memory.safetensors"]
    model.reset_memory()
    model.load_memory(path)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, want)
    assert model.seen == [40]

    from memformer import MemoryFileError
    other, _ = make(seed=123)                                           # another backbone
    with pytest.raises(MemoryFileError, match="another model"):
        other.load_memory(path)
    wider, _ = make(window=32)                                          # another memory config
    with pytest.raises(MemoryFileError, match="window"):
        wider.load_memory(path)
    data = (path / "memory.safetensors").read_bytes()
    (path / "memory.safetensors").write_bytes(data[: len(data) // 2])  # truncated file
    with pytest.raises(MemoryFileError, match="corrupt or truncated"):
        model.load_memory(path)
    with torch.no_grad():                                               # the failed load lost nothing
        torch.testing.assert_close(model(x).logits, want)
    with pytest.raises(FileNotFoundError, match="no manifest"):
        model.load_memory(tmp_path)


def test_save_empty_memory_is_an_error(tmp_path):
    model, _ = make()
    with pytest.raises(ValueError, match="empty"):
        model.save_memory(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_bad_inputs():
    model, _ = make(capacity=20, eviction="none")
    with pytest.raises(ValueError, match="empty"):
        model.memorize([], show_progress=False)
    with pytest.raises(ValueError, match="out of range"):
        model.memorize(torch.tensor([[1, 2, 500]]), show_progress=False)
    model.memorize(ids(16), show_progress=False)
    with pytest.raises(MemoryCapacityError):
        model.memorize(ids(16), show_progress=False)
    assert model.memory_size() == 16 - model.memory_config.sink_tokens   # the failed call wrote nothing
    with pytest.raises(ValueError, match="holds 1 sequence"):
        model.memorize(ids(4, b=2), show_progress=False)


@pytest.mark.parametrize("bad", [dict(top_k=0), dict(window=1), dict(position_mode="last"), dict(index="annoy"),
                                 dict(eviction="lru"), dict(sink_tokens=16), dict(memory_layers=[]),
                                 dict(overlap=12), dict(overlap=-1), dict(neighbors=-1)])
def test_config_validation(bad):
    with pytest.raises(ValueError, match="MemoryConfig"):
        MemoryConfig(**{"window": 16, **bad})


def test_memory_layer_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        make(memory_layers=[5])


def test_sink_tokens_prefix_every_window_and_never_enter_memory():
    model, _ = make(sink_tokens=2)
    model.memorize(ids(50), show_progress=False)
    mem = next(iter(model.memories.values()))
    assert model.memory_size() == 48 and mem.positions[0].tolist() == list(range(2, 50))
    assert torch.equal(model.sink_ids, ids(50)[:, :2])
    out = model.generate(ids(5, seed=3), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


@pytest.mark.parametrize("overlap", [0, 5])
def test_overlap_gives_context_without_writing_twice(overlap):
    """Every token is written once, in order, whether read in one call or streamed in pieces."""
    x = ids(70)
    whole, _ = make(overlap=overlap)
    whole.memorize(x, show_progress=False)
    pieces, _ = make(overlap=overlap)
    for a in range(0, 70, 23):
        pieces.memorize(x[:, a:a + 23], show_progress=False)
    for m in (whole, pieces):
        mem = m.memories[0]
        assert mem.positions[0].tolist() == list(range(4, 70))          # sinks stay local
    if overlap:                                       # the next call starts with the carried context
        assert torch.equal(pieces.tail_ids, x[:, -overlap:])


def test_generate_memorizes_overflow_and_reads_memory():
    model, oracle = make()
    x = ids(40)
    out = model.generate(x, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 44) and torch.equal(out[:, :40], x)
    assert model.memory_size() == 24                                    # all but the last window


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("blocks", [0, 4])
def test_cached_generation_equals_an_uncached_greedy_loop(model_type, blocks):
    """HF generate with its KV cache (the attention wrapper must take the cache under the name the
    installed transformers passes it) picks the same tokens as re-reading the whole local window
    [sink ‖ tail ‖ generated] at every step, with token reads and with block reads (block_size 1,
    so a query's blocks do not depend on which queries share its chunk)."""
    model, _ = make(model_type, read_blocks=blocks, block_size=1)
    x = ids(40)
    out = model.generate(x, max_new_tokens=6, do_sample=False)
    local = torch.cat([model.sink_ids, x[:, 40 - (16 - 4):]], 1)      # [sink ‖ last W - S tokens]
    for _ in range(6):
        nxt = model(local).logits[:, -1].argmax(-1, keepdim=True)
        local = torch.cat([local, nxt], 1)
    assert torch.equal(out[:, 40:], local[:, -6:])


def test_adapter_save_load_round_trip(tmp_path):
    model, _ = make(memory_layers=[0], lora_rank=2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "ad")
    fresh, _ = make(memory_layers=[0], lora_rank=2)
    fresh.load_adapter(tmp_path / "ad")
    x = ids(8)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits)
    mismatched, _ = make(memory_layers=[1], lora_rank=2)
    from memformer import MemoryFileError
    with pytest.raises(MemoryFileError, match="does not match"):
        mismatched.load_adapter(tmp_path / "ad")


def test_memory_fingerprint_is_stable_across_fresh_models():
    """An untrained adapter is seeded, so a memory saved by one process loads in the next."""
    from memformer.persistence import memory_fingerprint
    a, _ = make()
    b, _ = make()
    assert memory_fingerprint(a) == memory_fingerprint(b)


def test_faiss_flat_memory_layers_match_exact():
    """The memory layers use whichever index MemoryConfig names; exact FAISS == torch exact."""
    pytest.importorskip("faiss")
    x, q = ids(60), ids(9, seed=8)
    logits = []
    for index in ("exact", "faiss-flat"):
        model, _ = make(index=index)
        model.memorize(x, show_progress=False)
        with torch.no_grad():
            logits.append(model(q).logits)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)


def test_window_mode_stores_keys_rotated_at_their_window_position():
    model, _ = make(position_mode="window")
    first, _ = make(position_mode="first")
    x = ids(30)
    model.memorize(x, show_progress=False)
    first.memorize(x, show_progress=False)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    rotary = model.backbone.model.rotary_emb
    k_plain = first.memories[0].keys                                   # [1, Hkv, M, D] un-rotated
    # the first window is [sink (4) | 9 new tokens]: new tokens sit at positions 4..12
    n = 16 - 4 - model.memory_config.overlap
    cos, sin = rotary(k_plain, torch.arange(4, 4 + n)[None])
    want, _ = apply_rotary_pos_emb(k_plain[:, :, :n], k_plain[:, :, :n], cos, sin)
    torch.testing.assert_close(model.memories[0].keys[:, :, :n], want, atol=1e-5, rtol=1e-5)


def test_neighbor_expansion_reads_contiguous_rows_once_with_exact_scores():
    """expand_neighbors against a brute-force reading of the same definition: for every retrieved
    row, the rows holding the tokens up to r positions away (same sequence, no evicted gap), each
    once, scored q . k."""
    from index.store import LayerMemory
    from memformer.memory_layer import expand_neighbors
    g = torch.Generator().manual_seed(0)
    B, Hkv, D, r = 2, 2, 8, 2
    mem = LayerMemory(B, Hkv, D)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]])  # a gap after 5
    mem.add(torch.randn(B, Hkv, 10, D, generator=g), torch.randn(B, Hkv, 10, D, generator=g), pos)
    q = torch.randn(B, Hkv, 3, D, generator=g)
    _, ids = mem.search(q, 2)
    ids[0, 0, 0] = torch.tensor([5, 6])                   # either side of the gap
    ids[1, 1, 2] = torch.tensor([0, -1])                  # a missing neighbour and the first row
    scores, out = expand_neighbors(mem, q, ids, r)
    assert out.shape == (B, Hkv, 3, 2 * (2 * r + 1))
    for b in range(B):
        for h in range(Hkv):
            for t in range(3):
                want = set()
                for i in ids[b, h, t].tolist():
                    if i < 0:
                        continue
                    want |= {j for j in range(i - r, i + r + 1)
                             if 0 <= j < 10 and pos[b, j] - pos[b, i] == j - i}
                got = [j for j in out[b, h, t].tolist() if j >= 0]
                assert sorted(got) == sorted(want) and len(got) == len(set(got))
                for k, j in enumerate(out[b, h, t].tolist()):
                    if j >= 0:
                        torch.testing.assert_close(scores[b, h, t, k], q[b, h, t] @ mem.keys[b, h, j])
                    else:
                        assert scores[b, h, t, k] == float("-inf")
    assert set(out[0, 0, 0].tolist()) - {-1} == {3, 4, 5, 6, 7, 8}


def test_neighbors_read_more_rows_and_zero_changes_nothing():
    """neighbors=0 is the plain top-k path; neighbors=1 reads each retrieved row's neighbours too
    (more distinct rows per query) and changes the output."""
    outs, counts = {}, {}
    for r in (0, 1):
        model, _ = make(top_k=2, neighbors=r, read_during_ingest=True)
        model.runtime.record = True
        model.memorize(ids(64), show_progress=False)
        model.runtime.record = False
        rows, _ = model.runtime.retrieved[0][-1]
        counts[r] = int((rows >= 0).sum(-1).float().mean())
        with torch.no_grad():
            outs[r] = model(ids(8, seed=9)).logits
    base, _ = make(top_k=2, read_during_ingest=True)
    base.memorize(ids(64), show_progress=False)
    with torch.no_grad():
        torch.testing.assert_close(base(ids(8, seed=9)).logits, outs[0])
    assert counts[1] > counts[0] == 2
    assert (outs[1] - outs[0]).abs().max() > 1e-5


def test_set_neighbors_is_a_read_time_setting():
    """set_neighbors changes how memory is read (validated), not what is stored: the QA memory cache
    key stays the same."""
    from types import SimpleNamespace
    from memformer.qa.documents import Document
    from memformer.qa.longdoc import memory_key
    model, _ = make()
    corpus = SimpleNamespace(documents=[Document("notes", "a fact worth keeping")])   # all memory_key reads
    key = memory_key(corpus, model)
    model.set_neighbors(2)
    assert model.runtime.neighbors == 2 and model.memory_config.neighbors == 2
    assert memory_key(corpus, model) == key
    with pytest.raises(ValueError, match="neighbors"):
        model.set_neighbors(-1)
    assert model.runtime.neighbors == 2
    model.set_neighbors(0)
    model.set_read_blocks(3, block_size=16)                  # block reads: also read-time only
    assert (model.runtime.read_blocks, model.runtime.block_size) == (3, 16)
    assert memory_key(corpus, model) == key
    with pytest.raises(ValueError, match="set one"):
        model.set_neighbors(1)


def test_cli_memory_arguments_reach_the_memory_config():
    import argparse
    from memformer.cli.common import add_model_args, memory_config_from_args
    p = argparse.ArgumentParser()
    add_model_args(p)
    cfg = memory_config_from_args(p.parse_args(["--blocks", "4", "--block-size", "32", "--top-k", "8"]))
    assert (cfg.read_blocks, cfg.block_size, cfg.top_k, cfg.neighbors) == (4, 32, 8, 0)
    cfg = memory_config_from_args(p.parse_args(["--neighbors", "2"]))
    assert (cfg.read_blocks, cfg.block_size, cfg.neighbors) == (0, 64, 2)
