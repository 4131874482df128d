"""sharedecode: beam search, parallel sampling and shared-prompt batches for Hugging Face causal
LMs on a paged, copy-on-write KV cache."""

from sharedecode.block_allocator import KVCacheFull, KVCacheStats
from sharedecode.engine import Engine
from sharedecode.results import GeneratedSequence, GenerationResult, GenerationStats
from sharedecode.strategies import BeamSearch, Greedy, ParallelSampling, SharedPromptBatch

__version__ = "0.1.0"
__all__ = [
    "BeamSearch", "Engine", "GeneratedSequence", "GenerationResult", "GenerationStats", "Greedy",
    "KVCacheFull", "KVCacheStats", "ParallelSampling", "SharedPromptBatch",
]
