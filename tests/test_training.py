"""Crossbatch fine-tuning (memformer.training) on tiny random backbones and a byte tokenizer."""
import json
import random
from pathlib import Path

import pytest
import torch

from conftest import tiny_backbone
from memformer import MemformerForCausalLM, MemoryConfig
from memformer import persistence
from memformer.config import AdapterConfig
from memformer.persistence import MemoryFileError
from memformer.cli.main import build_parser
from memformer.fileio import BusyError, release_dir_lock
from memformer.training import CrossbatchRecipe, DenseMemory, TrainConfig, negative_groups, run_episode
from memformer.training.config import ConfigError, Schedule, apply_overrides, parse_yaml
from memformer.training import sharding
from memformer.training.crossbatch import scored_counts
from memformer.training.data import (BatchStream, Sample, SampleStream, collate, facts_sample, held_out, kv_sample,
                                     needles_sample,
                                     pack_document, passkey_sample)
from memformer.training.metrics import read_metrics

CONFIGS = sorted((Path(__file__).parent.parent / "training" / "configs").glob("*.yaml"))


class ByteTokenizer:
    """UTF-8 bytes shifted by one; 0 is end-of-text and padding."""
    eos_token_id = pad_token_id = 0
    eos_token = pad_token = "<eos>"
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [b + 1 for b in text.encode()]}

    def decode(self, ids, skip_special_tokens=True):
        ids = ids.tolist() if torch.is_tensor(ids) else ids
        return bytes(i - 1 for i in ids if i > 0).decode(errors="replace")


def tiny_model(**cfg):
    """A tiny memory model with LoRA (rank 4) on its memory layers, as the recipe builds it."""
    mc = MemoryConfig(**{"window": 32, "top_k": 8, "overlap": 4, "sink_tokens": 2, **cfg})
    model = MemformerForCausalLM(tiny_backbone(vocab_size=260), ByteTokenizer(), mc)
    model.add_lora(AdapterConfig(lora_rank=4))
    return model


