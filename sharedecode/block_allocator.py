"""Paged KV cache bookkeeping: block ids, ref counts, fork, copy-on-write, prefix sharing.

Pure Python and no torch, so that it can be property-tested in isolation. The allocator hands out
block ids; the KV pool (kv_pool.py) holds the tensors those ids index.

A sequence's `BlockTable` lists the blocks that hold its tokens' keys and values, in order. Forking a
table copies that list and adds one reference to each block. Appending into a partial last block that
another table also holds first copies it (copy-on-write): the allocator records a (src, dst) pair that
the engine applies in one batched copy before the next forward.

Full blocks are hashed by (previous block's hash, their token ids). A new prompt whose leading full
blocks match hashed blocks takes them (ref + 1) instead of recomputing them. A hashed block whose ref
count drops to zero stays "evictable" (least recently used first) until its space is needed.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field


class KVCacheFull(RuntimeError):
    """Not enough free KV blocks for the requested operation (nothing was changed)."""


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


@dataclass(eq=False)
class BlockTable:
    """One sequence's view of the cache: the tokens it holds and the blocks holding them."""

    block_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens found in cached blocks when allocated
    # Leading blocks already marked computed: `mark_computed` marks only the blocks after them
    # (full blocks never change in a table, and a held block stays computed).
    num_computed_blocks: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class KVCacheStats:
    """A readable snapshot of the cache. Byte fields are 0 when the allocator has no byte size."""

    num_blocks: int
    block_size: int
    blocks_in_use: int
    shared_blocks: int  # in use by more than one sequence
    evictable_blocks: int  # unreferenced but still holding a reusable cached prefix
    free_blocks: int
    num_sequences: int
    logical_tokens: int  # what the sequences hold, each counting its own tokens
    physical_tokens: int  # what the blocks in use hold
    bytes_per_token: int
    bytes_used: int  # blocks in use x block bytes
    contiguous_bytes: int  # each sequence holding all its own tokens, no sharing, no padding

    @property
    def fragmentation(self) -> float:
        """Fraction of the slots of in-use blocks that hold no token (the partial last blocks)."""
        slots = self.blocks_in_use * self.block_size
        return 0.0 if slots == 0 else 1.0 - self.physical_tokens / slots

    @property
    def sharing_ratio(self) -> float:
        """Logical tokens per physical token: how many times sharing multiplies the memory."""
        return 0.0 if self.physical_tokens == 0 else self.logical_tokens / self.physical_tokens


PENDING_TOKEN = -1  # a token appended before its value is known (the scheduler's look-ahead step)


