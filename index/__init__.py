"""memformer.index: kNN indexes over memory keys and the value store."""
from .base import GrowingBuffer, KNNIndex
from .exact import ExactIndex
from .faiss_index import FaissIndex
from .store import LayerMemory, MemoryCapacityError, MemoryStore, make_index

__all__ = ["KNNIndex", "GrowingBuffer", "ExactIndex", "FaissIndex", "MemoryStore", "LayerMemory",
           "MemoryCapacityError", "make_index"]
