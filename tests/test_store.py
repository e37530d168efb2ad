"""Compressed memory (int8 / bf16 / fp16 rows) and memory-mapped rows, index and store together."""
import json

import pytest
import torch

from memformer import MemformerForCausalLM, MemoryConfig
from memformer.index import LayerMemory
from memformer.index.base import QuantizedBuffer
from tests.conftest import tiny_backbone

pytest.importorskip("faiss")


def _rows(B=2, H=3, n=50, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, n, D, generator=g) * torch.rand(B, H, n, 1, generator=g) * 4


def test_int8_rows_round_trip_within_half_a_step():
    x = _rows()
    buf = QuantizedBuffer((2, 3), 16, "cpu", initial=4)          # grows past its first capacity
    buf.append(x[:, :, :7])
    buf.append(x[:, :, 7:])
    err = (buf.dequantize() - x).abs()                            # [B, H, n, D]
    step = x.abs().amax(-1, keepdim=True) / 127
    assert bool((err <= step / 2 + 1e-6).all())
    assert buf.data.dtype == torch.int8 and buf.scales.shape == (2, 3, 50)
    buf.drop_front(47)                                            # FIFO eviction keeps rows and scales together
    assert torch.allclose(buf.dequantize(), buf.dequantize(0, 3))
    assert (buf.dequantize() - x[:, :, 47:]).abs().max() <= step.max() / 2 + 1e-6


@pytest.mark.parametrize("dtype,rel", [(torch.bfloat16, 2 ** -8), (torch.float16, 2 ** -11)])
def test_half_precision_memory_round_trip(dtype, rel):
    mem = LayerMemory(2, 3, 16, dtype=dtype)
    k, v = _rows(seed=1), _rows(seed=2)
    mem.add(k, v, torch.arange(50).expand(2, 50))
    assert mem.keys.dtype == dtype and mem.key_scales is None
    assert bool(((mem.values.float() - v).abs() <= v.abs() * rel + 1e-6).all())
    assert bool(((mem.keys.float() - k).abs() <= k.abs() * rel + 1e-6).all())


def test_int8_memory_bytes_and_search_against_float():
    k, v = _rows(B=1, H=2, n=4000, D=64, seed=3), _rows(B=1, H=2, n=4000, D=64, seed=4)
    pos = torch.arange(4000)[None]
    f32, i8 = LayerMemory(1, 2, 64), LayerMemory(1, 2, 64, dtype=torch.int8)
    for m in (f32, i8):
        m.add(k, v, pos)
    nbytes = lambda m: sum(t.numel() * t.element_size() for t in m.state_dict().values())
    assert nbytes(i8) * 3.5 <= nbytes(f32)
    q = _rows(B=1, H=2, n=64, D=64, seed=5)
    s8, i8ids = i8.search(q, 32)
    # scores are exact inner products with the dequantised keys ...
    deq = i8.index.float_vectors()                                              # [1, 2, n, D]
    want = torch.einsum("bhqd,bhqkd->bhqk", q, deq[0][torch.arange(2)[:, None, None], i8ids[0]][None])
    assert torch.allclose(s8, want, atol=1e-4)
    # ... and the neighbours are nearly those of the float memory
    _, fids = f32.search(q, 32)
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(fids.reshape(-1, 32), i8ids.reshape(-1, 32)))
    assert overlap / fids.numel() > 0.95


@pytest.mark.parametrize("src,dst", [(torch.int8, torch.float32), (torch.float32, torch.int8), (torch.int8, torch.int8)])
def test_state_dict_converts_between_storage_dtypes(src, dst):
    a = LayerMemory(2, 3, 16, dtype=src)
    a.add(_rows(seed=6), _rows(seed=7), torch.arange(50).expand(2, 50))
    b = LayerMemory(2, 3, 16, dtype=dst)
    b.load_state_dict(a.state_dict())
    assert b.keys.dtype == dst and len(b) == 50
    deq = lambda m, t, s: t.float() if s is None else t.float() * s[..., None]
    step = _rows(seed=7).abs().amax(-1, keepdim=True) / 127
    assert ((deq(b, b.values, b.value_scales) - deq(a, a.values, a.value_scales)).abs() <= step + 1e-5).all()


def test_int8_state_without_scales_is_refused():
    a = LayerMemory(1, 3, 16, dtype=torch.int8)
    a.add(_rows(B=1), _rows(B=1, seed=1), torch.arange(50)[None])
    state = a.state_dict()
    del state["values_scales"]
    with pytest.raises(ValueError, match="scales"):
        LayerMemory(1, 3, 16).load_state_dict(state)


def test_saved_attention_mass_of_older_memories_is_ignored_and_score_eviction_is_refused():
    """Memories saved while score (H2O) eviction existed also hold "mass": they still load. A
    config asking for score eviction fails, naming the evictions that exist."""
    mem = LayerMemory(2, 3, 16, capacity=64)
    k, v = _rows(seed=3), _rows(seed=4)
    mem.add(k, v, torch.arange(50).expand(2, 50))
    state = mem.state_dict()
    assert "mass" not in state
    other = LayerMemory(2, 3, 16, capacity=64)
    other.load_state_dict({**state, "mass": torch.zeros(2, 50)})
    assert torch.equal(other.keys, mem.keys) and torch.equal(other.values, mem.values)
    with pytest.raises(ValueError, match="eviction 'score' is not one of fifo, none .score eviction was removed"):
        MemoryConfig(capacity=64, eviction="score")


