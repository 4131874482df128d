"""Tests of the block allocator: unit tests of each operation, a hypothesis state machine over a
simulated physical pool, and a long seeded random run."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sharedecode.block_allocator import BlockAllocator, BlockTable, KVCacheFull, KVCacheStats


# ====================================================================== helpers
def snapshot(alloc: BlockAllocator):
    """Everything observable about the allocator's state (to assert that a failed call changed
    nothing)."""
    return (
        list(alloc.ref_counts),
        list(alloc.free_block_ids),
        list(alloc.evictable),
        list(alloc.block_hashes),
        dict(alloc.block_tokens),
        list(alloc.computed),
        dict(alloc.hash_to_block),
        {key: (list(t.block_ids), list(t.token_ids), t.num_cached_tokens)
         for key, t in alloc.tables.items()},
        list(alloc.pending_copies),
        alloc.stats(),
    )


def held_by_tables(alloc: BlockAllocator, tables) -> list[int]:
    counts = Counter(b for t in tables for b in t.block_ids)
    return [counts[b] for b in range(alloc.num_blocks)]


def full_alloc(prompt_len: int = 8, num_blocks: int = 2, block_size: int = 4):
    alloc = BlockAllocator(num_blocks, block_size)
    table = alloc.allocate(list(range(prompt_len)))
    return alloc, table


# ====================================================================== construction
@pytest.mark.parametrize("num_blocks", [0, -1, 2.0, "4", None])
def test_invalid_num_blocks(num_blocks):
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(num_blocks, 16)


@pytest.mark.parametrize("block_size", [0, -16, 3, 12, 24, 16.0, "16"])
def test_invalid_block_size(block_size):
    with pytest.raises(ValueError, match="block_size"):
        BlockAllocator(8, block_size)


@pytest.mark.parametrize("block_size", [1, 2, 8, 16, 32, 256])
def test_valid_block_sizes(block_size):
    alloc = BlockAllocator(3, block_size)
    assert alloc.block_size == block_size
    assert alloc.num_free_blocks == 3 and alloc.num_blocks_in_use == 0
    alloc.check()


def test_blocks_for():
    alloc = BlockAllocator(4, 16)
    assert [alloc.blocks_for(n) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]


# ====================================================================== allocate / slots
def test_allocate_takes_ceil_blocks_and_maps_slots():
    alloc = BlockAllocator(8, 4)
    table = alloc.allocate([10, 11, 12, 13, 14, 15])
    assert table.num_tokens == 6 and len(table.block_ids) == 2
    assert table.num_cached_tokens == 0
    assert len(set(table.block_ids)) == 2
    assert all(alloc.ref_counts[b] == 1 for b in table.block_ids)
    assert alloc.num_blocks_in_use == 2 and alloc.num_free_blocks == 6
    b0, b1 = table.block_ids
    assert alloc.slot_mapping(table, 0, 6) == [b0 * 4, b0 * 4 + 1, b0 * 4 + 2, b0 * 4 + 3, b1 * 4, b1 * 4 + 1]
    assert alloc.slot_mapping(table, 5, 6) == [b1 * 4 + 1]
    assert alloc.slot_mapping(table, 3, 3) == []
    alloc.check()


def test_allocate_copies_the_prompt():
    alloc = BlockAllocator(8, 4)
    prompt = [1, 2, 3]
    table = alloc.allocate(prompt)
    prompt.append(4)
    assert table.token_ids == [1, 2, 3]


def test_allocate_empty_prompt_is_a_value_error():
    alloc = BlockAllocator(4, 4)
    before = snapshot(alloc)
    with pytest.raises(ValueError, match="empty"):
        alloc.allocate([])
    assert snapshot(alloc) == before


def test_allocate_kv_cache_full_changes_nothing():
    alloc = BlockAllocator(3, 4)
    a = alloc.allocate(list(range(9)))  # 3 blocks
    alloc.free(a)
    b = alloc.allocate([7] * 5)  # 2 blocks
    assert not alloc.can_allocate(list(range(100, 109)))
    before = snapshot(alloc)
    with pytest.raises(KVCacheFull, match="needs 3 free KV blocks"):
        alloc.allocate(list(range(100, 109)))
    assert snapshot(alloc) == before
    assert alloc.can_allocate([1, 2, 3, 4]) and not alloc.can_allocate([1, 2, 3, 4, 5])
    alloc.check()
    alloc.free(b)
    assert alloc.can_allocate(list(range(100, 112)))
    assert not alloc.can_allocate(list(range(100, 113)))


def test_kv_cache_full_is_a_runtime_error():
    assert issubclass(KVCacheFull, RuntimeError)


# ====================================================================== fork
def test_fork_shares_every_block_and_copies_nothing():
    alloc = BlockAllocator(8, 4)
    parent = alloc.allocate(list(range(10)))
    free_before = alloc.num_free_blocks
    child = alloc.fork(parent)
    assert child is not parent
    assert child.block_ids == parent.block_ids and child.block_ids is not parent.block_ids
    assert child.token_ids == parent.token_ids and child.token_ids is not parent.token_ids
    assert all(alloc.ref_counts[b] == 2 for b in parent.block_ids)
    assert alloc.num_free_blocks == free_before  # nothing new taken
    assert alloc.take_copies() == []  # nothing copied
    grandchild = alloc.fork(child)
    assert all(alloc.ref_counts[b] == 3 for b in parent.block_ids)
    alloc.check()
    for t in (parent, child, grandchild):
        alloc.free(t)
    assert alloc.num_blocks_in_use == 0
    alloc.check()


@pytest.mark.parametrize("seed", range(40))
def test_fork_into_leaves_what_free_then_fork_leaves(seed):
    """Random tables (shared prompts, forks, copy-on-write appends, computed and cached blocks):
    fork_into(target, source) against free(target) + fork(source) on a twin allocator."""
    import copy

    rng = random.Random(seed)
    alloc = BlockAllocator(64, 4)
    tables = []
    prompt = [rng.randrange(50) for _ in range(rng.randint(1, 14))]
    for _ in range(rng.randint(2, 5)):
        tables.append(alloc.allocate(prompt if rng.random() < 0.5 else
                                     prompt[: rng.randint(1, len(prompt))] + [rng.randrange(50)]))
        alloc.mark_computed(tables[-1])
    for _ in range(rng.randint(0, 12)):
        table = rng.choice(tables)
        if rng.random() < 0.4:
            tables.append(alloc.fork(table))
        elif alloc.can_append(table):
            alloc.append(table, [rng.randrange(50)])
            if rng.random() < 0.5:
                alloc.mark_computed(table)
    target, source = rng.sample(tables, 2)
    twin = copy.deepcopy((alloc, target, source))
    alloc.fork_into(target, source)
    twin_alloc, twin_target, twin_source = twin
    twin_alloc.tables = {id(t): t for t in twin_alloc.tables.values()}  # keyed by the copies' ids
    twin_alloc.free(twin_target)
    child = twin_alloc.fork(twin_source)
    ours, theirs = snapshot(alloc), snapshot(twin_alloc)
    assert ours[:7] == theirs[:7] and ours[8:] == theirs[8:]  # all but the tables' registry keys
    assert (target.block_ids, target.token_ids, target.num_cached_tokens, target.num_computed_blocks) == \
        (child.block_ids, child.token_ids, child.num_cached_tokens, child.num_computed_blocks)
    assert alloc.tables[id(target)] is target and target.block_ids is not source.block_ids
    alloc.fork_into(source, source)  # a table into itself: nothing changes
    assert snapshot(alloc)[:7] == ours[:7]


def test_fork_into_needs_live_tables():
    alloc = BlockAllocator(8, 4)
    a, b = alloc.allocate([1, 2, 3, 4, 5]), alloc.allocate([6])
    alloc.free(b)
    with pytest.raises(ValueError, match="not live"):
        alloc.fork_into(a, b)
    with pytest.raises(ValueError, match="not live"):
        alloc.fork_into(b, a)


def test_fork_on_a_full_cache_needs_no_block():
    alloc, table = full_alloc()
    assert alloc.num_free_blocks == 0
    child = alloc.fork(table)
    assert child.block_ids == table.block_ids
    alloc.check()


# ====================================================================== append and copy-on-write
def test_append_fills_the_partial_block_then_takes_a_new_one():
    alloc = BlockAllocator(8, 4)
    table = alloc.allocate([1, 2, 3])
    (b0,) = table.block_ids
    assert alloc.blocks_needed_to_append(table, 1) == 0
    alloc.append(table, [4])
    assert table.block_ids == [b0] and table.token_ids == [1, 2, 3, 4]
    assert alloc.blocks_needed_to_append(table, 1) == 1
    assert alloc.blocks_needed_to_append(table, 4) == 1
    assert alloc.blocks_needed_to_append(table, 5) == 2
    alloc.append(table, [5])
    assert len(table.block_ids) == 2 and table.block_ids[0] == b0
    alloc.append(table, [6, 7, 8, 9, 10])  # fills block 1 and takes block 2
    assert len(table.block_ids) == 3 and table.num_tokens == 10
    assert alloc.take_copies() == []
    alloc.check()


def test_append_nothing_is_a_no_op():
    alloc = BlockAllocator(4, 4)
    table = alloc.allocate([1, 2])
    child = alloc.fork(table)
    before = snapshot(alloc)
    assert alloc.blocks_needed_to_append(child, 0) == 0
    alloc.append(child, [])
    assert snapshot(alloc) == before


def test_append_after_full_shared_block_takes_a_new_block_without_copy():
    alloc = BlockAllocator(8, 4)
    parent = alloc.allocate([1, 2, 3, 4])
    child = alloc.fork(parent)
    (b0,) = parent.block_ids
    assert alloc.blocks_needed_to_append(child, 1) == 1
    alloc.append(child, [5])
    assert child.block_ids[0] == b0 and len(child.block_ids) == 2
    assert alloc.ref_counts[b0] == 2  # the full shared block stays shared
    assert alloc.take_copies() == []
    assert parent.token_ids == [1, 2, 3, 4]
    alloc.check()


def test_copy_on_write_of_a_shared_partial_block():
    alloc = BlockAllocator(8, 4)
    parent = alloc.allocate([1, 2, 3, 4, 5, 6])
    children = [alloc.fork(parent) for _ in range(2)]
    b0, b1 = parent.block_ids
    assert alloc.ref_counts[b1] == 3
    assert alloc.blocks_needed_to_append(children[0], 1) == 1  # the copy
    assert alloc.blocks_needed_to_append(children[0], 3) == 2  # the copy and one more block
    alloc.append(children[0], [7])
    new = children[0].block_ids[1]
    assert new not in (b0, b1)
    assert children[0].block_ids == [b0, new]
    assert alloc.ref_counts[b1] == 2 and alloc.ref_counts[new] == 1 and alloc.ref_counts[b0] == 3
    assert alloc.pending_copies == [(b1, new)]
    assert parent.token_ids == [1, 2, 3, 4, 5, 6]  # the parent's view is unchanged
    assert parent.block_ids == [b0, b1]
    alloc.check()
    # the second child copies too; after that the parent is the only holder and appends in place
    alloc.append(children[1], [8])
    new2 = children[1].block_ids[1]
    assert alloc.ref_counts[b1] == 1
    assert alloc.blocks_needed_to_append(parent, 1) == 0
    alloc.append(parent, [9])
    assert parent.block_ids == [b0, b1]
    assert alloc.take_copies() == [(b1, new), (b1, new2)]
    assert alloc.take_copies() == [] and alloc.pending_copies == []
    alloc.check()


def test_append_kv_cache_full_changes_nothing():
    alloc = BlockAllocator(3, 4)
    parent = alloc.allocate([1, 2, 3, 4, 5, 6])  # 2 blocks, the second partial
    child = alloc.fork(parent)
    other = alloc.allocate([9])  # the last free block
    assert alloc.num_free_blocks == 0
    # appending 1 token into the shared partial block needs a copy: no block left
    assert not alloc.can_append(child, 1)
    before = snapshot(alloc)
    with pytest.raises(KVCacheFull, match="needs 1 free KV blocks"):
        alloc.append(child, [7])
    assert snapshot(alloc) == before
    # appending into an unshared partial block needs nothing
    assert alloc.can_append(other, 3)
    assert not alloc.can_append(other, 4)
    with pytest.raises(KVCacheFull):
        alloc.append(other, [1, 2, 3, 4])
    assert snapshot(alloc) == before
    alloc.check()
    alloc.free(other)
    assert alloc.can_append(child, 1) and not alloc.can_append(child, 3)
    with pytest.raises(KVCacheFull, match="needs 2 free KV blocks"):
        alloc.append(child, [7, 8, 9])
    alloc.append(child, [7, 8])
    assert alloc.num_free_blocks == 0
    alloc.check()


def test_append_or_fork_of_a_freed_table_is_a_value_error():
    alloc = BlockAllocator(4, 4)
    table = alloc.allocate([1, 2, 3])
    alloc.free(table)
    before = snapshot(alloc)
    with pytest.raises(ValueError, match="not live"):
        alloc.append(table, [4])
    with pytest.raises(ValueError, match="not live"):
        alloc.fork(table)
    with pytest.raises(ValueError, match="not live"):
        alloc.append(BlockTable(block_ids=[0], token_ids=[5]), [6])  # never allocated here
    assert snapshot(alloc) == before
    alloc.check()


# ====================================================================== free
def test_free_returns_blocks_and_double_free_is_harmless():
    alloc = BlockAllocator(4, 4)
    a = alloc.allocate(list(range(6)))
    b = alloc.fork(a)
    alloc.free(a)
    assert alloc.num_blocks_in_use == 2  # b still holds them
    assert all(alloc.ref_counts[x] == 1 for x in b.block_ids)
    before = snapshot(alloc)
    alloc.free(a)  # twice: nothing happens, b keeps its blocks
    assert snapshot(alloc) == before
    alloc.free(b)
    assert alloc.num_blocks_in_use == 0 and alloc.num_free_blocks == 4
    assert sorted(alloc.free_block_ids) == [0, 1, 2, 3]
    alloc.free(b)
    alloc.free(a)
    assert alloc.num_free_blocks == 4 and alloc.ref_counts == [0] * 4
    alloc.check()


def test_free_all():
    alloc = BlockAllocator(6, 4)
    a = alloc.allocate(list(range(6)))
    b = alloc.fork(a)
    alloc.append(b, [1])
    alloc.allocate([5, 5])
    assert alloc.pending_copies
    alloc.free_all()
    assert alloc.num_blocks_in_use == 0 and not alloc.tables and not alloc.pending_copies
    alloc.check()


# ====================================================================== prefix sharing
def computed_prompt(alloc, tokens):
    table = alloc.allocate(tokens)
    alloc.mark_computed(table)
    return table


def test_prefix_reuse_of_identical_full_blocks():
    alloc = BlockAllocator(16, 4)
    a = computed_prompt(alloc, list(range(10)))  # blocks [0..3], [4..7], partial [8, 9]
    b = alloc.allocate(list(range(8)) + [50, 51, 52])
    assert b.num_cached_tokens == 8
    assert b.block_ids[:2] == a.block_ids[:2]
    assert b.block_ids[2] != a.block_ids[2]
    assert all(alloc.ref_counts[x] == 2 for x in a.block_ids[:2])
    assert alloc.ref_counts[a.block_ids[2]] == 1
    # only the first block in common
    c = alloc.allocate([0, 1, 2, 3, 9, 9, 9, 9, 9])
    assert c.num_cached_tokens == 4 and c.block_ids[0] == a.block_ids[0]
    assert c.block_ids[1] != a.block_ids[1]
    alloc.check()


def test_prefix_reuse_needs_the_whole_chain():
    """A block matches only when every block before it matches too (the hash chains them)."""
    alloc = BlockAllocator(16, 4)
    computed_prompt(alloc, [1, 1, 1, 1, 2, 2, 2, 2, 0])
    # same second block, different first block -> nothing shared
    b = alloc.allocate([3, 3, 3, 3, 2, 2, 2, 2, 0])
    assert b.num_cached_tokens == 0
    # a different token inside the first block -> nothing shared
    c = alloc.allocate([1, 1, 1, 5, 2, 2, 2, 2, 0])
    assert c.num_cached_tokens == 0
    # the same tokens at a different position (shifted) -> nothing shared
    d = alloc.allocate([9, 1, 1, 1, 1, 2, 2, 2, 2, 0])
    assert d.num_cached_tokens == 0
    alloc.check()


def test_the_last_prompt_token_is_never_taken_from_cache():
    alloc = BlockAllocator(16, 4)
    a = computed_prompt(alloc, list(range(8)))  # two full blocks, both hashed
    b = alloc.allocate(list(range(8)))  # identical prompt
    assert b.num_cached_tokens == 4  # the block holding the last token is recomputed
    assert b.block_ids[0] == a.block_ids[0] and b.block_ids[1] != a.block_ids[1]
    c = alloc.allocate(list(range(9)))  # one token more: both full blocks are reusable
    assert c.num_cached_tokens == 8 and c.block_ids[:2] == a.block_ids
    d = alloc.allocate(list(range(4)))  # exactly one block: nothing cached
    assert d.num_cached_tokens == 0
    e = alloc.allocate([0])
    assert e.num_cached_tokens == 0
    alloc.check()


def test_partial_blocks_are_never_shared_by_prefix():
    alloc = BlockAllocator(16, 4)
    a = computed_prompt(alloc, [1, 2, 3, 4, 5, 6])
    b = alloc.allocate([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert b.num_cached_tokens == 4 and b.block_ids[1] != a.block_ids[1]
    alloc.check()


def test_blocks_filled_by_append_are_reusable():
    alloc = BlockAllocator(16, 4)
    a = alloc.allocate([1, 2])
    alloc.append(a, [3, 4, 5, 6, 7, 8, 9])  # fills blocks 0 and 1
    alloc.mark_computed(a)
    b = alloc.allocate([1, 2, 3, 4, 5, 6, 7, 8, 0])
    assert b.num_cached_tokens == 8 and b.block_ids[:2] == a.block_ids[:2]
    alloc.check()


def test_uncomputed_blocks_are_never_reused_after_free():
    alloc = BlockAllocator(8, 4)
    a = alloc.allocate(list(range(9)))  # never marked computed
    alloc.free(a)
    assert not alloc.evictable and alloc.num_free_blocks == 8
    assert not alloc.hash_to_block and all(h is None for h in alloc.block_hashes)
    b = alloc.allocate(list(range(9)))
    assert b.num_cached_tokens == 0
    alloc.check()


def test_a_block_filled_after_mark_computed_is_not_cached():
    """mark_computed covers the tokens held at that moment; a block filled later is uncomputed."""
    alloc = BlockAllocator(8, 4)
    a = alloc.allocate([1, 2, 3, 4, 5, 6])
    b0, b1 = a.block_ids
    alloc.mark_computed(a)
    alloc.append(a, [7, 8])  # fills block 1, never computed
    alloc.free(a)
    assert list(alloc.evictable) == [b0]
    assert b1 in alloc.free_block_ids
    b = alloc.allocate([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert b.num_cached_tokens == 4 and b.block_ids[0] == b0
    alloc.check()


def test_mark_computed_marks_each_full_block_once_through_forks_and_copies():
    """mark_computed only walks the blocks past the ones it marked before (a fork inherits that
    count), and still marks every full block: new ones, and a block filled after a copy-on-write."""
    alloc = BlockAllocator(16, 4)
    a = computed_prompt(alloc, [1, 2, 3, 4, 5, 6])  # block 0 full (computed), block 1 partial
    assert a.num_computed_blocks == 1
    b = alloc.fork(a)
    assert b.num_computed_blocks == 1
    alloc.append(b, [7, 8])  # copy-on-write of the shared partial block, which b then fills
    copy = b.block_ids[1]
    assert copy != a.block_ids[1] and not alloc.computed[copy]
    alloc.mark_computed(b)
    assert alloc.computed[copy] and b.num_computed_blocks == 2
    assert not alloc.computed[a.block_ids[1]] and a.num_computed_blocks == 1
    alloc.append(a, [9, 10, 11])  # a fills its own block 1 and starts block 2
    alloc.mark_computed(a)
    assert alloc.computed[a.block_ids[1]] and not alloc.computed[a.block_ids[2]]
    assert a.num_computed_blocks == 2
    alloc.check()
    alloc.free(a)
    assert a.num_computed_blocks == 0
    alloc.free(b)
    alloc.check()


def test_in_use_blocks_are_shared_before_they_are_computed():
    """Prompts of one prefill share a prefix another of them is computing (the engine computes the
    tables in order); freeing them uncomputed must not leave the prefix cached."""
    alloc = BlockAllocator(8, 4)
    a = alloc.allocate(list(range(9)))
    b = alloc.allocate(list(range(8)) + [42])
    assert b.num_cached_tokens == 8 and b.block_ids[:2] == a.block_ids[:2]
    alloc.free(a)
    alloc.free(b)
    assert not alloc.evictable and alloc.num_free_blocks == 8
    alloc.check()


def test_computed_blocks_become_evictable_and_are_revived():
    alloc = BlockAllocator(6, 4)
    a = computed_prompt(alloc, list(range(10)))
    b0, b1, b2 = a.block_ids
    alloc.free(a)
    # the two full hashed blocks stay cached; the partial one goes back to the free list
    assert set(alloc.evictable) == {b0, b1}
    assert b2 in alloc.free_block_ids
    assert alloc.num_free_blocks == 6 and alloc.num_blocks_in_use == 0
    s = alloc.stats()
    assert s.evictable_blocks == 2 and s.free_blocks == 4 and s.blocks_in_use == 0
    # reviving takes them out of the evictable set and counts them as needed blocks
    prompt = list(range(8)) + [77]
    assert alloc.blocks_needed_to_allocate(prompt) == 3  # 1 new + 2 revived
    b = alloc.allocate(prompt)
    assert b.num_cached_tokens == 8 and b.block_ids[:2] == [b0, b1]
    assert not alloc.evictable and alloc.ref_counts[b0] == alloc.ref_counts[b1] == 1
    # while in use, sharing them costs nothing
    assert alloc.blocks_needed_to_allocate(list(range(8)) + [78]) == 1
    alloc.check()


def test_reset_prefix_cache_drops_unheld_cached_blocks_only():
    alloc = BlockAllocator(8, 4)
    kept = computed_prompt(alloc, list(range(8)))  # live: its hashes stay shareable
    gone = computed_prompt(alloc, [50 + i for i in range(9)])
    alloc.free(gone)
    assert len(alloc.evictable) == 2
    assert alloc.reset_prefix_cache() == 2
    assert not alloc.evictable and alloc.num_free_blocks == 6 and alloc.num_blocks_in_use == 2
    alloc.check()
    again = alloc.allocate([50 + i for i in range(9)])
    assert again.num_cached_tokens == 0  # computed again in full
    shared = alloc.allocate(list(range(8)) + [99])
    assert shared.num_cached_tokens == 8 and shared.block_ids[:2] == kept.block_ids
    assert alloc.reset_prefix_cache() == 0
    alloc.check()


def test_evictable_blocks_are_only_taken_when_the_free_list_is_empty():
    alloc = BlockAllocator(4, 4)
    a = computed_prompt(alloc, list(range(9)))  # 2 full hashed blocks + 1 partial
    alloc.free(a)
    evictable = set(alloc.evictable)
    assert len(evictable) == 2 and len(alloc.free_block_ids) == 2
    c = alloc.allocate([100] * 8)  # takes the 2 free blocks, no eviction
    assert set(c.block_ids).isdisjoint(evictable) and set(alloc.evictable) == evictable
    d = alloc.allocate([200])  # now one cached block must go
    assert d.block_ids[0] in evictable and len(alloc.evictable) == 1
    assert alloc.block_hashes[d.block_ids[0]] is None
    alloc.check()


def test_lru_eviction_order():
    alloc = BlockAllocator(8, 4)
    a = computed_prompt(alloc, [1] * 8 + [0])  # blocks a0, a1 full
    b = computed_prompt(alloc, [2] * 8 + [0])  # blocks b0, b1 full
    c = computed_prompt(alloc, [3] * 4 + [0])  # block c0 full
    a0, a1, _ = a.block_ids
    b0, b1, _ = b.block_ids
    c0, _ = c.block_ids
    alloc.free(b)
    alloc.free(a)
    alloc.free(c)
    # freed first = least recently used; within a table the tail goes first (a chain's head is
    # what later prompts match first)
    assert list(alloc.evictable) == [b1, b0, a1, a0, c0]
    # using a cached block again makes it the most recently used
    x = alloc.allocate([2] * 4 + [9])  # revives b0
    assert x.block_ids[0] == b0
    alloc.free(x)
    assert list(alloc.evictable) == [b1, a1, a0, c0, b0]
    # fill the free list, then each new block evicts the least recently used cached block
    alloc.allocate(list(range(100, 100 + 4 * len(alloc.free_block_ids))))
    assert not alloc.free_block_ids
    taken = [alloc.allocate([500 + i]).block_ids[0] for i in range(5)]
    assert taken == [b1, a1, a0, c0, b0]
    alloc.check()


def test_evicted_blocks_no_longer_match():
    alloc = BlockAllocator(3, 4)
    a = computed_prompt(alloc, [1, 2, 3, 4, 5])
    alloc.free(a)
    alloc.allocate(list(range(100, 112)))  # all 3 blocks: evicts the cached one
    alloc.free_all()
    b = alloc.allocate([1, 2, 3, 4, 5])
    assert b.num_cached_tokens == 0
    alloc.check()


def test_revived_blocks_keep_their_chain():
    alloc = BlockAllocator(8, 4)
    computed_prompt(alloc, list(range(13)))
    alloc.free_all()
    assert len(alloc.evictable) == 3
    b = alloc.allocate(list(range(13)))
    assert b.num_cached_tokens == 12
    alloc.free(b)
    c = alloc.allocate(list(range(8)) + [0, 0, 0, 0, 0])
    assert c.num_cached_tokens == 8
    alloc.check()


def test_blocks_needed_for_step():
    alloc = BlockAllocator(16, 4)
    parent = alloc.allocate([1, 2, 3, 4, 5, 6])  # last block partial
    beams = [parent] + [alloc.fork(parent) for _ in range(3)]  # 4 holders of it
    full = alloc.allocate([1, 2, 3, 4])  # full last block: a new block per step
    alone = alloc.allocate([1, 2])  # unshared partial block: nothing
    assert alloc.blocks_needed_for_step(beams) == 3  # the last appender owns the block alone
    assert alloc.blocks_needed_for_step(beams[:2]) == 2  # two copy, two others still hold it
    assert alloc.blocks_needed_for_step([full, alone]) == 1
    assert alloc.blocks_needed_for_step(beams + [full, alone]) == 4
    assert alloc.blocks_needed_for_step([]) == 0
    free_before = alloc.num_free_blocks
    for t in beams + [full, alone]:
        alloc.append(t, [9])
    assert free_before - alloc.num_free_blocks == 4
    assert len(alloc.take_copies()) == 3
    alloc.check()


# ====================================================================== take_copies contract
def test_take_copies_pairs_can_be_applied_at_once():
    """Copy-on-write recorded within one step must be applicable in one batched copy: distinct
    destinations, and no destination that another pair of the batch reads."""
    alloc = BlockAllocator(8, 4)
    p = alloc.allocate([1, 2, 3, 4, 5])
    a = alloc.fork(p)
    alloc.append(a, [6])  # CoW: p's last block x -> y
    b = alloc.fork(a)
    alloc.append(b, [7])  # CoW: a's y -> z; but y's content only arrives with the batch
    x = p.block_ids[1]
    y = a.block_ids[1]
    z = b.block_ids[1]
    copies = alloc.take_copies()
    assert sorted(copies) == sorted([(x, y), (x, z)])
    dsts = [d for _, d in copies]
    assert len(set(dsts)) == len(dsts)
    assert not set(dsts) & {s for s, _ in copies}
    alloc.check()


def test_take_copies_drops_superseded_destinations():
    alloc = BlockAllocator(4, 4)
    p = alloc.allocate([1, 2])
    a = alloc.fork(p)
    alloc.append(a, [3])  # p0 -> y
    y = a.block_ids[0]
    alloc.free(a)  # y is free again, its pending copy is dead
    q = alloc.allocate([7, 7])
    q2 = alloc.fork(q)
    alloc.free_block_ids.rotate(-alloc.free_block_ids.index(y))  # make y the next free block
    alloc.append(q2, [8])  # q0 -> y
    assert q2.block_ids == [y]
    copies = alloc.take_copies()
    assert copies == [(q.block_ids[0], y)]
    alloc.check()


# ====================================================================== stats
def test_stats_of_a_prompt_forked_four_ways():
    alloc = BlockAllocator(10, 16, bytes_per_token=100)
    prompt = alloc.allocate(list(range(40)))  # 16 + 16 + 8: 3 blocks
    forks = [alloc.fork(prompt) for _ in range(3)]  # 4 sequences in all
    s = alloc.stats()
    assert s == KVCacheStats(
        num_blocks=10, block_size=16, blocks_in_use=3, shared_blocks=3, evictable_blocks=0,
        free_blocks=7, num_sequences=4, logical_tokens=160, physical_tokens=40, bytes_per_token=100,
        bytes_used=3 * 16 * 100, contiguous_bytes=160 * 100,
    )
    assert s.fragmentation == pytest.approx(1 - 40 / 48)
    assert s.sharing_ratio == pytest.approx(4.0)
    # one fork appends a token: its partial last block is copied
    alloc.append(forks[0], [99])
    s = alloc.stats()
    assert s.blocks_in_use == 4 and s.shared_blocks == 3
    assert s.logical_tokens == 161 and s.physical_tokens == 49
    assert s.bytes_used == 4 * 16 * 100 and s.contiguous_bytes == 161 * 100
    assert s.fragmentation == pytest.approx(1 - 49 / 64)
    # after freeing everything but the copying fork
    for t in [prompt] + forks[1:]:
        alloc.free(t)
    s = alloc.stats()
    assert s.blocks_in_use == 3 and s.shared_blocks == 0 and s.num_sequences == 1
    assert s.logical_tokens == s.physical_tokens == 41
    assert s.sharing_ratio == pytest.approx(1.0)


def test_stats_of_an_empty_cache():
    s = BlockAllocator(5, 8).stats()
    assert (s.blocks_in_use, s.free_blocks, s.num_sequences, s.logical_tokens, s.physical_tokens) == (
        0, 5, 0, 0, 0)
    assert s.bytes_per_token == s.bytes_used == s.contiguous_bytes == 0
    assert s.fragmentation == 0.0 and s.sharing_ratio == 0.0


def test_stats_count_evictable_blocks_apart():
    alloc = BlockAllocator(6, 4, bytes_per_token=2)
    a = computed_prompt(alloc, list(range(9)))
    alloc.free(a)
    alloc.allocate([1, 2])
    s = alloc.stats()
    assert (s.blocks_in_use, s.evictable_blocks, s.free_blocks) == (1, 2, 3)
    assert s.bytes_used == 1 * 4 * 2 and s.contiguous_bytes == 2 * 2
    assert s.fragmentation == pytest.approx(0.5)


# ====================================================================== check() itself
def test_check_detects_corruption():
    alloc = BlockAllocator(4, 4)
    table = alloc.allocate([1, 2, 3, 4, 5])
    alloc.check()
    alloc.ref_counts[table.block_ids[0]] += 1
    with pytest.raises(AssertionError):
        alloc.check()
    alloc.ref_counts[table.block_ids[0]] -= 1
    alloc.free_block_ids.append(alloc.free_block_ids[0])
    with pytest.raises(AssertionError):
        alloc.check()
    alloc.free_block_ids.pop()
    alloc.check()
    alloc.free_block_ids.append(table.block_ids[0])
    with pytest.raises(AssertionError):
        alloc.check()


# ====================================================================== the simulated pool
@dataclass(eq=False)
class Seq:
    table: BlockTable
    tokens: list[int]  # what this sequence holds, kept by the test
    written: int  # how many of its tokens are in the simulated pool


class PagedSim:
    """The allocator driven as the engine would, over a simulated physical pool.

    `slots` maps slot -> the token id written there. A step writes the new tokens of every live
    sequence after applying the step's copy-on-write copies in one batch (all sources read before any
    destination is written, as `KVPool.copy_blocks` does). A block on the free list holds nothing
    (its content is dropped); `computed` remembers, per block, the tokens it held when it was marked
    computed, until something is written into it.
    """

    def __init__(self, alloc: BlockAllocator):
        self.alloc = alloc
        self.bs = alloc.block_size
        self.slots: dict[int, int] = {}
        self.computed: dict[int, tuple[int, ...]] = {}
        self.seqs: list[Seq] = []
        self.in_step = False
        self.kv_full = 0
        self.copies = 0

    # ---------------------------------------------------------------- operations
    def allocate(self, prompt: list[int]) -> Seq | None:
        alloc, bs = self.alloc, self.bs
        can = alloc.can_allocate(prompt)
        before = snapshot(alloc)
        live = {b for s in self.seqs for b in s.table.block_ids}
        try:
            table = alloc.allocate(prompt)
        except KVCacheFull:
            assert not can, "can_allocate said yes"
            assert snapshot(alloc) == before, "a failed allocate changed the state"
            self.kv_full += 1
            return None
        assert can, "can_allocate said no"
        cached = table.num_cached_tokens
        assert cached % bs == 0 and 0 <= cached < len(prompt)
        for index in range(cached // bs):
            block_id = table.block_ids[index]
            chunk = tuple(prompt[index * bs:(index + 1) * bs])
            # a cached block is either being used (so being computed) or was computed with these
            # very tokens and not written since
            assert block_id in live or self.computed.get(block_id) == chunk, "reused uncomputed block"
        seq = Seq(table, list(prompt), cached)
        self.seqs.append(seq)
        self.settle()
        return seq

    def fork(self, seq: Seq) -> Seq:
        before = self.alloc.num_free_blocks
        child = Seq(self.alloc.fork(seq.table), list(seq.tokens), seq.written)
        assert self.alloc.num_free_blocks == before
        self.seqs.append(child)
        return child

    def append(self, seq: Seq, tokens: list[int]) -> bool:
        alloc = self.alloc
        can = alloc.can_append(seq.table, len(tokens))
        before = snapshot(alloc)
        try:
            alloc.append(seq.table, tokens)
        except KVCacheFull:
            assert not can, "can_append said yes"
            assert snapshot(alloc) == before, "a failed append changed the state"
            self.kv_full += 1
            return False
        assert can, "can_append said no"
        seq.tokens.extend(tokens)
        self.settle()
        return True

    def mark_computed(self, seq: Seq) -> None:
        assert seq.written == len(seq.tokens)
        self.alloc.mark_computed(seq.table)
        bs = self.bs
        for index in range(len(seq.tokens) // bs):
            self.computed[seq.table.block_ids[index]] = tuple(seq.tokens[index * bs:(index + 1) * bs])

    def free(self, seq: Seq) -> None:
        self.alloc.free(seq.table)
        self.seqs.remove(seq)
        self.settle()

    def decode(self, seqs: list[Seq], tokens: list[int]) -> bool:
        """One decode step: one token appended to each of `seqs` (distinct), as the engine does
        after asking `blocks_needed_for_step`."""
        alloc = self.alloc
        needed = alloc.blocks_needed_for_step([s.table for s in seqs])
        if needed > alloc.num_free_blocks:
            self.kv_full += 1
            return False
        free_before = alloc.num_free_blocks
        self.in_step = True
        try:
            for seq, token in zip(seqs, tokens):
                assert self.append(seq, [token])
        finally:
            self.in_step = False
        assert free_before - alloc.num_free_blocks == needed, "blocks_needed_for_step is wrong"
        self.settle()
        return True

    def step(self, ops) -> None:
        """Several forks / appends / frees between two forwards: copies and writes deferred."""
        self.in_step = True
        try:
            for op, pick, tokens in ops:
                if not self.seqs:
                    break
                # every other pick is the newest sequence (a child just forked, as beams do)
                seq = self.seqs[-1] if pick % 2 else self.seqs[pick // 2 % len(self.seqs)]
                if op == "fork":
                    self.fork(seq)
                elif op == "fork_append":
                    self.append(self.fork(seq), tokens)
                elif op == "append":
                    self.append(seq, tokens)
                else:
                    self.free(seq)
        finally:
            self.in_step = False
        self.settle()

    # ---------------------------------------------------------------- the forward
    def settle(self) -> None:
        """What the engine does before and during a forward: the batched block copies, then the
        new tokens written into their slots."""
        if self.in_step:
            return
        alloc, bs = self.alloc, self.bs
        copies = alloc.take_copies()
        dsts = [d for _, d in copies]
        assert len(set(dsts)) == len(dsts), f"a block is the destination of two copies: {copies}"
        # (a destination may also be a source: a block freed and taken again within the step)
        read = {(d, o): self.slots.get(s * bs + o) for s, d in copies for o in range(bs)}
        for (d, o), token in read.items():
            if token is None:
                self.slots.pop(d * bs + o, None)
            else:
                self.slots[d * bs + o] = token
            self.computed.pop(d, None)
        self.copies += len(copies)
        # blocks on the free list hold nothing any more
        for block_id in alloc.free_block_ids:
            if block_id in self.computed or block_id * bs in self.slots:
                self.computed.pop(block_id, None)
                for o in range(bs):
                    self.slots.pop(block_id * bs + o, None)
        for seq in self.seqs:
            n = len(seq.tokens)
            if seq.written < n:
                for pos, slot in zip(range(seq.written, n), alloc.slot_mapping(seq.table, seq.written, n)):
                    self.slots[slot] = seq.tokens[pos]
                    self.computed.pop(slot // bs, None)
                seq.written = n

    # ---------------------------------------------------------------- invariants
    def check(self) -> None:
        alloc, bs = self.alloc, self.bs
        alloc.check()
        tables = [s.table for s in self.seqs]
        assert len({id(t) for t in tables}) == len(tables)
        assert set(alloc.tables) == {id(t) for t in tables}
        # each block's ref count is the number of tables holding it
        assert alloc.ref_counts == held_by_tables(alloc, tables)
        for t in tables:
            assert len(set(t.block_ids)) == len(t.block_ids), "a block twice in one table"
            assert len(t.block_ids) == alloc.blocks_for(t.num_tokens)
        # free + in use + evictable = total, and no block in two places
        free = list(alloc.free_block_ids)
        evictable = list(alloc.evictable)
        in_use = [b for b in range(alloc.num_blocks) if alloc.ref_counts[b] > 0]
        assert len(free) + len(evictable) + len(in_use) == alloc.num_blocks
        assert len(set(free) | set(evictable) | set(in_use)) == alloc.num_blocks
        assert alloc.num_free_blocks == len(free) + len(evictable)
        assert alloc.num_blocks_in_use == len(in_use)
        # every evictable block was computed with the tokens it is cached under, and still holds them
        for b in evictable:
            assert self.computed.get(b) == alloc.block_tokens[b], "an uncomputed block is cached"
            assert [self.slots.get(b * bs + o) for o in range(bs)] == list(alloc.block_tokens[b])
        for h, b in alloc.hash_to_block.items():
            assert alloc.block_hashes[b] == h
        # every sequence reads back exactly its own tokens through its block table
        for s in self.seqs:
            assert s.table.token_ids == s.tokens
            n = len(s.tokens)
            read = [self.slots.get(slot) for slot in alloc.slot_mapping(s.table, 0, n)]
            assert read == s.tokens, "a sequence reads back tokens it does not hold"
        stats = alloc.stats()
        assert stats.blocks_in_use == len(in_use) and stats.evictable_blocks == len(evictable)
        assert stats.free_blocks == len(free) and stats.num_sequences == len(self.seqs)
        assert stats.logical_tokens == sum(len(s.tokens) for s in self.seqs)
        assert stats.shared_blocks == sum(1 for r in alloc.ref_counts if r > 1)
        assert stats.physical_tokens <= len(in_use) * bs


# ====================================================================== hypothesis state machine
SM_BLOCK_SIZE = 4
SM_NUM_BLOCKS = 10
SM_VOCAB = 3  # few token ids: equal blocks are common

tokens_st = st.lists(st.integers(0, SM_VOCAB - 1), min_size=1, max_size=6)
pick_st = st.integers(0, 1 << 16)
STEP_OPS = ["fork", "fork_append", "append", "append", "free"]


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.sim = PagedSim(BlockAllocator(SM_NUM_BLOCKS, SM_BLOCK_SIZE))
        self.prompts: list[list[int]] = []

    def pick(self, i: int) -> Seq:
        return self.sim.seqs[i % len(self.sim.seqs)]

    @rule(prompt=st.lists(st.integers(0, SM_VOCAB - 1), min_size=1, max_size=12))
    def allocate(self, prompt):
        self.prompts.append(prompt)
        self.sim.allocate(prompt)

    @precondition(lambda self: self.prompts)
    @rule(base=pick_st, cut=st.integers(0, 4), extra=st.integers(0, 2),
          suffix=st.lists(st.integers(0, SM_VOCAB - 1), max_size=6))
    def allocate_sharing_a_prefix(self, base, cut, extra, suffix):
        """An earlier prompt's leading full blocks (cut at a block boundary or not), then more."""
        earlier = self.prompts[base % len(self.prompts)]
        prompt = earlier[: cut * SM_BLOCK_SIZE + extra] + suffix
        if not prompt:
            prompt = [0]
        self.prompts.append(prompt)
        self.sim.allocate(prompt)

    @precondition(lambda self: self.sim.seqs)
    @rule(i=pick_st)
    def allocate_a_live_sequence(self, i):
        """A prompt equal to what a live sequence holds (decoded tokens included) plus one token."""
        self.sim.allocate(self.pick(i).tokens + [0])

    @precondition(lambda self: self.sim.seqs and len(self.sim.seqs) < 12)
    @rule(i=pick_st)
    def fork(self, i):
        self.sim.fork(self.pick(i))

    @precondition(lambda self: self.sim.seqs)
    @rule(i=pick_st, tokens=tokens_st)
    def append(self, i, tokens):
        self.sim.append(self.pick(i), tokens)

    @precondition(lambda self: self.sim.seqs)
    @rule(i=pick_st)
    def mark_computed(self, i):
        self.sim.mark_computed(self.pick(i))

    @precondition(lambda self: self.sim.seqs)
    @rule(i=pick_st, twice=st.booleans())
    def free(self, i, twice):
        seq = self.pick(i)
        self.sim.free(seq)
        if twice:
            before = snapshot(self.sim.alloc)
            self.sim.alloc.free(seq.table)
            assert snapshot(self.sim.alloc) == before

    @precondition(lambda self: self.sim.seqs)
    @rule(ops=st.lists(st.tuples(st.sampled_from(STEP_OPS), pick_st,
                                 st.lists(st.integers(0, SM_VOCAB - 1), min_size=1, max_size=2)),
                       min_size=2, max_size=6))
    def step(self, ops):
        """Forks, appends and frees between two forwards: one batched copy, then the writes."""
        self.sim.step(ops)

    @precondition(lambda self: self.sim.seqs)
    @rule(picks=st.lists(pick_st, min_size=1, max_size=8), token=st.integers(0, SM_VOCAB - 1))
    def decode(self, picks, token):
        seqs = list({id(s): s for s in map(self.pick, picks)}.values())
        self.sim.decode(seqs, [token] * len(seqs))

    @rule()
    def reset_prefix_cache(self):
        alloc = self.sim.alloc
        free, evictable = alloc.num_free_blocks, len(alloc.evictable)
        assert alloc.reset_prefix_cache() == evictable
        assert alloc.num_free_blocks == free and not alloc.evictable

    @invariant()
    def invariants(self):
        self.sim.check()

    @invariant()
    def remembered_prefix_matches_are_current(self):
        """The memo of the last prefix match answers what hashing the prompt again would."""
        alloc = self.sim.alloc
        for prompt in self.prompts[-3:]:
            for _ in range(2):  # the second call is the memo's
                assert alloc._match_prefix(prompt) == alloc._hash_match(prompt)

    def teardown(self):
        self.sim.alloc.free_all()
        self.sim.seqs.clear()
        self.sim.check()
        assert self.sim.alloc.num_blocks_in_use == 0


AllocatorMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestAllocatorStateMachine = AllocatorMachine.TestCase


# ====================================================================== long seeded run
def test_long_random_run():
    rng = random.Random(1234)
    alloc = BlockAllocator(24, 4, bytes_per_token=8)
    sim = PagedSim(alloc)
    prompts: list[list[int]] = [[rng.randrange(4) for _ in range(rng.randrange(1, 20))]]
    counts = Counter()
    for _ in range(10_000):
        r = rng.random()
        seqs = sim.seqs
        if r < 0.22 or not seqs:
            if rng.random() < 0.6:
                base = rng.choice(prompts)
                prompt = base[: rng.randrange(len(base) + 1)]
            else:
                prompt = []
            prompt = prompt + [rng.randrange(4) for _ in range(rng.randrange(0 if prompt else 1, 9))]
            prompts.append(prompt)
            if len(prompts) > 50:
                prompts.pop(0)
            seq = sim.allocate(prompt)
            counts["allocate" if seq else "allocate_full"] += 1
            if seq is not None and seq.table.num_cached_tokens:
                counts["prefix_hit"] += 1
        elif r < 0.34:
            if len(seqs) < 16:
                sim.fork(rng.choice(seqs))
                counts["fork"] += 1
        elif r < 0.62:
            seq = rng.choice(seqs)
            if len(seq.tokens) < 60:
                ok = sim.append(seq, [rng.randrange(4) for _ in range(rng.randrange(1, 7))])
                counts["append" if ok else "append_full"] += 1
        elif r < 0.70:
            sim.mark_computed(rng.choice(seqs))
            counts["mark_computed"] += 1
        elif r < 0.76:
            chosen = rng.sample(seqs, rng.randint(1, len(seqs)))
            ok = sim.decode(chosen, [rng.randrange(4) for _ in chosen])
            counts["decode" if ok else "decode_full"] += 1
        elif r < 0.94:
            seq = rng.choice(seqs)
            sim.free(seq)
            if rng.random() < 0.1:
                alloc.free(seq.table)  # a harmless double free
            counts["free"] += 1
        else:
            ops = [(rng.choice(STEP_OPS), rng.randrange(1 << 16), [rng.randrange(4) for _ in range(rng.randrange(1, 3))])
                   for _ in range(rng.randrange(2, 7))]
            sim.step(ops)
            counts["step"] += 1
        sim.check()
    for seq in list(sim.seqs):
        sim.free(seq)
    alloc.check()
    sim.check()
    assert alloc.num_blocks_in_use == 0 and not alloc.tables
    assert alloc.num_free_blocks == alloc.num_blocks
    assert alloc.stats().logical_tokens == 0
    # the run exercised what it is meant to
    assert counts["allocate_full"] > 0 and counts["append_full"] > 0
    assert counts["prefix_hit"] > 0 and sim.copies > 0
    assert counts["free"] > 100 and counts["step"] > 100 and counts["decode"] > 100


