import pytest
import torch

from kernel_ref import TOL, naive_attention, rel_err
from sharedecode.kernels.paged_attention import paged_attention
from sharedecode.kernels.shared_prefix import (PrefixGroups, find_prefix_groups,
                                               shared_prefix_decode, shared_prefix_decode_torch)


def make_tree(device, dtype, *, bs, hq, hkv, d, prefix_blocks=(4, 3), own=(2, 3, 1),
              loners=2):
    """Groups of sequences sharing scattered prefix blocks, plus sequences in no group.
    Returns query [S, Hq, D], caches, block tables (-1 padded), context lens, expected groups."""
    specs = []  # (block list, context_len)
    nblocks = 1000
    perm = iter(torch.randperm(nblocks).tolist())
    expected = []
    for pb in prefix_blocks:
        prefix = [next(perm) for _ in range(pb)]
        members = []
        for j in range(len(own)):
            blocks = prefix + [next(perm) for _ in range(own[j])]
            ctx = (pb + own[j] - 1) * bs + 1 + torch.randint(0, bs, ()).item()
            members.append(len(specs))
            specs.append((blocks, ctx))
        expected.append((tuple(members), pb))
    for _ in range(loners):
        blocks = [next(perm) for _ in range(3)]
        specs.append((blocks, 2 * bs + 5))
    max_b = max(len(b) for b, _ in specs) + 1
    bt = torch.full((len(specs), max_b), -1, dtype=torch.int32)
    k = torch.full((nblocks, bs, hkv, d), float("nan"))
    v = torch.full_like(k, float("nan"))
    for i, (blocks, ctx) in enumerate(specs):
        bt[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        for p in range(ctx):
            b, o = blocks[p // bs], p % bs
            if torch.isnan(k[b, o]).all():
                k[b, o] = torch.randn(hkv, d)
                v[b, o] = torch.randn(hkv, d)
    ctx = torch.tensor([c for _, c in specs], dtype=torch.int32)
    q = torch.randn(len(specs), hq, d)
    return (q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), bt.to(device),
            ctx.to(device)), expected


def test_find_prefix_groups(device):
    (q, k, v, bt, ctx), expected = make_tree(device, torch.float32, bs=8, hq=4, hkv=1, d=16)
    g = find_prefix_groups(bt, ctx, 8)
    assert isinstance(g, PrefixGroups)
    assert sorted(g.groups) == sorted(expected)
    plen = g.seq_prefix_len.tolist()
    for members, nb in expected:
        assert all(plen[i] == nb * 8 for i in members)
    assert plen[-1] == 0 and plen[-2] == 0
    assert g.num_chunks == 2  # default members_per_chunk=32: one chunk per group here
    g2 = find_prefix_groups(bt, ctx, 8, members_per_chunk=2)
    assert g2.num_chunks == 4 and g2.chunk_count.tolist() == [2, 1, 2, 1]
    # capped at the shortest member's full blocks
    ctx2 = ctx.clone()
    ctx2[0] = 2 * 8 + 3
    g3 = find_prefix_groups(bt, ctx2, 8)
    assert dict((m, n) for m, n in g3.groups)[expected[0][0]] == 2
    # no group when nothing is shared
    g4 = find_prefix_groups(bt[-2:], ctx[-2:], 8)
    assert g4.num_chunks == 0 and g4.groups == []
    with pytest.raises(ValueError, match="min_group"):
        find_prefix_groups(bt, ctx, 8, min_group=1)


CASES = [  # (dtype, bs, Hq, Hkv, D, members_per_chunk, prefix_splits, suffix_splits)
    (torch.float32, 8, 8, 2, 64, 16, None, None),
    (torch.float16, 16, 8, 1, 128, 2, 3, 2),
    (torch.bfloat16, 8, 4, 4, 80, 4, 1, 1),
    (torch.float32, 32, 16, 2, 256, 3, 2, 1),
    (torch.float16, 16, 4, 1, 96, 16, 5, 3),
]


@pytest.mark.parametrize("dtype,bs,hq,hkv,d,mpc,ps,ss", CASES)
def test_shared_prefix_matches_paged(dtype, bs, hq, hkv, d, mpc, ps, ss, device):
    (q, k, v, bt, ctx), _ = make_tree(device, dtype, bs=bs, hq=hq, hkv=hkv, d=d)
    qsl = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=device)
    ref = naive_attention(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), ctx.cpu(), qsl.cpu(), scale=d ** -0.5)
    groups = find_prefix_groups(bt, ctx, bs, members_per_chunk=mpc)
    out = torch.full_like(q, float("nan"))
    shared_prefix_decode(q, k, v, bt, ctx, scale=d ** -0.5, groups=groups, out=out,
                         prefix_splits=ps, suffix_splits=ss)
    assert rel_err(out.cpu(), ref) < TOL[dtype]
    paged = paged_attention(q, k, v, bt, ctx, qsl, scale=d ** -0.5)
    assert rel_err(out.cpu(), paged.cpu()) < 2 * TOL[dtype]


