"""Invariants of DESIGN.md on tiny random llama / mistral / qwen2 backbones."""
import contextlib
import dataclasses
import json
import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import clone_backbone, tiny_backbone
from memformer import MemformerForCausalLM, MemoryCapacityError, MemoryConfig
from memformer.config import AdapterConfig


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


GATE = "backbone.model.layers.{}.self_attn.memory_gate"
LORA = "backbone.model.layers.{}.self_attn.attn.{}_proj.lora_{}.default.weight"


def test_fresh_model_trains_exactly_the_memory_gates():
    """No LoRA until add_lora: the per-head memory gates of the memory layers are the trainable part."""
    model, _ = make(memory_layers=[1])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [GATE.format(1)]
    assert model.adapter_config is None and list(model.trainable_state_dict()) == trainable
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_add_lora_trains_gates_and_lora_and_leaves_outputs_unchanged():
    model, _ = make(memory_layers=[1])
    model.memorize(ids(40), show_progress=False)
    x = ids(10, seed=5)
    with torch.no_grad():
        before = model(x).logits
    model.add_lora(AdapterConfig(lora_rank=4, lora_alpha=8.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {GATE.format(1)} | {LORA.format(1, p, ab) for p in "qkvo" for ab in "AB"}
    assert set(model.trainable_state_dict()) == trainable
    assert model.adapter_config == AdapterConfig(lora_rank=4, lora_alpha=8.0)
    assert all(p.shape[0] == 4 for n, p in model.named_parameters() if ".lora_A." in n)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, atol=1e-6, rtol=0)   # B = 0: no change
        for n, p in model.named_parameters():                                      # ... until B trains
            if ".lora_B." in n:
                p.normal_(0, 0.5)
        assert (model(x).logits - before).abs().max() > 1e-4
    with pytest.raises(ValueError, match="already has LoRA"):
        model.add_lora(AdapterConfig(lora_rank=4))


def test_backbone_only_is_the_frozen_backbone_with_lora_and_memory_off():
    """The baselines' model: inside backbone_only the logits are the untouched backbone's, though
    LoRA is trained and memory holds rows; outside, LoRA and memory apply again and which weights
    train is as before."""
    model, oracle = make(memory_layers=[0, 1])
    model.add_lora(AdapterConfig(lora_rank=4, lora_alpha=8.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.5)
    model.memorize(ids(40), show_progress=False)
    x = ids(10, seed=5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        want, before = oracle(x).logits, model(x).logits
        with model.memory_disabled():
            lora_on = model(x).logits
        with model.backbone_only():
            torch.testing.assert_close(model(x).logits, want, atol=1e-5, rtol=0)
        assert (lora_on - want).abs().max() > 1e-3          # memory_disabled keeps the LoRA
        torch.testing.assert_close(model(x).logits, before, atol=0, rtol=0)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable


def test_add_lora_rank_zero_sets_the_gates_only():
    model, _ = make()
    model.add_lora(AdapterConfig(lora_rank=0, gate_init=-2.0))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [GATE.format(0), GATE.format(1)]
    assert all(bool((p == -2.0).all()) for n, p in model.named_parameters() if n.endswith("memory_gate"))
    with pytest.raises(ValueError, match="already has LoRA"):
        model.add_lora()


@pytest.mark.parametrize("sinks", [0, 4])
def test_no_token_retrieves_itself_or_the_future(sinks):
    model, _ = make(top_k=64, sink_tokens=sinks)
    model.runtime.record = True
    model.memorize(ids(64), read=True, show_progress=False)       # windows read while being written
    model.runtime.record = False
    step = 16 - sinks - model.memory_config.overlap
    starts = list(range(sinks, 64, step))                          # first token of each window
    assert set(model.recorded_reads()) == {0, 1}                  # both (kNN) layers read
    for layer, calls in model.recorded_reads().items():
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
    assert model.state.seen == [29, 11]
    S = model.memory_config.sink_tokens                         # the first S stay local as the sink
    assert mem.valid[0].sum() == 29 - S and mem.valid[1].sum() == 11 - S
    assert mem.positions[1][mem.valid[1]].tolist() == list(range(S, 11))


def test_search_score_equals_attention_logit():
    """Search ranks keys by exactly the logit the attention then uses, for every query head (GQA):
    the query at its local position moved one window W further, against keys stored rotated at
    their window slot."""
    model, bb = make(top_k=5, layer_blocks=0)
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
    rows, probs = model.recorded_reads()[layer][0]                     # [1, Hq, T, K]
    # recompute, independently of the layer: q from the hidden states, rotated at its real local
    # position, then by one window W more (against keys rotated in their window)
    inner = attn.attn
    B, T, _ = captured["h"].shape
    q = inner.q_proj(captured["h"]).view(B, T, 4, 16).transpose(1, 2)   # [1, Hq, T, D]
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    W = model.memory_config.window
    shift = model.backbone.model.rotary_emb(q, torch.full((1, T), W))    # (cos, sin) of distance W
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
    assert model.state.seen == [40]

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


@pytest.mark.parametrize("bad", [dict(top_k=0), dict(window=1), dict(index="annoy"), dict(eviction="lru"),
                                 dict(sink_tokens=16), dict(memory_layers=[]), dict(overlap=12), dict(overlap=-1),
                                 dict(block_size=0), dict(question_blocks=0), dict(knn_layers=[]),
                                 dict(memory_layers=[1], knn_layers=[0, 1]), dict(capacity=0),
                                 dict(memory_dtype="int4"),
                                 dict(index="faiss-flat", storage_dir="/tmp/rows"), dict(storage_dir=""),
                                 dict(index="faiss-hnsw"), dict(eviction="score")])
def test_config_validation(bad):
    with pytest.raises(ValueError, match="MemoryConfig"):
        MemoryConfig(**{"window": 16, **bad})


REMOVED_FIELDS = ["neighbors", "read_blocks", "read_during_ingest", "position_mode", "fixed_distance",
                  "index_device", "lora_rank", "lora_alpha", "gate_init"]


def test_memory_config_has_at_most_18_fields():
    """13 until storage_dir left index_params to become a field of its own (eviction keeps its
    place: "none" still refuses to overflow); 15 since layer_blocks gave generate and perplexity
    block reads chosen by the layers (top_k stays for kNN reads: layer_blocks=0 and corpora); 16
    with sentence_ranking, how question reads and RAG rank passages; 17 with answer_reads, how
    many checked reads a question answers from; 18 with copy_pointer, how strongly an answer's
    copy from a read goes on at the next row."""
    names = [f.name for f in dataclasses.fields(MemoryConfig)]
    assert len(names) <= 18, names
    assert not set(names) & set(REMOVED_FIELDS)
    cfg = MemoryConfig(window=16, overlap=3, knn_layers=[1], index_params={"nprobe": 4}, storage_dir="/tmp/rows")
    assert MemoryConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_unknown_memory_config_fields_are_refused_with_a_message():
    """A config file of an older memformer (a removed read-path switch, LoRA settings) fails
    at once, naming the fields, not with a bare TypeError."""
    with pytest.raises(ValueError, match=re.escape(f"MemoryConfig: unknown fields {sorted(REMOVED_FIELDS)}")):
        MemoryConfig.from_dict({"window": 16, **dict.fromkeys(REMOVED_FIELDS, 1)})


def test_adapter_config_validation():
    assert AdapterConfig() == AdapterConfig(lora_rank=8, lora_alpha=16.0, gate_init=0.0)
    assert AdapterConfig(lora_rank=0).lora_rank == 0                          # gates only
    with pytest.raises(ValueError, match="AdapterConfig: lora_rank must be >= 0"):
        AdapterConfig(lora_rank=-1)
    with pytest.raises(ValueError, match=r"AdapterConfig: unknown fields \['rank'\]"):
        AdapterConfig.from_dict({"rank": 4})
    assert AdapterConfig.from_dict({"lora_rank": 2, "gate_init": -1.0}) == AdapterConfig(lora_rank=2, gate_init=-1.0)


def test_memory_layer_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        make(memory_layers=[5])


def test_sink_tokens_prefix_every_window_and_never_enter_memory():
    model, _ = make(sink_tokens=2)
    model.memorize(ids(50), show_progress=False)
    mem = next(iter(model.memories.values()))
    assert model.memory_size() == 48 and mem.positions[0].tolist() == list(range(2, 50))
    assert torch.equal(model.state.sink_ids, ids(50)[:, :2])
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
        assert torch.equal(pieces.state.tail_ids, x[:, -overlap:])


def test_generate_memorizes_overflow_and_reads_memory():
    model, oracle = make()
    x = ids(40)
    out = model.generate(x, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 44) and torch.equal(out[:, :40], x)
    assert model.memory_size() == 24                                    # all but the last window


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("reads", ["knn", "blocks"])
def test_cached_generation_equals_an_uncached_greedy_loop(model_type, reads):
    """HF generate with its KV cache (the attention wrapper must take the cache under the name the
    installed transformers passes it) picks the same tokens as re-reading the whole local window
    [sink ‖ tail ‖ generated] at every step, with kNN reads (generate memorizes the overflow) and
    with question reads of pinned blocks (`reading_blocks`). The copy pointer, a bias of each
    generated token alone, is off: a whole window re-read has no step before."""
    model, _ = make(model_type, block_size=4, copy_pointer=0.0)
    x = ids(40)
    if reads == "knn":
        reading = contextlib.nullcontext
        out = model.generate(x, max_new_tokens=6, do_sample=False, prompt_reads=None)   # every chunk reads, as forward
    else:
        model.memorize(x[:, :28], show_progress=False)                  # what generate(x) memorizes
        reading = lambda: model.reading_blocks([1, 3, 5])               # stream positions 4..7, 12..15, 20..23
        with reading():
            out = torch.cat([x[:, :28], model.generate(x[:, 28:], max_new_tokens=6, do_sample=False)], 1)
    assert model.memory_size() == 28 - 4
    local = torch.cat([model.state.sink_ids, x[:, 40 - (16 - 4):]], 1)      # [sink ‖ last W - S tokens]
    with reading(), torch.no_grad():
        for _ in range(6):
            nxt = model(local).logits[:, -1].argmax(-1, keepdim=True)
            local = torch.cat([local, nxt], 1)
        with model.memory_disabled():                                   # memory is read at all
            plain = model(local).logits
        assert (model(local).logits - plain).abs().max() > 1e-4
    assert torch.equal(out[:, 40:], local[:, -6:])


@pytest.mark.parametrize("lora", [2, 0])
def test_adapter_save_load_round_trip(tmp_path, lora):
    """save_pretrained writes the trained memory-layer weights with the MemoryConfig and (when LoRA
    was added) the AdapterConfig; a fresh model's load_adapter adds that LoRA first and then gives
    identical outputs. Without LoRA the adapter is the gates alone."""
    model, _ = make(memory_layers=[0])
    if lora:
        model.add_lora(AdapterConfig(lora_rank=lora, lora_alpha=4.0, gate_init=0.5))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    path = model.save_pretrained(tmp_path / "ad")
    files = ["adapter.safetensors", "memory_config.json"] + (["adapter_config.json"] if lora else [])
    assert sorted(p.name for p in path.iterdir()) == sorted(files)
    if lora:
        saved = json.loads((path / "adapter_config.json").read_text())
        assert AdapterConfig.from_dict(saved) == model.adapter_config
    fresh, _ = make(memory_layers=[0])
    untouched, _ = make(memory_layers=[0])
    fresh.load_adapter(path)
    assert fresh.adapter_config == model.adapter_config                 # LoRA added from the file (or none)
    assert fresh.trainable_state_dict().keys() == model.trainable_state_dict().keys()
    assert any(".lora_A." in n for n in fresh.trainable_state_dict()) == bool(lora)
    x = ids(8, seed=4)
    for m in (model, fresh, untouched):                                 # gates act on memory reads
        m.memorize(ids(40), show_progress=False)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits)
        assert (untouched(x).logits - model(x).logits).abs().max() > 1e-4   # the weights matter
    mismatched, _ = make(memory_layers=[1])
    from memformer import MemoryFileError
    with pytest.raises(MemoryFileError, match="does not match"):
        mismatched.load_adapter(path)


def test_adapter_of_another_backbone_is_refused_and_nothing_changes(tmp_path):
    """An adapter's file names the backbone it was trained on; loading it into another backbone
    (same shapes, other weights) is a MemoryFileError that leaves the model as it was."""
    from memformer import MemoryFileError
    model, _ = make(memory_layers=[0])
    model.add_lora(AdapterConfig(lora_rank=2))
    path = model.save_pretrained(tmp_path / "ad")
    other, _ = make(seed=1, memory_layers=[0])
    before = {n: p.clone() for n, p in other.named_parameters()}
    with pytest.raises(MemoryFileError, match="another backbone"):
        other.load_adapter(path)
    assert other.adapter_config is None
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())


def test_from_pretrained_without_a_shipped_adapter_is_training_free(tmp_path):
    """adapter="auto" (the default) finds no packaged adapter for a backbone it was not trained on:
    memory in every layer, no LoRA; an explicit memory_config is used as given."""
    model = MemformerForCausalLM.from_pretrained(tiny_backbone(), tokenizer=None)
    assert model.memory_layer_ids == [0, 1] and model.adapter_config is None
    model = MemformerForCausalLM.from_pretrained(tiny_backbone(), MemoryConfig(memory_layers=[1], window=16, overlap=3))
    assert model.memory_layer_ids == [1] and model.memory_config.window == 16


def test_memory_fingerprint_is_stable_across_fresh_models():
    """An untrained adapter is seeded (LoRA's random A too), so a memory saved by one process loads
    in the next; adding LoRA changes the fingerprint."""
    from memformer.persistence import memory_fingerprint
    a, _ = make()
    b, _ = make()
    assert memory_fingerprint(a) == memory_fingerprint(b)
    plain = memory_fingerprint(a)
    torch.manual_seed(123)
    a.add_lora(AdapterConfig(lora_rank=2))
    torch.manual_seed(456)
    b.add_lora(AdapterConfig(lora_rank=2))
    assert memory_fingerprint(a) == memory_fingerprint(b) != plain


def test_memory_fingerprint_covers_the_lora_scaling():
    """The same LoRA weights at another lora_alpha store other keys: a memory saved under one
    scaling is not taken for the other's."""
    from memformer.persistence import memory_fingerprint
    a, _ = make()
    b, _ = make()
    for model, alpha in ((a, 4.0), (b, 3.0)):
        torch.manual_seed(123)
        model.add_lora(AdapterConfig(lora_rank=2, lora_alpha=alpha))
    assert all(torch.equal(v, b.trainable_state_dict()[k]) for k, v in a.trainable_state_dict().items())
    assert memory_fingerprint(a) != memory_fingerprint(b)


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


def test_keys_are_stored_rotated_at_their_window_position():
    """Memory keeps each key as its window computed it: rotated at its slot in the window (the
    frozen backbone's own k_proj + RoPE, computed here independently), with that slot recorded."""
    model, oracle = make()
    x = ids(30)
    model.memorize(x, show_progress=False)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    # the first window is [sink (4) | n new tokens]: the new tokens sit at slots 4 .. 4 + n - 1
    n = 16 - 4 - model.memory_config.overlap
    k_proj = {}
    hooks = [oracle.model.layers[i].self_attn.k_proj.register_forward_hook(
        lambda m, a, out, i=i: k_proj.update({i: out})) for i in (0, 1)]
    with torch.no_grad():
        oracle(x[:, :4 + n])
    for h in hooks:
        h.remove()
    cos, sin = oracle.model.rotary_emb(k_proj[0], torch.arange(4 + n)[None])
    for i in (0, 1):
        k = k_proj[i].view(1, 4 + n, 2, 16).transpose(1, 2)             # [1, Hkv, 4 + n, D] un-rotated
        want = apply_rotary_pos_emb(k, k, cos, sin)[1][:, :, 4:]
        torch.testing.assert_close(model.memories[i].keys[:, :, :n], want, atol=1e-5, rtol=1e-5)
    assert model.memories[0].slots[0, :n].tolist() == list(range(4, 4 + n))
    assert model.memories[0].positions[0, :n].tolist() == list(range(4, 4 + n))


def test_memorize_read_reads_earlier_windows_while_writing():
    """memorize(read=True) runs kNN reads of the earlier windows in every window it writes (the
    perplexity evaluation); by default memorize only writes, as a plain windowed forward."""
    x = ids(64)
    models = {}
    for read in (False, True):
        model, _ = make(top_k=8)
        model.runtime.record = True
        model.memorize(x, read=read, show_progress=False)
        model.runtime.record = False
        models[read] = model
    windows = len(range(4, 64, 16 - 4 - 3))
    assert models[False].recorded_reads() == {}                       # writing only
    assert {i: len(c) for i, c in models[True].recorded_reads().items()} == {0: windows - 1, 1: windows - 1}
    assert models[True].memory_size() == models[False].memory_size() == 60    # everything written either way
    plain, read = models[False].memories, models[True].memories
    # layer 0's keys come from the embeddings; layer 1's from hidden states that read memory in layer 0
    torch.testing.assert_close(read[0].keys, plain[0].keys)
    n = 16 - 4 - 3                                                     # the first window found memory empty
    torch.testing.assert_close(read[1].keys[:, :, :n], plain[1].keys[:, :, :n])
    assert (read[1].keys[:, :, n:] - plain[1].keys[:, :, n:]).abs().max() > 1e-4


def test_first_memorize_shorter_than_the_sink_is_all_sink():
    """A first text shorter than sink_tokens becomes the (short) sink: nothing is written, no
    error, and generation works (with no memory rows it is the backbone after that sink)."""
    model, oracle = make(sink_tokens=4)
    first = ids(2, seed=3)
    assert model.memorize(first, show_progress=False) == 2
    assert model.memory_size() == 0 and model.state.seen == [2] and torch.equal(model.state.sink_ids, first)
    x = ids(5, seed=6)
    out = model.generate(x, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9) and torch.equal(out[:, :5], x)
    want = oracle.generate(torch.cat([first, x], 1), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out[:, 5:], want[:, 7:])
    model.memorize(ids(20, seed=7), show_progress=False)               # later calls write everything
    assert model.memory_size() == 20 and model.memories[0].positions[0].tolist() == list(range(2, 22))
    assert model.generate(x, max_new_tokens=2, do_sample=False).shape == (1, 7)


def test_cli_memory_arguments_reach_the_memory_config():
    import argparse
    from memformer.cli.common import add_model_args, memory_config_from_args
    p = argparse.ArgumentParser()
    add_model_args(p)
    assert memory_config_from_args(p.parse_args([])) == MemoryConfig()
    cfg = memory_config_from_args(p.parse_args(["--question-blocks", "6", "--block-size", "32", "--top-k", "8",
                                                "--knn-layers", "10..12", "--storage-dir", "/tmp/rows",
                                                "--sink-tokens", "2", "--memory-dtype", "int8", "--overlap", "64"]))
    assert (cfg.question_blocks, cfg.block_size, cfg.top_k, cfg.knn_layers) == (6, 32, 8, [10, 11, 12])
    assert (cfg.sink_tokens, cfg.memory_dtype, cfg.storage_dir, cfg.index_params) == (2, "int8", "/tmp/rows", {})
    assert cfg.overlap == 64
    base = MemoryConfig(window=16, overlap=3, top_k=4, question_blocks=2)               # an adapter's config: flags override it
    cfg = memory_config_from_args(p.parse_args(["--top-k", "8"]), base)
    assert (cfg.window, cfg.overlap, cfg.top_k, cfg.question_blocks) == (16, 3, 8, 2)
    assert MemoryConfig().sentence_ranking                                              # on by default
    assert not memory_config_from_args(p.parse_args(["--no-sentence-ranking"])).sentence_ranking
    off = MemoryConfig(sentence_ranking=False)
    assert memory_config_from_args(p.parse_args(["--sentence-ranking"]), off).sentence_ranking
    assert not memory_config_from_args(p.parse_args([]), off).sentence_ranking        # no flag: the base's
    assert memory_config_from_args(p.parse_args(["--copy-pointer", "0"])).copy_pointer == 0.0
    assert memory_config_from_args(p.parse_args(["--copy-pointer", "1.5"])).copy_pointer == 1.5
    with pytest.raises(ValueError, match="copy_pointer"):
        memory_config_from_args(p.parse_args(["--copy-pointer", "-1"]))


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_memorize_stops_at_the_last_memory_layer(model_type, monkeypatch):
    """Writing runs the decoder only up to the last memory layer (nothing above it is stored):
    the layers above never run, and memory holds exactly what a whole forward would write."""
    import memformer.model as model_module
    bb = tiny_backbone(model_type, num_hidden_layers=4)
    twin = clone_backbone(bb)
    cfg = MemoryConfig(window=16, top_k=4, overlap=3, memory_layers=[1])
    model, whole = MemformerForCausalLM(bb, None, cfg), MemformerForCausalLM(twin, None, cfg)
    calls = []
    bb.model.layers[3].register_forward_hook(lambda *a: calls.append(3))
    bb.model.layers[1].register_forward_hook(lambda *a: calls.append(1))
    model.memorize(ids(64), show_progress=False)
    assert calls and set(calls) == {1}                                  # layers 2 and 3 never ran
    monkeypatch.setattr(model_module, "decoder_span", lambda *a: contextlib.nullcontext())
    whole.memorize(ids(64), show_progress=False)
    torch.testing.assert_close(model.memories[1].keys, whole.memories[1].keys, rtol=0, atol=0)
    torch.testing.assert_close(model.memories[1].values, whole.memories[1].values, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_context_cache_continuations_equal_generating_from_the_whole_prompt(model_type):
    """A context read once (`context_cache`) then continued twice gives the tokens and logits of
    generating from [context ‖ continuation] each time; the cache is left as it was."""
    model, _ = make(model_type)
    model.memorize(ids(40), show_progress=False)                      # kNN reads have rows to find
    ctx = ids(6, seed=2)
    cache = model.context_cache(ctx)
    assert cache.get_seq_length() == 4 + 6                             # [sink ‖ context]
    kw = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    for seed in (3, 4):
        full = torch.cat([ctx, ids(2, seed=seed)], 1)
        want = model.generate(full, **kw)
        got = model.generate(full, cache=cache, **kw)
        assert torch.equal(got.sequences, want.sequences)
        assert torch.allclose(torch.stack(got.logits), torch.stack(want.logits), atol=1e-5)
        assert cache.get_seq_length() == 4 + 6                         # unchanged for the next call
    with model.memory_disabled():                                       # memory is read at all
        plain = model.generate(full, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                               output_logits=True)
    assert (torch.stack(plain.logits) - torch.stack(want.logits)).abs().max() > 1e-4


def test_context_cache_refuses_what_it_was_not_made_for():
    model, _ = make()
    model.memorize(ids(40), show_progress=False)
    ctx = ids(6, seed=2)
    cache = model.context_cache(ctx)
    with pytest.raises(ValueError, match="start with the context"):     # another context
        model.generate(torch.cat([ids(6, seed=9), ctx[:, :1]], 1), cache=cache, max_new_tokens=2)
    with pytest.raises(ValueError, match="add at least one"):           # nothing to continue
        model.generate(ctx, cache=cache, max_new_tokens=2)
    with pytest.raises(ValueError, match="local window"):              # longer than the window
        model.generate(torch.cat([ctx, ids(8, seed=5)], 1), cache=cache, max_new_tokens=2)
    with pytest.raises(ValueError, match="1 to 11 tokens"):             # window 16 - sink 4 = 12 local
        model.context_cache(ids(12))
    state = model.state.to_tensors()
    model.state.load_tensors(state, batch=1)                             # same size, read again
    with pytest.raises(ValueError, match="memory changed"):
        model.generate(torch.cat([ctx, ids(1)], 1), cache=cache, max_new_tokens=2)
    cache = model.context_cache(ctx)
    model.memorize(ids(20, seed=6), show_progress=False)
    with pytest.raises(ValueError, match="memory changed"):             # reads of an older memory
        model.generate(torch.cat([ctx, ids(1)], 1), cache=cache, max_new_tokens=2)