def test_append_tokens_equals_append_then_slot_mapping():
    """The decode step's batched append gives the same tables, slots, copies, hashes and free
    lists as appending token by token, through forks, shared partial blocks and full blocks."""
    rng = random.Random(7)
    for trial in range(40):
        block_size = rng.choice([1, 2, 4, 8])
        pair = [BlockAllocator(num_blocks=400, block_size=block_size) for _ in range(2)]
        prompt = [rng.randrange(50) for _ in range(rng.randint(1, 12))]
        tables = [[a.allocate(prompt)] for a in pair]
        for _ in range(rng.randint(1, 30)):
            if rng.random() < 0.3:  # fork a random table in both allocators
                i = rng.randrange(len(tables[0]))
                for a, ts in zip(pair, tables):
                    ts.append(a.fork(ts[i]))
            if rng.random() < 0.1 and len(tables[0]) > 1:
                i = rng.randrange(len(tables[0]))
                for a, ts in zip(pair, tables):
                    a.free(ts.pop(i))
            tokens = [rng.randrange(50) for _ in tables[0]]
            expected = []
            for table, token in zip(tables[0], tokens):
                pair[0].append(table, [token])
                expected.append(pair[0].slot_mapping(table, table.num_tokens - 1, table.num_tokens)[0])
            assert pair[1].append_tokens(tables[1], tokens) == expected
            for a, b in zip(tables[0], tables[1]):
                assert (a.block_ids, a.token_ids) == (b.block_ids, b.token_ids)
            assert pair[0].take_copies() == pair[1].take_copies()
            assert pair[0].block_hashes == pair[1].block_hashes
            assert list(pair[0].free_block_ids) == list(pair[1].free_block_ids)
            for a in pair:
                for table in (tables[0] if a is pair[0] else tables[1]):
                    a.mark_computed(table)
                a.check()


