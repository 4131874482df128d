"""Decoding strategies over one engine: they decide which sequences live, fork and die."""

from sharedecode.strategies.beam_search import BeamSearch
from sharedecode.strategies.sampling import Greedy, ParallelSampling
from sharedecode.strategies.shared_prompt import SharedPromptBatch

__all__ = ["BeamSearch", "Greedy", "ParallelSampling", "SharedPromptBatch"]
