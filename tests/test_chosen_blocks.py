"""Block reads with no question (memformer.blocks.chosen_blocks / chosen_block_attention): each
chunk of queries reads the blocks its layer's own queries choose, causally, in one softmax."""
import pytest
import torch

from conftest import tiny_backbone
from index.store import LayerMemory
from memformer import MemformerForCausalLM, MemoryConfig
from memformer.blocks import chosen_blocks, chunk_chooser


def _model(n_blocks, W=32, bs=8):
    torch.manual_seed(0)
    return MemformerForCausalLM(tiny_backbone("llama"), None, MemoryConfig(window=W, sink_tokens=2, overlap=4, top_k=4,
                                                                           block_size=bs, layer_blocks=n_blocks))


def test_chooser_scores_blocks_by_their_best_key_and_lags_one_chunk():
    """Block 2 holds a key along e0, block 5 one along e1; queries of chunk 0 point at e0, of
    chunk 1 at e1: chunk 0 reads block 2 (its first query chooses), chunk 1 reads block 2 too (its
    choice is chunk 0's mean query), chunk 2 reads block 5 (chunk 1's)."""
    B, Hkv, D, bs, M = 1, 2, 8, 4, 32
    mem = LayerMemory(B, Hkv, D)
    keys = torch.randn(B, Hkv, M, D) * 0.01
    keys[:, :, 2 * bs + 1, 0] = 5.0                       # block 2
    keys[:, :, 5 * bs + 3, 1] = 5.0                       # block 5
    mem.add(keys, torch.randn(B, Hkv, M, D), torch.arange(M)[None], None, torch.arange(M)[None] % 16)
    q = torch.zeros(B, 2 * Hkv, 3 * bs, D)                # 3 chunks of bs queries, 2 query heads per kv head
    q[:, :, :bs, 0] = 1.0
    q[:, :, bs:2 * bs, 1] = 1.0
    q[:, :, 2 * bs:, 2] = 1.0
    qg = q.view(B, Hkv, 2, 3 * bs, D).mean(2)             # [B, Hkv, T, D]: the choosers' queries
    choosers = torch.stack([chunk_chooser(qg, c, bs) for c in range(3)], dim=2)   # [B, Hkv, 3, D]
    blocks = chosen_blocks(mem, choosers, 1, bs)          # [B, 3, 1]
    assert blocks[0, :, 0].tolist() == [2, 2, 5]
    two = chosen_blocks(mem, choosers, 2, bs)              # [B, 3, 2]: best first, then another block
    assert two.shape == (1, 3, 2) and two[0, :, 0].tolist() == [2, 2, 5]
    assert all(len(set(row)) == 2 for row in two[0].tolist())