def block_hash(previous: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((previous, token_ids))


class BlockAllocator:
    """Hands out fixed-size KV blocks to block tables; ask-then-act (`can_*` before acting)."""

    def __init__(self, num_blocks: int, block_size: int = 16, bytes_per_token: int = 0):
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        if not isinstance(block_size, int) or not is_power_of_two(block_size):
            raise ValueError(f"block_size must be a power of two (8, 16, 32, ...), got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.bytes_per_token = bytes_per_token
        self.ref_counts = [0] * num_blocks
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()  # LRU order: oldest first
        self.block_hashes: list[int | None] = [None] * num_blocks
        self.block_tokens: dict[int, tuple[int, ...]] = {}  # hashed block -> its tokens (to verify)
        self.computed = [False] * num_blocks  # a hashed block's KV has been written
        self.hash_to_block: dict[int, int] = {}
        self._hashes_removed = 0  # bumped whenever a hash leaves hash_to_block (`_match_prefix`)
        self._last_match: tuple[int, list[int], list[int]] | None = None
        self.tables: dict[int, BlockTable] = {}  # live tables by id()
        self.pending_copies: list[tuple[int, int]] = []
        self.reserved: set[int] = set()  # taken for a step launched ahead, not in a table yet

    # ---------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks available to new allocations: the free list plus evictable cached blocks."""
        return len(self.free_block_ids) + len(self.evictable)

    @property
    def num_blocks_in_use(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _match_prefix(self, token_ids: list[int]) -> list[int]:
        """Leading full blocks of `token_ids` that are already cached (never the whole prompt:
        the last token is always recomputed so that its logits exist).

        Hashing is the cost here (admission asks for a prompt's block count, then allocates it;
        256 prompts behind one 1,024-token system prompt hash its 64 blocks 512 times), so the
        last match is remembered: while no hash has left the cache since, a match stays a match,
        and a prompt that starts with the last matched blocks' tokens continues from there (one
        C-level list comparison instead of a hash per block)."""
        matched: list[int] = []
        last = self._last_match
        if last is not None and last[0] == self._hashes_removed:
            _, tokens, blocks = last
            limit = min(len(blocks), (len(token_ids) - 1) // self.block_size)
            matched = blocks[: self._common_blocks(token_ids, tokens, limit)]
        matched = self._hash_match(token_ids, matched)
        self._last_match = (self._hashes_removed, list(token_ids), list(matched))
        return matched

    def _common_blocks(self, a: list[int], b: list[int], limit: int) -> int:
        """How many leading blocks (at most `limit`) `a` and `b` have in common: a bisection over
        slice comparisons, each one C-level pass."""
        bs = self.block_size
        if a[: limit * bs] == b[: limit * bs]:
            return limit
        low, high = 0, limit  # a and b agree on `low` blocks and differ within `high`
        while high - low > 1:
            middle = (low + high) // 2
            if a[: middle * bs] == b[: middle * bs]:
                low = middle
            else:
                high = middle
        return low

    def _hash_match(self, token_ids: list[int], matched: list[int] | None = None) -> list[int]:
        """Leading cached blocks by their chained hashes, continuing after `matched` (blocks
        already known to match)."""
        matched = [] if matched is None else matched
        previous = self.block_hashes[matched[-1]] if matched else None
        bs = self.block_size
        for start in range(len(matched) * bs, len(token_ids) - 1 - bs + 1, bs):
            chunk = tuple(token_ids[start : start + bs])
            h = block_hash(previous, chunk)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.block_tokens.get(block_id) != chunk:
                break
            matched.append(block_id)
            previous = h
        return matched

    def blocks_needed_to_allocate(self, token_ids: list[int]) -> int:
        return self._blocks_needed(token_ids, self._match_prefix(token_ids))

    def _blocks_needed(self, token_ids: list[int], matched: list[int]) -> int:
        """Free blocks a prompt whose cached leading blocks are `matched` takes (a cached block at
        ref count 0 costs one, as it leaves the evictable pool)."""
        revived = sum(1 for b in matched if self.ref_counts[b] == 0)
        return self.blocks_for(len(token_ids)) - len(matched) + revived

    def can_allocate(self, token_ids: list[int]) -> bool:
        return self.blocks_needed_to_allocate(token_ids) <= self.num_free_blocks

    def blocks_needed_to_append(self, table: BlockTable, num_new_tokens: int = 1) -> int:
        """New blocks an append of `num_new_tokens` takes, copy-on-write included."""
        offset = table.num_tokens % self.block_size
        needed = self.blocks_for(table.num_tokens + num_new_tokens) - len(table.block_ids)
        if offset and num_new_tokens and self.ref_counts[table.block_ids[-1]] > 1:
            needed += 1  # the shared partial last block is copied first
        return needed

    def can_append(self, table: BlockTable, num_new_tokens: int = 1) -> bool:
        return self.blocks_needed_to_append(table, num_new_tokens) <= self.num_free_blocks

    def blocks_needed_for_step(self, tables: list[BlockTable]) -> int:
        """New blocks that appending one token to each of `tables` takes, all together.

        Tables sharing a partial last block: the copy-on-write happens for all but the last appender
        when every holder appends (it then owns the block alone), for each appender otherwise.
        """
        bs, ref_counts = self.block_size, self.ref_counts
        appenders: dict[int, int] = {}
        needed = 0
        for table in tables:
            if len(table.token_ids) % bs == 0:
                needed += 1
            else:
                last = table.block_ids[-1]
                if ref_counts[last] > 1:  # (held alone: the append takes no block)
                    appenders[last] = appenders.get(last, 0) + 1
        for block_id, count in appenders.items():
            refs = ref_counts[block_id]
            needed += count - 1 if count >= refs else count
        return needed

    # ---------------------------------------------------------------- actions
    def _take_block(self) -> int:
        if self.free_block_ids:
            block_id = self.free_block_ids.popleft()
        else:  # evict the least recently used cached block
            block_id, _ = self.evictable.popitem(last=False)
            self._forget_hash(block_id)
        self.ref_counts[block_id] = 1
        return block_id

    def _forget_hash(self, block_id: int) -> None:
        h = self.block_hashes[block_id]
        if h is not None:
            if self.hash_to_block.get(h) == block_id:
                del self.hash_to_block[h]
                self._hashes_removed += 1
            self.block_hashes[block_id] = None
            self.block_tokens.pop(block_id, None)
        self.computed[block_id] = False

    def _register_full_block(self, table: BlockTable, index: int) -> None:
        """Hash the full block at `index` of `table` so that later prompts can reuse it."""
        block_id = table.block_ids[index]
        if self.block_hashes[block_id] is not None:
            return
        bs = self.block_size
        previous = self.block_hashes[table.block_ids[index - 1]] if index else None
        if index and previous is None:
            return  # the chain is broken (an earlier block was never hashed)
        chunk = tuple(table.token_ids[index * bs : (index + 1) * bs])
        if PENDING_TOKEN in chunk:
            return  # hashed by fill_last_tokens once the token is known
        h = block_hash(previous, chunk)
        if h in self.hash_to_block:
            return  # the same content is already cached in another block
        self.hash_to_block[h] = block_id
        self.block_hashes[block_id] = h
        self.block_tokens[block_id] = chunk

    def allocate(self, token_ids: list[int]) -> BlockTable:
        """A new table for a prompt; leading cached full blocks are shared instead of recomputed."""
        token_ids = list(token_ids)
        if not token_ids:
            raise ValueError("token_ids must not be empty")
        matched = self._match_prefix(token_ids)  # once: hashing a long prompt is the cost here
        needed = self._blocks_needed(token_ids, matched)
        if needed > self.num_free_blocks:
            raise KVCacheFull(
                f"a {len(token_ids)}-token sequence needs {needed} free KV blocks, "
                f"{self.num_free_blocks} of {self.num_blocks} are free"
            )
        for block_id in matched:
            if self.ref_counts[block_id] == 0:
                del self.evictable[block_id]
            self.ref_counts[block_id] += 1
        table = BlockTable(block_ids=list(matched), token_ids=token_ids,
                           num_cached_tokens=len(matched) * self.block_size)
        while len(table.block_ids) < self.blocks_for(len(token_ids)):
            table.block_ids.append(self._take_block())
        for index in range(len(matched), len(token_ids) // self.block_size):
            self._register_full_block(table, index)
        self.tables[id(table)] = table
        return table

    def _check_live(self, table: BlockTable) -> None:
        if self.tables.get(id(table)) is not table:
            raise ValueError("the block table is not live (freed, or not from this allocator)")

    def fork(self, table: BlockTable) -> BlockTable:
        """A child sharing every block of `table` (ref + 1 each); nothing is copied."""
        self._check_live(table)
        ref_counts = self.ref_counts
        for block_id in table.block_ids:
            ref_counts[block_id] += 1
        child = BlockTable(table.block_ids.copy(), table.token_ids.copy(), table.num_cached_tokens,
                           table.num_computed_blocks)
        self.tables[id(child)] = child
        return child

    def append(self, table: BlockTable, token_ids: list[int]) -> None:
        """Reserve slots for new tokens at the end of `table` (copy-on-write where shared)."""
        self._check_live(table)
        bs = self.block_size
        old = len(table.token_ids)
        new = old + len(token_ids)
        needed = self.blocks_needed_to_append(table, len(token_ids))
        if needed > self.num_free_blocks:
            raise KVCacheFull(
                f"appending {len(token_ids)} token(s) needs {needed} free KV blocks, "
                f"{self.num_free_blocks} of {self.num_blocks} are free"
            )
        if old % bs and token_ids and self.ref_counts[table.block_ids[-1]] > 1:
            self._copy_last_block(table)
        table.token_ids.extend(token_ids)
        while len(table.block_ids) < self.blocks_for(new):
            table.block_ids.append(self._take_block())
        for index in range(old // bs, new // bs):
            self._register_full_block(table, index)

    def _copy_last_block(self, table: BlockTable) -> int:
        """Copy on write: `table` gets a block of its own for its shared partial last block (the
        copy is recorded for the step's batched copy); returns the new block's id."""
        last = table.block_ids[-1]
        copy = self._take_block()
        self.pending_copies.append((last, copy))
        self.ref_counts[last] -= 1
        table.block_ids[-1] = copy
        return copy

    def append_tokens(self, tables: list[BlockTable], token_ids: list[int]) -> list[int]:
        """A decode step's bookkeeping: append one token to each table (in order, exactly as
        `append(table, [token])` would) and return each new token's KV slot.

        The common case, a token landing in a partial last block the table holds alone, takes a
        few list operations; everything else goes through `append`. Check the step's needs first
        (`blocks_needed_for_step`): a KVCacheFull here leaves the earlier tables appended."""
        bs, ref_counts, live = self.block_size, self.ref_counts, self.tables
        if len(tables) != len(token_ids):
            raise ValueError(f"append_tokens got {len(tables)} tables but {len(token_ids)} tokens")
        for table in tables:  # before any change
            if live.get(id(table)) is not table:
                self._check_live(table)
        slots = []
        for table, token in zip(tables, token_ids):
            old = len(table.token_ids)
            offset = old % bs
            block_ids = table.block_ids
            if offset:  # into the partial last block: its own, or a copy of it when shared (beams)
                last = block_ids[-1]
                if ref_counts[last] > 1:
                    last = self._copy_last_block(table)
            elif len(block_ids) == old // bs:  # a new block, as `append` takes it
                last = self._take_block()
                block_ids.append(last)
            else:
                self.append(table, [token])
                slots.append(block_ids[old // bs] * bs + offset)
                continue
            table.token_ids.append(token)
            slots.append(last * bs + offset)
            if offset == bs - 1:  # the block is now full: hash it for prefix reuse
                self._register_full_block(table, old // bs)
        return slots

    def fill_last_tokens(self, tables: list[BlockTable], token_ids: list[int]) -> None:
        """Set each table's last token, appended as PENDING_TOKEN before its value was known, and
        hash the block it completes (the hashing `append` skipped)."""
        bs = self.block_size
        for table, token in zip(tables, token_ids):
            table.token_ids[-1] = token
            if len(table.token_ids) % bs == 0:
                self._register_full_block(table, len(table.token_ids) // bs - 1)

    def mark_computed(self, table: BlockTable) -> None:
        """Record that the KV of all of `table`'s tokens has been written (after a forward)."""
        self.mark_all_computed([table])

    def mark_all_computed(self, tables: list[BlockTable]) -> None:
        """`mark_computed` of each table (one call per decode step)."""
        bs, computed = self.block_size, self.computed
        for table in tables:
            full = len(table.token_ids) // bs
            if full > table.num_computed_blocks:
                block_ids = table.block_ids
                for index in range(table.num_computed_blocks, full):
                    computed[block_ids[index]] = True
                table.num_computed_blocks = full

    def free(self, table: BlockTable) -> None:
        """Drop `table`'s references; blocks at ref 0 go back (hashed ones become evictable)."""
        if self.tables.pop(id(table), None) is None:
            return  # already freed: freeing twice is harmless
        self._release(table.block_ids)
        table.block_ids = []
        table.token_ids = []
        table.num_computed_blocks = 0

    def _release(self, block_ids: list[int]) -> None:
        """Drop one reference to each of `block_ids`, last first (the free list's order)."""
        ref_counts = self.ref_counts
        for block_id in reversed(block_ids):
            ref_counts[block_id] -= 1
            if ref_counts[block_id] == 0:
                if self.block_hashes[block_id] is not None and self.computed[block_id]:
                    self.evictable[block_id] = None
                else:  # uncomputed content must never be matched by a later prompt
                    self._forget_hash(block_id)
                    self.free_block_ids.append(block_id)

    def fork_into(self, target: BlockTable, source: BlockTable) -> None:
        """Turn the live `target` into a fork of `source`: the state `free(target)` then
        `fork(source)` leave (same ref counts, same blocks freed in the same order), but only the
        blocks past the two tables' common leading run are touched. Beam search turns a pruned beam
        into a survivor's sibling this way: their shared prompt blocks, most of a table, stay put."""
        self._check_live(target)
        self._check_live(source)
        if target is source:
            return
        old, new = target.block_ids, source.block_ids
        # Any common leading run gives the same result. Beams differ only in their last few blocks,
        # so step back from the end to the last equal position and check the run up to it with
        # one C-level comparison (0 if it is not a common run after all).
        common = min(len(old), len(new))
        while common and old[common - 1] != new[common - 1]:
            common -= 1
        if old[:common] != new[:common]:
            common = 0
        ref_counts = self.ref_counts
        for block_id in new[common:]:  # first: a block in both tails never reaches 0 on the way
            ref_counts[block_id] += 1
        self._release(old[common:])
        target.block_ids = new.copy()
        target.token_ids = source.token_ids.copy()
        target.num_cached_tokens = source.num_cached_tokens
        target.num_computed_blocks = source.num_computed_blocks

    def reset_prefix_cache(self) -> int:
        """Forget every cached block no table holds (their KV becomes plain free space), so the next
        prompts are computed in full; returns how many blocks were dropped. Blocks of live tables
        keep their hashes: a new prompt may still share them (as beams and samples do)."""
        dropped = list(self.evictable)
        self.evictable.clear()
        for block_id in dropped:
            self._forget_hash(block_id)
        self.free_block_ids.extend(dropped)
        self._last_match = None
        return len(dropped)

    def free_all(self) -> None:
        for table in list(self.tables.values()):
            self.free(table)
        self.unreserve(list(self.reserved))
        self.pending_copies.clear()

    # ---------------------------------------------------------------- beams launched ahead
    def reserve(self, count: int) -> list[int]:
        """Take `count` free blocks for a step launched before its block tables exist (beam search
        ahead: each new beam's last block, filled on the device); `fork_with_tail` hands one to a
        table, `unreserve` gives back the rest. Raises KVCacheFull (taking nothing) when short."""
        if count > self.num_free_blocks:
            raise KVCacheFull(f"reserving {count} KV blocks, {self.num_free_blocks} of "
                              f"{self.num_blocks} are free")
        blocks = [self._take_block() for _ in range(count)]
        self.reserved.update(blocks)
        return blocks

    def unreserve(self, block_ids: list[int]) -> None:
        """Give reserved blocks back (never hashed: straight to the free list, in order)."""
        for block_id in block_ids:
            self.reserved.remove(block_id)
        self._release(block_ids[::-1])

    def take_tail(self, table: BlockTable, tail: int, token: int) -> None:
        """`table` continues as its own child of `fork_with_tail`: its partial last block (if any)
        is released for the reserved `tail` (holding the device's copy of it), and `token` is
        appended. The state `fork_with_tail(table, tail, token)` then `free(table)` leave, with
        the child in `table`, but without touching its full blocks."""
        self._check_live(table)
        if tail not in self.reserved:
            raise ValueError(f"block {tail} is not reserved")
        bs = self.block_size
        length = len(table.token_ids)
        full = length // bs
        self.reserved.remove(tail)
        block_ids = table.block_ids
        self._release(block_ids[full:])
        del block_ids[full:]
        block_ids.append(tail)
        table.token_ids.append(token)
        table.num_computed_blocks = min(table.num_computed_blocks, full)
        if length % bs == bs - 1:
            self._register_full_block(table, full)

    def fork_with_tail(self, parent: BlockTable, tail: int, token: int) -> BlockTable:
        """A child of `parent` holding `parent`'s full blocks (ref + 1 each), then the reserved
        block `tail`, with `token` appended: what `fork(parent)` then `append(child, [token])`
        leave, except that the last block is always `tail` (the device copied `parent`'s partial
        last block into it, when there is one, so no copy-on-write copy is recorded)."""
        if tail not in self.reserved:
            raise ValueError(f"block {tail} is not reserved")
        child = self.fork(parent)
        self.take_tail(child, tail, token)
        return child

    def take_copies(self) -> list[tuple[int, int]]:
        """The copy-on-write (src, dst) pairs recorded since the last call, for one batched copy
        that reads every source before writing any destination (as `KVPool.copy_blocks` does):
        each destination once (a later copy into a block supersedes an earlier one, whose table was
        freed), and a source that is itself a destination of the batch replaced by its own source.
        A source can still be a destination: a freed source block taken again as a copy target."""
        origin: dict[int, int] = {}
        for src, dst in self.pending_copies:
            source = origin.get(src, src)
            origin.pop(dst, None)
            origin[dst] = source
        self.pending_copies = []
        return [(src, dst) for dst, src in origin.items()]

    def slot_mapping(self, table: BlockTable, start: int, end: int) -> list[int]:
        """Flat KV slot indices (block_id * block_size + offset) of tokens start..end-1."""
        bs = self.block_size
        return [table.block_ids[i // bs] * bs + i % bs for i in range(start, end)]

    # ---------------------------------------------------------------- stats and checks
    def stats(self) -> KVCacheStats:
        bs = self.block_size
        fill: dict[int, int] = {}
        logical = 0
        for table in self.tables.values():
            logical += table.num_tokens
            for index, block_id in enumerate(table.block_ids):
                held = min(bs, table.num_tokens - index * bs)
                fill[block_id] = max(fill.get(block_id, 0), held)
        in_use = self.num_blocks_in_use
        return KVCacheStats(
            num_blocks=self.num_blocks,
            block_size=bs,
            blocks_in_use=in_use,
            shared_blocks=sum(1 for r in self.ref_counts if r > 1),
            evictable_blocks=len(self.evictable),
            free_blocks=len(self.free_block_ids),
            num_sequences=len(self.tables),
            logical_tokens=logical,
            physical_tokens=sum(fill.values()),
            bytes_per_token=self.bytes_per_token,
            bytes_used=in_use * bs * self.bytes_per_token,
            contiguous_bytes=logical * self.bytes_per_token,
        )

    def check(self) -> None:
        """Raise AssertionError if an internal invariant is broken (for tests and debugging)."""
        holders = [0] * self.num_blocks
        for block_id in self.reserved:
            holders[block_id] += 1
        for table in self.tables.values():
            assert len(table.block_ids) == self.blocks_for(table.num_tokens), "table size"
            for block_id in table.block_ids:
                holders[block_id] += 1
            assert table.num_computed_blocks <= table.num_tokens // self.block_size, "computed past the full blocks"
            assert all(self.computed[b] for b in table.block_ids[: table.num_computed_blocks]), \
                "a block marked computed in its table lost its KV"
        assert holders == self.ref_counts, "ref counts differ from the tables holding each block"
        free = set(self.free_block_ids)
        evictable = set(self.evictable)
        in_use = {b for b, r in enumerate(self.ref_counts) if r > 0}
        assert len(free) == len(self.free_block_ids), "a block is twice on the free list"
        assert not (free & evictable or free & in_use or evictable & in_use), "block in two places"
        assert len(free) + len(evictable) + len(in_use) == self.num_blocks, "a block is lost"
        for block_id in evictable:
            assert self.block_hashes[block_id] is not None, "an evictable block has no hash"
        for h, block_id in self.hash_to_block.items():
            assert self.block_hashes[block_id] == h, "hash map out of sync"
