"""The engine: runs a Hugging Face causal LM with its attention on the paged KV cache.

Strategies drive it through a handful of calls on block tables (one per live sequence):
`add` a prompt, `prefill` the new prompts, `fork` a sequence, `decode` one token for many sequences,
`free` a sequence. The engine owns the allocator (block ids) and the KV pool (tensors).
"""

from __future__ import annotations

import inspect
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from sharedecode.attention import BACKENDS, PagedBatch, check_supported, paged_attention_enabled
from sharedecode.block_allocator import BlockAllocator, BlockTable, KVCacheFull, KVCacheStats, is_power_of_two
from sharedecode.kv_pool import KVLayout, KVPool, free_device_bytes
from sharedecode.uploads import flat_rows, upload

if TYPE_CHECKING:  # the kernels are imported when first used: tests set TRITON_INTERPRET before that
    from sharedecode.kernels.shared_prefix import PrefixGroups

CPU_KV_CACHE_BYTES = 256 * 2**20  # a modest fixed pool for CPU runs
DEFAULT_GPU_FRACTION = 0.8  # of the memory left free after the model and a warm-up forward
# The cascade pays only when it skips enough key/value reads: on the H100 (M1, bench/NOTES.md item
# 15) 4-16 beams or 8 samples of a 512-token prompt (at most 7.7k tokens saved) ran no faster on the
# device and up to 13% slower end to end; 64 samples (32k) and shared system prompts gained.
SHARED_PREFIX_MIN_SAVED_TOKENS = 16384


SWAP_FROM_TOKENS = 1024  # see Engine._forward


@dataclass(frozen=True)
class ModelShape:
    """What the cache must know of a model, read off its (text) config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int | None

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        max_context = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
        return cls(text.num_hidden_layers, kv_heads, head_dim, text.vocab_size, max_context)


def load_model(name: str | os.PathLike, dtype: torch.dtype | None, device: torch.device):
    """A model id or local path -> (model, tokenizer), honouring HF_HUB_OFFLINE."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    local = Path(name).is_dir()
    kwargs = {"local_files_only": offline or local}
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or "auto", **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    return model.to(device).eval(), tokenizer


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {sorted(names)} or a torch.dtype, got {dtype!r}")
    return names[dtype]


