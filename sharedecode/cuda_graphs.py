"""Decode steps captured as CUDA graphs: one graph per batch-size bucket and group-capacity class.

A decode step of a small model is dozens of short kernels per layer; launching them from Python
costs more than running them. Each graph reads static input buffers (token ids, positions, slots,
block tables, context lengths, shared-prefix groups) and writes static logits; a step fills one
host staging buffer (pinned on CUDA) from its Python lists, copies it to the device in one
non-blocking copy (block-table rows only where they changed since the previous step, then moved
into the wide static table by one device-side index copy), replays, and reads the first n rows.
Padding rows write nowhere (slot -1) and attend to one token.

Shared prefixes: a step whose sequences form groups (found by the engine from the block tables)
replays a graph whose attention is the shared-prefix cascade. The cascade's grid and tiles are fixed
at capture from the bucket and a capacity class (chunks, members per chunk), each rounded up to a
power of two; the group tensors are static buffers refilled every step (padding chunks have no
members and their programs exit at once; the prefix splits are cut in-kernel from the runtime
prefix lengths), so one graph serves every step whose groups fit its class. Graphs are keyed by
GraphKey(bucket, chunks, chunk_members); chunks = 0 is the bucket's plain graph. Bound: one plain
graph per bucket plus at most `max_group_graphs` group graphs in all (a class per bucket is one of
log2(bucket) chunk counts x 6 member counts, 2..64; a workload uses one or two per bucket); a step
needing a class beyond that bound replays its bucket's plain graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from sharedecode.attention import PagedBatch, paged_attention_enabled
from sharedecode.deferred_rotary import RotaryDeferral
from sharedecode.fused_projections import ProjectionFuser
from sharedecode.kernels.kv_cache_ops import copy_blocks
from sharedecode.kernels.shared_prefix import GroupLayout, PrefixGroups, layout_groups
from sharedecode.uploads import flat_rows

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MEMBERS_PER_CHUNK = 64  # the cascade's chunk size: also the largest member class


class DeviceRows(NamedTuple):
    """A step's block tables computed on the device (`Engine.decode_forked`), with its
    copy-on-write pairs: sources on the device, destinations known to the host (-1: no copy)."""

    rows: torch.Tensor  # [n, width] int32
    copy_src: torch.Tensor  # [n] int64
    copy_dst: list[int]


class GraphKey(NamedTuple):
    size: int  # batch bucket
    chunks: int  # group chunks the captured cascade has room for; 0: plain paged attention
    chunk_members: int  # members per chunk it has room for (its rows per KV head and chunk)


def _pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def capacity_class(layout: GroupLayout) -> tuple[int, int]:
    """(chunks, members per chunk) of the graph that fits `layout`: powers of two, so that few
    classes cover all group shapes."""
    return _pow2(layout.num_chunks), max(2, _pow2(layout.max_chunk_members))


def pack_groups(layout: GroupLayout, size: int, chunks: int) -> dict[str, list[int]]:
    """A step's group buffers padded to a graph's capacity: rows past the batch share nothing,
    chunks past the real ones have no members (their programs exit at once)."""
    if layout.num_chunks > chunks or len(layout.seq_prefix_len) > size:
        raise ValueError(f"groups of {layout.num_chunks} chunks over {len(layout.seq_prefix_len)} rows "
                         f"do not fit a graph of {chunks} chunks and {size} rows")
    pad = [0] * (chunks - layout.num_chunks)
    return {"members": layout.members, "chunk_start": layout.chunk_start + pad,
            "chunk_count": layout.chunk_count + pad, "chunk_prefix_len": layout.chunk_prefix_len + pad,
            "seq_prefix_len": layout.seq_prefix_len + [0] * (size - len(layout.seq_prefix_len))}


class Staging:
    """Named device buffers cut from one flat device buffer, and its host twin (pinned on CUDA).

    A step writes its fields into the host views (numpy arrays: a Python list is converted in one C
    pass, no torch op per field) and copies the used front of the buffer to the device in one
    non-blocking copy. Before the host buffer is written again, `wait` blocks until that copy has
    read it (an event; normally long done, since a step ends by reading its logits on the host).
    """

    def __init__(self, fields: dict[str, tuple[torch.dtype, int]], device: torch.device):
        self.offsets: dict[str, int] = {}
        nbytes = 0
        for name, (dtype, count) in fields.items():
            nbytes = -(-nbytes // 64) * 64  # aligned: Triton and inductor specialise on 16 bytes
            self.offsets[name] = nbytes
            nbytes += count * dtype.itemsize
        on_cuda = device.type == "cuda"
        self._host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=on_cuda)
        self._device = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self.host: dict[str, np.ndarray] = {}
        self.device: dict[str, torch.Tensor] = {}
        for name, (dtype, count) in fields.items():
            span = slice(self.offsets[name], self.offsets[name] + count * dtype.itemsize)
            self.host[name] = self._host[span].view(dtype).numpy()
            self.device[name] = self._device[span].view(dtype)
        self._copied = torch.cuda.Event() if on_cuda else None

    def wait(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()

    def copy_to_device(self, last: str, count: int) -> None:
        """Copy every field before `last` and the first `count` elements of `last`."""
        end = self.offsets[last] + count * self.host[last].itemsize
        self._device[:end].copy_(self._host[:end], non_blocking=True)
        if self._copied is not None:
            self._copied.record()


def _put(dst: np.ndarray, values: Sequence[int], size: int, pad: int) -> None:
    dst[: len(values)] = values
    dst[len(values): size] = pad


# The most compilations of the prefill: it has one per class of chunk (at most 16 tokens, or more)
# and a few at most if torch specialises something unforeseen; past this it runs uncompiled, so
# that no workload pays a compilation (tens of seconds on the H100) per prefill.
PREFILL_COMPILATIONS = 4


def _more_recompiles(limit: int = 64):
    """Each graph key (bucket, group class) may need its own compilation: past dynamo's default
    limit of 8 per function the step silently runs uncompiled (and is captured that way). Set the
    limit to `limit` compilations, and past it fail loudly, so that `_warm_up` warns and captures
    the eager step (and `prefill_forward` warns and runs eagerly: see PREFILL_COMPILATIONS)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    changes = {name: limit}
    if hasattr(config, "fail_on_recompile_limit_hit"):
        changes["fail_on_recompile_limit_hit"] = True
    return config.patch(**changes)


