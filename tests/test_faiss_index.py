"""FaissIndex backends against ExactIndex: exactness / recall, padding, eviction, persistence, GPU."""
import os
import sys

import pytest
import torch

faiss = pytest.importorskip("faiss")  # a declared dependency; skip rather than error where it is absent

from memformer import MemoryConfig  # noqa: E402
from memformer.index import ExactIndex, FaissIndex, KNNIndex, LayerMemory, make_index  # noqa: E402

G, N, D, K = 4, 20000, 32, 10
# Measured recall@10 at these sizes (seed 0): ivf 0.94.
RECALL_MIN = {"ivf": 0.85}
SMALL = {"flat": {}, "ivf": {"train_threshold": 1000}}   # small data: train early


def clustered(g, n, d, clusters, noise=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(g, clusters, d, generator=gen)
    pick = torch.randint(0, clusters, (g, n), generator=gen)
    points = torch.gather(centres, 1, pick[..., None].expand(g, n, d))
    return points + noise * torch.randn(g, n, d, generator=gen)


@pytest.fixture(scope="module")
def data():
    """20k clustered keys per group, queries near stored keys, the exact top-10."""
    keys = clustered(G, N, D, 256)
    gen = torch.Generator().manual_seed(1)
    queries = keys[:, torch.randperm(N, generator=gen)[:200]] + 0.3 * torch.randn(G, 200, D, generator=gen)
    exact = ExactIndex((G,), D)
    exact.add(keys)
    return keys, queries, exact.search(queries, K)


@pytest.fixture(scope="module")
def built(data):
    """One big index per kind, built window by window, shared by the read-only tests."""
    cache = {}

    def get(kind):
        if kind not in cache:
            # IVF trains at 4096 keys here (its default waits for 65536, where it starts to pay)
            idx = FaissIndex((G,), D, kind=kind, train_threshold=4096)
            for a in range(0, N, 2000):
                idx.add(data[0][:, a:a + 2000])
            cache[kind] = idx
        return cache[kind]
    return get


def recall(ids, want):
    k = want.shape[-1]
    pairs = zip(ids.reshape(-1, k).tolist(), want.reshape(-1, k).tolist())
    hits = sum(len(set(a) & set(b)) for a, b in pairs)
    return hits / want.numel()


def check_consistent(idx, queries, scores, ids):
    """Every returned id is a valid stored row whose key gives the returned score; -1 <=> -inf."""
    g, nq, k = ids.shape
    assert torch.equal(ids < 0, torch.isinf(scores))
    keys = idx.vectors.reshape(g, len(idx), -1)
    valid = idx.valid.reshape(g, len(idx))
    assert ids.max() < len(idx)
    for gi in range(g):
        hit = ids[gi] >= 0
        rows = ids[gi][hit]
        assert valid[gi, rows].all(), "a padding row was returned"
        want = (queries[gi][:, None, :].expand(nq, k, -1)[hit] * keys[gi, rows]).sum(-1)
        torch.testing.assert_close(scores[gi][hit], want, atol=1e-4, rtol=1e-4)


def small(kind, n=3000, groups=2, d=16, seed=0, padding=True, **params):
    """A small index with per-group padding rows, added in windows of 500, and its inputs."""
    keys = clustered(groups, n, d, 32, seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    valid = torch.rand(groups, n, generator=gen) > 0.2 if padding else torch.ones(groups, n, dtype=torch.bool)
    idx = FaissIndex((groups,), d, kind=kind, **{**SMALL[kind], **params})
    for a in range(0, n, 500):
        idx.add(keys[:, a:a + 500], valid[:, a:a + 500])
    return idx, keys, valid


def test_flat_identical_to_exact(data, built):
    keys, queries, (ws, wi) = data
    idx = built("flat")
    assert isinstance(idx, KNNIndex)
    s, i = idx.search(queries, K)
    assert torch.equal(i, wi)
    torch.testing.assert_close(s, ws, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", ["ivf"])
def test_approximate_recall(data, built, kind):
    keys, queries, (ws, wi) = data
    idx = built(kind)
    s, i = idx.search(queries, K)
    r = recall(i, wi)
    print(f"\n{kind}: recall@{K} = {r:.4f} (nlist {idx.nlist_trained})")
    assert r >= RECALL_MIN[kind]
    assert idx.trained
    check_consistent(idx, queries, s, i)
    assert (s[..., :-1] >= s[..., 1:]).all()          # sorted


def test_more_search_effort_raises_recall_without_rebuild(data, built):
    keys, queries, (ws, wi) = data
    idx = built("ivf")
    idx.set_search_params(nprobe=1)
    r_low = recall(idx.search(queries, K)[1], wi)
    idx.set_search_params(nprobe=idx.nlist_trained)
    s, i = idx.search(queries, K)
    assert recall(i, wi) > r_low
    assert recall(i, wi) == 1.0                        # every list visited: exact again
    check_consistent(idx, queries, s, i)


def test_centered_index_scores_are_exact_inner_products():
    # keys with a large shared component, as attention keys have: scores stay q.k exactly
    idx, keys, valid = small("ivf", padding=False)
    shifted = FaissIndex((2,), 16, kind="ivf", **SMALL["ivf"])
    offset = torch.full((16,), 20.0)
    shifted.add(keys + offset, valid)
    q = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(3))
    s, i = shifted.search(q, 5)
    assert shifted.trained and shifted._center is not None and shifted._center.mean() > 10
    check_consistent(shifted, q, s, i)


@pytest.mark.parametrize("kind", ["ivf"])
def test_exact_until_trained(kind):
    keys = clustered(2, 4000, 16, 32)
    q = keys[:, :50] + 0.1
    idx = FaissIndex((2,), 16, kind=kind, train_threshold=3000)
    exact = ExactIndex((2,), 16)
    for a in range(0, 4000, 1000):
        idx.add(keys[:, a:a + 1000])
        exact.add(keys[:, a:a + 1000])
        assert idx.trained == (a + 1000 >= 3000)
        if not idx.trained:
            assert torch.equal(idx.search(q, 8)[1], exact.search(q, 8)[1])
    assert 1 <= idx.nlist_trained <= 3000 // 39


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_padding_never_returned_and_k_beyond_size(kind):
    idx, keys, valid = small(kind)
    q = keys[:, :40] + 0.05
    s, i = idx.search(q, 50)
    check_consistent(idx, q, s, i)
    tiny = FaissIndex((1, 1), 4, kind=kind)
    assert (tiny.search(torch.ones(1, 1, 2, 4), 3)[1] == -1).all()       # empty
    tiny.add(torch.eye(4)[None, None, :3], valid=torch.tensor([[[True, False, True]]]))
    s, i = tiny.search(torch.ones(1, 1, 2, 4), 5)
    assert sorted(i[0, 0, 0, :2].tolist()) == [0, 2] and i[0, 0, 0, 2:].tolist() == [-1, -1, -1]
    assert torch.isinf(s[0, 0, :, 2:]).all()


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_bf16_keys_scores_match_stored_rows(kind):
    keys = clustered(2, 1000, 16, 8)
    idx = FaissIndex((2,), 16, kind=kind, dtype=torch.bfloat16, train_threshold=500)
    exact = ExactIndex((2,), 16, dtype=torch.bfloat16)
    idx.add(keys)
    exact.add(keys)
    q = keys[:, :20] + 0.05
    s, i = idx.search(q, 8)
    check_consistent(idx, q, s, i)              # faiss saw the bf16-rounded keys, not the inputs
    if kind == "flat":
        assert torch.equal(i, exact.search(q, 8)[1])


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_remove_oldest_keeps_ids_consistent(kind):
    idx, keys, valid = small(kind)
    exact = ExactIndex((2,), 16)
    exact.add(keys, valid)
    q = keys[:, 2500:2540] + 0.05
    for n in (700, 300, 1100):
        idx.remove_oldest(n)
        exact.remove_oldest(n)
        assert len(idx) == len(exact) and torch.equal(idx.vectors, exact.vectors)
        s, i = idx.search(q, 20)
        check_consistent(idx, q, s, i)
        if kind == "flat":
            assert torch.equal(i, exact.search(q, 20)[1])
        else:
            assert recall(i[..., :10], exact.search(q, 10)[1]) > 0.8
    idx.add(keys[:, :500], valid[:, :500])      # ids keep counting after eviction
    assert len(idx) == 900 + 500
    check_consistent(idx, q, *idx.search(q, 20))
    idx.remove_oldest(10_000)
    assert len(idx) == 0 and (idx.search(q, 5)[1] == -1).all()


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_state_dict_round_trip(kind, tmp_path):
    from safetensors.torch import load_file, save_file
    idx, keys, valid = small(kind)
    idx.remove_oldest(700)                      # a non-zero id base must survive too
    q = keys[:, 2000:2050] + 0.05
    state = idx.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "s.safetensors"))  # no pickle
    other = FaissIndex((2,), 16, kind=kind, **SMALL[kind])
    other.load_state_dict(load_file(str(tmp_path / "s.safetensors")))
    assert other.trained == idx.trained and torch.equal(other.vectors, idx.vectors)
    for a, b in zip(idx.search(q, 12), other.search(q, 12)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="do not fit"):
        FaissIndex((2,), 8, kind=kind).load_state_dict(state)


