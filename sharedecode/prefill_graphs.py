"""Short prefill chunks captured as CUDA graphs: one graph per (token bucket, sequences, kept logits).

A prefill chunk of a few hundred tokens is some 600 kernel launches from Python: M1's 512-token
prefill takes ~15 ms on the H100 while its kernels add up to ~5 (bench/NOTES.md, items 38-39;
compiled it is no faster, its custom ops' launches stay). Replayed, the host's share is one staging
copy and one launch. Chunks of `Engine.swap_from_tokens` tokens or more keep the compiled path.

A graph's shapes are fixed, so a chunk is padded to its bucket (a multiple of TOKEN_STEP tokens; 16
or 32 for the shortest): any padding tokens form one extra sequence after the real ones, whose
slots are -1 (its keys and values are written nowhere), whose block-table row points at block 0 (it
reads finite, meaningless keys) and whose logits are not kept. Rows are independent through every
layer but attention, and attention keeps sequences apart, so the real sequences' logits are those of
the unpadded forward (up to the GEMMs' choice of algorithm for another row count).

    graphs = PrefillGraphs(engine, decode_graphs, max_tokens=1024)
    logits = graphs.run(ids, positions, slots, block_rows, context_lens, query_lens, keep)
    # None: the chunk does not fit a graph (too long, too many sequences, the graph bound reached)
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Sequence

import numpy as np
import torch

from sharedecode.attention import PagedBatch
from sharedecode.cuda_graphs import Staging, _more_recompiles, capture

TOKEN_STEP = 64  # chunk lengths above 32 tokens are rounded up to a multiple of this
MAX_SEQS = 16  # sequences per chunk (one prompt usually; a few when several are admitted at once)
MAX_GRAPHS = 16  # captured graphs at most (one per prompt-length bucket a workload meets); then eager


class PrefillKey(NamedTuple):
    tokens: int  # the graph's token count: the chunk's, rounded up to its bucket
    seqs: int  # the chunk's sequences
    kept: int  # logits rows kept (the sequences whose prompt ends in this chunk)
    padded: bool  # the chunk is shorter than `tokens`: the graph has a padding sequence

    @property
    def graph_seqs(self) -> int:
        return self.seqs + self.padded


def token_bucket(tokens: int) -> int:
    """The graph size a chunk of `tokens` runs in: 16, 32, then multiples of TOKEN_STEP."""
    if tokens <= 16:
        return 16
    if tokens <= 32:
        return 32
    return -(-tokens // TOKEN_STEP) * TOKEN_STEP


class PrefillGraphs:
    """Captured prefill forwards, for an engine whose decode steps are captured (`graphs`: its
    DecodeGraphs, whose swaps the prefill runs with, as the compiled prefill does)."""

    def __init__(self, engine, graphs, max_tokens: int, max_seqs: int = MAX_SEQS,
                 max_graphs: int = MAX_GRAPHS):
        self.engine = engine
        self.decode_graphs = graphs
        self.max_tokens = token_bucket(max_tokens)
        self.max_seqs = max_seqs
        self.max_graphs = max_graphs
        self.max_blocks = max_blocks = graphs.max_blocks  # (the widest table the decode graphs take)
        i64, i32 = torch.int64, torch.int32
        rows = max_seqs + 1
        self.staging = Staging({"input_ids": (i64, self.max_tokens), "positions": (i64, self.max_tokens),
                                "slots": (i64, self.max_tokens), "context_lens": (i32, rows),
                                "query_start_loc": (i32, rows + 1), "keep": (i64, max_seqs),
                                "block_rows": (i32, rows * max_blocks)}, engine.device)
        self._host_rows = self.staging.host["block_rows"].reshape(rows, max_blocks)
        self.block_tables = self.staging.device["block_rows"].view(rows, max_blocks)
        self.graphs: dict[PrefillKey, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None  # one memory pool for all prefill graphs (their logits are copied out)
        self.replays = 0  # chunks run through a graph so far

    def key(self, num_tokens: int, num_seqs: int, num_kept: int, widest: int) -> PrefillKey | None:
        """The graph of a chunk, or None when it does not fit one. The padded token count must
        exceed the sequence count: a batch of one token per sequence is a decode step to the
        attention kernels."""
        if not 0 < num_tokens <= self.max_tokens or not 0 < num_seqs <= self.max_seqs or widest > self.max_blocks:
            return None
        tokens = token_bucket(num_tokens)
        key = PrefillKey(tokens, num_seqs, num_kept, tokens > num_tokens)
        if key.tokens <= key.graph_seqs or (key not in self.graphs and len(self.graphs) >= self.max_graphs):
            return None
        return key

    def stage(self, key: PrefillKey, token_ids: Sequence[int], positions: Sequence[int],
              slots: Sequence[int], block_rows: Sequence[Sequence[int]], context_lens: Sequence[int],
              query_lens: Sequence[int], keep: Sequence[int]) -> None:
        """Copy a chunk's inputs, padded to `key`, into the static buffers (one non-blocking copy)."""
        host = self.staging.host
        self.staging.wait()
        n, s = len(token_ids), len(block_rows)
        pad = key.tokens - n
        host["input_ids"][:n] = token_ids
        host["input_ids"][n: key.tokens] = 0
        host["positions"][:n] = positions
        host["positions"][n: key.tokens] = np.arange(pad)
        host["slots"][:n] = slots
        host["slots"][n: key.tokens] = -1
        host["context_lens"][:s] = context_lens
        host["query_start_loc"][0] = 0
        np.cumsum(query_lens, out=host["query_start_loc"][1: s + 1])
        host["keep"][: len(keep)] = keep
        for row, ids in zip(self._host_rows, block_rows):
            row[: len(ids)] = ids  # (entries past a sequence's blocks are never read)
        if key.padded:  # the padding sequence: positions 0.., reading block 0, writing nowhere
            host["context_lens"][s] = pad
            host["query_start_loc"][s + 1] = key.tokens
            self._host_rows[s, : -(-pad // self.engine.block_size)] = 0
        self.staging.copy_to_device("block_rows", key.graph_seqs * self.max_blocks)

    def _batch(self, key: PrefillKey) -> PagedBatch:
        d = self.staging.device
        return PagedBatch(pool=self.engine.pool, backend=self.engine.backend,
                          slot_mapping=d["slots"][: key.tokens], block_tables=self.block_tables[: key.graph_seqs],
                          context_lens=d["context_lens"][: key.graph_seqs],
                          query_start_loc=d["query_start_loc"][: key.graph_seqs + 1],
                          max_context_len=None, is_decode=False)

    def _forward(self, key: PrefillKey) -> torch.Tensor:
        """The staged chunk's forward (under the decode graphs' swaps): kept logits [kept, V] fp32."""
        fuser = self.decode_graphs.fuser
        if fuser is not None:
            fuser.forget_inputs()
        d = self.staging.device
        out = self.engine.model(input_ids=d["input_ids"][None, : key.tokens],
                                position_ids=d["positions"][None, : key.tokens], use_cache=False,
                                sharedecode_batch=self._batch(key), logits_to_keep=d["keep"][: key.kept])
        return out.logits[0].float()

    def _capture(self, key: PrefillKey) -> None:
        """Capture `key`'s graph. The staged inputs are the chunk's own, so the warm-up forwards
        only write its keys and values into their slots, as the replay does anyway."""
        with torch.inference_mode(), self.decode_graphs.model_swaps(), _more_recompiles():
            graph, logits = capture(lambda: [self._forward(key) for _ in range(2)],
                                    lambda: self._forward(key), self.pool)
            self.pool = graph.pool()
        self.graphs[key] = (graph, logits)

    def run(self, token_ids: Sequence[int], positions: Sequence[int], slots: Sequence[int],
            block_rows: Sequence[Sequence[int]], context_lens: Sequence[int],
            query_lens: Sequence[int], keep: Sequence[int]) -> torch.Tensor | None:
        """The chunk's kept logits [len(keep), V] (fp32, a copy), its keys and values written into
        their slots; None (nothing done) when it fits no graph. Captures its graph at first use."""
        key = self.key(len(token_ids), len(block_rows), len(keep), max(map(len, block_rows)))
        if key is None:
            return None
        self.stage(key, token_ids, positions, slots, block_rows, context_lens, query_lens, keep)
        try:
            return self._replay(key)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - a model whose forward cannot be captured
            # (the warm-up may have written this chunk's keys and values: the eager forward the
            # caller runs instead writes the same ones)
            warnings.warn(f"a prefill graph failed ({type(error).__name__}: {error}); "
                          "prefills run without graphs from now on", RuntimeWarning, stacklevel=3)
            self.max_graphs = 0
            self.graphs.clear()
            return None

    def _replay(self, key: PrefillKey) -> torch.Tensor:
        if key not in self.graphs:
            self._capture(key)
        graph, logits = self.graphs[key]
        graph.replay()
        self.replays += 1
        return logits.clone()  # (the next prefill graph's replay may reuse its memory)