def test_int8_model_generates_close_to_float():
    cfgs = {name: MemoryConfig(window=32, sink_tokens=2, overlap=4, top_k=4, memory_dtype=dt)
            for name, dt in [("f32", "float32"), ("i8", "int8")]}
    backbone = tiny_backbone()
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, cfg in cfgs.items():
        model = MemformerForCausalLM(backbone, None, cfg)
        model.memorize(ids[:, :260], show_progress=False)
        logits[name] = model(ids[:, 260:]).logits
        for layer in list(backbone.model.layers):                                # unwrap for the next config
            if hasattr(layer.self_attn, "attn"):
                layer.self_attn = layer.self_attn.attn
    assert (logits["i8"] - logits["f32"]).abs().max() < 0.05 * logits["f32"].abs().max()
    assert not torch.equal(logits["i8"], logits["f32"])


def test_int8_memory_save_load_identical(tmp_path):
    cfg = MemoryConfig(window=32, sink_tokens=2, overlap=4, top_k=4, memory_dtype="int8")
    model = MemformerForCausalLM(tiny_backbone(), None, cfg)
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(1))
    model.memorize(ids, show_progress=False)
    before = model(ids[:, -20:]).logits
    model.save_memory(tmp_path / "m")
    model.reset_memory()
    model.load_memory(tmp_path / "m")
    assert model.memories[0].keys.dtype == torch.int8
    assert torch.equal(model(ids[:, -20:]).logits, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_memory_mapped_rows_match_ram_and_leave_nothing_behind(tmp_path, dtype):
    ram = LayerMemory(2, 3, 16, dtype=dtype)
    disk = LayerMemory(2, 3, 16, dtype=dtype, mmap_dir=tmp_path)
    keys, values = _rows(n=3000, seed=11), _rows(n=3000, seed=12)
    for a in range(0, 3000, 700):                                  # grows past the first allocation
        for m in (ram, disk):
            m.add(keys[:, :, a:a + 700], values[:, :, a:a + 700], torch.arange(a, min(3000, a + 700)).expand(2, -1))
    assert list(tmp_path.iterdir()) == []                         # mapped files are unlinked at once
    q = _rows(n=20, seed=13)
    assert all(torch.equal(a, b) for a, b in zip(ram.search(q, 8), disk.search(q, 8)))
    assert all(torch.equal(ram.state_dict()[k], disk.state_dict()[k]) for k in ram.state_dict())
    disk.load_state_dict(ram.state_dict())
    assert torch.equal(disk.values, ram.values)
    with pytest.raises(ValueError, match="exact"):
        LayerMemory(1, 1, 16, index="faiss-flat", mmap_dir=tmp_path)


def test_model_with_memory_mapped_storage_equals_ram(tmp_path):
    backbone = tiny_backbone()
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(2))
    logits = []
    for storage in (None, tmp_path):                                   # RAM, then memory-mapped rows
        cfg = MemoryConfig(window=32, sink_tokens=2, overlap=4, top_k=4, storage_dir=storage)
        assert cfg.storage_dir == (None if storage is None else str(tmp_path)) and cfg.index_params == {}
        model = MemformerForCausalLM(backbone, None, cfg)
        model.memorize(ids[:, :180], show_progress=False)
        assert model.memories[0].store.values.mmap_dir == cfg.storage_dir  # the field reached the store
        logits.append(model(ids[:, 180:]).logits)
        for layer in backbone.model.layers:
            layer.self_attn = layer.self_attn.attn
    assert torch.equal(logits[0], logits[1])
    assert MemoryConfig.from_dict(json.loads(cfg.to_json())) == cfg   # saved and loaded with the config


def test_storage_dir_is_validated_and_its_old_form_translated_with_a_warning(tmp_path):
    with pytest.raises(ValueError, match="storage_dir .memory-mapped rows. needs index='exact'"):
        MemoryConfig(storage_dir=str(tmp_path), index="faiss-ivf")
    for bad in ("", "  ", 3, ["a"]):
        with pytest.raises(ValueError, match="storage_dir must be None .memory in RAM. or a folder path"):
            MemoryConfig(storage_dir=bad)
    # the form before it was a field: translated for one release, with a FutureWarning
    with pytest.warns(FutureWarning, match="use MemoryConfig\\(storage_dir=...\\)"):
        cfg = MemoryConfig(index_params={"storage_dir": str(tmp_path), "key_chunk": 8})
    assert cfg.storage_dir == str(tmp_path) and cfg.index_params == {"key_chunk": 8}
    with pytest.warns(FutureWarning):                                   # a config file of the old form too
        assert MemoryConfig.from_dict({"index_params": {"storage_dir": str(tmp_path)}}).storage_dir == str(tmp_path)
    with pytest.raises(ValueError, match="needs index='exact'"), pytest.warns(FutureWarning):
        MemoryConfig(index_params={"storage_dir": str(tmp_path)}, index="faiss-ivf")
    with pytest.raises(ValueError, match="differ; give storage_dir only"):
        MemoryConfig(storage_dir="/a", index_params={"storage_dir": "/b"})
