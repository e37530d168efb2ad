"""memformer.index: kNN indexes over memory keys and the value store."""
from .base import GrowingBuffer, KNNIndex
from .exact import ExactIndex
from .store import LayerMemory, MemoryCapacityError, MemoryStore, make_index

__all__ = ["KNNIndex", "GrowingBuffer", "ExactIndex", "MemoryStore", "LayerMemory",
           "MemoryCapacityError", "make_index"]
