"""Tests of the KV pool: layout sizes, the byte budget, slot writes and batched block copies."""

from __future__ import annotations

import pytest
import torch

from sharedecode.block_allocator import BlockAllocator
from sharedecode.kv_pool import KVLayout, KVPool


def layout(dtype=torch.float32, layers=3, heads=2, dim=8, block_size=4) -> KVLayout:
    return KVLayout(num_layers=layers, num_kv_heads=heads, head_dim=dim, block_size=block_size, dtype=dtype)


def random_pool(num_blocks=8, seed=0, **kw) -> KVPool:
    pool = KVPool(layout(**kw), num_blocks)
    g = torch.Generator().manual_seed(seed)
    pool.tensor.copy_(torch.randn(pool.tensor.shape, generator=g))
    return pool


# ====================================================================== layout and budget
@pytest.mark.parametrize("dtype,element", [(torch.float32, 4), (torch.float16, 2), (torch.bfloat16, 2),
                                           (torch.float64, 8)])
def test_layout_bytes(dtype, element):
    lay = KVLayout(num_layers=12, num_kv_heads=4, head_dim=64, block_size=16, dtype=dtype)
    assert lay.bytes_per_token == 2 * 12 * 4 * 64 * element
    assert lay.bytes_per_block == 16 * 2 * 12 * 4 * 64 * element


def test_pool_shape_and_nbytes():
    lay = layout(dtype=torch.float16, layers=3, heads=2, dim=8, block_size=4)
    pool = KVPool(lay, 5)
    assert pool.tensor.shape == (3, 2, 5, 4, 2, 8)
    assert pool.tensor.dtype == torch.float16 and pool.tensor.device.type == "cpu"
    assert pool.nbytes == 5 * lay.bytes_per_block == 5 * 4 * lay.bytes_per_token
    k, v = pool.layer(1)
    assert k.shape == v.shape == (5, 4, 2, 8)
    assert k.data_ptr() == pool.tensor[1, 0].data_ptr() and v.data_ptr() == pool.tensor[1, 1].data_ptr()


def test_blocks_for_budget():
    lay = layout(dtype=torch.float16)  # 2 * 3 * 2 * 8 * 2 = 192 bytes a token, 768 a block
    assert lay.bytes_per_block == 768
    assert KVPool.blocks_for_budget(lay, 768 * 10) == 10
    assert KVPool.blocks_for_budget(lay, 768 * 10 + 767) == 10
    assert KVPool.blocks_for_budget(lay, 767) == 0
    assert KVPool.blocks_for_budget(lay, 0) == 0
    assert KVPool.blocks_for_budget(lay, 768 * 3.5) == 3
    n = KVPool.blocks_for_budget(lay, 100_000)
    assert KVPool(lay, n).nbytes <= 100_000 < KVPool(lay, n + 1).nbytes


def test_a_new_pool_is_zeroed():
    pool = KVPool(layout(dtype=torch.float16), 3)
    assert not pool.tensor.any()


@pytest.mark.parametrize("num_blocks", [0, -3])
def test_pool_needs_a_block(num_blocks):
    with pytest.raises(ValueError, match="num_blocks"):
        KVPool(layout(), num_blocks)


# ====================================================================== writes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_then_read_back(dtype):
    pool = random_pool(num_blocks=6, dtype=dtype)
    lay = pool.layout
    before = pool.tensor.clone()
    g = torch.Generator().manual_seed(1)
    slots = torch.tensor([0, 5, 23, 9, 10, 11, 12], dtype=torch.long)  # across blocks, out of order
    bs = lay.block_size
    written = {}
    for layer in range(lay.num_layers):
        key = torch.randn(len(slots), lay.num_kv_heads, lay.head_dim, generator=g)  # float32 in
        value = torch.randn(len(slots), lay.num_kv_heads, lay.head_dim, generator=g)
        pool.write(layer, key, value, slots)
        written[layer] = (key.to(dtype), value.to(dtype))
    expected = before.clone()
    for layer, (key, value) in written.items():
        k_cache, v_cache = pool.layer(layer)
        for i, slot in enumerate(slots.tolist()):
            block, offset = divmod(slot, bs)
            # read back through the layer views and through the pool tensor
            assert torch.equal(k_cache[block, offset], key[i])
            assert torch.equal(v_cache[block, offset], value[i])
            assert torch.equal(pool.tensor[layer, 0, block, offset], key[i])
            assert torch.equal(pool.tensor[layer, 1, block, offset], value[i])
            expected[layer, 0, block, offset] = key[i]
            expected[layer, 1, block, offset] = value[i]
    # nothing else was touched
    assert torch.equal(pool.tensor, expected)


