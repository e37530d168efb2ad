"""Question reads (memformer.blocks, MemformerForCausalLM.reading_blocks / blocks_for / ask): which
rows the pinned blocks read, where they are laid out, and that the whole path is exact."""

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from conftest import HashedWords, clone_backbone, tiny_backbone
from index.store import LayerMemory
from memformer import MemformerForCausalLM, MemoryConfig
from memformer.blocks import block_attention


def _memory(B, Hkv, D, positions, g, valid=None, slots=None):
    mem = LayerMemory(B, Hkv, D)
    M = positions.shape[1]
    mem.add(torch.randn(B, Hkv, M, D, generator=g) * 0.5, torch.randn(B, Hkv, M, D, generator=g), positions,
            valid, slots)
    return mem


def _identity(n, D):
    """(cos, sin) [1, n, D] of a rotation that changes nothing."""
    return torch.ones(1, n, D), torch.zeros(1, n, D)


def _read(mem, q, k_loc, v_loc, blocks, bs, scale=1.0, bias=None, W=32):
    """block_attention with identity rotations (positions play no part): the rows and the softmax."""
    blocks = torch.as_tensor(blocks)
    blocks = blocks.expand(q.shape[0], -1) if blocks.dim() == 1 else blocks        # [B, n]
    D = q.shape[-1]
    return block_attention(mem, q, k_loc, v_loc, blocks, block_size=bs, scale=scale, rotary_fn=apply_rotary_pos_emb,
                           row_rotation=_identity(blocks.shape[-1] * bs, D), slot_rotation=_identity(W, D),
                           mem_bias=bias, with_probs=True)


def _dense(q, k_loc, v_loc, k_mem, v_mem, ok, scale, bias):
    """One softmax over [causal local keys (queries are the last T) ‖ memory rows where ok [B, T, M]]."""
    B, Hq, T, D = q.shape
    G = Hq // k_loc.shape[1]
    kl, vl = k_loc.repeat_interleave(G, 1), v_loc.repeat_interleave(G, 1)
    km, vm = k_mem.repeat_interleave(G, 1), v_mem.repeat_interleave(G, 1)
    s_loc = (q @ kl.transpose(-1, -2)) * scale
    S = kl.shape[2]
    causal = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]
    s_loc = s_loc.masked_fill(~causal, float("-inf"))
    s_mem = (q @ km.transpose(-1, -2)) * scale + bias.view(1, Hq, 1, 1)
    s_mem = s_mem.masked_fill(~ok[:, None], float("-inf"))
    p = torch.softmax(torch.cat([s_loc, s_mem], -1), -1)
    return p @ torch.cat([vl, vm], 2)


def _read_rows(rows, b, t=0):
    return [i for i in rows[b, 0, t].tolist() if i >= 0]


