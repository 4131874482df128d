import pytest
import torch

from sharedecode.kernels.kv_cache_ops import copy_blocks, copy_blocks_torch, write_kv, write_kv_torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bs,hkv,d", [(8, 2, 64), (16, 1, 80), (32, 3, 128)])
def test_write_kv(dtype, bs, hkv, d, device):
    nb, t = 12, 20
    kc = torch.randn(nb, bs, hkv, d, device=device).to(dtype)
    vc = torch.randn_like(kc)
    key = torch.randn(t, hkv, d, device=device).to(dtype)
    value = torch.randn_like(key)
    slots = torch.randperm(nb * bs, device=device)[:t]
    slots[::5] = -1  # padding
    for idx_dtype in (torch.int64, torch.int32):
        a, b, a2, b2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
        write_kv(key, value, a, b, slots.to(idx_dtype))
        write_kv_torch(key, value, a2, b2, slots.to(idx_dtype))
        assert torch.equal(a, a2) and torch.equal(b, b2)
        keep = slots >= 0
        assert torch.equal(a.view(-1, hkv, d)[slots[keep]], key[keep])
        assert torch.equal(b.view(-1, hkv, d)[slots[keep]], value[keep])
        untouched = torch.ones(nb * bs, dtype=torch.bool, device=device)
        untouched[slots[keep]] = False
        assert torch.equal(a.view(-1, hkv, d)[untouched], kc.view(-1, hkv, d)[untouched])


def test_write_kv_strided_input(device):
    # key/value as views of a fused qkv projection output
    t, hkv, d = 6, 2, 64
    qkv = torch.randn(t, 3 * hkv, d, device=device)
    key, value = qkv[:, hkv:2 * hkv], qkv[:, 2 * hkv:]
    kc = torch.zeros(4, 8, hkv, d, device=device)
    vc = torch.zeros_like(kc)
    slots = torch.tensor([0, 9, 17, -1, 30, 31], device=device)
    write_kv(key, value, kc, vc, slots)
    a, b = torch.zeros_like(kc), torch.zeros_like(vc)
    write_kv_torch(key, value, a, b, slots)
    assert torch.equal(kc, a) and torch.equal(vc, b)


def test_write_kv_into_pool_slices(device):
    pool = torch.randn(2, 2, 6, 8, 2, 32, device=device)
    key = torch.randn(3, 2, 32, device=device)
    value = torch.randn_like(key)
    slots = torch.tensor([5, 40, 47], device=device)
    ref = pool.clone()
    write_kv(key, value, pool[1, 0], pool[1, 1], slots)
    write_kv_torch(key, value, ref[1, 0], ref[1, 1], slots)
    assert torch.equal(pool, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bs,hkv,d", [(8, 2, 64), (16, 8, 128)])
def test_copy_blocks(dtype, bs, hkv, d, device):
    pool = torch.randn(3, 2, 20, bs, hkv, d, device=device).to(dtype)
    src = torch.tensor([1, 4, 4, 9], device=device)
    dst = torch.tensor([2, 7, 15, 0], device=device)
    a, b = pool.clone(), pool.clone()
    copy_blocks(a, src, dst)
    copy_blocks_torch(b, src, dst)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :, dst], pool[:, :, src])
    others = [i for i in range(20) if i not in dst.tolist()]
    assert torch.equal(a[:, :, others], pool[:, :, others])
    copy_blocks(a, src[:0], dst[:0])  # empty is a no-op


def test_copy_blocks_skips_padding_pairs(device):
    """A captured step copies a list padded to its bucket: pairs with a negative source copy
    nothing, wherever they sit, and the real pairs still copy every layer's K and V."""
    pool = torch.randn(2, 2, 12, 8, 2, 16, device=device)
    before = pool.clone()
    src = torch.tensor([3, -1, 5, -1, -1], device=device)
    dst = torch.tensor([7, -1, 9, 4, -1], device=device)  # (a padding pair's dst is never read)
    copy_blocks(pool, src, dst)
    expected = before.clone()
    expected[:, :, [7, 9]] = before[:, :, [3, 5]]
    assert torch.equal(pool, expected)


def test_kv_ops_validation(device):
    kc = torch.zeros(4, 8, 2, 32, device=device)
    key = torch.zeros(3, 2, 32, device=device)
    for fn in (write_kv, write_kv_torch):
        with pytest.raises(ValueError, match="slot_mapping"):
            fn(key, key, kc, kc, torch.zeros(2, dtype=torch.long, device=device))
        with pytest.raises(TypeError, match="slot_mapping"):
            fn(key, key, kc, kc, torch.zeros(3, device=device))
        with pytest.raises(TypeError, match="dtypes"):
            fn(key.half(), key.half(), kc, kc, torch.zeros(3, dtype=torch.long, device=device))
        with pytest.raises(ValueError, match="does not fit"):
            fn(key[:, :1], key[:, :1], kc, kc, torch.zeros(3, dtype=torch.long, device=device))
    for fn in (copy_blocks, copy_blocks_torch):
        with pytest.raises(ValueError, match="kv_pool"):
            fn(kc, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        with pytest.raises(ValueError, match="src and dst"):
            fn(torch.zeros(1, 2, 4, 8, 2, 32, device=device), torch.zeros(2, dtype=torch.long, device=device),
               torch.zeros(1, dtype=torch.long, device=device))


def test_write_kv_with_pdl(pdl_path, device):
    kc = torch.randn(6, 8, 2, 64, device=device)
    vc = torch.randn_like(kc)
    key, value = torch.randn(5, 2, 64, device=device), torch.randn(5, 2, 64, device=device)
    slots = torch.tensor([3, -1, 17, 40, 8], device=device)
    a, b, a2, b2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    write_kv(key, value, a, b, slots)
    write_kv_torch(key, value, a2, b2, slots)
    assert torch.equal(a, a2) and torch.equal(b, b2)