def test_exact_state_loads_into_ivf():
    keys = clustered(2, 2000, 16, 32)
    exact = ExactIndex((2,), 16)
    exact.add(keys)
    ivf = FaissIndex((2,), 16, kind="ivf", train_threshold=1000)
    ivf.load_state_dict(exact.state_dict())     # keys + valid only: rebuilt and trained here
    assert ivf.trained and len(ivf) == 2000
    q = keys[:, :30] + 0.05
    assert recall(ivf.search(q, 10)[1], exact.search(q, 10)[1]) > 0.8


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_save_load_round_trip(kind, tmp_path):
    idx, keys, valid = small(kind)
    idx.remove_oldest(200)
    q = keys[:, 2000:2050] + 0.05
    path = tmp_path / "mem"
    idx.save(path)
    idx.add(keys[:, :100])
    idx.save(path)                              # overwrite an existing save
    # no temp dirs left behind (the lock file stays)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["mem"]
    other = FaissIndex((2,), 16, kind=kind, **SMALL[kind])
    other.load(path)
    assert len(other) == len(idx) and torch.equal(other.valid, idx.valid)
    for a, b in zip(idx.search(q, 12), other.search(q, 12)):
        assert torch.equal(a, b)
    other.remove_oldest(300)                    # a loaded index keeps evicting correctly
    check_consistent(other, q, *other.search(q, 12))


