"""Shared fixtures: tiny random backbones built in code (no downloads), a stand-in sentence
embedder, and the real default backbone."""
import re
import zlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

_TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
_FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def tiny_backbone(model_type: str = "llama", seed: int = 0, **overrides):
    """A 2-layer, hidden-64 random causal LM of the given family, in eval mode."""
    cfg_cls, model_cls = _FAMILIES[model_type]
    torch.manual_seed(seed)
    cfg = cfg_cls(**{**_TINY, **overrides})
    cfg._attn_implementation = "sdpa"
    return model_cls(cfg).eval()


def clone_backbone(model):
    """An independent copy with the same weights (the 'frozen backbone' oracle)."""
    twin = type(model)(model.config).eval()
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.fixture
def tiny():
    return tiny_backbone


@pytest.fixture(scope="session")
def default_model():
    """What `from_pretrained()` gives: the real embedded default backbone with its shipped trained
    sparse memory (loaded once per session)."""
    from memformer import MemformerForCausalLM
    return MemformerForCausalLM.from_pretrained()


@pytest.fixture(scope="session")
def training_free_model():
    """The real embedded default backbone with training-free memory in every layer."""
    from memformer import MemformerForCausalLM, MemoryConfig
    return MemformerForCausalLM.from_pretrained(None, MemoryConfig())


class HashedWords:
    """A deterministic stand-in for a sentence-transformers model: hashed word counts (words =
    runs of `pattern`), plus `eps` everywhere, L2-normalised; `calls` lists every encode call's texts."""

    def __init__(self, dim: int = 512, pattern: str = r"[a-z]+", eps: float = 0.0):
        self.dim, self.pattern, self.eps = dim, pattern, eps
        self.calls: list[list[str]] = []

    def encode(self, texts, convert_to_tensor=True, normalize_embeddings=True, **kw):
        self.calls.append(list(texts))
        out = torch.zeros(len(texts), self.dim)
        for i, t in enumerate(texts):
            for w in re.findall(self.pattern, t.lower()):
                out[i, zlib.crc32(w.encode()) % self.dim] += 1
        return torch.nn.functional.normalize(out + self.eps, dim=1)

    def get_sentence_embedding_dimension(self):
        return self.dim


def fake_default_embedder(monkeypatch, emb):
    """The CLI loads its models itself: make `emb` its default sentence embedder."""
    import memformer.passages
    import memformer.qa.rag
    monkeypatch.setattr(memformer.passages, "default_embedder", lambda: emb)
    monkeypatch.setattr(memformer.qa.rag, "default_embedder", lambda: emb)
    return emb