@pytest.mark.parametrize("kw", [{"sliding_window": 20}, {"softcap": 2.0},
                                {"sliding_window": 45, "softcap": 10.0}])
def test_shared_prefix_window_softcap(kw, device):
    (q, k, v, bt, ctx), _ = make_tree(device, torch.float32, bs=8, hq=8, hkv=2, d=64)
    qsl = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=device)
    ref = naive_attention(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), ctx.cpu(), qsl.cpu(), scale=0.2, **kw)
    out = torch.full_like(q, float("nan"))
    shared_prefix_decode(q, k, v, bt, ctx, scale=0.2, out=out, prefix_splits=2, **kw)
    assert rel_err(out.cpu(), ref) < 1e-4
    out_t = shared_prefix_decode_torch(q, k, v, bt, ctx, scale=0.2, **kw)
    assert rel_err(out_t.cpu(), ref) < 1e-4


def test_groups_reused_across_layers_and_no_groups(device):
    (q, k, v, bt, ctx), _ = make_tree(device, torch.float32, bs=8, hq=4, hkv=2, d=32)
    groups = find_prefix_groups(bt, ctx, 8)
    qsl = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=device)
    for _layer in range(2):  # fresh K/V per layer, same groups
        k = torch.where(torch.isnan(k), k, torch.randn_like(k))
        v = torch.where(torch.isnan(v), v, torch.randn_like(v))
        ref = naive_attention(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), ctx.cpu(), qsl.cpu(), scale=0.1)
        out = shared_prefix_decode(q, k, v, bt, ctx, scale=0.1, groups=groups)
        assert rel_err(out.cpu(), ref) < 1e-4
    # a batch with no shared prefix falls back to plain paged decode
    ref = naive_attention(q[-2:].cpu(), k.cpu(), v.cpu(), bt[-2:].cpu(), ctx[-2:].cpu(),
                          qsl[:3].cpu(), scale=0.1)
    out = shared_prefix_decode(q[-2:], k, v, bt[-2:], ctx[-2:], scale=0.1)
    assert rel_err(out.cpu(), ref) < 1e-4


def test_shared_prefix_validation(device):
    (q, k, v, bt, ctx), _ = make_tree(device, torch.float32, bs=8, hq=4, hkv=1, d=16)
    with pytest.raises(ValueError, match="decode"):
        shared_prefix_decode(q[:3], k, v, bt, ctx, scale=0.1)
    with pytest.raises(TypeError, match="PrefixGroups"):
        shared_prefix_decode(q, k, v, bt, ctx, scale=0.1, groups=[(0, 1)])
    g = find_prefix_groups(bt[:4], ctx[:4], 8)
    with pytest.raises(ValueError, match="sequences"):
        shared_prefix_decode(q, k, v, bt, ctx, scale=0.1, groups=g)


def test_scratch_garbage_is_never_read(device, monkeypatch):
    # split-KV scratch comes from torch.empty: poison it and check nothing unwritten leaks in
    import sharedecode.kernels.paged_attention as pa
    import sharedecode.kernels.shared_prefix as sp

    alloc = pa._alloc_partials

    def poisoned(*a, **k):
        acc, lse = alloc(*a, **k)
        return acc.fill_(float("nan")), lse.fill_(float("nan"))

    monkeypatch.setattr(sp, "_alloc_partials", poisoned)
    monkeypatch.setattr(pa, "_alloc_partials", poisoned)
    (q, k, v, bt, ctx), _ = make_tree(device, torch.float32, bs=8, hq=4, hkv=2, d=32)
    qsl = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=device)
    ref = naive_attention(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), ctx.cpu(), qsl.cpu(), scale=0.1)
    out = shared_prefix_decode(q, k, v, bt, ctx, scale=0.1, prefix_splits=3, suffix_splits=2)
    assert rel_err(out.cpu(), ref) < 1e-4
    out = paged_attention(q, k, v, bt, ctx, qsl, scale=0.1, num_splits=8)
    assert rel_err(out.cpu(), ref) < 1e-4
