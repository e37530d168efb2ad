"""Block reads (memformer.blocks): which rows are read, and the attention over them."""
import copy

import pytest
import torch

from index.store import LayerMemory
from memformer.blocks import block_attention


def _memory(B, Hkv, D, positions, g, valid=None):
    mem = LayerMemory(B, Hkv, D)
    M = positions.shape[1]
    mem.add(torch.randn(B, Hkv, M, D, generator=g) * 0.5, torch.randn(B, Hkv, M, D, generator=g), positions, valid)
    return mem


def _dense(q, q_mem, k_loc, v_loc, k_mem, v_mem, ok, scale, bias):
    """One softmax over [causal local keys ‖ memory rows where ok [B, T, M]]: [B, Hq, T, D]."""
    B, Hq, T, D = q.shape
    G = Hq // k_loc.shape[1]
    kl, vl = k_loc.repeat_interleave(G, 1), v_loc.repeat_interleave(G, 1)
    km, vm = k_mem.repeat_interleave(G, 1), v_mem.repeat_interleave(G, 1)
    s_loc = (q @ kl.transpose(-1, -2)) * scale
    S = kl.shape[2]
    causal = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]
    s_loc = s_loc.masked_fill(~causal, float("-inf"))
    s_mem = (q_mem @ km.transpose(-1, -2)) * scale + bias.view(1, Hq, 1, 1)
    s_mem = s_mem.masked_fill(~ok[:, None], float("-inf"))
    p = torch.softmax(torch.cat([s_loc, s_mem], -1), -1)
    return p @ torch.cat([vl, vm], 2)


@pytest.mark.parametrize("T,block_size", [(1, 4), (7, 4), (10, 3)])
def test_reading_every_block_is_full_attention_over_local_and_memory(T, block_size):
    """With as many blocks as memory holds and top_k >= M, every row is read: the result is one
    dense softmax over local keys and all of memory, with the gate added to memory logits."""
    g = torch.Generator().manual_seed(0)
    B, Hkv, G, D, M = 2, 2, 2, 8, 13
    Hq = Hkv * G
    mem = _memory(B, Hkv, D, torch.arange(M).repeat(B, 1), g)
    q, q_mem = torch.randn(B, Hq, T, D, generator=g), torch.randn(B, Hq, T, D, generator=g)
    k_loc, v_loc = torch.randn(B, Hkv, T + 2, D, generator=g), torch.randn(B, Hkv, T + 2, D, generator=g)
    bias = torch.randn(Hq, generator=g)
    out, rows, probs = block_attention(mem, q, q_mem, k_loc, v_loc, top_k=M, n_blocks=99, block_size=block_size,
                                       scale=D ** -0.5, mem_bias=bias)
    want = _dense(q, q_mem, k_loc, v_loc, mem.keys, mem.values, torch.ones(B, T, M, dtype=torch.bool), D ** -0.5, bias)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for b in range(B):
        for t in range(T):
            assert sorted(i for i in rows[b, 0, t].tolist() if i >= 0) == list(range(M))
    assert rows.shape[:3] == (B, 1, T) and probs.shape == rows.shape
    assert bool((probs[rows < 0] == 0).all()) and float(probs.sum(-1).max()) < 1