def capture(warm_up: Callable[[], object], forward: Callable[[], torch.Tensor],
            pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """A CUDA graph of `forward` and its output, after `warm_up` on a side stream (compilation,
    Triton's and cuBLAS's choices happen there, off the graph); `pool`: the memory pool to share."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        warm_up()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = forward()
    return graph, output


class DecodeGraphs:
    def __init__(self, engine, max_batch: int = 256, max_context: int = 32768,
                 num_splits: int | None = None, compile: bool = False, fuse_projections: bool = True,
                 max_group_graphs: int = 32, skinny_gemm: bool = True, defer_rotary: bool = True):
        if not isinstance(max_group_graphs, int) or max_group_graphs < 0:
            raise ValueError(f"max_group_graphs must be an int >= 0, got {max_group_graphs!r}")
        self.engine = engine
        self.num_splits = num_splits
        self.max_group_graphs = max_group_graphs
        # torch.compile before capture fuses the model's norms, rotary and activations into fewer
        # kernels (the paged attention stays an opaque custom op); batch sizes after the first
        # bucket share one dynamic-shape compilation.
        self.compiled = torch.compile(self._model_step) if compile else None
        # Prefill chunks run compiled too, with the step's swaps (`prefill_forward`): eagerly, M1's
        # forward is host-bound up to ~2k tokens (about 15 ms for 16 to 2,048 tokens on the H100,
        # bench/NOTES.md item 38). The token and sequence counts are marked dynamic at each call (not
        # dynamic=True, which would make the weights' shapes and the model's float constants
        # symbolic too): one compilation serves any prompt length.
        self.compiled_prefill = torch.compile(self._model_prefill) if compile else None
        self.fuser = ProjectionFuser(engine.model, skinny=skinny_gemm) if fuse_projections else None
        # the attention kernels apply the rotary embedding as they load queries and keys (triton only)
        self.rotary = RotaryDeferral(engine.model) if defer_rotary and engine.backend == "triton" else None
        self.buckets = [b for b in BUCKETS if b <= max_batch]
        self.max_batch = self.buckets[-1]
        self.max_blocks = -(-max_context // engine.block_size)
        device = engine.device
        n = self.max_batch
        i64, i32 = torch.int64, torch.int32
        # groups have >= 2 members, so at most n // 2 chunks: n covers that count's power of two
        self.staging = Staging({"input_ids": (i64, n), "positions": (i64, n), "slots": (i64, n),
                                "context_lens": (i32, n), "seq_prefix_len": (i32, n), "members": (i32, n),
                                "chunk_start": (i32, n), "chunk_count": (i32, n),
                                "chunk_prefix_len": (i32, n), "changed_rows": (i64, n),
                                "copy_src": (i64, n), "copy_dst": (i64, n),
                                "block_rows": (i32, n * self.max_blocks)}, device)
        self.block_tables = torch.zeros((n, self.max_blocks), dtype=torch.int32, device=device)
        self._rows_on_device: list[list[int] | None] = [None] * n  # what block_tables' rows hold
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        # Copy-on-write copies run inside the graph (no launch of their own from Python): each
        # sequence copies at most one block per step, so a bucket-sized list always has room.
        self.copies_in_graph = engine.backend == "triton"
        self.graphs: dict[GraphKey, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None  # graph memory pool shared by all graphs

    def fits(self, num_seqs: int, max_blocks: int) -> bool:
        return num_seqs <= self.max_batch and max_blocks <= self.max_blocks

    def _prefix_groups(self, key: GraphKey) -> PrefixGroups | None:
        """The capacity-padded groups a graph reads: static buffers, launch config from the key."""
        if not key.chunks:
            return None
        d = self.staging.device
        return PrefixGroups(
            members=d["members"][: key.size], chunk_start=d["chunk_start"][: key.chunks],
            chunk_count=d["chunk_count"][: key.chunks], chunk_prefix_len=d["chunk_prefix_len"][: key.chunks],
            seq_prefix_len=d["seq_prefix_len"][: key.size], groups=None, members_per_chunk=MEMBERS_PER_CHUNK,
            max_chunk_members=key.chunk_members, max_prefix_len=None, max_suffix_len=None)

    def _batch(self, key: GraphKey) -> PagedBatch:
        size, d = key.size, self.staging.device
        return PagedBatch(
            pool=self.engine.pool,
            backend=self.engine.backend,
            slot_mapping=d["slots"][:size],
            block_tables=self.block_tables[:size],
            context_lens=d["context_lens"][:size],
            query_start_loc=self.query_start_loc[: size + 1],
            max_context_len=None,
            is_decode=True,
            prefix_groups=self._prefix_groups(key),
            num_splits=self.num_splits,
        )

    def _model_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        out = self.engine.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                sharedecode_batch=batch)
        return out.logits[0].float()

    def _model_prefill(self, input_ids: torch.Tensor, position_ids: torch.Tensor, batch: PagedBatch,
                       model_kwargs: dict) -> torch.Tensor:
        return self.engine.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                 sharedecode_batch=batch, **model_kwargs).logits[0]

    def prefill_forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, batch: PagedBatch,
                        model_kwargs: dict) -> torch.Tensor | None:
        """An eager forward (a prefill chunk) through torch.compile, with the step's swaps: the
        model's logits [tokens kept, V]. None where compile is off or has failed (then the caller
        runs the model itself; a failure warns once and turns the compiled prefill off)."""
        if self.compiled_prefill is None:
            return None
        # Fresh copies of the inputs: they are views into `upload`'s ring, and torch.compile
        # specialises a view's storage offset at 0 and 1, so the ring wrapping round would compile
        # the model again (seen on the H100 in W-shared 256: bench/results/...-recompiles-order-*).
        # No max_context_len: the kernels need no bound on the context for a prefill, and a python
        # int would be a guard, and so a compilation, per value.
        input_ids, position_ids = input_ids.clone(), position_ids.clone()
        model_kwargs = {name: value.clone() if isinstance(value, torch.Tensor) else value
                        for name, value in model_kwargs.items()}
        batch = dataclasses.replace(batch, max_context_len=None, slot_mapping=batch.slot_mapping.clone(),
                                    block_tables=batch.block_tables.clone(),
                                    context_lens=batch.context_lens.clone(),
                                    query_start_loc=batch.query_start_loc.clone())
        for tensor, dim in [(input_ids, 1), (position_ids, 1), (batch.slot_mapping, 0), (batch.block_tables, 1)]:
            torch._dynamo.maybe_mark_dynamic(tensor, dim)
        # The sequence count and the number of logits kept are unbacked: no 0/1 specialisation, so
        # one chunk of one prompt, of several, or of none that ends share one compilation.
        counts = [(batch.block_tables, 0), (batch.context_lens, 0), (batch.query_start_loc, 0)]
        counts += [(kept, 0) for kept in model_kwargs.values() if isinstance(kept, torch.Tensor)]
        for tensor, dim in counts:
            torch._dynamo.decorators.mark_unbacked(tensor, dim)
        try:
            with torch.inference_mode(), self.model_swaps(), _more_recompiles(PREFILL_COMPILATIONS):
                return self.compiled_prefill(input_ids, position_ids, batch, model_kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - a compiler failure: the uncompiled model runs
            warnings.warn(f"torch.compile of the prefill failed ({type(error).__name__}: {error}); "
                          "prefills run uncompiled from now on", RuntimeWarning, stacklevel=3)
            self.compiled_prefill = None
            return None

    def _forward(self, key: GraphKey) -> torch.Tensor:
        step = self.compiled or self._model_step
        if self.fuser is not None:
            self.fuser.forget_inputs()  # the same guards for every warm-up forward (see there)
        d = self.staging.device
        if self.copies_in_graph:  # the step's copy-on-write pairs, padded with -1 (skipped)
            copy_blocks(self.engine.pool.tensor, d["copy_src"][: key.size], d["copy_dst"][: key.size])
        return step(d["input_ids"][None, : key.size], d["positions"][None, : key.size], self._batch(key))

    def _warm_up(self, key: GraphKey) -> None:
        """Run the step off the graph first: compilation, Triton's and cuBLAS's choices happen here."""
        try:
            for _ in range(3):
                self._forward(key)
        except Exception as error:  # noqa: BLE001 - any compiler failure falls back to eager capture
            if self.compiled is None:
                raise
            warnings.warn(f"torch.compile of the decode step failed ({type(error).__name__}: {error}); "
                          "capturing the uncompiled model instead", RuntimeWarning, stacklevel=3)
            self.compiled = None
            for _ in range(2):
                self._forward(key)

    @contextlib.contextmanager
    def model_swaps(self) -> Iterator[None]:
        """The model as a captured step runs it: attention on the paged cache, fused projections,
        the rotary embedding left to the attention kernels."""
        fused = self.fuser.active() if self.fuser is not None else contextlib.nullcontext()
        deferred = self.rotary.active() if self.rotary is not None else contextlib.nullcontext()
        with paged_attention_enabled(self.engine.model), fused, deferred:
            yield

    def _capture(self, key: GraphKey) -> None:
        """Capture `key`'s graph. The staged inputs are the current step's, so the warm-up forwards
        only rewrite this step's own K/V slots with the values the replay writes anyway."""
        with torch.inference_mode(), self.model_swaps(), _more_recompiles():
            graph, logits = capture(lambda: self._warm_up(key), lambda: self._forward(key), self.pool)
            self.pool = graph.pool()
        self.graphs[key] = (graph, logits)

    def graph_key(self, num_seqs: int, layout: GroupLayout | None) -> GraphKey:
        """The graph of a step of `num_seqs` sequences: its bucket's plain graph without groups or
        once `max_group_graphs` other classes are captured, else the group graph of its class."""
        size = self._bucket(num_seqs)
        if layout is None or not layout.num_chunks:
            return GraphKey(size, 0, 0)
        key = GraphKey(size, *capacity_class(layout))
        captured = sum(1 for k in self.graphs if k.chunks)
        return key if key in self.graphs or captured < self.max_group_graphs else GraphKey(size, 0, 0)

    def _bucket(self, num_seqs: int) -> int:
        return next(b for b in self.buckets if b >= num_seqs)

    def takes_copies(self, copies: list[tuple[int, int]], num_seqs: int) -> bool:
        """Whether the graph of a `num_seqs` step can make these copy-on-write copies itself: room
        in its bucket, and no block both read and written (its copies run in parallel)."""
        if not self.copies_in_graph or len(copies) > self._bucket(num_seqs):
            return False
        return not {s for s, _ in copies} & {d for _, d in copies}

    def stage(self, token_ids: list[int], positions: list[int], slots: list[int],
              tables: list[list[int]] | DeviceRows, context_lens: list[int],
              groups: Sequence[tuple[tuple[int, ...], int]] = (), input_ids: torch.Tensor | None = None,
              copies: Sequence[tuple[int, int]] = ()) -> GraphKey:
        """Copy a step's inputs into the static buffers; returns the key of the graph to replay.
        `tables`: each row's block ids, or rows already on the device (with their copies).
        `groups`: from group_shared_prefixes over `tables` and `context_lens`. `input_ids`: the
        tokens as a device tensor instead of `token_ids` (copied on the device, after the staging
        copy, in stream order). `copies`: copy-on-write (src, dst) block pairs the graph makes
        before its forward (only where `takes_copies` allows)."""
        if isinstance(tables, DeviceRows):
            if not self.copies_in_graph:
                raise ValueError("rows on the device need a graph that makes their copies")
            copies = [(-1, dst) for dst in tables.copy_dst]  # sources filled on the device below
        n = len(token_ids)
        layout = layout_groups(groups, n, self.engine.block_size, MEMBERS_PER_CHUNK) if groups else None
        key = self.graph_key(n, layout)
        host = self.staging.host
        self.staging.wait()
        _put(host["input_ids"], token_ids, key.size, 0)
        _put(host["positions"], positions, key.size, 0)
        _put(host["slots"], slots, key.size, -1)
        _put(host["context_lens"], context_lens, key.size, 1)
        if self.copies_in_graph:
            _put(host["copy_src"], [src for src, _ in copies], key.size, -1)
            _put(host["copy_dst"], [dst for _, dst in copies], key.size, -1)
        elif copies:
            raise ValueError("copies given to a graph that does not make them (see takes_copies)")
        if key.chunks:
            for name, values in pack_groups(layout, key.size, key.chunks).items():
                host[name][: len(values)] = values
        device = self.staging.device
        if isinstance(tables, DeviceRows):
            self.staging.copy_to_device("block_rows", 0)
            rows = tables.rows
            self.block_tables[:n, : rows.shape[1]].copy_(rows)
            self._rows_on_device[:n] = [None] * n
            device["copy_src"][:n].copy_(tables.copy_src)
        else:
            width = max(map(len, tables))
            changed = self._changed_rows(tables)
            k = len(changed)
            host["changed_rows"][:k] = changed
            host["block_rows"][: k * width] = flat_rows([tables[i] for i in changed], width)
            self.staging.copy_to_device("block_rows", k * width)
            if k:
                rows = device["block_rows"][: k * width].view(k, width)
                self.block_tables[:, :width].index_copy_(0, device["changed_rows"][:k], rows)
        if input_ids is not None:
            self.staging.device["input_ids"][:n].copy_(input_ids)
        return key

    def _changed_rows(self, tables: list[list[int]]) -> list[int]:
        """Rows whose block ids differ from what the device table holds. The table keeps its rows
        from step to step and most rows of a step are the previous step's (a new block every
        block_size tokens), so only these are converted and copied; comparing lists is cheap."""
        held = self._rows_on_device
        changed = [i for i, (ids, old) in enumerate(zip(tables, held)) if ids != old]
        for i in changed:
            held[i] = list(tables[i])
        return changed

    def run(self, token_ids: list[int], positions: list[int], slots: list[int],
            tables: list[list[int]] | DeviceRows, context_lens: list[int], groups: Sequence[tuple[tuple[int, ...], int]] = (),
            input_ids: torch.Tensor | None = None, copies: Sequence[tuple[int, int]] = (),
            reuse_output: bool = False) -> torch.Tensor:
        """Stage one step and replay its graph; the logits [S, V]. They are a copy unless
        `reuse_output`: then a view of the graph's output buffer, which the next replay
        overwrites (so every read of them must be queued before the next step's replay)."""
        key = self.stage(token_ids, positions, slots, tables, context_lens, groups, input_ids, copies)
        if key not in self.graphs:
            self._capture(key)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[: len(token_ids)] if reuse_output else logits[: len(token_ids)].clone()
