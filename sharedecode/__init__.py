"""sharedecode: beam search, parallel sampling and shared-prompt batches for Hugging Face causal
LMs on a paged, copy-on-write KV cache."""

from pathlib import Path as _Path

# Installed, the Triton kernels live in sharedecode/kernels; in a source checkout that is not
# installed (PYTHONPATH=.), they are the top-level folder kernels/, found through this path entry.
if not (_Path(__file__).parent / "kernels").is_dir() and (_Path(__file__).parents[1] / "kernels").is_dir():
    __path__.append(str(_Path(__file__).parents[1]))

from sharedecode.block_allocator import KVCacheFull, KVCacheStats
from sharedecode.engine import Engine
from sharedecode.results import GeneratedSequence, GenerationResult, GenerationStats
from sharedecode.strategies import BeamSearch, Greedy, ParallelSampling, SharedPromptBatch

__version__ = "0.1.0"
__all__ = [
    "BeamSearch", "Engine", "GeneratedSequence", "GenerationResult", "GenerationStats", "Greedy",
    "KVCacheFull", "KVCacheStats", "ParallelSampling", "SharedPromptBatch",
]