def test_the_chunk_reads_the_block_holding_its_matching_key_in_document_order():
    """A key planted at one position wins its whole block for the query chunk that asks for it;
    chunks are end-aligned (the last `block_size` queries are one chunk), heads share the rows."""
    g = torch.Generator().manual_seed(1)
    B, Hkv, G, D, bs = 1, 2, 3, 16, 8
    Hq, M, T = Hkv * G, 64, 10                                     # chunks: queries 0-1, 2-9
    mem = LayerMemory(B, Hkv, D)
    keys = torch.randn(B, Hkv, M, D, generator=g) * 0.1
    a, b = torch.randn(D, generator=g), torch.randn(D, generator=g)
    keys[:, :, 43] = a * 3                                          # block 5 (positions 40-47)
    keys[:, :, 12] = b * 3                                          # block 1 (positions 8-15)
    mem.add(keys, torch.randn(B, Hkv, M, D, generator=g), torch.arange(M)[None])
    q_mem = torch.zeros(B, Hq, T, D)
    q_mem[:, :, :2] = b                                             # first chunk asks for b
    q_mem[:, :, 2:] = a                                             # last chunk asks for a
    k_loc = torch.randn(B, Hkv, T, D, generator=g) * 0.1
    _, rows, probs = block_attention(mem, q_mem, q_mem, k_loc, k_loc, top_k=4, n_blocks=1, block_size=bs,
                                     scale=1.0)
    assert rows[0, 0, 0].tolist() == list(range(8, 16)) == rows[0, 0, 1].tolist()
    for t in range(2, T):
        assert rows[0, 0, t].tolist() == list(range(40, 48))
    assert int(probs[0, 0, 5].argmax()) == 3                         # row 43 draws the attention
    _, rows2, _ = block_attention(mem, q_mem, q_mem, k_loc, k_loc, top_k=4, n_blocks=2, block_size=bs, scale=1.0)
    got = [i for i in rows2[0, 0, 9].tolist() if i >= 0]             # two whole blocks, document order
    assert len(got) == 2 * bs and got == sorted(got) and set(range(40, 48)) <= set(got)


