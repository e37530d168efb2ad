"""memformer: a long-term kNN memory of millions of tokens for frozen pretrained language models."""
from memformer.adapters import ADAPTERS, BackboneAdapter, get_adapter
from memformer.config import AdapterConfig, MemoryConfig
from memformer.index import MemoryCapacityError
from memformer.model import MemformerForCausalLM
from memformer.persistence import MemoryFileError

__version__ = "0.1.0"
__all__ = ["MemformerForCausalLM", "MemoryConfig", "AdapterConfig", "MemoryCapacityError", "MemoryFileError",
           "ADAPTERS", "BackboneAdapter", "get_adapter"]