def test_load_refuses_corrupt_or_mismatched(tmp_path):
    idx, keys, valid = small("ivf")
    idx.save(tmp_path / "ok")
    with pytest.raises(ValueError, match="dim"):
        FaissIndex((2,), 8, kind="ivf").load(tmp_path / "ok")
    with pytest.raises(ValueError, match="group shape"):
        FaissIndex((3,), 16, kind="ivf").load(tmp_path / "ok")
    with pytest.raises(ValueError, match="'ivf' index, not 'flat'"):
        FaissIndex((2,), 16, kind="flat").load(tmp_path / "ok")
    fresh = FaissIndex((2,), 16, kind="ivf")
    f = tmp_path / "ok" / "group_1.faiss"
    os.truncate(f, f.stat().st_size // 2)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        fresh.load(tmp_path / "ok")
    assert len(fresh) == 0                      # a refused load changes nothing
    with pytest.raises(ValueError, match="manifest"):
        fresh.load(tmp_path / "missing")


def test_layer_memory_with_faiss_ivf_end_to_end():
    assert MemoryConfig(index="faiss-ivf", index_params={"nprobe": 8}).index == "faiss-ivf"
    assert isinstance(make_index("faiss-flat", (1, 2), 8, torch.float32, "cpu"), FaissIndex)
    for removed in ("faiss-hnsw", "faiss-ivfpq"):       # measured, lost to faiss-ivf, deleted
        with pytest.raises(ValueError, match=rf"not one of exact, faiss-flat, faiss-ivf \({removed} was removed"):
            MemoryConfig(index=removed)
        with pytest.raises(ValueError, match="unknown index kind"):
            make_index(removed, (1, 2), 8, torch.float32, "cpu")
        with pytest.raises(ValueError, match="not in"):
            FaissIndex((1,), 8, kind=removed.split("-")[1])
    mems = [LayerMemory(2, 2, 16, index=kind, index_params=params, capacity=1500)
            for kind, params in (("faiss-ivf", {"train_threshold": 600}), ("exact", {}))]
    keys = clustered(4, 2000, 16, 16).view(2, 2, 2000, 16)
    pad = torch.ones(2, 2000, dtype=torch.bool)
    pad[1, 1900:] = False                       # sequence 1 ends early: its tail is padding
    for a in range(0, 2000, 250):
        w = slice(a, a + 250)
        for mem in mems:
            mem.add(keys[:, :, w], keys[:, :, w] * 10, torch.arange(a, a + 250).expand(2, 250), pad[:, w])
    mem, exact = mems
    assert mem.index.trained and len(mem) == 1500
    assert mem.positions[0].tolist() == list(range(500, 2000))
    q = keys[:, :, 1800:1820] + 0.05
    s, ids = mem.search(q, 8)
    hit = ids >= 0
    assert hit.all() and (ids[1] < 1400).all()  # no padding row returned
    rows = ids[..., None].expand(-1, -1, -1, -1, 16).flatten(2, 3)        # [B, H, q*k, D]
    assert torch.equal(mem.values.gather(2, rows), mem.keys.gather(2, rows) * 10)  # same row, index and store
    check_consistent(mem.index, q.flatten(0, 1), s.flatten(0, 1), ids.flatten(0, 1))
    assert recall(ids[..., :8], exact.search(q, 8)[1]) > 0.8


def test_missing_faiss_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        FaissIndex((1,), 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not hasattr(faiss, "get_num_gpus")
                    or faiss.get_num_gpus() == 0, reason="needs CUDA and faiss-gpu")
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_gpu_matches_cpu(kind, tmp_path):
    keys = clustered(2, 3000, 16, 32).cuda()
    q = keys[:, :40] + 0.05
    idx = FaissIndex((2,), 16, kind=kind, device="cuda", **SMALL[kind])
    exact = ExactIndex((2,), 16, device="cuda")
    for a in range(0, 3000, 500):
        idx.add(keys[:, a:a + 500])
        exact.add(keys[:, a:a + 500])
    assert idx._gpu
    idx.remove_oldest(400)                      # GPU indexes rebuild instead of remove_ids
    exact.remove_oldest(400)
    s, i = idx.search(q, 10)
    assert s.device.type == "cuda"
    check_consistent(idx, q, s, i)
    assert recall(i, exact.search(q, 10)[1]) > 0.8
    idx.save(tmp_path / "g")
    other = FaissIndex((2,), 16, kind=kind, device="cuda", **SMALL[kind])
    other.load(tmp_path / "g")
    assert torch.equal(other.search(q, 10)[1], i)


def test_calibrated_nprobe_reaches_target_recall_on_new_queries():
    keys = clustered(2, 6000, 16, 64)
    idx = FaissIndex((2,), 16, kind="ivf", train_threshold=1000, retrain_growth=0)
    for a in range(0, 6000, 500):
        idx.add(keys[:, a:a + 500])
    exact = ExactIndex((2,), 16)
    exact.add(keys)
    gen = torch.Generator().manual_seed(5)
    noisy = lambda: keys[:, torch.randint(0, 6000, (300,), generator=gen)] + 0.3 * torch.randn(2, 300, 16, generator=gen)
    first, later = noisy(), noisy()
    idx.search(first, 8)                                   # calibrates on these queries
    assert all(1 <= p < idx.nlist_trained for p in idx.nprobes), (idx.nprobes, idx.nlist_trained)
    r = recall(idx.search(later, 8)[1], exact.search(later, 8)[1])
    assert r >= 0.9, r                                     # target 0.95 on the calibration queries


def test_ivf_retrains_as_memory_grows_and_loses_no_row():
    keys = clustered(2, 8000, 16, 64, seed=2)
    valid = torch.rand(2, 8000, generator=torch.Generator().manual_seed(4)) > 0.1
    idx = FaissIndex((2,), 16, kind="ivf", train_threshold=1000, retrain_growth=2.0)
    seen = []
    for a in range(0, 8000, 500):
        idx.add(keys[:, a:a + 500], valid[:, a:a + 500])
        seen.append(idx.nlist_trained)
    assert len(set(seen) - {0}) >= 3, seen                # trained at 1000, again at 2000 and 4000 rows
    assert seen == sorted(seen)                            # nlist only grows
    assert idx.trained_rows * 2 > int(valid.sum(1).min())  # the last training is recent
    assert [idx._indexes[g].ntotal for g in range(2)] == valid.sum(1).tolist()
    idx.set_search_params(nprobe=idx.nlist_trained)        # every list visited: exact again
    q = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(6))
    exact = ExactIndex((2,), 16)
    exact.add(keys, valid)
    s, i = idx.search(q, 10)
    assert torch.equal(i, exact.search(q, 10)[1])
    check_consistent(idx, q, s, i)


def test_fixed_nlist_trains_once():
    keys = clustered(1, 6000, 16, 32)
    idx = FaissIndex((1,), 16, kind="ivf", nlist=16, train_threshold=1000)
    for a in range(0, 6000, 500):
        idx.add(keys[:, a:a + 500])
    assert idx.nlist_trained == 16 and idx.trained_rows == 1000


@pytest.mark.parametrize("bad", [{"target_recall": 0.0}, {"target_recall": 1.5}, {"nlist_factor": 0},
                                 {"retrain_growth": 1.0}])
def test_growth_settings_are_checked(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        FaissIndex((1,), 8, kind="ivf", **bad)