def test_short_evicted_and_padding_blocks_read_only_their_own_rows():
    """A block cut by eviction (a gap in positions), the last, short block and padding rows:
    only rows whose position lies in the chosen block and that are valid are read."""
    g = torch.Generator().manual_seed(2)
    B, Hkv, D, bs = 2, 1, 8, 4
    pos = torch.tensor([[2, 3, 4, 5, 6, 7, 8, 9, 10], [0, 1, 2, 3, 4, 5, 6, 7, 8]])   # seq 0 lost 0-1
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 7:] = False                                            # seq 1 is shorter: padding rows
    mem = _memory(B, Hkv, D, pos, g, valid)
    q = torch.randn(B, Hkv, 1, D, generator=g)
    out, rows, _ = block_attention(mem, q, q, q, q, top_k=9, n_blocks=9, block_size=bs, scale=1.0)
    assert sorted(i for i in rows[0, 0, 0].tolist() if i >= 0) == list(range(9))
    assert sorted(i for i in rows[1, 0, 0].tolist() if i >= 0) == list(range(7))
    ok = torch.stack([torch.ones(9, dtype=torch.bool), valid[1]])[:, None]                 # [B, T, M]
    want = _dense(q, q, q, q, mem.keys, mem.values, ok, 1.0, torch.zeros(Hkv))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    _, one, _ = block_attention(mem, q, q, q, q, top_k=9, n_blocks=1, block_size=bs, scale=1.0)
    for b in range(B):                                              # one block: rows of one position block
        got = [i for i in one[b, 0, 0].tolist() if i >= 0]
        assert got and len({int(pos[b, i]) // bs for i in got}) == 1 and bool(valid[b, got].all())
        assert got == list(range(got[0], got[-1] + 1))


def test_block_reads_in_the_model_generate_record_and_are_a_read_time_setting():
    """read_blocks through MemformerForCausalLM: generation reads blocks (other logits than token
    reads), evidence recording works, and set_read_blocks(0) gives token reads back exactly."""
    from conftest import tiny_backbone
    from memformer import MemformerForCausalLM, MemoryConfig
    from memformer.qa.evidence import retrieval_mass
    torch.manual_seed(0)
    cfg = MemoryConfig(window=16, sink_tokens=2, overlap=4, top_k=4, lora_rank=0)
    model = MemformerForCausalLM(tiny_backbone("llama"), None, cfg)
    ids = torch.randint(3, 100, (1, 120))
    model.memorize(ids[:, :100], show_progress=False)
    tail = torch.cat([model.sink_ids, ids[:, 100:]], 1)
    token_logits = model(tail).logits
    model.set_read_blocks(2, block_size=8)
    block_logits = model(tail).logits
    assert not torch.allclose(token_logits, block_logits)
    model.set_read_blocks(0)
    torch.testing.assert_close(model(tail).logits, token_logits)
    model.set_read_blocks(2)
    torch.testing.assert_close(model(tail).logits, block_logits)
    out = model.generate(ids[:, 100:], max_new_tokens=3, do_sample=False, record=True)
    assert out.shape == (1, 23)
    mass = retrieval_mass(model, model.seen[0])
    assert float(mass.answer.sum()) > 0
    with pytest.raises(ValueError, match="block_size"):
        model.set_read_blocks(2, block_size=0)


@pytest.mark.parametrize("kw,msg", [(dict(read_blocks=-1), "read_blocks"), (dict(block_size=0), "block_size"),
                                    (dict(read_blocks=2, neighbors=1), "set one")])
def test_block_read_settings_are_validated(kw, msg):
    from memformer import MemoryConfig
    with pytest.raises(ValueError, match=msg):
        MemoryConfig(**kw)


@pytest.mark.parametrize("mode", ["fixed", "first"])
def test_contiguous_block_reads_of_all_memory_equal_the_backbone_over_the_whole_text(mode):
    """Keys stored un-rotated are laid out in document order just before the local window. With
    no sink, no overlap, memory in every layer and every block read, reading window 2 against the
    memory of window 1 is exactly the frozen backbone's causal forward over both windows: the
    memory rows are the backbone's own keys/values of window 1 at the positions they had."""
    from conftest import tiny_backbone
    from memformer import MemformerForCausalLM, MemoryConfig
    torch.manual_seed(0)
    W, bs = 24, 8                                                   # 3 blocks fill window 1
    backbone = tiny_backbone("llama")
    cfg = MemoryConfig(window=W, sink_tokens=0, overlap=0, top_k=W, lora_rank=0, position_mode=mode,
                       read_blocks=W // bs, block_size=bs)
    model = MemformerForCausalLM(backbone, None, cfg)
    ids = torch.randint(3, 100, (1, 2 * W))
    model.memorize(ids[:, :W], show_progress=False)
    got = model(ids[:, W:]).logits                                  # [1, W, V]
    model.runtime.enabled = False
    want = model.backbone(ids).logits[:, W:]                        # plain causal forward, positions 0..2W-1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    model.runtime.enabled = True
    model.set_read_blocks(1)                                        # one block: a different (partial) read
    assert not torch.allclose(model(ids[:, W:]).logits, want, atol=1e-3)
    model.set_read_blocks(W // 4, block_size=4)                     # the layout follows the new setting
    torch.testing.assert_close(model(ids[:, W:]).logits, want, atol=1e-4, rtol=1e-4)


def test_contiguous_layout_puts_the_blocks_read_at_minus_R_and_refuses_a_short_rotation():
    """block_attention with row_rotation: rows rotated by slot (short last block included), read
    against q_rot, equal a dense softmax over keys rotated at positions slot - R."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    g = torch.Generator().manual_seed(3)
    B, Hkv, G, D, M, bs, T = 1, 2, 2, 8, 13, 4, 3
    Hq = Hkv * G
    mem = _memory(B, Hkv, D, torch.arange(M)[None], g)
    rope = LlamaRotaryEmbedding(LlamaConfig(hidden_size=Hq * D, num_attention_heads=Hq, head_dim=D))
    R = 4 * bs                                                      # 4 blocks, the last holds 1 row
    cos, sin = rope(torch.zeros(1), torch.arange(-R, 0)[None])      # [1, R, D]
    q, k_loc = torch.randn(B, Hq, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    out, rows, _ = block_attention(mem, q, torch.randn(B, Hq, T, D, generator=g), k_loc, k_loc, top_k=M,
                                   n_blocks=4, block_size=bs, scale=1.0, rotary_fn=apply_rotary_pos_emb,
                                   row_rotation=(cos, sin))
    assert rows[0, 0, 0].tolist()[:M] == list(range(M))
    k_rot = apply_rotary_pos_emb(mem.keys, mem.keys, cos[:, :M], sin[:, :M])[1]     # row m at slot m
    want = _dense(q, q, k_loc, k_loc, k_rot, mem.values, torch.ones(B, T, M, dtype=torch.bool), 1.0,
                  torch.zeros(Hq))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="row_rotation covers"):
        block_attention(mem, q, q, k_loc, k_loc, top_k=M, n_blocks=4, block_size=bs, scale=1.0,
                        rotary_fn=apply_rotary_pos_emb, row_rotation=(cos[:, :8], sin[:, :8]))


@pytest.mark.parametrize("T", [1, 6])
def test_pinned_blocks_are_read_by_every_query_without_a_search(T):
    """pinned block ids [B, n]: every query reads exactly those blocks' rows (document order,
    per sequence) in one dense softmax with its local keys; memory is never searched."""
    g = torch.Generator().manual_seed(4)
    B, Hkv, G, D, M, bs = 2, 2, 2, 8, 21, 4
    Hq = Hkv * G
    mem = _memory(B, Hkv, D, torch.arange(M).repeat(B, 1), g)
    mem.search = None                                               # a search would fail
    q, q_mem = torch.randn(B, Hq, T, D, generator=g), torch.randn(B, Hq, T, D, generator=g)
    k_loc, v_loc = torch.randn(B, Hkv, T + 1, D, generator=g), torch.randn(B, Hkv, T + 1, D, generator=g)
    pinned = torch.tensor([[5, 1], [2, 3]])                         # block 5 holds one row (20)
    out, rows, probs = block_attention(mem, q, q_mem, k_loc, v_loc, top_k=3, n_blocks=1, block_size=bs,
                                       scale=D ** -0.5, pinned=pinned)
    want_rows = [list(range(4, 8)) + [20], list(range(8, 16))]
    ok = torch.zeros(B, T, M, dtype=torch.bool)
    for b in range(B):
        ok[b, :, want_rows[b]] = True
        for t in range(T):
            assert [i for i in rows[b, 0, t].tolist() if i >= 0] == want_rows[b]
    want = _dense(q, q_mem, k_loc, v_loc, mem.keys, mem.values, ok, D ** -0.5, torch.zeros(Hq))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert bool((probs[rows < 0] == 0).all())


def test_reading_blocks_in_the_model_is_scoped_and_validated():
    """model.reading_blocks(ids): inside, the contiguous layout of every block equals the frozen
    backbone over the whole text (fixed mode, no sink/overlap); outside, the configured token
    reads come back exactly. Bad ids are refused before anything changes."""
    from conftest import tiny_backbone
    from memformer import MemformerForCausalLM, MemoryConfig
    torch.manual_seed(0)
    W, bs = 24, 8
    cfg = MemoryConfig(window=W, sink_tokens=0, overlap=0, top_k=4, lora_rank=0, position_mode="fixed",
                       block_size=bs)
    model = MemformerForCausalLM(tiny_backbone("llama"), None, cfg)
    ids = torch.randint(3, 100, (1, 2 * W))
    with pytest.raises(ValueError, match="nothing is memorized"):
        with model.reading_blocks([0]):
            pass
    model.memorize(ids[:, :W], show_progress=False)
    token_logits = model(ids[:, W:]).logits
    model.runtime.enabled = False
    want = model.backbone(ids).logits[:, W:]
    model.runtime.enabled = True
    assert model.memory_blocks() == W // bs
    with model.reading_blocks([2, 0, 1]):                           # any order: read in document order
        torch.testing.assert_close(model(ids[:, W:]).logits, want, atol=1e-4, rtol=1e-4)
    with model.reading_blocks([1]):
        assert not torch.allclose(model(ids[:, W:]).logits, want, atol=1e-3)
    torch.testing.assert_close(model(ids[:, W:]).logits, token_logits)
    assert model.runtime.read_blocks == 0 and model.runtime.pinned_blocks is None
    model.set_neighbors(1)                                          # pinned reads skip neighbours, keep the setting
    with model.reading_blocks([0, 1, 2], block_size=8):
        torch.testing.assert_close(model(ids[:, W:]).logits, want, atol=1e-4, rtol=1e-4)
    assert model.memory_config.neighbors == 1 and model.runtime.neighbors == 1
    model.set_neighbors(0)
    with pytest.raises(ValueError, match="block_size must be"):
        with model.reading_blocks([0], block_size=0):
            pass
    for bad, msg in (([3], r"in \[0, 3\)"), ([-1], r"in \[0, 3\)"), ([1, 1], "repeats"), ([[0], [1]], "must be"),
                     ([], "must be")):
        with pytest.raises(ValueError, match=msg):
            with model.reading_blocks(bad):
                pass
    torch.testing.assert_close(model(ids[:, W:]).logits, token_logits)


def test_pinned_blocks_over_rotated_keys_are_laid_out_like_unrotated_ones():
    """"window" keys are stored rotated at their window slot; the contiguous layout of pinned
    blocks undoes that rotation, so reading them equals reading the same blocks of a "fixed"
    memory (keys stored un-rotated) — also for blocks that straddle a window boundary and blocks
    of different windows that share slots. The "stored" layout reads them where they were."""
    from conftest import tiny_backbone
    from memformer import MemformerForCausalLM, MemoryConfig
    torch.manual_seed(0)
    backbone = tiny_backbone("llama")
    kw = dict(window=24, sink_tokens=2, overlap=4, top_k=4, lora_rank=0, block_size=8)
    twin = copy.deepcopy(backbone)
    window = MemformerForCausalLM(backbone, None, MemoryConfig(position_mode="window", **kw))
    ids = torch.randint(3, 100, (1, 90))
    window.memorize(ids[:, :70], show_progress=False)         # windows of 18 new tokens: blocks straddle them
    mem = next(iter(window.memories.values()))
    assert mem.slots[0, :3].tolist() == [2, 3, 4] and int(mem.slots.max()) == 23  # sink (0, 1) never stored
    state = {i: m.state_dict() for i, m in window.memories.items()}
    fixed = MemformerForCausalLM(twin, None, MemoryConfig(position_mode="fixed", **kw))
    fixed.memorize(ids[:, :70], show_progress=False)
    q = ids[:, 70:]
    blocks = [0, 2, 5, 7]                                       # block 2 (16..23) straddles windows 1 and 2
    with fixed.reading_blocks(blocks):
        want = fixed(q).logits
    with window.reading_blocks(blocks):
        torch.testing.assert_close(window(q).logits, want, atol=1e-4, rtol=1e-4)
    with window.reading_blocks(blocks, layout="stored"):
        assert not torch.allclose(window(q).logits, want, atol=1e-3)
    with pytest.raises(ValueError, match="unknown layout"):
        with window.reading_blocks(blocks, layout="packed"):
            pass
    for i, m in window.memories.items():                       # a memory saved before slots were kept
        old = {k: v for k, v in state[i].items() if k != "slots"}
        m.load_state_dict(old)
        assert bool((m.slots == -1).all())
    with pytest.raises(ValueError, match="no recorded window slots"):
        with window.reading_blocks(blocks):
            pass
    assert window.runtime.pinned_blocks is None and window.runtime.slot_rotation is None
    assert window.runtime.read_blocks == 0 and window.unknown_window_slots()
    with window.reading_blocks(blocks, layout="stored"):       # still readable where they were stored
        window(q)


def test_window_slots_survive_save_load_and_eviction(tmp_path):
    from conftest import tiny_backbone
    from memformer import MemformerForCausalLM, MemoryConfig
    torch.manual_seed(0)
    kw = dict(window=24, sink_tokens=2, overlap=4, lora_rank=0)
    model = MemformerForCausalLM(tiny_backbone("llama"), None, MemoryConfig(**kw))
    ids = torch.randint(3, 100, (1, 70))
    model.memorize(ids, show_progress=False)
    slots = {i: m.slots.clone() for i, m in model.memories.items()}
    model.save_memory(tmp_path / "m")
    model.reset_memory()
    model.load_memory(tmp_path / "m")
    for i, m in model.memories.items():
        assert torch.equal(m.slots, slots[i])
    small = MemformerForCausalLM(tiny_backbone("llama"), None, MemoryConfig(capacity=30, eviction="fifo", **kw))
    small.memorize(ids, show_progress=False)
    mem = next(iter(small.memories.values()))
    full = next(iter(slots.values()))
    assert mem.slots.shape == mem.positions.shape == (1, 30)
    assert torch.equal(mem.slots, full[:, -30:])                # slots stay with their rows
    small.memories[next(iter(small.memories))].evict_lowest_mass(5)
    assert torch.equal(mem.slots, full[:, -25:])


def test_a_prefix_before_pinned_blocks_is_read_in_the_same_softmax():
    """prefix (keys, values) [B, Hkv, P, D]: read by every query in one softmax with the pinned
    rows and the local keys (the same dense attention with P more memory keys); probs still
    cover the block rows only; a prefix without pinned blocks is refused."""
    g = torch.Generator().manual_seed(5)
    B, Hkv, G, D, M, bs, P, T = 2, 2, 2, 8, 16, 4, 3, 5
    Hq = Hkv * G
    mem = _memory(B, Hkv, D, torch.arange(M).repeat(B, 1), g)
    q = torch.randn(B, Hq, T, D, generator=g)
    k_loc, v_loc = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    kp, vp = torch.randn(B, Hkv, P, D, generator=g), torch.randn(B, Hkv, P, D, generator=g)
    pinned = torch.tensor([[1, 3], [0, 2]])
    bias = torch.randn(Hq, generator=g)
    out, rows, probs = block_attention(mem, q, q, k_loc, v_loc, top_k=3, n_blocks=2, block_size=bs,
                                       scale=D ** -0.5, mem_bias=bias, pinned=pinned, prefix=(kp, vp))
    ok = torch.zeros(B, T, M + P, dtype=torch.bool)
    ok[..., M:] = True
    for b, blocks in enumerate(pinned.tolist()):
        for blk in blocks:
            ok[b, :, blk * bs:(blk + 1) * bs] = True
    want = _dense(q, q, k_loc, v_loc, torch.cat([mem.keys, kp], 2), torch.cat([mem.values, vp], 2), ok,
                  D ** -0.5, bias)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert probs.shape[-1] == rows.shape[-1] == 2 * bs and float(probs.sum(-1).max()) < 1.0
    with pytest.raises(ValueError, match="only before pinned"):
        block_attention(mem, q, q, k_loc, v_loc, top_k=3, n_blocks=2, block_size=bs, scale=D ** -0.5,
                        prefix=(kp, vp))


@pytest.mark.parametrize("mode", ["window", "fixed"])
def test_pinned_blocks_after_their_sink_are_the_backbone_over_sink_text_sink_question(mode, tmp_path):
    """With the sink prefix, pinned blocks are read after the sink their states were
    computed after: with block_size = sink_tokens (block 0 is the sink, never stored), one
    window memorized and all its blocks read, [sink | question] against memory equals the frozen
    backbone's causal forward over [sink | text | sink | question]. Without the prefix it does not."""
    from conftest import tiny_backbone
    from memformer import MemformerForCausalLM, MemoryConfig
    torch.manual_seed(0)
    S, L = 4, 24
    cfg = MemoryConfig(window=S + L, sink_tokens=S, overlap=0, top_k=4, lora_rank=0, position_mode=mode,
                       block_size=S)
    model = MemformerForCausalLM(tiny_backbone("llama"), None, cfg)
    ids = torch.randint(3, 100, (1, S + L))
    question = torch.randint(3, 100, (1, 5))
    model.memorize(ids, show_progress=False)
    local = torch.cat([ids[:, :S], question], 1)                    # [sink | question], positions 0..
    model.runtime.enabled = False
    want = model.backbone(torch.cat([ids, local], 1)).logits[:, S + L:]
    model.runtime.enabled = True
    blocks = list(range(1, (S + L) // S))                           # every stored block, after the sink's
    with model.reading_blocks(blocks, sink_prefix=True):
        assert set(model.runtime.pinned_prefix) == set(model.memories)
        torch.testing.assert_close(model(local).logits, want, atol=1e-4, rtol=1e-4)
    assert model.runtime.pinned_prefix == {}
    with pytest.raises(ValueError, match="sink_prefix needs the contiguous layout"):
        with model.reading_blocks(blocks, layout="stored", sink_prefix=True):
            pass
    assert model.runtime.pinned_blocks is None and model.runtime.pinned_prefix == {}
    with model.reading_blocks(blocks):                              # the default: no prefix
        assert model.runtime.pinned_prefix == {}
        assert not torch.allclose(model(local).logits, want, atol=1e-3)
    model.save_memory(tmp_path / "mem")                             # the sink travels with the memory
    model.reset_memory()
    model.load_memory(tmp_path / "mem")
    with model.reading_blocks(blocks, sink_prefix=True):
        torch.testing.assert_close(model(local).logits, want, atol=1e-4, rtol=1e-4)