def test_write_one_layer_leaves_the_others():
    pool = random_pool()
    before = pool.tensor.clone()
    lay = pool.layout
    key = torch.full((2, lay.num_kv_heads, lay.head_dim), 7.0)
    pool.write(1, key, -key, torch.tensor([3, 4]))
    assert torch.equal(pool.tensor[0], before[0]) and torch.equal(pool.tensor[2], before[2])
    assert torch.equal(pool.tensor[1, 0, 0, 3], key[0]) and torch.equal(pool.tensor[1, 0, 1, 0], key[1])
    assert torch.equal(pool.tensor[1, 1, 1, 0], -key[1])


# ====================================================================== block copies
def test_copy_blocks_copies_every_layer_k_and_v_and_nothing_else():
    pool = random_pool(num_blocks=10)
    before = pool.tensor.clone()
    src = torch.tensor([1, 4, 4, 7])
    dst = torch.tensor([2, 0, 9, 5])
    pool.copy_blocks(src, dst)
    for s, d in zip(src.tolist(), dst.tolist()):
        assert torch.equal(pool.tensor[:, :, d], before[:, :, s])  # all layers, K and V
        assert not torch.equal(pool.tensor[:, :, d], before[:, :, d])  # fresh data: it did change
    untouched = [b for b in range(10) if b not in dst.tolist()]
    assert torch.equal(pool.tensor[:, :, untouched], before[:, :, untouched])


def test_copy_blocks_with_no_pairs_is_a_no_op():
    pool = random_pool()
    before = pool.tensor.clone()
    pool.copy_blocks(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    assert torch.equal(pool.tensor, before)


def test_copy_blocks_reads_every_source_before_writing():
    """The allocator's take_copies relies on it: a block may be a destination and a source."""
    pool = random_pool(num_blocks=6)
    before = pool.tensor.clone()
    pool.copy_blocks(torch.tensor([1, 3]), torch.tensor([2, 1]))  # 1 -> 2 while 3 -> 1
    assert torch.equal(pool.tensor[:, :, 2], before[:, :, 1])
    assert torch.equal(pool.tensor[:, :, 1], before[:, :, 3])


# ====================================================================== allocator + pool
def test_copy_on_write_through_the_pool():
    """Each sequence reads back its own keys/values through its block table after forks, appends,
    copy-on-write and one batched copy per step."""
    lay = layout(layers=2, heads=1, dim=4, block_size=4)
    alloc = BlockAllocator(12, lay.block_size)
    pool = KVPool(lay, 12)
    pool.tensor.copy_(torch.randn(pool.tensor.shape, generator=torch.Generator().manual_seed(3)))

    def kv(token: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.full((1, lay.num_kv_heads, lay.head_dim), float(token * 10 + layer))
        return k, -k

    def write(table, start):
        slots = torch.tensor(alloc.slot_mapping(table, start, table.num_tokens))
        for layer in range(lay.num_layers):
            keys, values = zip(*(kv(t, layer) for t in table.token_ids[start:]))
            pool.write(layer, torch.cat(keys), torch.cat(values), slots)

    def step():
        copies = alloc.take_copies()
        if copies:
            pool.copy_blocks(torch.tensor([s for s, _ in copies]), torch.tensor([d for _, d in copies]))

    def read_back(table):
        for layer in range(lay.num_layers):
            k_cache, v_cache = pool.layer(layer)
            for pos, token in enumerate(table.token_ids):
                block, offset = table.block_ids[pos // lay.block_size], pos % lay.block_size
                k, v = kv(token, layer)
                assert torch.equal(k_cache[block, offset], k[0]) and torch.equal(v_cache[block, offset], v[0])

    parent = alloc.allocate([1, 2, 3, 4, 5, 6])
    write(parent, 0)
    beams = [alloc.fork(parent) for _ in range(3)]
    grown = []
    for i, beam in enumerate(beams):  # each appends its own token into the shared partial block
        start = beam.num_tokens
        alloc.append(beam, [100 + i])
        grown.append((beam, start))
    child = alloc.fork(beams[0])  # forked after the append, before the step's copies
    alloc.append(child, [200])
    grown.append((child, child.num_tokens - 2))  # its inherited token has no KV yet either
    step()  # one batched copy, then the step writes the new tokens
    for table, start in grown:
        write(table, start)
    for table in [parent, *beams, child]:
        read_back(table)
    assert [t.token_ids for t in beams] == [[1, 2, 3, 4, 5, 6, 100 + i] for i in range(3)]
    alloc.check()