# ---------------------------------------------------------------- block_attention
@pytest.mark.parametrize("T,block_size", [(1, 4), (7, 4), (10, 3)])
def test_reading_every_block_is_full_attention_over_local_and_memory(T, block_size):
    """Every block pinned: every row is read, by every query; the result is one dense softmax over
    local keys and all of memory, with the gate added to memory logits."""
    g = torch.Generator().manual_seed(0)
    B, Hkv, G, D, M = 2, 2, 2, 8, 13
    Hq = Hkv * G
    mem = _memory(B, Hkv, D, torch.arange(M).repeat(B, 1), g)
    q = torch.randn(B, Hq, T, D, generator=g)
    k_loc, v_loc = torch.randn(B, Hkv, T + 2, D, generator=g), torch.randn(B, Hkv, T + 2, D, generator=g)
    bias = torch.randn(Hq, generator=g)
    blocks = list(range(-(-M // block_size)))
    out, rows, probs = _read(mem, q, k_loc, v_loc, blocks, block_size, scale=D ** -0.5, bias=bias)
    want = _dense(q, k_loc, v_loc, mem.keys, mem.values, torch.ones(B, T, M, dtype=torch.bool), D ** -0.5, bias)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for b in range(B):
        for t in range(T):
            assert _read_rows(rows, b, t) == list(range(M))
    assert rows.shape == (B, 1, T, len(blocks) * block_size) and probs.shape == rows.shape
    assert bool((probs[rows < 0] == 0).all()) and float(probs.sum(-1).max()) < 1


def test_short_evicted_and_padding_blocks_read_only_their_own_rows():
    """A block cut by eviction (a gap in positions), the last, short block and padding rows:
    only rows whose position lies in a pinned block and that are valid are read; a block with no
    row left reads nothing (the local attention alone)."""
    g = torch.Generator().manual_seed(2)
    B, Hkv, D, bs = 2, 1, 8, 4
    pos = torch.tensor([[2, 3, 4, 5, 6, 7, 8, 9, 10], [0, 1, 2, 3, 4, 5, 6, 7, 8]])   # seq 0 lost 0-1
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 7:] = False                                            # seq 1 is shorter: padding rows
    mem = _memory(B, Hkv, D, pos, g, valid)
    q = torch.randn(B, Hkv, 1, D, generator=g)
    out, rows, _ = _read(mem, q, q, q, [0, 1, 2], bs)
    assert _read_rows(rows, 0) == list(range(9)) and _read_rows(rows, 1) == list(range(7))
    ok = torch.stack([torch.ones(9, dtype=torch.bool), valid[1]])[:, None]                 # [B, T, M]
    torch.testing.assert_close(out, _dense(q, q, q, mem.keys, mem.values, ok, 1.0, torch.zeros(Hkv)),
                               atol=1e-5, rtol=1e-5)
    _, one, _ = _read(mem, q, q, q, [0], bs)                        # block 0: positions 0..3
    assert _read_rows(one, 0) == [0, 1] and _read_rows(one, 1) == [0, 1, 2, 3]
    out2, two, _ = _read(mem, q, q, q, [[2], [2]], bs)              # block 2: positions 8..11
    assert _read_rows(two, 0) == [6, 7, 8] and _read_rows(two, 1) == []
    none = torch.zeros(B, 1, 9, dtype=torch.bool)
    torch.testing.assert_close(out2[1], _dense(q, q, q, mem.keys, mem.values, none, 1.0, torch.zeros(Hkv))[1],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [1, 6])
def test_pinned_blocks_are_read_by_every_query_without_a_search(T):
    """pinned block ids [B, n]: every query reads exactly those blocks' rows (document order, per
    sequence) in one dense softmax with its local keys; memory is never searched."""
    g = torch.Generator().manual_seed(4)
    B, Hkv, G, D, M, bs = 2, 2, 2, 8, 21, 4
    Hq = Hkv * G
    mem = _memory(B, Hkv, D, torch.arange(M).repeat(B, 1), g)
    mem.search = None                                               # a search would fail
    q = torch.randn(B, Hq, T, D, generator=g)
    k_loc, v_loc = torch.randn(B, Hkv, T + 1, D, generator=g), torch.randn(B, Hkv, T + 1, D, generator=g)
    bias = torch.randn(Hq, generator=g)
    out, rows, probs = _read(mem, q, k_loc, v_loc, [[5, 1], [2, 3]], bs, scale=D ** -0.5, bias=bias)
    want_rows = [list(range(4, 8)) + [20], list(range(8, 16))]     # block 5 holds one row (20)
    ok = torch.zeros(B, T, M, dtype=torch.bool)
    for b in range(B):
        ok[b, :, want_rows[b]] = True
        for t in range(T):
            assert _read_rows(rows, b, t) == want_rows[b]
    torch.testing.assert_close(out, _dense(q, k_loc, v_loc, mem.keys, mem.values, ok, D ** -0.5, bias),
                               atol=1e-5, rtol=1e-5)
    assert bool((probs[rows < 0] == 0).all())


def test_contiguous_layout_puts_the_blocks_read_at_minus_R_and_refuses_a_short_rotation():
    """Keys stored rotated at their window slot (windows of 6 new tokens after a sink of 2: slots
    restart, a block straddles two windows, rows of different windows share slots): block_attention
    undoes each row's slot rotation and lays block j of the n read at positions j*bs - R .. (R =
    n * bs; a short block leaves its tail empty). That equals a dense softmax over the raw keys
    rotated at those positions."""
    g = torch.Generator().manual_seed(3)
    B, Hkv, G, D, M, bs, T, W = 1, 2, 2, 8, 13, 4, 3, 8
    Hq = Hkv * G
    rope = LlamaRotaryEmbedding(LlamaConfig(hidden_size=Hq * D, num_attention_heads=Hq, head_dim=D))
    at = lambda positions: rope(torch.zeros(1), torch.as_tensor(positions)[None])       # (cos, sin) [1, n, D]
    raw = torch.randn(B, Hkv, M, D, generator=g)
    slots = torch.tensor([[2, 3, 4, 5, 6, 7, 2, 3, 4, 5, 6, 7, 2]])                     # three windows
    stored = apply_rotary_pos_emb(raw, raw, *at(slots[0]))[1]
    mem = LayerMemory(B, Hkv, D)
    values = torch.randn(B, Hkv, M, D, generator=g)
    mem.add(stored, values, torch.arange(M)[None], None, slots)
    blocks = [3, 0, 1]                                              # block 1 = rows 4-7: windows 1 and 2
    R = len(blocks) * bs                                            # block 3 holds one row (12)
    q, k_loc = torch.randn(B, Hq, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    kw = dict(block_size=bs, scale=1.0, rotary_fn=apply_rotary_pos_emb, slot_rotation=at(range(W)))
    out, rows, _ = block_attention(mem, q, k_loc, k_loc, torch.tensor([blocks]), row_rotation=at(range(-R, 0)), **kw)
    assert rows[0, 0, 0].tolist() == list(range(8)) + [12, -1, -1, -1]
    read = list(range(8)) + [12]
    layout = torch.zeros(M, dtype=torch.long)
    layout[read] = torch.arange(9) - R                               # row 12 at slot 8 of R = 12
    oracle = apply_rotary_pos_emb(raw, raw, *at(layout))[1]
    ok = torch.zeros(B, T, M, dtype=torch.bool)
    ok[..., read] = True
    torch.testing.assert_close(out, _dense(q, k_loc, k_loc, oracle, values, ok, 1.0, torch.zeros(Hq)),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="row_rotation covers"):
        block_attention(mem, q, k_loc, k_loc, torch.tensor([blocks]), row_rotation=at(range(-8, 0)), **kw)


# ---------------------------------------------------------------- question reads in the model
@pytest.mark.parametrize("W,bs", [(24, 8), (20, 8)])
def test_contiguous_block_reads_of_all_memory_equal_the_backbone_over_the_whole_text(W, bs):
    """No sink, no overlap, memory in every layer, one window memorized: reading all its blocks,
    a prompt's logits are exactly the frozen backbone's causal forward over [text ‖ prompt], the
    text at positions 0..N-1 and the prompt at R.. (R = blocks * bs; the last block of the
    20-token text is short, so the prompt sits R - N positions after the text). Any order of the
    ids reads the same; one block alone is a different, partial read."""
    torch.manual_seed(0)
    model = MemformerForCausalLM(tiny_backbone("llama"), None,
                                 MemoryConfig(window=W, sink_tokens=0, overlap=0, top_k=4, block_size=bs))
    ids, prompt = torch.randint(3, 100, (1, W)), torch.randint(3, 100, (1, 7))
    model.memorize(ids, show_progress=False)
    n = model.memory_blocks()
    assert n == -(-W // bs)
    R = n * bs
    with model.memory_disabled():
        pos = torch.cat([torch.arange(W), torch.arange(R, R + prompt.shape[1])])[None]
        want = model.backbone(torch.cat([ids, prompt], 1), position_ids=pos).logits[:, W:]
    with torch.no_grad(), model.reading_blocks(list(range(n))[::-1]):
        torch.testing.assert_close(model(prompt).logits, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad(), model.reading_blocks([1]):
        assert not torch.allclose(model(prompt).logits, want, atol=1e-3)


def test_question_reads_after_the_sink_are_the_backbone_over_sink_text_sink_question():
    """With a sink: the memory's rows were computed after the sink, which is never stored; the
    prompt [sink ‖ question] (generate prepends the memory's sink) reading every block equals the
    frozen backbone over [sink ‖ text ‖ sink ‖ question] in which the second part does not see the
    first sink (it reads the text only, laid out just before it). Block 0, the sink's, is empty:
    reading it too changes nothing. The first generated token's logits are the same."""
    torch.manual_seed(0)
    S, L, bs = 4, 24, 4
    cfg = MemoryConfig(window=S + L, sink_tokens=S, overlap=0, top_k=4, block_size=bs)
    model = MemformerForCausalLM(tiny_backbone("llama"), None, cfg)
    ids, question = torch.randint(3, 100, (1, S + L)), torch.randint(3, 100, (1, 5))
    model.memorize(ids, show_progress=False)
    assert model.memory_size() == L and torch.equal(model.state.sink_ids, ids[:, :S])
    local = torch.cat([ids[:, :S], question], 1)
    full = torch.cat([ids, local], 1)
    N = full.shape[1]
    allow = torch.tril(torch.ones(N, N, dtype=torch.bool))
    allow[S + L:, :S] = False                                       # the second part skips the first sink
    with model.memory_disabled():
        want = model.backbone(full, attention_mask=allow[None, None]).logits[:, S + L:]
        plain = model.backbone(full).logits[:, S + L:]
    assert not torch.allclose(want, plain, atol=1e-3)               # the mask matters
    n = model.memory_blocks()
    with torch.no_grad():
        for blocks in (list(range(1, n)), list(range(n))):
            with model.reading_blocks(blocks):
                torch.testing.assert_close(model(local).logits, want, atol=1e-4, rtol=1e-4)
                out = model.generate(question, max_new_tokens=1, do_sample=False, return_dict_in_generate=True,
                                     output_logits=True)
            torch.testing.assert_close(out.logits[0], want[:, -1], atol=1e-4, rtol=1e-4)


def test_reading_blocks_is_validated_and_scoped():
    """reading_blocks refuses bad ids (out of range, repeated, wrong shape for the memory's batch)
    and an empty memory before changing anything; inside, every memory layer reads the pinned
    blocks; afterwards (also after an exception inside) the runtime is as before and kNN reads
    come back exactly."""
    torch.manual_seed(0)
    W, bs = 24, 8
    cfg = MemoryConfig(window=W, sink_tokens=2, overlap=0, top_k=4, block_size=bs)
    model = MemformerForCausalLM(tiny_backbone("llama"), None, cfg)
    rt = model.runtime

    def restored():
        return rt.pinned_blocks is None and rt.row_rotation is None

    with pytest.raises(ValueError, match="nothing is memorized"):
        with model.reading_blocks([0]):
            pass
    model.memorize(torch.tensor([[5]]), show_progress=False)        # shorter than the sink: all sink
    assert model.memory_size() == 0 and model.memories
    with pytest.raises(ValueError, match="nothing is memorized"):
        with model.reading_blocks([0]):
            pass
    model.reset_memory()
    ids = torch.randint(3, 100, (1, 2 + W))
    model.memorize(ids, show_progress=False)                       # positions 2..25: blocks 0..3
    assert model.memory_blocks() == 4
    q = torch.randint(3, 100, (1, 6))
    with torch.no_grad():
        knn = model(q).logits
        with model.reading_blocks([2, 0]):
            assert rt.pinned_blocks.tolist() == [[2, 0]] and rt.row_rotation[0].shape[1] == 2 * bs
            pinned = model(q).logits
        assert restored()
        assert not torch.allclose(pinned, knn, atol=1e-3)
        for bad, msg in (([4], r"in \[0, 4\)"), ([-2], r"in \[0, 4\)"), ([1, 1], "repeats"),
                         ([1, -1, 1], "repeats"), ([-1], "at least one block"),
                         ([[0, 1], [-1, -1]], "at least one block"), ([], "must be"), ([[[0]]], "must be")):
            with pytest.raises(ValueError, match=msg):
                with model.reading_blocks(bad):
                    pass
            assert restored()
        with pytest.raises(RuntimeError, match="inside"):
            with model.reading_blocks([1]):
                model(q)
                raise RuntimeError("inside")
        assert restored()
        torch.testing.assert_close(model(q).logits, knn)
        # a memory of one sequence read by a batch of K, each row its own blocks (-1 pads)
        with model.reading_blocks([[-1, 2], [0, 3], [-1, 1]]):
            assert rt.pinned_blocks.tolist() == [[-1, 2], [0, 3], [-1, 1]]
            rows = model(q.expand(3, -1)).logits
        with model.reading_blocks([2]):
            torch.testing.assert_close(rows[0], model(q).logits[0], atol=1e-5, rtol=1e-5)
        with model.reading_blocks([3, 0]):
            torch.testing.assert_close(rows[1], model(q).logits[0], atol=1e-5, rtol=1e-5)

    two = MemformerForCausalLM(tiny_backbone("llama"), None, cfg)   # a batch of two memories
    two.memorize(torch.randint(3, 100, (2, 2 + W)), show_progress=False)
    with two.reading_blocks([[0, 1], [3, 2]]):
        assert two.runtime.pinned_blocks.tolist() == [[0, 1], [3, 2]]
    with two.reading_blocks([1]):                                   # [n]: the same blocks for both
        assert two.runtime.pinned_blocks.tolist() == [[1], [1]]
    for bad, msg in (([[0], [1], [2]], r"must be \[n\] or \[2, n\]"), ([[0, 0], [1, 2]], "repeats")):
        with pytest.raises(ValueError, match=msg):
            with two.reading_blocks(bad):
                pass
    assert two.runtime.pinned_blocks is None and two.runtime.row_rotation is None


def test_pinned_blocks_over_rotated_keys_are_laid_out_like_unrotated_ones():
    """Memory keys are stored rotated at their window slot (the sink's slots 0, 1 are never
    stored); the pinned layout undoes that rotation, so reading blocks equals reading the same
    blocks of a memory holding the un-rotated keys (the k_proj outputs, captured while memorizing)
    at slot 0 — also for blocks that straddle a window boundary and blocks of different windows
    that share slots."""
    torch.manual_seed(0)
    backbone = tiny_backbone("llama")
    twin_backbone = clone_backbone(backbone)
    cfg = MemoryConfig(window=24, sink_tokens=2, overlap=4, top_k=4, block_size=8)
    model = MemformerForCausalLM(backbone, None, cfg)
    layers = model.adapter.layers(model.backbone)
    captured = {i: [] for i in model.memory_layer_ids}
    hooks = [getattr(layers[i], model.adapter.attn_attr).attn.k_proj.register_forward_hook(
        lambda m, inp, out, i=i: captured[i].append(out[:, model.runtime.write_slice])) for i in captured]
    ids = torch.randint(3, 100, (1, 90))
    model.memorize(ids[:, :70], show_progress=False)               # windows of 18 new tokens
    for h in hooks:
        h.remove()
    mem = next(iter(model.memories.values()))
    assert mem.slots[0, :3].tolist() == [2, 3, 4] and int(mem.slots.max()) == 23
    assert mem.slots[0, 18:21].tolist() == [6, 7, 8]               # window 2 after its 4 tokens of context
    twin = MemformerForCausalLM(twin_backbone, None, cfg)
    twin.state.ensure(1)
    D = model.config.hidden_size // model.config.num_attention_heads
    rotary = model.backbone.model.rotary_emb
    for i, m in model.memories.items():
        raw = torch.cat(captured[i], 1).view(1, len(m), -1, D).transpose(1, 2)          # [1, Hkv, M, D]
        cos, sin = rotary(raw, m.slots)
        torch.testing.assert_close(m.keys, apply_rotary_pos_emb(raw, raw, cos, sin)[1], atol=1e-5, rtol=1e-5)
        twin.memories[i].add(raw, m.values, m.positions, m.valid, torch.zeros_like(m.slots))
    q = ids[:, 70:]
    for blocks in ([0, 2, 5, 7], [1, 2], list(range(model.memory_blocks()))):   # block 2: positions 16..23
        with torch.no_grad(), model.reading_blocks(blocks), twin.reading_blocks(blocks):
            torch.testing.assert_close(model(q).logits, twin(q).logits, atol=1e-5, rtol=1e-5)


def test_window_slots_survive_save_load_and_eviction(tmp_path):
    torch.manual_seed(0)
    kw = dict(window=24, sink_tokens=2, overlap=4)
    model = MemformerForCausalLM(tiny_backbone("llama"), None, MemoryConfig(**kw))
    ids = torch.randint(3, 100, (1, 70))
    model.memorize(ids, show_progress=False)
    slots = {i: m.slots.clone() for i, m in model.memories.items()}
    assert int(next(iter(slots.values())).min()) >= 2              # every row's slot is known
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
    mem.remove_oldest(5)                                        # FIFO eviction below capacity
    assert torch.equal(mem.slots, full[:, -25:])


def test_question_read_records_only_the_pinned_blocks():
    """Generation inside reading_blocks with record=True: every memory layer, kNN layer or not,
    records reads of exactly the rows of the pinned blocks (the same rows for every query), and the
    evidence mass lands on those positions only."""
    from memformer.qa.evidence import retrieval_mass
    torch.manual_seed(0)
    cfg = MemoryConfig(window=16, sink_tokens=2, overlap=4, top_k=4, block_size=8, knn_layers=[1])
    model = MemformerForCausalLM(tiny_backbone("llama"), None, cfg)
    ids = torch.randint(3, 100, (1, 120))
    model.memorize(ids[:, :100], show_progress=False)
    blocks = [3, 9]
    with model.reading_blocks(blocks):
        out = model.generate(ids[:, 100:110], max_new_tokens=3, do_sample=False, record=True)
    assert out.shape == (1, 13)
    rt = model.runtime
    assert sorted(model.recorded_reads()) == [0, 1] and rt.pinned_blocks is None
    want = [r for r in range(model.memory_size()) if int(model.memories[0].positions[0, r]) // 8 in blocks]
    assert len(want) == 16
    for i, calls in model.recorded_reads().items():
        assert len(calls) == 3                                      # prefill + 2 decoding steps
        for rows, probs in calls:
            assert rows.shape[1] == 1 and rows.shape[-1] == 16 and probs.shape == rows.shape
            for t in range(rows.shape[2]):
                assert _read_rows(rows, 0, t) == want
    mass = retrieval_mass(model, model.state.seen[0])
    assert float(mass.answer.sum()) > 0
    inside = torch.zeros(model.state.seen[0], dtype=torch.bool)
    for b in blocks:
        inside[b * 8:(b + 1) * 8] = True
    assert float(mass.answer[~inside].abs().sum()) == 0 and float(mass.prompt[~inside].abs().sum()) == 0


@pytest.mark.parametrize("kw,msg", [(dict(block_size=0), "block_size"), (dict(question_blocks=0), "question_blocks"),
                                    (dict(layer_blocks=-1), "layer_blocks"), (dict(layer_blocks="32"), "layer_blocks")])
def test_block_read_settings_are_validated(kw, msg):
    with pytest.raises(ValueError, match=msg):
        MemoryConfig(**kw)


# ---------------------------------------------------------------- ask: passages pick the blocks
def char_tokenizer():
    """One token per printable ASCII character (+ newline), ids < 100: fits the tiny vocab of 128."""
    chars = ["\n"] + [chr(i) for i in range(32, 127)]
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


FILLER = ["river", "stone", "cloud", "maple", "lantern", "copper", "meadow", "harbor", "willow", "pepper"]
PLANT = "zebraquartz"


def _filler(n_words, seed):
    g = torch.Generator().manual_seed(seed)
    return " ".join(FILLER[int(i)] for i in torch.randint(0, len(FILLER), (n_words,), generator=g))


@pytest.mark.parametrize("where", [0.1, 0.5, 0.95])
def test_ask_reads_the_blocks_under_the_passage_holding_the_answer(where):
    """blocks_for: the passage the embedder ranks first holds the planted string, and the blocks
    chosen are those under it (widened by the margin, or the passage's own when that is too many)
    and cover the plant. ask() generates inside that question read: every memory layer records
    reads of exactly those blocks' rows, the runtime is restored afterwards, and the answer is what
    generate gives inside reading_blocks(blocks_for(question))."""
    from memformer.passages import QUESTION_MARGIN
    torch.manual_seed(0)
    bs, n_blocks = 16, 12
    cfg = MemoryConfig(window=64, sink_tokens=2, overlap=8, top_k=4, block_size=bs, question_blocks=n_blocks,
                       knn_layers=[1], answer_reads=1)              # the best read alone
    model = MemformerForCausalLM(tiny_backbone("llama"), char_tokenizer(), cfg, embedder=HashedWords(256))
    doc_a = _filler(80, 1) + "."
    words = _filler(140, 2).split()
    cut = int(len(words) * where)
    doc_b = " ".join(words[:cut] + [PLANT] + words[cut:]) + "."
    model.memorize(doc_a, show_progress=False)
    model.memorize(doc_b, show_progress=False)
    assert model.state.doc_starts == [[0, len(doc_a)]]
    p0 = len(doc_a) + doc_b.index(PLANT)                            # char tokenizer: stream position = char
    p1 = p0 + len(PLANT)
    question = "Where is the zebraquartz?"
    top = model.questions.passages.search(question)[0]
    assert top.start <= p0 and p1 <= top.end and top.score > 0
    blocks = model.questions.blocks_for(question)
    a, b, limit = max(0, top.start - QUESTION_MARGIN), min(top.end + QUESTION_MARGIN, model.state.seen[0]), model.state.seen[0]
    under = list(range(a // bs, (b - 1) // bs + 1))
    if len(under) > n_blocks:
        under = list(range(top.start // bs, (top.end - 1) // bs + 1))[:n_blocks]
    assert blocks == sorted(blocks) and len(blocks) <= n_blocks and set(under) <= set(blocks)
    assert set(range(p0 // bs, (p1 - 1) // bs + 1)) <= set(blocks) and max(blocks) * bs < limit

    answer = model.ask(question, max_new_tokens=3, record=True)
    rt = model.runtime
    assert rt.pinned_blocks is None and rt.row_rotation is None
    mem = model.memories[0]
    want = [r for r in range(model.memory_size()) if int(mem.positions[0, r]) // bs in blocks]
    assert sorted(model.recorded_reads()) == [0, 1]                # layer 0 runs no kNN reads
    for calls in model.recorded_reads().values():
        for rows, _ in calls:
            assert rows.shape[-1] == len(blocks) * bs
            assert all(_read_rows(rows, 0, t) == want for t in range(rows.shape[2]))
    x = model.questions.prompt_ids(question)
    with model.reading_blocks(blocks):
        out = model.generate(x, max_new_tokens=3, do_sample=False)
    assert answer == model.tokenizer.decode(out[0, x.shape[1]:], skip_special_tokens=True).strip()


def test_question_read_without_memory_and_for_a_batch():
    """question_read with nothing memorized changes nothing (kNN reads, here none); blocks_for
    needs a memory of one sequence."""
    model = MemformerForCausalLM(tiny_backbone("llama"), char_tokenizer(),
                                 MemoryConfig(window=32, sink_tokens=2, overlap=4, block_size=8),
                                 embedder=HashedWords(256))
    with model.question_read("anything"):
        assert model.runtime.pinned_blocks is None
    assert isinstance(model.ask("river?", max_new_tokens=2), str)
    model.memorize([_filler(20, 1), _filler(20, 2)], show_progress=False)
    with pytest.raises(ValueError, match="one sequence"):
        model.questions.blocks_for("river")


@pytest.mark.parametrize("T,R,G", [(1, 7, 1), (5, 33, 3), (64, 130, 2)])
def test_fused_memory_part_equals_the_matmul_one(T, R, G):
    """The fused CPU path of shared_rows_attention (no gradient) gives the matmul path's output,
    with missing rows, a sequence with no row at all, and a memory gate."""
    from memformer.blocks import _rows_flash, _rows_softmax
    torch.manual_seed(T + R)
    B, Hkv, D = 2, 2, 16
    q = torch.randn(B, Hkv * G, T, D)
    k, v = torch.randn(B, Hkv, R, D), torch.randn(B, Hkv, R, D)
    ok = torch.rand(B, R) > 0.3
    ok[1] = False                                          # sequence 1 reads nothing
    bias = torch.randn(Hkv * G)
    want_out, want_lse, _ = _rows_softmax(q, k, v, ok, 0.25, bias)
    out, lse = _rows_flash(q, k, v, ok, 0.25, bias)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    assert torch.isneginf(lse[1]).all() and (out[1] == 0).all()


# ---------------------------------------------------------------- copy pointer
def _rows_reference(q, k_loc, v_loc, k_rows, v_rows, ok, scale, bias, extra):
    """One softmax over [causal local keys ‖ rows where ok [B, R]], memory logits + bias [Hq] +
    extra [B, Hq, T, R]: (out [B, Hq, T, D], each row's share [B, Hq, T, R])."""
    B, Hq, T, D = q.shape
    G = Hq // k_loc.shape[1]
    kl, vl = k_loc.repeat_interleave(G, 1), v_loc.repeat_interleave(G, 1)
    km, vm = k_rows.repeat_interleave(G, 1), v_rows.repeat_interleave(G, 1)
    S = kl.shape[2]
    causal = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]
    s_loc = ((q @ kl.transpose(-1, -2)) * scale).masked_fill(~causal, float("-inf"))
    s_mem = (q @ km.transpose(-1, -2)) * scale + bias.view(1, Hq, 1, 1) + extra
    s_mem = s_mem.masked_fill(~ok[:, None, None, :], float("-inf"))
    p = torch.softmax(torch.cat([s_loc, s_mem], -1), -1)
    return p @ torch.cat([vl, vm], 2), p[..., S:]


def test_copy_pointer_points_a_generated_token_at_the_row_after_the_one_read_before():
    """CopyPointer: a prompt (T > 1) is read exactly as without it and leaves its last query's
    shares; the next single query's memory logit at row j gets + beta * its head's share on row
    j - 1 at that query (one softmax with the local keys), which moves attention to those rows;
    a step of another batch or row count gets no bias."""
    from memformer.blocks import CopyPointer, shared_rows_attention
    g = torch.Generator().manual_seed(7)
    B, Hkv, G, D, R, T, beta = 2, 2, 2, 8, 11, 5, 3.0
    Hq, scale = Hkv * G, D ** -0.5
    k_rows, v_rows = torch.randn(B, Hkv, R, D, generator=g), torch.randn(B, Hkv, R, D, generator=g)
    ok = torch.rand(B, R, generator=g) > 0.2
    bias = torch.randn(Hq, generator=g)
    k_loc, v_loc = torch.randn(B, Hkv, T + 1, D, generator=g), torch.randn(B, Hkv, T + 1, D, generator=g)
    q = torch.randn(B, Hq, T + 1, D, generator=g)
    kw = dict(scale=scale, mem_bias=bias, with_probs=True)

    pointer = CopyPointer(beta)
    out, probs = shared_rows_attention(q[:, :, :T], k_loc[:, :, :T], v_loc[:, :, :T], k_rows, v_rows, ok,
                                       pointer=pointer, **kw)
    plain, plain_probs = shared_rows_attention(q[:, :, :T], k_loc[:, :, :T], v_loc[:, :, :T], k_rows, v_rows, ok, **kw)
    torch.testing.assert_close(out, plain)                                  # the prompt is read as it is
    torch.testing.assert_close(pointer.share, plain_probs[:, :, -1])        # [B, Hq, R] the last query's
    before = pointer.share.clone()

    step, step_probs = shared_rows_attention(q[:, :, T:], k_loc, v_loc, k_rows, v_rows, ok, pointer=pointer, **kw)
    after = torch.zeros_like(before)
    after[..., 1:] = before[..., :-1]                                       # row j gets row j-1's share
    want, want_p = _rows_reference(q[:, :, T:], k_loc, v_loc, k_rows, v_rows, ok, scale, bias,
                                   beta * after[:, :, None, :])
    torch.testing.assert_close(step, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step_probs, want_p, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pointer.share, want_p[:, :, -1], atol=1e-5, rtol=1e-5)
    free, free_p = _rows_reference(q[:, :, T:], k_loc, v_loc, k_rows, v_rows, ok, scale, bias, torch.zeros(1))
    assert not torch.allclose(step, free, atol=1e-3)
    pointed = (after > 0.05)[:, :, None, :]                                 # rows after a well-read row
    assert bool((want_p[pointed] > free_p[pointed]).all())

    assert pointer.bias(B, Hq, 2, R) is None and pointer.bias(1, Hq, 1, R) is None
    assert pointer.bias(B, Hq, 1, R + 1) is None and CopyPointer(beta).bias(B, Hq, 1, R) is None


def test_copy_pointer_is_scoped_to_a_read_and_leaves_prompts_and_training_reads_alone():
    """reading_blocks gives each read fresh pointers (MemoryConfig.copy_pointer > 0) and none at 0;
    a prompt's logits are the same either way; the first generated token too, and later ones
    differ (a random model's heads read memory); training's block reads keep no pointer."""
    import dataclasses
    from memformer.memory_layer import pinned_reads
    torch.manual_seed(0)
    cfg = MemoryConfig(window=16, sink_tokens=2, overlap=4, top_k=4, block_size=8, knn_layers=[1])
    model = MemformerForCausalLM(tiny_backbone("llama"), None, cfg)
    assert cfg.copy_pointer == 3.0
    ids = torch.randint(3, 100, (1, 120))
    model.memorize(ids[:, :100], show_progress=False)
    prompt, outs = ids[:, 100:110], {}
    for beta in (0.0, 3.0):
        model.memory_config = dataclasses.replace(cfg, copy_pointer=beta)
        with torch.no_grad(), model.reading_blocks([3, 9]):
            assert (model.runtime.pointers is None) == (beta == 0)
            logits = model(prompt).logits
            if beta:
                assert sorted(model.runtime.pointers) == sorted(model.memory_modules)
            out = model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
        outs[beta] = (logits, out.logits)
        assert model.runtime.pointers is None and model.runtime.copy_pointer == 0
    torch.testing.assert_close(outs[3.0][0], outs[0.0][0])
    torch.testing.assert_close(outs[3.0][1][0], outs[0.0][1][0])
    assert not torch.allclose(torch.cat(outs[3.0][1][1:]), torch.cat(outs[0.0][1][1:]), atol=1e-4)
    rt = model.runtime
    with pinned_reads(rt, torch.tensor([[3, 9]]), "own", model.rotation_at(*range(-16, 0))):
        assert rt.pointers is None                                           # training's reads: no pointer


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), True, "3", 101.0])
def test_copy_pointer_setting_is_validated(bad):
    with pytest.raises(ValueError, match="copy_pointer"):
        MemoryConfig(copy_pointer=bad)


def test_copy_pointer_rests_once_a_generated_token_ends_an_item():
    """item_end_tokens marks tokens that end an item themselves (a line break), that end in
    ".!?", and that start with whitespace; inside reading_blocks the first forward (the prompt)
    never rests the pointer, and once the generated text ends an item as first_item does (a line
    break, or "." then whitespace) the row rests for the rest of the read (its bias is zero), the
    other rows not; a point inside a value ("3.14") leaves it copying."""
    from memformer.blocks import CopyPointer
    torch.manual_seed(0)
    tok = char_tokenizer()
    cfg = MemoryConfig(window=32, sink_tokens=0, overlap=0, top_k=4, block_size=8, knn_layers=[1])
    model = MemformerForCausalLM(tiny_backbone("llama"), tok, cfg)
    breaks, closes, spaced = model.item_end_tokens()
    kind = lambda mask: [bool(mask[tok.convert_tokens_to_ids(c)]) for c in ".!?\na 7,"]
    assert kind(breaks) == [False] * 3 + [True] + [False] * 4
    assert kind(closes) == [True] * 3 + [False] * 5
    assert kind(spaced) == [False] * 3 + [True, False, True, False, False]
    model.memorize(torch.randint(3, 100, (1, 64)), show_progress=False)
    ids = lambda text: torch.tensor([tok(t, add_special_tokens=False)["input_ids"] for t in text])   # [B, T]
    rt = model.runtime
    with torch.no_grad(), model.reading_blocks([[1, 2], [0, 3]]):          # two reads of the one memory
        model(ids(["ab.", "cd."]))                                          # a prompt ending in "." rests nothing
        assert rt.pointer_rest.tolist() == [False, False]
        for step, want in (([".", "."], [False, False]),                   # "3." so far: the item goes on
                           (["1", " "], [False, True]),                    # "3.1" a value; "." then " " ends it
                           (["4", "z"], [False, True]),
                           (["!", "w"], [False, True]),
                           ([" ", "\n"], [True, True])):
            model(ids(step))
            assert rt.pointer_rest.tolist() == want, step
    assert rt.pointer_rest is None
    p = CopyPointer(2.0, torch.rand(2, 3, 5))
    bias = p.bias(2, 3, 1, 5, rest=torch.tensor([True, False]))
    assert bool((bias[0] == 0).all()) and bool((bias[1] != 0).any())