def test_reading_every_block_equals_the_pinned_read_of_every_block():
    """With a budget of every block, a generation step (one query) reads exactly what a question
    read of all blocks reads: same layout, same softmax."""
    model = _model(n_blocks=19)
    model.memorize(torch.randint(3, 100, (1, 150)), show_progress=False)
    n = model.memory_blocks()
    assert n == 19                                        # 150 tokens less the 2 sink tokens, blocks of 8
    x = torch.randint(3, 100, (1, 1))
    with torch.no_grad():
        chosen = model(x).logits
        with model.reading_blocks(list(range(n))):
            pinned = model(x).logits
        with model.memory_disabled():
            plain = model(x).logits
    torch.testing.assert_close(chosen, pinned, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(chosen, plain, atol=1e-3)


def test_chosen_reads_are_causal_and_read_a_few_blocks():
    """A token's logits do not depend on later tokens (each chunk's blocks are chosen by the chunk
    before it), and a budget of 2 blocks reads 2 blocks of rows, not the whole memory."""
    model = _model(n_blocks=2)
    model.memorize(torch.randint(3, 100, (1, 150)), show_progress=False)
    a = torch.randint(3, 100, (1, 30))
    b = torch.cat([a[:, :20], torch.randint(3, 100, (1, 10))], 1)
    model.runtime.record = False
    with torch.no_grad():
        la, lb = model(a).logits, model(b).logits
    torch.testing.assert_close(la[:, :20], lb[:, :20], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(la[:, 20:], lb[:, 20:], atol=1e-3)
    out = model.generate(a[:, :12], max_new_tokens=3, do_sample=False, record=True)
    assert out.shape == (1, 15)
    for reads in model.recorded_reads().values():
        for rows, _ in reads:
            assert ((rows >= 0).sum(-1) <= 2 * 8).all()


def test_generating_with_a_cache_reads_what_one_forward_reads():
    """Chunks count positions from the start of the window, and the cache keeps each layer's
    chooser queries and current rows: greedy generation (one token per call, crossing several
    chunks of 4) gives every token the logits a single forward over the whole sequence gives it,
    and a context cache continued twice gives the same tokens both times."""
    torch.manual_seed(0)
    model = MemformerForCausalLM(tiny_backbone("llama"), None, MemoryConfig(window=64, sink_tokens=2, overlap=4,
                                                                           top_k=4, block_size=4, layer_blocks=3))
    model.memorize(torch.randint(3, 100, (1, 200)), show_progress=False)
    x = torch.randint(3, 100, (1, 9))
    out = model.generate(x, max_new_tokens=14, do_sample=False, output_scores=True, return_dict_in_generate=True,
                         prompt_reads=None)                                         # every chunk of the prompt reads
    full = model.state.with_sink(out.sequences, model.memory_config.sink_tokens)     # [1, S + 9 + 14]
    with torch.no_grad():
        logits = model(full).logits[0, -15:-1]                                         # [14, V]: the new tokens'
    torch.testing.assert_close(torch.stack([s[0] for s in out.scores]), logits, atol=1e-4, rtol=1e-4)
    ctx = model.context_cache(x[:, :6])
    first = model.generate(x, max_new_tokens=10, do_sample=False, cache=ctx)
    second = model.generate(x, max_new_tokens=10, do_sample=False, cache=ctx)
    assert torch.equal(first, second) and torch.equal(first, out.sequences[:, :19])


def test_a_chunk_is_chosen_once_while_generating(monkeypatch):
    """A new token chooses and gathers blocks only when it starts a chunk: 12 new tokens after a
    5-token prompt (sink 2, chunks of 4: positions 0..18) choose in 5 calls per layer, not 13."""
    import memformer.blocks as blocks
    model = MemformerForCausalLM(tiny_backbone("llama"), None, MemoryConfig(window=64, sink_tokens=2, overlap=4,
                                                                           top_k=4, block_size=4, layer_blocks=2))
    model.memorize(torch.randint(3, 100, (1, 120)), show_progress=False)
    calls = []
    real = blocks.chosen_blocks
    monkeypatch.setattr(blocks, "chosen_blocks", lambda *a, **k: calls.append(a[1].shape[2]) or real(*a, **k))
    model.generate(torch.randint(3, 100, (1, 5)), max_new_tokens=12, do_sample=False)
    per_layer = len(calls) // len(model.knn_layer_ids)
    # the prefill chooses chunks 0 and 1 in one call; then chunks 2, 3 and 4 start at new tokens
    assert per_layer == 4 and sum(calls) // len(model.knn_layer_ids) == 5


def test_prompt_reads_skip_the_early_chunks_of_a_prompt():
    """generate(prompt_reads=2): the prompt's chunks before its last 2 read nothing (their logits
    are memory-off logits), the last 2 and every new token read as before, and each new token gets
    the logits a forward with the same first reading position gives it."""
    from memformer.memory_layer import memory_pass
    torch.manual_seed(0)
    model = MemformerForCausalLM(tiny_backbone("llama"), None, MemoryConfig(window=64, sink_tokens=2, overlap=4,
                                                                           top_k=4, block_size=4, layer_blocks=3))
    model.memorize(torch.randint(3, 100, (1, 200)), show_progress=False)
    x = torch.randint(3, 100, (1, 21))                    # 23 positions with the sink: chunks 0..5, the last partial
    out = model.generate(x, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True,
                         prompt_reads=2, record=True)
    read_from = 16                                        # chunks 4 and 5 read: positions 16..22
    prefill = model.recorded_reads()
    for reads in prefill.values():
        rows = reads[0][0]                                # the prompt's forward: [1, 1, 23, R]
        assert (rows[:, :, :read_from] < 0).all() and (rows[:, :, read_from:] >= 0).any(-1).all()
    full = model.state.with_sink(out.sequences, model.memory_config.sink_tokens)     # [1, 2 + 21 + 6]
    with torch.no_grad():
        with memory_pass(model.runtime, model.memory_modules, read_from=read_from):
            tail = model(full).logits[0]
        with model.memory_disabled():
            off = model(full).logits[0]
        every = model(full).logits[0]
    torch.testing.assert_close(torch.stack([s[0] for s in out.scores]), tail[-7:-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tail[:read_from], off[:read_from], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(tail[read_from:], off[read_from:], atol=1e-3)
    assert not torch.allclose(tail[read_from:], every[read_from:], atol=1e-5)   # earlier positions' states changed
    assert model.runtime.read_from == 0                   # restored after the call
    # "auto" (the default): PROMPT_READS = 2 chunks with trained memory layers, every chunk training-free
    for trained, skipped in ((True, True), (False, False)):
        model.memory_trained = trained
        model.generate(x, max_new_tokens=1, do_sample=False, record=True)
        rows = next(iter(model.recorded_reads().values()))[0][0]                     # [1, 1, 23, R]
        assert bool((rows[:, :, :read_from] < 0).all()) == skipped
    for bad in (0, -1, 1.5, True, "last"):
        with pytest.raises(ValueError, match="prompt_reads"):
            model.generate(x, max_new_tokens=1, prompt_reads=bad)
    # a budget beyond the memory's blocks: the skipped chunks' rows are as wide as the read ones
    small = MemformerForCausalLM(tiny_backbone("llama"), None, MemoryConfig(window=64, sink_tokens=2, overlap=4,
                                                                           top_k=4, block_size=4, layer_blocks=80))
    small.memorize(torch.randint(3, 100, (1, 60)), show_progress=False)        # 15 blocks stored
    assert small.generate(x, max_new_tokens=3, do_sample=False, prompt_reads=1, record=True).shape == (1, 24)
    for reads in small.recorded_reads().values():
        assert reads[0][0].shape[-1] == 15 * 4


def test_prompt_reads_benchmark_positions_and_losses():
    """The first reading position (`prompt_read_start`, generate's and benchmarks/prompt_reads.py's),
    and the benchmark's continuation loss: the same in every setting when no chunk is skipped."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import prompt_reads

    from memformer.blocks import prompt_read_start
    assert [prompt_read_start(23, 4, k) for k in (None, 1, 2, 5, 6, 9)] == [0, 20, 16, 4, 0, 0]
    torch.manual_seed(0)
    model = MemformerForCausalLM(tiny_backbone("llama"), None, MemoryConfig(window=32, sink_tokens=2, overlap=4,
                                                                           top_k=4, block_size=4, layer_blocks=3))
    ids = torch.randint(3, 100, (200,)).tolist()
    nll = prompt_reads.continuation_nll(model, ids, ["all", "1", "8", "off"], continuation=8)
    assert nll["all"] == pytest.approx(nll["8"], abs=1e-6)   # 8 chunks: the whole 32-position window
    assert nll["1"] != pytest.approx(nll["all"], abs=1e-6) and nll["off"] != pytest.approx(nll["all"], abs=1e-6)
    copied = prompt_reads.continuation_nll(model, ids, ["all"], continuation=8, copy_cue=4)
    assert copied["all"] != pytest.approx(nll["all"], abs=1e-6)