def test_append_tokens_rejects_a_freed_table_and_mismatched_lengths():
    allocator = BlockAllocator(num_blocks=8, block_size=4)
    table = allocator.allocate([1, 2, 3])
    allocator.free(table)
    with pytest.raises(ValueError, match="not live"):
        allocator.append_tokens([table], [5])
    live = allocator.allocate([1, 2, 3])
    with pytest.raises(ValueError):
        allocator.append_tokens([live], [5, 6])


# ====================================================================== beams launched ahead
def test_fork_with_tail_holds_the_parents_full_blocks_then_the_reserved_tail():
    """Beam search launched ahead: each child is the parent's full blocks plus a reserved block
    that the device filled (a copy of the parent's partial block, or a fresh block), with the
    parent's tokens plus its own; freeing the parents afterwards leaves a consistent cache."""
    rng = random.Random(3)
    for trial in range(60):
        bs = rng.choice([1, 2, 4, 8])
        alloc = BlockAllocator(num_blocks=200, block_size=bs)
        parents = [alloc.allocate([rng.randrange(9) for _ in range(rng.randint(1, 20))])]
        for _ in range(rng.randint(0, 3)):
            child = alloc.fork(parents[0])
            alloc.append(child, [rng.randrange(9)])
            parents.append(child)
        for table in parents:
            alloc.mark_computed(table)
        alloc.take_copies()  # (the setup's copy-on-write copies)
        free_before = alloc.num_free_blocks
        tails = alloc.reserve(len(parents) + 1)
        assert alloc.num_free_blocks == free_before - len(tails)
        alloc.check()  # reserved blocks are held, by no table
        choice = [rng.randrange(len(parents)) for _ in range(len(parents))]
        children = []
        for parent_index, tail in zip(choice, tails):
            parent = parents[parent_index]
            token = rng.randrange(9)
            child = alloc.fork_with_tail(parent, tail, token)
            full = parent.num_tokens // bs
            assert child.block_ids == parent.block_ids[:full] + [tail]
            assert child.token_ids == parent.token_ids + [token]
            children.append(child)
        alloc.unreserve(tails[len(parents):])
        assert not alloc.reserved and not alloc.pending_copies
        for parent in parents:
            alloc.free(parent)
        alloc.mark_all_computed(children)
        alloc.check()
        for child in children:
            alloc.free(child)
        alloc.check()
        assert alloc.num_blocks_in_use == 0