class Engine:
    """Runs `model` on a paged, copy-on-write KV cache.

    Args:
        model: a transformers `PreTrainedModel` (causal LM), or a model id / local path.
        tokenizer: optional; loaded with the model when `model` is a name.
        kv_cache_bytes: the KV pool's size; default: a fraction of free GPU memory on CUDA
            (`kv_cache_fraction`, measured after a warm-up forward), 256 MiB on CPU.
        block_size: tokens per KV block, a power of two.
        backend: "triton" (the kernels), "torch" (the reference path), or "auto" (triton on CUDA).
        dtype: cast the model (and the cache) to this dtype; default: the model's own.
        device: where to run; default: the model's device (a name loads on CUDA when available).
        max_prefill_tokens: the most prompt tokens computed by one forward (chunked prefill).
        kv_cache_fraction: the fraction of free GPU memory given to the KV pool by default.
        cuda_graphs: on CUDA with the triton backend, replay decode steps as CUDA graphs, and
            prefill chunks of fewer than 1,024 tokens (and at most 16 prompts) too, each padded
            to its token bucket (prefill_graphs.py; a graph is captured at a bucket's first use).
        compile: torch.compile the decode step before capturing it, and prefill chunks (dynamic
            shapes); fewer, fused kernels and far fewer launches from Python. The first step of
            each new batch size, and the first prefills, then take a while. Only with cuda_graphs.
        shared_prefix: with the triton backend, decode steps whose sequences share leading KV
            blocks (beams or samples of one prompt, prompts sharing a cached system prompt; found
            from the block tables every step) read each shared prefix once per group instead of
            once per sequence (the shared-prefix "cascade" kernel), when a step's groups skip at
            least `engine.shared_prefix_min_saved_tokens` key/value reads per layer (sum over
            groups of (members - 1) x shared tokens). False: always the plain kernel.
        look_ahead: let the scheduler launch a sampling, greedy or beam-search step before reading
            the previous step's results (its input tokens, and for beam search its block tables,
            stay on the device), so that the host's bookkeeping overlaps the next forward; the
            tokens are the same either way (see `Scheduler`).
            Default: on CUDA only (on the CPU nothing runs asynchronously, so it would only add
            the discarded step after each stop).
        skinny_gemm: in captured decode steps of at most 16 sequences, run the decoder layers'
            projections through the Triton skinny GEMM instead of cuBLAS (bench/NOTES.md, item
            19: the M1 step at batch 1 1.31 against 1.50 ms on the H100, batch 8 the same).
    """

    def __init__(
        self,
        model: PreTrainedModel | str | os.PathLike,
        tokenizer=None,
        *,
        kv_cache_bytes: int | None = None,
        block_size: int = 16,
        backend: str = "auto",
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        max_prefill_tokens: int = 4096,
        kv_cache_fraction: float = DEFAULT_GPU_FRACTION,
        cuda_graphs: bool = True,
        compile: bool = True,
        shared_prefix: bool = True,
        look_ahead: bool | None = None,
        skinny_gemm: bool = True,
    ):
        if not isinstance(block_size, int) or isinstance(block_size, bool) or not is_power_of_two(block_size):
            raise ValueError(f"block_size must be a power of two (8, 16, 32, ...), got {block_size!r}")
        if backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        if not isinstance(max_prefill_tokens, int) or max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be an int >= 1, got {max_prefill_tokens!r}")
        if not 0.0 < kv_cache_fraction <= 1.0:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {kv_cache_fraction!r}")
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False, got {compile!r}")
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
        if not isinstance(shared_prefix, bool):
            raise TypeError(f"shared_prefix must be True or False, got {shared_prefix!r}")
        if not isinstance(skinny_gemm, bool):
            raise TypeError(f"skinny_gemm must be True or False, got {skinny_gemm!r}")
        if look_ahead is not None and not isinstance(look_ahead, bool):
            raise TypeError(f"look_ahead must be True, False or None (on CUDA only), got {look_ahead!r}")
        if kv_cache_bytes is not None and (not isinstance(kv_cache_bytes, int) or kv_cache_bytes <= 0):
            raise ValueError(f"kv_cache_bytes must be a positive int, got {kv_cache_bytes!r}")
        dtype = resolve_dtype(dtype)
        if isinstance(model, (str, os.PathLike)):
            device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            model, loaded_tokenizer = load_model(model, dtype, device)
            tokenizer = tokenizer or loaded_tokenizer
        check_supported(model)
        if device is not None:
            model = model.to(device)
        if dtype is not None:
            model = model.to(dtype)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        self.backend = backend
        self.shared_prefix = shared_prefix and backend == "triton"  # torch: the reference path
        self.shared_prefix_min_saved_tokens = SHARED_PREFIX_MIN_SAVED_TOKENS
        # the last decode step's block-id lists (the tables' own list objects) and their groups
        self._groups_memo: tuple[list[list[int]], list] = ([], [])
        self.look_ahead = self.device.type == "cuda" if look_ahead is None else look_ahead
        self.shape = ModelShape.from_config(model.config)
        self.layout = KVLayout(self.shape.num_layers, self.shape.num_kv_heads, self.shape.head_dim,
                               block_size, self.dtype)
        self.block_size = block_size
        self.max_prefill_tokens = max_prefill_tokens
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        if kv_cache_bytes is None:
            kv_cache_bytes = self._default_kv_bytes(kv_cache_fraction)
        num_blocks = KVPool.blocks_for_budget(self.layout, kv_cache_bytes)
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_bytes={kv_cache_bytes} is smaller than one KV block "
                f"({self.layout.bytes_per_block} bytes at block_size={block_size})"
            )
        self.pool = KVPool(self.layout, num_blocks, self.device)
        self.allocator = BlockAllocator(num_blocks, block_size, self.layout.bytes_per_token)
        self._last_rows: torch.Tensor | None = None  # the last decode step's block tables (device)
        self.graphs = None
        self.prefill_graphs = None  # shorter prefill chunks replayed as CUDA graphs (prefill_graphs.py)
        # prefill forwards of at least this many tokens run as the captured steps do (None: none)
        self.swap_from_tokens: int | None = SWAP_FROM_TOKENS
        self.prefilled_tokens = 0  # prompt tokens run through prefill forwards (cached ones are not)
        if cuda_graphs and self.device.type == "cuda" and self.backend == "triton":
            from sharedecode.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, max_context=min(self.shape.max_context or 32768, 32768),
                                       compile=compile, skinny_gemm=skinny_gemm)
            if self._keeps_logits:  # (a graph keeps its chunk's last-token logits only)
                from sharedecode.prefill_graphs import PrefillGraphs

                self.prefill_graphs = PrefillGraphs(self, self.graphs, max_tokens=SWAP_FROM_TOKENS)

    # ---------------------------------------------------------------- setup
    def _default_kv_bytes(self, fraction: float) -> int:
        if self.device.type != "cuda":
            return CPU_KV_CACHE_BYTES
        # A warm-up forward of a full prefill chunk, so that its activations are counted as used.
        tokens = min(self.max_prefill_tokens, self.shape.max_context or self.max_prefill_tokens)
        probe_layout = KVLayout(self.layout.num_layers, self.layout.num_kv_heads, self.layout.head_dim,
                                self.block_size, self.dtype)
        probe_blocks = -(-tokens // self.block_size)
        self.pool = KVPool(probe_layout, probe_blocks, self.device)
        self.allocator = BlockAllocator(probe_blocks, self.block_size)
        table = self.allocator.allocate([0] * tokens)
        try:
            self.prefill([table])
        finally:
            self.allocator.free_all()
        del self.pool
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        return int(free_device_bytes(self.device) * fraction)

    # ---------------------------------------------------------------- sequences
    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free_blocks

    def kv_stats(self) -> KVCacheStats:
        return self.allocator.stats()

    def add(self, token_ids: list[int]) -> BlockTable:
        """Allocate blocks for a prompt (cached leading blocks are reused); prefill it next."""
        return self.allocator.allocate(token_ids)

    def fork(self, table: BlockTable) -> BlockTable:
        return self.allocator.fork(table)

    def fork_into(self, target: BlockTable, source: BlockTable) -> None:
        """Reuse the table `target` as a fork of `source` (see `BlockAllocator.fork_into`)."""
        self.allocator.fork_into(target, source)

    def free(self, table: BlockTable) -> None:
        self.allocator.free(table)

    def free_all(self) -> None:
        self.allocator.free_all()

    def reset_prefix_cache(self) -> int:
        """Drop the KV of prompts no sequence holds any more (see `BlockAllocator.reset_prefix_cache`):
        a prompt seen before is then computed again. Returns the number of blocks dropped."""
        return self.allocator.reset_prefix_cache()

    def blocks_needed_for_decode(self, tables: list[BlockTable]) -> int:
        return self.allocator.blocks_needed_for_step(tables)

    # ---------------------------------------------------------------- forwards
    def prefill(self, tables: list[BlockTable]) -> torch.Tensor:
        """Compute the uncached prompt tokens of `tables`; returns each one's last-token logits [S, V].

        Chunked: at most `max_prefill_tokens` tokens per forward. Tables are computed in order, so a
        table that reuses blocks an earlier table of the same call computes starts after them: they
        are written by an earlier forward, or by the same one (each layer writes every new key and
        value before attending). A system prompt shared by a batch of requests is computed once.
        """
        work = []
        scheduled: set[int] = set()  # blocks an earlier table of this call computes
        bs = self.block_size
        for table in tables:
            start = self._first_uncomputed(table, scheduled)
            work.append((table, start, table.num_tokens))
            scheduled.update(table.block_ids[start // bs : table.num_tokens // bs])
            self.prefilled_tokens += table.num_tokens - start
        logits = [None] * len(tables)
        chunk: list[tuple[int, int, int]] = []  # (table index, start, end)
        budget = self.max_prefill_tokens
        for index, (table, start, end) in enumerate(work):
            while start < end:
                take = min(end - start, budget)
                chunk.append((index, start, start + take))
                start += take
                budget -= take
                if budget == 0:
                    self._prefill_chunk(tables, chunk, logits)
                    chunk, budget = [], self.max_prefill_tokens
        if chunk:
            self._prefill_chunk(tables, chunk, logits)
        for table in tables:
            self.allocator.mark_computed(table)
        return torch.stack(logits)

    def _first_uncomputed(self, table: BlockTable, scheduled: set[int]) -> int:
        """Where `table`'s prefill starts: after its cached blocks whose KV is already written or is
        `scheduled` (computed by an earlier table of the same call). A reused block that neither
        holds (another table's, still being computed elsewhere) is recomputed here: writing the
        same K/V into the shared slot is harmless."""
        bs = self.block_size
        computed = self.allocator.computed
        for index in range(table.num_cached_tokens // bs):
            block_id = table.block_ids[index]
            if not computed[block_id] and block_id not in scheduled:
                return index * bs
        return table.num_cached_tokens

    def _prefill_chunk(self, tables, chunk, logits) -> None:
        ids, positions, slots, keep = [], [], [], []
        for index, start, end in chunk:
            table = tables[index]
            ids.extend(table.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self.allocator.slot_mapping(table, start, end))
            if end == table.num_tokens:
                keep.append(len(ids) - 1)
        chunk_tables = [tables[index] for index, _, _ in chunk]
        context_lens = [end for _, _, end in chunk]
        query_lens = [end - start for _, start, end in chunk]
        out = self._forward(ids, positions, slots, chunk_tables, context_lens, query_lens, keep,
                            is_decode=False)
        finished = [index for index, _, end in chunk if end == tables[index].num_tokens]
        for row, index in enumerate(finished):
            logits[index] = out[row]

    def decode(self, tables: list[BlockTable], token_ids: list[int],
               input_ids: torch.Tensor | None = None, reuse_output: bool = False) -> torch.Tensor:
        """Append one token to each table and run one forward for all; returns logits [S, V].

        `input_ids` (int64 [S] on the device): the tokens to feed when the host does not know them
        yet (a step launched before the previous one's results were read); `token_ids` then holds
        PENDING_TOKEN for each, set later with `allocator.fill_last_tokens`.
        `reuse_output`: the logits may be the captured step's output buffer, valid until the next
        decode (no copy: at batch 256 and M1's vocabulary the copy moved 260 MB a step); for
        callers that queue every read of them on the device first.
        Raises KVCacheFull (changing nothing) when the step's new blocks do not fit.
        """
        if len(tables) != len(token_ids):
            raise ValueError(f"decode got {len(tables)} tables but {len(token_ids)} tokens")
        needed = self.allocator.blocks_needed_for_step(tables)
        if needed > self.allocator.num_free_blocks:
            raise KVCacheFull(f"a decode step of {len(tables)} sequences needs {needed} new KV blocks, "
                              f"{self.allocator.num_free_blocks} are free")
        slots = self.allocator.append_tokens(tables, token_ids)
        block_ids = [t.block_ids for t in tables]
        context_lens = [len(t.token_ids) for t in tables]
        positions = [n - 1 for n in context_lens]
        groups = self._shared_prefix_groups(block_ids, context_lens)
        width = max(map(len, block_ids))
        if self.graphs is not None and self.graphs.fits(len(tables), width):
            copies = self.allocator.take_copies()
            if not self.graphs.takes_copies(copies, len(tables)):
                self._copy_blocks(copies)
                copies = []
            out = self.graphs.run(list(token_ids), positions, slots, block_ids, context_lens, groups,
                                  input_ids=input_ids, copies=copies, reuse_output=reuse_output)
            self._last_rows = self.graphs.block_tables[: len(tables), :width]
        else:
            out = self._forward(list(token_ids) if input_ids is None else input_ids, positions, slots,
                                tables, context_lens, [1] * len(tables), None, is_decode=True,
                                prefix_groups=self._prefix_groups(groups, context_lens))
        self.allocator.mark_all_computed(tables)
        return out

    def _shared_prefix_groups(self, block_ids, context_lens: list[int]) -> list:
        """The step's shared-prefix groups, when there are enough to pay for the cascade."""
        if not self.shared_prefix:
            return []
        from sharedecode.kernels.shared_prefix import group_shared_prefixes

        # A table's full blocks never change while its block-id list is the same object (copy on
        # write replaces only a partial last block; forks and frees give the table a new list),
        # and every shared block of a group is full. So when the step's lists are the last
        # step's objects, in the same order, the last step's groups still hold (sharing that grew
        # since would go unused, which costs speed, not correctness: it does not happen to
        # forked samples or shared prompts). Saves ~150 us a step at W-shared 256 (256 tables).
        lists, groups = self._groups_memo
        if len(lists) != len(block_ids) or not all(map(operator.is_, lists, block_ids)):
            groups = group_shared_prefixes(block_ids, context_lens, self.block_size)
            self._groups_memo = (list(block_ids), groups)
        return self._worth_a_cascade(groups)

    def _worth_a_cascade(self, groups: list) -> list:
        saved = sum((len(members) - 1) * shared for members, shared in groups) * self.block_size
        # too little shared to pay for the cascade's extra programs and merge
        return groups if self.shared_prefix and saved >= self.shared_prefix_min_saved_tokens else []

    def _prefix_groups(self, groups: list, context_lens: list[int]) -> PrefixGroups | None:
        if not groups:
            return None
        from sharedecode.kernels.shared_prefix import prefix_groups_to_device

        return prefix_groups_to_device(groups, context_lens, self.block_size, self.device)

    @property
    def last_block_tables(self) -> torch.Tensor:
        """The block tables of the last decode step, on the device ([rows, width] int32): what
        `decode_forked`'s new tables are made from."""
        if self._last_rows is None:
            raise RuntimeError("no decode step has run since the last prefill")
        return self._last_rows

    def decode_forked(self, rows: torch.Tensor, copy_src: torch.Tensor, positions: list[int], tails: list[int],
                      input_ids: torch.Tensor, groups: list | None = None, reuse_output: bool = False) -> torch.Tensor:
        """A decode step for sequences whose block tables exist only on the device (beam search
        launched ahead: each new table forks a row of `last_block_tables` chosen on the device).
        `rows` [S, width] int32: the tables, each holding the reserved block `tails[i]` for the
        token fed at `positions[i]` (`input_ids[i]`, on the device); `copy_src` [S] int64: the
        block whose KV is copied into the tail first (the parent's partial last block), -1 where
        the tail starts empty (positions[i] at a block boundary). The host mirrors these tables
        afterwards (`BlockAllocator.fork_with_tail`). `groups`: shared-prefix groups over the rows
        (blocks that every member holds), used when the cascade pays. Returns logits [S, V]
        (`reuse_output`: as in `decode`)."""
        n, bs, device = len(tails), self.block_size, self.device
        if rows.dim() != 2 or rows.shape[0] != n or copy_src.shape != (n,) or input_ids.shape != (n,) \
                or len(positions) != n:
            raise ValueError(f"decode_forked got {n} tails, {len(positions)} positions, rows "
                             f"{tuple(rows.shape)}, copy_src {tuple(copy_src.shape)} and input ids "
                             f"{tuple(input_ids.shape)}")
        copied = [p % bs != 0 for p in positions]  # a partial block carried over into the tail
        slots = [t * bs + p % bs for t, p in zip(tails, positions)]
        context_lens = [p + 1 for p in positions]
        groups = self._worth_a_cascade(groups or [])
        if self.graphs is not None and self.graphs.fits(n, rows.shape[1]):
            from sharedecode.cuda_graphs import DeviceRows

            staged = DeviceRows(rows, copy_src, [t if c else -1 for t, c in zip(tails, copied)])
            out = self.graphs.run([0] * n, positions, slots, staged, context_lens, groups, input_ids=input_ids,
                                  reuse_output=reuse_output)
        else:
            if any(copied):
                pick = [i for i, c in enumerate(copied) if c]
                ids = upload(pick + [tails[i] for i in pick], device, torch.int64)
                self._copy_block_tensors(copy_src.index_select(0, ids[: len(pick)]), ids[len(pick):])
            out = self._forward(input_ids, positions, slots, None, context_lens, [1] * n, None, is_decode=True,
                                prefix_groups=self._prefix_groups(groups, context_lens), block_tables=rows)
        self._last_rows = rows
        return out

    def _apply_copies(self) -> None:
        self._copy_blocks(self.allocator.take_copies())

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        # One non-blocking upload of both id lists (no host sync in the decode loop).
        ids = upload([s for s, _ in copies] + [d for _, d in copies], self.device, torch.int64)
        disjoint = not {s for s, _ in copies} & {d for _, d in copies}
        self._copy_block_tensors(ids[: len(copies)], ids[len(copies):], disjoint)

    def _copy_block_tensors(self, src: torch.Tensor, dst: torch.Tensor, disjoint: bool = True) -> None:
        """Copy blocks src[i] -> dst[i] (device tensors). The Triton copy is one launch (the torch
        version's indexing costs ~0.2 ms of host time) but copies in parallel, so it needs sources
        that no pair of the batch writes (`disjoint`)."""
        if self.backend == "triton" and disjoint:
            from sharedecode.kernels.kv_cache_ops import copy_blocks

            copy_blocks(self.pool.tensor, src, dst)
        else:
            self.pool.copy_blocks(src, dst)

    def _forward(self, ids, positions, slots, tables, context_lens, query_lens, keep, *, is_decode,
                 prefix_groups: PrefixGroups | None = None, block_tables: torch.Tensor | None = None):
        """One forward over the tables' new tokens (`block_tables`: their rows already on the device)."""
        self._apply_copies()
        # A prefill chunk shorter than `swap_from_tokens` replays a captured graph where it fits one
        # (eagerly it is host-bound: ~15 ms for M1's 512 tokens on the H100, ~5 ms of kernels).
        if not is_decode and self.prefill_graphs is not None and keep is not None and (
                self.swap_from_tokens is None or len(slots) < self.swap_from_tokens):
            logits = self.prefill_graphs.run(ids, positions, slots, [t.block_ids for t in tables],
                                             context_lens, query_lens, keep)
            if logits is not None:
                return logits
        device = self.device
        i32, i64 = torch.int32, torch.int64
        # Inputs through `upload`: non-blocking copies (torch.tensor(list, device=cuda) copies from
        # pageable memory and so waits for the device), read by this forward's kernels at once.
        if block_tables is None:
            width = max(len(t.block_ids) for t in tables)
            block_tables = upload(flat_rows([t.block_ids for t in tables], width), device, i32)
            block_tables = block_tables.view(len(tables), width)
        # A decode step's rows stay for `decode_forked` (a copy: `upload`'s ring is reused later).
        self._last_rows = block_tables.clone() if is_decode and device.type == "cuda" else \
            block_tables if is_decode else None
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        batch = PagedBatch(
            pool=self.pool,
            backend=self.backend,
            slot_mapping=upload(slots, device, i64),
            block_tables=block_tables,
            context_lens=upload(context_lens, device, i32),
            query_start_loc=upload(starts, device, i32),
            max_context_len=max(context_lens),
            is_decode=is_decode,
            prefix_groups=prefix_groups,
        )
        # ids: a list, or a device tensor of tokens the host has not read (a look-ahead step)
        input_ids = ids[None] if isinstance(ids, torch.Tensor) else upload(ids, device, i64)[None]
        position_ids = upload(positions, device, i64)[None]
        kwargs = {}
        if keep is not None and self._keeps_logits:
            kwargs["logits_to_keep"] = upload(keep, device, i64)
        # Where steps are captured, a prefill of at least `swap_from_tokens` tokens runs as they do:
        # compiled (unless compile is off), with their swaps (fused projections, the rotary in the
        # kernels). On the H100 that took M1's 2,048-token prefill from 29 to 19 ms and the
        # 4,096-token one from 35 to 23 ms; at 512 tokens and below the forward is host-bound
        # either way, and compiled it was no faster (bench/NOTES.md, items 37-39).
        swapped = (not is_decode and self.graphs is not None and self.swap_from_tokens is not None
                   and len(slots) >= self.swap_from_tokens)
        logits = self.graphs.prefill_forward(input_ids, position_ids, batch, kwargs) if swapped else None
        if logits is None:
            swaps = self.graphs.model_swaps() if swapped else paged_attention_enabled(self.model)
            with torch.inference_mode(), swaps:
                logits = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                    sharedecode_batch=batch, **kwargs).logits[0]
        if keep is not None and not self._keeps_logits:
            logits = logits.index_select(0, upload(keep, device, i64))
        return logits.float()
