"""ExactIndex against brute force; LayerMemory capacity/eviction consistency; persistence of state."""
import pytest
import torch

from memformer.index import ExactIndex, GrowingBuffer, KNNIndex, LayerMemory, MemoryCapacityError


def brute(keys, queries, k):
    s = queries @ keys.transpose(-1, -2)                  # [*G, q, n]
    return s.topk(min(k, s.shape[-1]), dim=-1)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("n,k,chunk", [(100, 8, 1000), (257, 16, 64), (33, 1, 7)])
def test_exact_matches_brute_force(n, k, chunk, backend):
    torch.manual_seed(0)
    idx = ExactIndex((2, 3), 16, key_chunk=chunk, backend=backend)
    assert isinstance(idx, KNNIndex)
    keys = torch.randn(2, 3, n, 16)
    for a in range(0, n, 40):                            # added window by window
        idx.add(keys[:, :, a:a + 40])
    q = torch.randn(2, 3, 40, 16)                         # >= 32 queries: the FAISS path when asked
    s, i = idx.search(q, k)
    ws, wi = brute(keys, q, k)
    torch.testing.assert_close(s, ws, atol=1e-5, rtol=1e-5)
    assert torch.equal(i, wi)


def test_k_larger_than_size_and_invalid_rows():
    idx = ExactIndex((1, 1), 4)
    keys = torch.eye(4)[None, None, :3]                   # 3 keys
    idx.add(keys, valid=torch.tensor([[[True, False, True]]]))
    s, i = idx.search(torch.ones(1, 1, 2, 4), 5)
    assert i[0, 0, 0].tolist()[:2] in ([0, 2], [2, 0]) and i[0, 0, 0, 2:].tolist() == [-1, -1, -1]
    assert torch.isinf(s[0, 0, 0, 2:]).all()


def test_empty_index_returns_no_neighbours():
    idx = ExactIndex((2,), 4)
    s, i = idx.search(torch.randn(2, 3, 4), 2)
    assert (i == -1).all() and torch.isinf(s).all()


def test_shape_errors():
    idx = ExactIndex((1, 2), 8)
    with pytest.raises(ValueError, match="do not match"):
        idx.add(torch.randn(1, 3, 5, 8))
    with pytest.raises(ValueError, match="do not match"):
        idx.search(torch.randn(1, 2, 5, 4), 1)


def test_growing_buffer_grows_and_drops():
    buf = GrowingBuffer((2,), (3,), torch.float32, "cpu", initial=2)
    rows = torch.arange(2 * 10 * 3, dtype=torch.float32).view(2, 10, 3)
    for a in range(0, 10, 3):
        buf.append(rows[:, a:a + 3])
    assert torch.equal(buf.data, rows)
    buf.drop_front(4)
    assert torch.equal(buf.data, rows[:, 4:])


def _mem(capacity=None, eviction="fifo"):
    return LayerMemory(2, 2, 4, capacity=capacity, eviction=eviction)


def _window(start, n):
    keys = torch.arange(start, start + n, dtype=torch.float32).view(1, 1, n, 1).expand(2, 2, n, 4).contiguous()
    pos = torch.arange(start, start + n).expand(2, n)
    return keys, keys * 10, pos


def test_fifo_eviction_keeps_index_and_store_consistent():
    mem = _mem(capacity=10)
    for a in range(0, 25, 5):
        mem.add(*_window(a, 5))
    assert len(mem) == 10 and len(mem.index) == 10
    assert mem.positions[0].tolist() == list(range(15, 25))
    # every id the index returns points at the row with the same token in the store
    _, ids = mem.search(torch.ones(2, 2, 1, 4), 10)
    assert torch.equal(mem.values[0, 0, ids[0, 0, 0], 0], mem.keys[0, 0, ids[0, 0, 0], 0] * 10)
    mem.add(*_window(100, 30))                           # a window bigger than the capacity
    assert mem.positions[0].tolist() == list(range(120, 130))


def test_eviction_none_raises_and_writes_nothing():
    mem = _mem(capacity=8, eviction="none")
    mem.add(*_window(0, 6))
    with pytest.raises(MemoryCapacityError, match="capacity 8"):
        mem.add(*_window(6, 5))
    assert len(mem) == 6 and mem.positions[0].tolist() == list(range(6))


def test_layer_memory_state_round_trip_and_mismatch():
    mem = _mem()
    mem.add(*_window(0, 7))
    state = {k: v.clone() for k, v in mem.state_dict().items()}
    other = _mem()
    other.load_state_dict(state)
    assert torch.equal(other.keys, mem.keys) and torch.equal(other.values, mem.values)
    assert torch.equal(other.positions, mem.positions)
    wrong = LayerMemory(2, 3, 4)
    with pytest.raises(ValueError, match="do not fit"):
        wrong.load_state_dict(state)


def test_add_rejects_wrong_shapes():
    mem = _mem()
    with pytest.raises(ValueError, match="do not match"):
        mem.add(torch.randn(2, 2, 3, 5), torch.randn(2, 2, 3, 5), torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_exact_no_queries_and_int8_keys(backend):
    torch.manual_seed(1)
    idx = ExactIndex((2,), 8, dtype=torch.int8, backend=backend)
    keys = torch.randn(2, 50, 8)
    idx.add(keys)
    s, i = idx.search(torch.randn(2, 0, 8), 4)
    assert s.shape == i.shape == (2, 0, 4)
    q = torch.randn(2, 40, 8)
    s, i = idx.search(q, 4)
    ws, wi = brute(idx.float_vectors(), q, 4)             # the dequantised keys are what is searched
    torch.testing.assert_close(s, ws, atol=1e-5, rtol=1e-5)
    assert torch.equal(i, wi)


def test_exact_backend_is_checked():
    with pytest.raises(ValueError, match="backend"):
        ExactIndex((1,), 4, backend="numpy")