def random_batch(B=3, L=100, doc_ids=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = doc_ids if doc_ids is not None else list(range(B))
    return collate([Sample(torch.randint(1, 257, (L,), generator=g).tolist(), [True] * L, ids[b], "text")
                    for b in range(B)], L, 0)


def write_corpus(folder: Path, n_docs=24, chars=700) -> Path:
    """A JSONL of documents that repeat a per-document phrase (memory helps predict it)."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(n_docs):
            phrase = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega", "sigma"]) for _ in range(6))
            text = f"doc {i}: " + " ".join(f"{phrase} {rng.randint(0, 9)}." for _ in range(chars // 40))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def tiny_config(tmp_path, **over) -> TrainConfig:
    raw = {"output_dir": str(tmp_path / "run"), "seed": 0,
           "memory": {"window": 32, "top_k": 8, "overlap": 4, "sink_tokens": 2},
           "adapter": {"lora_rank": 4},
           "data": {"sources": [{"type": "jsonl", "path": str(write_corpus(tmp_path))}], "seq_len": 128,
                    "min_doc_tokens": 64, "eval_fraction": 0.25, "shuffle_buffer": 4, "synthetic_rate": 0.2,
                    "synthetic_tasks": ["kv"]},
           "crossbatch": {"batch_size": 3, "d": 2, "w": 2, "top_k": 8},
           "optim": {"lr": 1e-2, "warmup_steps": 2},
           "train": {"max_steps": 6, "gradient_checkpointing": True},
           "eval": {"every": 0, "batch_size": 2, "batches": 1, "passkey_trials": 0},
           "checkpoint": {"every": 2, "keep": 3}}
    return TrainConfig.from_dict(apply_overrides(raw, [f"{k}={v}" for k, v in over.items()]))


def recipe_for(cfg):
    r = CrossbatchRecipe(cfg, backbone=tiny_backbone(vocab_size=260), tokenizer=ByteTokenizer())
    r.setup()
    return r


# ---------------------------------------------------------------- crossbatch masks
def test_dense_memory_search_is_dense_or_exact_top_k():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 3, 10, 8, generator=g), torch.randn(2, 3, 10, 8, generator=g)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 6:] = False                                          # lane 1 has 6 rows
    q = torch.randn(2, 3, 5, 8, generator=g, requires_grad=True)
    scores, ids = DenseMemory(keys, values, valid).search(q, 99)
    assert ids.shape == (2, 3, 5, 10) and (ids[1, ..., 6:] == -1).all() and (ids[0] >= 0).all()
    torch.testing.assert_close(scores, q @ keys.transpose(-1, -2))
    s4, i4 = DenseMemory(keys, values, valid, top_k=4).search(q)
    brute = (q @ keys.transpose(-1, -2)).masked_fill(~valid[:, None, None], float("-inf")).topk(4, dim=-1)
    torch.testing.assert_close(s4, brute.values)
    assert torch.equal(i4, brute.indices)
    s4.sum().backward()                                            # the search score is a logit: it trains q
    assert q.grad is not None and q.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="top_k"):
        DenseMemory(keys, values, valid, top_k=0)
    with pytest.raises(ValueError, match=r"\[B, Hkv, M, D\]"):
        DenseMemory(keys, values[:, :2], valid)


def test_negative_groups_come_only_from_other_documents():
    docs = torch.tensor([7, 7, 8, 9, 10])                         # lanes 0 and 1: chunks of one document
    assert torch.equal(negative_groups(docs, 1, random.Random(0)), torch.eye(5, dtype=torch.bool))
    for seed in range(5):
        g = negative_groups(docs, 3, random.Random(seed))
        assert g.diagonal().all() and (g.sum(1) == 3).all()
        assert not g[0, 1] and not g[1, 0]                        # never the same document
    assert negative_groups(docs, 5, random.Random(0))[0].sum() == 4   # fewer others than d - 1
    with pytest.raises(ValueError, match="d must be >= 1"):
        negative_groups(docs, 0, random.Random(0))


@pytest.mark.parametrize("d", [1, 2, 3])
def test_memory_rows_are_earlier_windows_of_the_lanes_group(d):
    model = tiny_model()
    batch = random_batch(B=3, L=100)
    with torch.no_grad():
        res = run_episode(model, batch, d=d, w=2, top_k=None, generator=random.Random(0), keep_rows=True)
    group = negative_groups(batch.doc_ids, d, random.Random(0))   # the same draw as the episode's
    step = 32 - 2 - 4
    for t, rows in enumerate(res.rows, start=1):                  # window t reads rows from windows < t
        valid = rows[..., 0] >= 0
        lane, window, pos = rows[..., 0], rows[..., 1], rows[..., 2]
        assert (window[valid] < t).all() and (window[valid] >= t - 2).all()    # the last w windows only
        assert (pos[valid] < 2 + t * step).all()                  # never the window itself or the future
        for b in range(3):
            assert set(lane[b][valid[b]].tolist()) == set(group[b].nonzero().flatten().tolist())
        if d == 1:
            assert (lane[valid] == torch.arange(3)[:, None].expand_as(lane)[valid]).all()   # no negatives


def _window_losses(model, batch, d, doc_ids=None):
    with torch.no_grad():
        res = run_episode(model, batch, d=d, w=None, top_k=None, generator=random.Random(0))
    return torch.stack(res.loss)                                 # [windows, B]


def test_no_window_sees_its_future_and_negatives_follow_documents():
    model = tiny_model()
    base = random_batch(B=2, L=100)
    changed = random_batch(B=2, L=100, seed=1)
    changed.ids[:, :60] = base.ids[:, :60]                        # both lanes differ from token 60 on
    a, b = _window_losses(model, base, d=2), _window_losses(model, changed, d=2)
    # windows start at 2, 28, 54, 80 (sink 2, 26 new tokens); scored: 1, 2, 3; only window 1 ends before 60
    assert torch.equal(a[0], b[0]) and (a[1:] != b[1:]).all()
    # lane 1's text reaches lane 0 only as a negative (d = 2, other documents), never with d = 1
    other = random_batch(B=2, L=100, seed=1)
    other.ids[0] = base.ids[0]
    assert not torch.equal(_window_losses(model, base, 2)[:, 0], _window_losses(model, other, 2)[:, 0])
    assert torch.equal(_window_losses(model, base, 1)[:, 0], _window_losses(model, other, 1)[:, 0])
    # two chunks of one document are never each other's negatives
    same_doc, other_same = random_batch(B=2, L=100, doc_ids=[5, 5]), random_batch(B=2, L=100, doc_ids=[5, 5], seed=1)
    other_same.ids[0] = same_doc.ids[0]
    assert torch.equal(_window_losses(model, same_doc, 2)[:, 0], _window_losses(model, other_same, 2)[:, 0])


def test_scored_counts_match_the_episode_and_gradients_reach_only_memory_layers():
    model = tiny_model(memory_layers=[1])
    model.train()
    batch = random_batch(B=2, L=90)
    batch.valid[1, 70:] = False                                   # a shorter document
    batch.targets[1, 70:] = False
    res = run_episode(model, batch, d=2, w=1, top_k=4, generator=random.Random(0),
                      backward=lambda loss, count, t, last: loss.sum().backward())
    assert torch.equal(sum(res.count), scored_counts(model, batch))
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".layers.1." in n and ("lora_" in n or "memory_gate" in n) for n in grads)
    assert any("memory_gate" in n and g.abs().sum() > 0 for n, g in grads.items())


def _episode_with_grads(model, batch, fast, measure_no_memory=False):
    """Per-window losses [windows, B] (and without memory), and {parameter: gradient} of one
    episode whose backward sums every window's loss, as the recipe's does."""
    model.zero_grad(set_to_none=True)
    res = run_episode(model, batch, d=2, w=2, top_k=4, generator=random.Random(0), fast=fast,
                      backward=lambda loss, count, t, last: loss.sum().backward())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        plain = run_episode(model, batch, d=2, w=2, top_k=4, generator=random.Random(0), fast=fast,
                            measure_no_memory=True)
    return torch.stack(res.loss), torch.stack(plain.loss_no_memory), grads


@pytest.mark.parametrize("layers,checkpointing", [([2, 3], False), ([2, 3], True), (None, False)])   # None: all 5, as the CPU config
def test_fast_episode_gives_the_reference_losses_and_gradients(layers, checkpointing):
    """The fast episode (the frozen layers below the first memory layer run once per window for
    both passes, the write pass stops at the last memory layer, the last window is not written)
    learns exactly what the reference (every pass through the whole decoder) learns: same losses
    with and without memory, same gradients, on the same set of trainable parameters."""
    mc = MemoryConfig(window=32, top_k=4, overlap=4, sink_tokens=2, memory_layers=layers,
                      knn_layers=layers or list(range(5)))
    model = MemformerForCausalLM(tiny_backbone(vocab_size=260, num_hidden_layers=5), ByteTokenizer(), mc)
    model.add_lora(AdapterConfig(lora_rank=4))
    with torch.no_grad():                     # a trained-looking adapter: B != 0, gates != 0
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.train()
    if checkpointing:
        model.backbone.activation_checkpointing_enable({"use_reentrant": False})
    batch = random_batch(B=3, L=110)
    batch.valid[2, 80:] = False                                   # a shorter document
    batch.targets[2, 80:] = False
    batch.targets[1, :95] = False                                 # an answer-only sample: no target before its last window
    batch.targets[0, 40:70] = False                               # a window where only lane 2 scores
    loss, plain, grads = _episode_with_grads(model, batch, fast=True)
    ref_loss, ref_plain, ref_grads = _episode_with_grads(model, batch, fast=False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, ref_plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(loss, plain)                        # memory is read: it changes the loss
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys() == trainable          # every adapter weight and gate, nothing else
    for n, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert all(ref_grads[n].abs().sum() > 0 for n in trainable)
    if layers is not None:                                        # the memory layers are 2 and 3 only
        assert all(".layers.2." in n or ".layers.3." in n for n in trainable)


# ---------------------------------------------------------------- data
def test_data_split_packing_and_synthetic_samples(tmp_path):
    tok = ByteTokenizer()
    assert [len(c) for c in pack_document(list(range(250)), 100, 40)] == [100, 100, 50]   # 50 >= 40 kept
    assert [len(c) for c in pack_document(list(range(230)), 100, 40)] == [100, 100]   # 30 < 40 dropped
    cfg = dict(sources=[{"type": "jsonl", "path": str(write_corpus(tmp_path))}], tokenizer=tok,
               seq_len=128, min_tokens=64, eval_fraction=0.3)
    train = SampleStream(**cfg, split="train", shuffle_buffer=3)
    held = list(SampleStream(**cfg, split="eval"))
    it = iter(train)
    seen = {next(it).doc_id for _ in range(60)}
    assert held and not seen & {s.doc_id for s in held}           # held out by document
    assert all(len(s.ids) <= 128 for s in held)
    rng = random.Random(0)
    pk = passkey_sample(tok, rng, 400, local=100, answer_only=True)
    answer = tok.decode([i for i, t in zip(pk.ids, pk.targets) if t])
    assert len(pk.ids) <= 400 and answer.strip().rstrip(".").isdigit()
    assert tok.decode(pk.ids[:300]).count(answer.strip().rstrip(".")) >= 1   # the needle lies before the last 100
    with pytest.raises(ValueError, match="raise data.seq_len"):
        passkey_sample(tok, rng, 100, local=50, answer_only=True)
    kv = kv_sample(tok, rng, 400, local=100, answer_only=True)
    values = tok.decode([i for i, t in zip(kv.ids, kv.targets) if t]).split()
    assert values and all(tok.decode(kv.ids[:300]).count(v) for v in values)
    text = tok("filler words of a real document. " * 20, add_special_tokens=False)["input_ids"]
    for _ in range(20):                                           # look-alike needles in real text
        nd = needles_sample(tok, rng, 600, local=100, answer_only=True, text=text)
        assert len(nd.ids) <= 600 and nd.kind == "needles"
        answers = [v.rstrip(".") for v in tok.decode([i for i, t in zip(nd.ids, nd.targets) if t]).split()]
        early = tok.decode(nd.ids[:len(nd.ids) - 100])
        assert len(answers) == 2 and all(f" is {a}." in early for a in answers)   # planted beyond the local 100
        assert early.count(" is ") >= 4 and "filler words" in early
    stream = SampleStream(**{**cfg, "seq_len": 600}, split="train", shuffle_buffer=3, synthetic_rate=0.5,
                          synthetic_tasks=["needles"], local=20)
    kinds = [s.kind for s, _ in zip(stream, range(30))]
    assert "needles" in kinds and "text" in kinds
    # the stream is a function of its seed: skipping replays it
    a, b = BatchStream(train, 2, 0), BatchStream(SampleStream(**cfg, split="train", shuffle_buffer=3), 2, 0)
    [next(a) for _ in range(3)]
    b.skip(3)
    assert torch.equal(next(a).ids, next(b).ids)


def test_synthetic_answers_vary_in_form_and_length():
    """Answers of one fixed form teach the copy to stop there: numbers of 4-10 digits, hex codes,
    UUIDs and words, under several phrasings, each asked with the cue its statement begins with."""
    tok = ByteTokenizer()
    rng = random.Random(0)
    text = tok("filler words of a real document. " * 40, add_special_tokens=False)["input_ids"]
    forms, lengths, cues = set(), set(), set()
    for _ in range(80):
        nd = needles_sample(tok, rng, 900, local=100, answer_only=True, text=text)
        answers = [v.rstrip(".") for v in tok.decode([i for i, t in zip(nd.ids, nd.targets) if t]).split()]
        early = tok.decode(nd.ids[:len(nd.ids) - 100])
        for a in answers:
            assert f" is {a}." in early
            lengths.add(len(a)) if a.isdigit() else None
            forms.add("number" if a.isdigit() else "uuid" if a.count("-") == 4 else
                      "word" if a.isalpha() else "code")
        cues.add(tok.decode(nd.ids[-20:]).split(" of ")[0].split("\n")[-1])
    assert forms == {"number", "uuid", "word", "code"}
    assert min(lengths) <= 5 and max(lengths) >= 9
    assert len(cues) >= 5
    keys = {tok.decode([i for i, t in zip(s.ids, s.targets) if t]).strip(" .")
            for s in (passkey_sample(tok, rng, 400, local=100, answer_only=True) for _ in range(30))}
    assert len({len(k) for k in keys}) >= 3


def test_facts_are_asked_as_ask_asks_them():
    """Natural facts planted beyond the local window, asked as free-form questions (answered by
    restating the fact) or as cues; the values are targets and lie only in the planted text."""
    tok = ByteTokenizer()
    rng = random.Random(0)
    text = tok("filler words of a real document. " * 40, add_special_tokens=False)["input_ids"]
    forms = set()
    for _ in range(40):
        s = facts_sample(tok, rng, 900, local=100, answer_only=True, text=text)
        assert len(s.ids) <= 900 and s.kind == "facts"
        answers = tok.decode([i for i, t in zip(s.ids, s.targets) if t])
        early = tok.decode(s.ids[:len(s.ids) - 100])
        assert "filler words" in early and early.count(" is ") >= 4
        for line in filter(None, answers.replace(".", ".\n").splitlines()):
            value = line.strip().rstrip(".").split(" is ")[-1]
            assert value and value in early                       # planted beyond the local 100 tokens
            forms.add("question" if " is " in line else "cue")
    assert forms == {"question", "cue"}
    stream = SampleStream(sources=[{"type": "python_docs"}], tokenizer=tok, seq_len=900, min_tokens=300,
                          eval_fraction=0.05, split="train", shuffle_buffer=3, synthetic_rate=1.0,
                          synthetic_tasks=["facts"], local=100)
    assert {s.kind for s, _ in zip(stream, range(6))} >= {"facts"}


def test_init_adapter_starts_from_saved_weights(tmp_path):
    first = recipe_for(tiny_config(tmp_path / "a", **{"train.max_steps": 2, "eval.at_start": False,
                                                      "eval.at_end": False}))
    first.train()
    first.cleanup()
    saved = tmp_path / "a" / "run" / "adapter"
    again = recipe_for(tiny_config(tmp_path / "b", **{"model.init_adapter": str(saved)}))
    want, got = first.model.trainable_state_dict(), again.model.trainable_state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert any(t.abs().max() > 0 for n, t in got.items() if ".lora_B." in n)     # trained, not fresh
    again.cleanup()
    with pytest.raises(ConfigError, match="model.init_adapter"):
        tiny_config(tmp_path / "c", **{"model.init_adapter": str(tmp_path / "nowhere")})


def test_init_adapter_of_fewer_layers_starts_them_and_lora_layers_limit_lora(tmp_path):
    """An adapter of memory layer 1 continues as a model with memory in both layers and LoRA in
    layer 1 only: layer 1 starts from the saved weights, layer 0 has a fresh gate and no LoRA, and
    the adapter saved after training loads back as it was trained."""
    first = recipe_for(tiny_config(tmp_path / "a", **{"memory.memory_layers": "[1]", "train.max_steps": 2,
                                                      "eval.at_start": False, "eval.at_end": False}))
    first.train()
    first.cleanup()
    saved = tmp_path / "a" / "run" / "adapter"
    wider = tiny_config(tmp_path / "b", **{"model.init_adapter": str(saved), "adapter.lora_layers": "[1]",
                                           "train.max_steps": 2, "eval.at_start": False, "eval.at_end": False})
    again = recipe_for(wider)
    want, got = first.model.trainable_state_dict(), again.model.trainable_state_dict()
    assert set(want) < set(got)
    assert all(torch.equal(got[n], want[n]) for n in want)
    fresh = sorted(set(got) - set(want))
    assert fresh == ["backbone.model.layers.0.self_attn.memory_gate"]       # no LoRA in layer 0
    assert float(got[fresh[0]].abs().max()) == 0.0
    again.train()
    trained = again.model.trainable_state_dict()
    again.cleanup()
    assert float(trained[fresh[0]].abs().max()) > 0.0                       # the new gate trained
    model = MemformerForCausalLM(tiny_backbone(vocab_size=260), ByteTokenizer(),
                                 persistence.read_adapter_config(tmp_path / "b" / "run" / "adapter"))
    model.load_adapter(tmp_path / "b" / "run" / "adapter")
    assert model.adapter_config.lora_layers == [1]
    back = model.trainable_state_dict()
    assert back.keys() == trained.keys() and all(torch.equal(back[n], trained[n]) for n in back)
    # a strict load of the narrower adapter into the wider model is refused; a file holding a
    # weight the model lacks is refused even when partial
    with pytest.raises(MemoryFileError, match="does not match"):
        persistence.load_adapter(model, saved)
    narrow = MemformerForCausalLM(tiny_backbone(vocab_size=260), ByteTokenizer(),
                                  MemoryConfig(window=32, top_k=8, overlap=4, sink_tokens=2, memory_layers=[1]))
    with pytest.raises(MemoryFileError, match="does not match"):
        persistence.load_adapter(narrow, tmp_path / "b" / "run" / "adapter", partial=True)


@pytest.mark.parametrize("layers, memory, message", [
    ("[]", "null", "lora_layers must be a non-empty list"), ("[-1]", "null", "lora_layers must be a non-empty list"),
    ("[true]", "null", "lora_layers must be a non-empty list"),
    ("[0, 1]", "[1]", r"adapter.lora_layers \[0, 1\] must be memory layers")])
def test_bad_lora_layers_are_clear_errors(tmp_path, layers, memory, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, **{"adapter.lora_layers": layers, "memory.memory_layers": memory})


def test_lora_layers_outside_the_memory_layers_are_refused():
    model = MemformerForCausalLM(tiny_backbone(vocab_size=260), ByteTokenizer(),
                                 MemoryConfig(window=32, top_k=8, overlap=4, sink_tokens=2, memory_layers=[1]))
    with pytest.raises(ValueError, match=r"lora_layers \[0\] are not memory layers"):
        model.add_lora(AdapterConfig(lora_rank=4, lora_layers=[0]))
    assert model.adapter_config is None and not any(".lora_" in n for n, _ in model.named_parameters())


def test_text_and_hf_disk_sources_and_bad_specs(tmp_path):
    datasets = pytest.importorskip("datasets")
    tok = ByteTokenizer()
    (tmp_path / "t").mkdir()
    for i in range(6):
        (tmp_path / "t" / f"{i}.txt").write_text(f"text file {i} " * 20)
    datasets.Dataset.from_dict({"body": [f"row {i} " * 30 for i in range(6)]}).save_to_disk(str(tmp_path / "hf"))
    for spec in ({"type": "text", "paths": [str(tmp_path / "t")]},
                 {"type": "hf_disk", "path": str(tmp_path / "hf"), "text_field": "body"}):
        s = SampleStream([spec], tok, seq_len=64, min_tokens=32, eval_fraction=0.5, split="eval")
        train = SampleStream([spec], tok, seq_len=64, min_tokens=32, eval_fraction=0.5, shuffle_buffer=1)
        assert {x.doc_id for x in s}.isdisjoint({next(iter(train)).doc_id})
    # the split and the document ids do not depend on where the corpus lies
    import shutil
    shutil.copytree(tmp_path / "t", tmp_path / "elsewhere" / "t")
    here, there = ({x.doc_id for x in SampleStream([{"type": "text", "paths": [str(root / "t")]}], tok, seq_len=64,
                                                   min_tokens=32, eval_fraction=0.5, split="eval")}
                   for root in (tmp_path, tmp_path / "elsewhere"))
    assert here == there and 0 < len(here) < 6
    with pytest.raises(ValueError, match="type 'csv' not in"):
        SampleStream([{"type": "csv"}], tok, seq_len=64, min_tokens=32, eval_fraction=0.5)
    with pytest.raises(ValueError, match="missing"):
        SampleStream([{"type": "jsonl"}], tok, seq_len=64, min_tokens=32, eval_fraction=0.5)
    with pytest.raises(ValueError, match="no column"):
        list(SampleStream([{"type": "hf_disk", "path": str(tmp_path / "hf")}], tok, seq_len=64, min_tokens=32,
                          eval_fraction=0.5, split="eval"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        list(SampleStream([{"type": "jsonl", "path": str(bad)}], tok, seq_len=64, min_tokens=1,
                          eval_fraction=0.999, split="eval"))


def test_default_corpus_is_real_long_documents_offline():
    from memformer.training.data import python_docs_documents, stdlib_documents
    docs = list(stdlib_documents(random.Random(0)))
    names = {d.name for d in docs}
    assert {"stdlib/email", "stdlib/json", "stdlib/typing.py"} <= names and "stdlib/test" not in names
    email = next(d for d in docs if d.name == "stdlib/email").load()
    assert "# file: email/parser.py" in email and len(email) > 100_000
    parts = list(python_docs_documents(random.Random(0), parts=4))
    assert len(parts) == 4 and all(len(p.load()) > 50_000 for p in parts)
    assert 0 < sum(held_out(n, 0.1) for n in names) < len(names) / 4


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_yaml_config_validates_and_shows_its_command(path):
    cfg = TrainConfig.load(path)
    raw = parse_yaml(path.read_text())            # LoRA settings live in the adapter: section
    assert "lora_rank" not in raw["memory"] and cfg.adapter == AdapterConfig(**raw["adapter"])
    assert f"memformer train --config training/configs/{path.name}" in path.read_text().split("\n\n")[0]
    assert max(cfg.d_schedule().values()) <= cfg.crossbatch.batch_size


def test_configs_include_cpu_smoke_and_gpu_d_schedule_to_64():
    names = {p.name for p in CONFIGS}
    assert {"smollm2_cpu.yaml", "smollm2_gpu.yaml"} <= names
    cpu = TrainConfig.load(CONFIGS[0].parent / "smollm2_cpu.yaml")
    gpu = TrainConfig.load(CONFIGS[0].parent / "smollm2_gpu.yaml")
    assert cpu.memory.window <= 512 and gpu.memory.window == 2048
    assert max(gpu.d_schedule().values()) >= 64 and min(gpu.d_schedule().values()) <= 2


@pytest.mark.parametrize("override, message", [
    ("train.max_step=3", "unknown keys"), ("crossbatch.d=64", "batch holds only"),
    ("crossbatch.d=[[5, 2]]", "starting at 0"), ("crossbatch.w={choices: []}", "choices"),
    ("memory.window=0", "memory: MemoryConfig"), ("data.min_doc_tokens=20", "second window"),
    ("optim.scheduler=step", "not in"), ("data.sources=[{type: csv}]", "type 'csv'"),
    ("eval.passkey_lengths=[4q]", "not a length"), ("bogus=1", "unknown top-level"),
    ("optim.lr=fast", "optim.lr must be float"), ("train.gradient_checkpointing=3", "must be bool"),
    ("adapter.rank=4", r"adapter: AdapterConfig: unknown fields \['rank'\]"),
    ("adapter.lora_rank=-1", "adapter: AdapterConfig: lora_rank must be >= 0"),
    ("memory.lora_rank=4", r"memory: MemoryConfig: unknown fields \['lora_rank'\]"),
])
def test_bad_configs_are_clear_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, **dict([override.split("=", 1)]))


def test_overrides_and_schedules():
    raw = apply_overrides({"crossbatch": {"d": 2}}, ["crossbatch.d=[[0, 2], [10, 8]]", "optim.lr=3e-4"])
    assert raw == {"crossbatch": {"d": [[0, 2], [10, 8]]}, "optim": {"lr": 3e-4}}
    s = Schedule(raw["crossbatch"]["d"], "d")
    assert [s.at(i, None) for i in (0, 9, 10, 99)] == [2, 2, 8, 8]
    c = Schedule({"choices": [2, 4]}, "d")
    assert {c.at(0, random.Random(i)) for i in range(20)} == {2, 4}
    assert Schedule(None, "w", allow_none=True).at(5, None) is None
    with pytest.raises(ConfigError, match="not key=value"):
        apply_overrides({}, ["train.max_steps"])


def test_cli_train_parses_and_prints_config(capsys):
    args = build_parser().parse_args(["train", "--config", str(CONFIGS[0].parent / "smollm2_cpu.yaml"),
                                      "train.max_steps=7", "--print-config"])
    assert args.func(args) == 0
    assert "max_steps: 7" in capsys.readouterr().out
    bad = build_parser().parse_args(["train", "--config", "nope.yaml"])
    assert bad.func(bad) == 2


# ---------------------------------------------------------------- the recipe
def test_training_lowers_loss_and_keeps_the_backbone_bit_identical(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.max_steps": 25, "checkpoint.every": 0, "eval.at_start": False,
                                   "eval.at_end": False, "optim.lr": 2e-2, "optim.gate_lr": 5e-2,
                                   "data.synthetic_rate": 0.0})
    r = recipe_for(cfg)
    assert [g["initial_lr"] for g in r.optimizer.param_groups] == [2e-2, 5e-2]
    frozen = {n: p.detach().clone() for n, p in r.model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in r.model.named_parameters() if p.requires_grad}
    r.train()
    r.cleanup()
    assert all(torch.equal(p, frozen[n]) for n, p in r.model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, before[n]) for n, p in r.model.named_parameters() if n in before)
    losses = [v for _, v in read_metrics(tmp_path / "run" / "metrics.csv")["train/loss"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 5000         # the run's curves
    # the saved adapter is what from_pretrained(backbone, memory_config, adapter=) loads
    # (LoRA included: the recipe added it from cfg.adapter, and the adapter folder says so)
    assert r.model.adapter_config == cfg.adapter and any(".lora_A." in n for n in before)
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["lora_rank"] == 4
    fresh = MemformerForCausalLM.from_pretrained(tiny_backbone(vocab_size=260), cfg.memory,
                                                 adapter=tmp_path / "run" / "adapter", tokenizer=ByteTokenizer())
    want = r.model.trainable_state_dict()
    got = fresh.trainable_state_dict()
    assert fresh.adapter_config == cfg.adapter and got.keys() == want.keys()
    assert all(torch.equal(t, want[n]) for n, t in got.items())


class Killed(Exception):
    pass


def test_kill_and_resume_continues_the_same_run(tmp_path):
    full = recipe_for(tiny_config(tmp_path / "a"))
    full.train()
    full.cleanup()
    killed = recipe_for(tiny_config(tmp_path / "b"))
    step = killed._train_step

    def dies_at_step_5():
        if killed.step == 4:                                      # after the step-4 checkpoint, mid-run
            raise Killed
        return step()
    killed._train_step = dies_at_step_5
    with pytest.raises(Killed):
        killed.train()
    release_dir_lock(killed._lock)                                # as the killed process's end would
    resumed = recipe_for(tiny_config(tmp_path / "b"))
    assert resumed.step == 4
    resumed.train()
    resumed.cleanup()
    a, b = (read_metrics(tmp_path / x / "run" / "metrics.csv") for x in "ab")
    assert a.keys() == b.keys() and a["train/loss"] == b["train/loss"] and len(a["train/loss"]) == 6
    assert a["eval/loss_memory"] == b["eval/loss_memory"]
    sa, sb = full.model.trainable_state_dict(), resumed.model.trainable_state_dict()
    assert all(torch.equal(sa[n], sb[n]) for n in sa)


def test_one_run_per_output_folder(tmp_path):
    """A second run on the folder of a live one is refused (naming the folder) before it writes;
    once the first ends, the folder is free."""
    first = recipe_for(tiny_config(tmp_path, **{"train.max_steps": 1}))
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(BusyError, match="in use by another process"):
        recipe_for(tiny_config(tmp_path, **{"train.max_steps": 1}))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    first.cleanup()
    recipe_for(tiny_config(tmp_path, **{"train.max_steps": 1})).cleanup()


def test_a_run_killed_before_its_first_checkpoint_starts_over_cleanly(tmp_path):
    """Killed after logging step 1 but before the step-2 checkpoint: the next run starts from
    step 0 and its metrics equal an uninterrupted run's (the killed run's rows are dropped)."""
    full = recipe_for(tiny_config(tmp_path / "a", **{"train.max_steps": 3}))
    full.train()
    full.cleanup()
    killed = recipe_for(tiny_config(tmp_path / "b", **{"train.max_steps": 3}))
    killed.save_checkpoint = lambda: (_ for _ in ()).throw(Killed())   # dies writing its first checkpoint
    with pytest.raises(Killed):
        killed.train()
    release_dir_lock(killed._lock)
    again = recipe_for(tiny_config(tmp_path / "b", **{"train.max_steps": 3}))
    assert again.step == 0
    again.train()
    again.cleanup()
    a, b = (read_metrics(tmp_path / x / "run" / "metrics.csv") for x in "ab")
    assert a.keys() == b.keys()
    assert a["train/loss"] == b["train/loss"] and len(b["train/loss"]) == 3


def test_pruned_checkpoints_leave_no_files(tmp_path):
    """checkpoint.keep=1: only the newest step_* folder and its lock file stay."""
    r = recipe_for(tiny_config(tmp_path, **{"train.max_steps": 4, "checkpoint.keep": 1, "eval.at_end": False}))
    r.train()
    r.cleanup()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [".step_0000004.lock", "step_0000004"]


def test_fsdp_with_one_process_trains_unsharded_and_checkpoint_layouts_must_match(tmp_path):
    """train.fsdp=true with a single process has nothing to shard: it trains as usual. A checkpoint
    written by a sharded run is refused by an unsharded one (and back): optimizer layouts differ."""
    r = recipe_for(tiny_config(tmp_path, **{"train.fsdp": True, "train.max_steps": 2, "eval.at_end": False}))
    assert not r.fsdp and not any(sharding.is_sharded(p) for p in r.model.parameters())
    r.train()
    r.cleanup()
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["fsdp"] is False and state["data_position"] == 2
    state["fsdp"] = True
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="saved with FSDP"):
        recipe_for(tiny_config(tmp_path, **{"train.max_steps": 3}))


def test_batch_stream_resume_position_is_the_same_on_every_process(monkeypatch):
    """Process 0 lags the others by up to world - 1 batches; all resume at the next untaken one."""
    import memformer.training.data as data
    monkeypatch.setattr(data, "collate", lambda samples, *a: samples)     # samples are plain numbers here

    class Numbers:
        seq_len = 4

        def __iter__(self):
            return iter(range(10 ** 6))
    streams = [BatchStream(Numbers(), 1, 0, rank, 3) for rank in range(3)]
    taken = [[next(s) for _ in range(2)] for s in streams]
    assert taken == [[[0], [3]], [[1], [4]], [[2], [5]]]
    assert [s.position for s in streams] == [4, 5, 6] and {s.next_global for s in streams} == {6}
    again = BatchStream(Numbers(), 1, 0, 1, 3)
    again.skip(6)
    assert next(again) == [7]


def test_evaluation_hook_reports_memory_and_passkey(tmp_path):
    cfg = tiny_config(tmp_path, **{"eval.passkey_trials": 1, "eval.passkey_lengths": "[300]"})
    r = recipe_for(cfg)
    out = r.evaluate()
    assert {"loss_memory", "loss_no_memory", "memory_gain", "ppl_memory", "passkey_300"} <= set(out)
    assert out["loss_memory"] != out["loss_no_memory"] and out["passkey_300"] in (0.0, 1.0)
    assert not r.model.memories                                  # evaluation leaves no memory behind
    r.cleanup()


def test_evaluation_episode_equals_the_inference_path():
    """d = 1, w = all, inference top-k: each window's loss is what memorize + forward give (the
    episode writes from a forward without memory, as memorize does)."""
    model = tiny_model(top_k=4, layer_blocks=0)              # the inference path with kNN reads, as training reads
    batch = random_batch(B=1, L=100)
    with torch.no_grad():
        res = run_episode(model, batch, d=1, w=None, top_k=4, generator=random.Random(0))
        windows = list(model.plan_windows(batch.ids, [100], 2, batch.ids[:, :2], None))
        for t, (x, mask, p, start, end) in enumerate(windows[1:], start=1):
            model.reset_memory()
            model.memorize(batch.ids[:, :start], show_progress=False)
            logits = model(x).logits[0, p - 1:-1]
            want = torch.nn.functional.cross_entropy(logits, x[0, p:], reduction="sum")
            torch.testing.assert_close(res.loss[t - 1][0], want, rtol=1e-4, atol=1e-4)
    model.reset_memory()


def _torchrun_worker(out: Path, mode: str) -> list[dict]:
    """Run tests/ddp_worker.py as 2 CPU processes (gloo) in `mode`; the per-rank facts."""
    import os
    import socket
    import subprocess
    import sys
    with socket.socket() as s:                                    # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).parent / "ddp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(port), str(worker), str(out), mode],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    info = [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [i["index"] for i in info] == [0, 1] and all(i["world"] == 2 for i in info)
    assert all("MULTI_CPU" in i["type"] and i["frozen_unchanged"] for i in info)
    return info


_gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                           reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return out, _torchrun_worker(out, "ddp")


@_gloo
def test_ddp_on_two_cpu_processes_keeps_the_adapters_in_sync(ddp_run, tmp_path):
    """torchrun, 2 CPU processes (DDP over gloo, as `accelerate launch --cpu` gives): every process ends
    with the same adapter weights, changed by training, and the backbone untouched."""
    from safetensors.torch import load_file
    out, info = ddp_run
    assert not any(i["sharded"] for i in info)
    a, b = (load_file(out / f"rank{i}.safetensors") for i in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    init = recipe_for(tiny_config(tmp_path / "init")).model.trainable_state_dict()
    assert any(not torch.equal(a[n], init[n]) for n in a)
    saved = load_file(next((out / "run" / "adapter").glob("*.safetensors")))
    assert all(torch.equal(saved[n], a[n]) for n in saved) and saved
    # resumed from step 2 of 3: each process must continue with its own next batch
    assert all(i["resumed_from"] == 2 for i in info)
    resumed = load_file(out / "resumed0.safetensors")
    assert all(torch.equal(resumed[n], a[n]) for n in a)


@_gloo
def test_fsdp_on_two_cpu_processes_matches_ddp_and_resumes(ddp_run, tmp_path):
    """train.fsdp=true, 2 CPU processes: the adapters are sharded, training (with gradient
    checkpointing and the passkey evaluation hook) ends at the DDP run's adapter, the saved adapter
    is the gathered one, and a run resumed from the step-2 checkpoint ends exactly where the
    uninterrupted run did."""
    from safetensors.torch import load_file
    info = _torchrun_worker(tmp_path, "fsdp")
    assert all(i["sharded"] for i in info)
    assert all(i["eval"]["passkey_300"] in (0.0, 1.0) and "loss_memory" in i["eval"] for i in info)
    same = [{k: v for k, v in i["eval"].items() if k != "seconds"} for i in info]
    assert same[0] == same[1]                                     # every rank evaluated the same model
    a, b = (load_file(tmp_path / f"rank{i}.safetensors") for i in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    ddp = load_file(ddp_run[0] / "rank0.safetensors")
    assert ddp.keys() == a.keys()
    for n in a:                       # same data, same averaged gradients: only summation order differs
        torch.testing.assert_close(a[n], ddp[n], rtol=1e-4, atol=1e-5)
    saved = load_file(next((tmp_path / "run" / "adapter").glob("*.safetensors")))
    assert saved.keys() == a.keys() and all(torch.equal(saved[n], a[n]) for n in saved)
    assert all(i["resumed_from"] == 2 for i in info)
    resumed = load_file(tmp_path / "resumed0.safetensors")
    assert all(torch.equal(resumed[n], a[n]) for n in a)


@pytest.mark.parametrize("N,chunk", [(1, 4), (7, 3), (37, 8), (64, 64), (65, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_equals_the_plain_loss_and_gradient(N, chunk, dtype):
    """The chunked head + cross-entropy gives the plain path's per-token loss and input gradient,
    across chunk boundaries (N not a multiple of chunk, one chunk, one token) and dtypes."""
    from memformer.training.linear_ce import linear_cross_entropy
    g = torch.Generator().manual_seed(N)
    head = torch.nn.Linear(24, 101, bias=False).to(dtype).requires_grad_(False)
    h = torch.randn(N, 24, generator=g).to(dtype).requires_grad_(True)
    y = torch.randint(0, 101, (N,), generator=g)
    w = torch.rand(N, generator=g)                                 # per-token weights, as the episode's lane sums
    got = linear_cross_entropy(h, head, y, chunk=chunk)
    (got * w).sum().backward()
    grad, h.grad = h.grad.clone(), None
    want = torch.nn.functional.cross_entropy(head(h).float(), y, reduction="none")
    (want * w).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert got.dtype == torch.float32 and got.shape == (N,)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(grad, h.grad, **tol)


def test_linear_cross_entropy_without_gradient_and_fallbacks():
    """No gradient needed: loss only. A trainable head or one with a bias takes the plain path (the
    weight's gradient flows). No tokens: an empty loss."""
    from memformer.training.linear_ce import linear_cross_entropy
    head = torch.nn.Linear(8, 11, bias=False).requires_grad_(False)
    h, y = torch.randn(5, 8), torch.randint(0, 11, (5,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, head, y, chunk=2),
                                   torch.nn.functional.cross_entropy(head(h), y, reduction="none"))
    trainable = torch.nn.Linear(8, 11, bias=True)
    linear_cross_entropy(h, trainable, y).sum().backward()
    assert trainable.weight.grad is not None and trainable.bias.grad is not None
    assert linear_cross_entropy(torch.zeros(0, 8), head, torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_the_curriculum_holds_no_evaluation_format():
    """Every synthetic task's text is the curriculum's own: no RULER template, needle or noise
    haystack, no prompt, filler or name of the passkey / needle evaluations (they stay held out)."""
    from memformer.eval import needle as needle_eval, passkey as passkey_eval, ruler
    from training import data
    tok = ByteTokenizer()
    rng = random.Random(0)
    text = tok("filler words of a real document. " * 60, add_special_tokens=False)["input_ids"]
    samples = [data.passkey_sample(tok, rng, 600, local=100, answer_only=False) for _ in range(20)]
    samples += [data.kv_sample(tok, rng, 600, local=100, answer_only=False) for _ in range(10)]
    samples += [data.needles_sample(tok, rng, 900, local=100, answer_only=False, text=text) for _ in range(40)]
    samples += [data.facts_sample(tok, rng, 1200, local=100, answer_only=False, text=text) for _ in range(40)]
    decoded = "\n".join(tok.decode(s.ids) for s in samples).lower()
    banned = ["special magic", "provided text", "variables are assgined", "var ", ruler.NOISE, passkey_eval.TASK,
              passkey_eval.FILLER, "pass key", "the grass is green", "the sky is blue"]
    banned += passkey_eval.NAMED_QUESTION.split("{")[:1] + [needle_eval.VARIANTS[0]]
    assert not [b for b in banned if b.lower() in decoded]
    assert not set(data.NAMES) & set(passkey_eval.NAMES)
    assert "the code to keep in mind is" in decoded and "locker combination" in decoded