def test_a_tail_that_completes_its_block_is_hashed_for_reuse():
    alloc = BlockAllocator(num_blocks=8, block_size=4)
    parent = alloc.allocate([5, 6, 7])
    alloc.mark_computed(parent)
    (tail,) = alloc.reserve(1)
    child = alloc.fork_with_tail(parent, tail, 8)
    alloc.mark_computed(child)
    alloc.free(parent)
    alloc.free(child)
    assert alloc.allocate([5, 6, 7, 8, 9]).block_ids[0] == tail  # the full block is found cached


def test_reserve_checks_room_and_the_tail_must_be_reserved():
    alloc = BlockAllocator(num_blocks=4, block_size=4)
    parent = alloc.allocate([1, 2, 3, 4, 5])
    with pytest.raises(KVCacheFull):
        alloc.reserve(3)
    assert alloc.num_free_blocks == 2 and not alloc.reserved
    with pytest.raises(ValueError, match="not reserved"):
        alloc.fork_with_tail(parent, 3, 7)
    alloc.reserve(2)
    alloc.free_all()  # reserved blocks go back too
    alloc.check()
    assert alloc.num_free_blocks == 4


def test_take_tail_leaves_what_fork_with_tail_then_free_leaves():
    """A parent continuing as its own first child (in place) against a new child table and the
    parent freed: the same blocks, ref counts, hashes and free blocks (as a set: the order differs
    only in which of the parent's released blocks is listed first)."""
    rng = random.Random(5)
    for trial in range(80):
        bs = rng.choice([1, 2, 4, 8])
        pair = [BlockAllocator(num_blocks=64, block_size=bs) for _ in range(2)]
        prompt = [rng.randrange(9) for _ in range(rng.randint(1, 20))]
        suffix = [rng.randrange(9) for _ in range(rng.randint(0, 5))]
        tables = []
        for alloc in pair:
            table = alloc.allocate(prompt)
            alloc.append(table, suffix)
            alloc.mark_computed(table)
            alloc.take_copies()
            tables.append(table)
        tails = [a.reserve(1)[0] for a in pair]
        token = rng.randrange(9)
        child = pair[0].fork_with_tail(tables[0], tails[0], token)
        pair[0].free(tables[0])
        pair[1].take_tail(tables[1], tails[1], token)
        assert (child.block_ids, child.token_ids) == (tables[1].block_ids, tables[1].token_ids)
        assert child.num_computed_blocks == tables[1].num_computed_blocks
        assert pair[0].ref_counts == pair[1].ref_counts
        assert pair[0].block_hashes == pair[1].block_hashes
        assert set(pair[0].free_block_ids) == set(pair[1].free_block_ids)
        for alloc in pair:
            alloc.check()
        with pytest.raises(ValueError, match="not reserved"):
            pair[1].take_tail(tables[1], tails[1], token)
