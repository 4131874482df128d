import dataclasses

import pytest
import torch

from kernel_ref import TOL, naive_attention, rel_err
from sharedecode.kernels.paged_attention import paged_attention
from sharedecode.kernels.shared_prefix import (PrefixGroups, find_prefix_groups,
                                               group_shared_prefixes, layout_groups,
                                               shared_prefix_decode, shared_prefix_decode_torch)


def make_tree(device, dtype, *, bs, hq, hkv, d, prefix_blocks=(4, 3), group_sizes=None,
              loners=2, max_own=3):
    """Groups of sequences sharing scattered (non-contiguous, randomly placed) prefix blocks, of
    the given sizes (default 3 each), each member with 1..max_own own blocks and a random fill of
    its last block; plus ``loners`` sequences in no group. Slots no sequence owns are NaN.
    Returns (query [S, Hq, D], caches, block tables (-1 padded), context lens), expected groups."""
    group_sizes = group_sizes or (3,) * len(prefix_blocks)
    specs = []  # (block list, context_len)
    nblocks = 1000
    perm = iter(torch.randperm(nblocks).tolist())
    expected = []
    for pb, size in zip(prefix_blocks, group_sizes):
        prefix = [next(perm) for _ in range(pb)]
        members = []
        for _ in range(size):
            own = torch.randint(1, max_own + 1, ()).item()
            blocks = prefix + [next(perm) for _ in range(own)]
            ctx = (pb + own - 1) * bs + 1 + torch.randint(0, bs, ()).item()
            members.append(len(specs))
            specs.append((blocks, ctx))
        expected.append((tuple(members), pb))
    for _ in range(loners):
        blocks = [next(perm) for _ in range(3)]
        specs.append((blocks, 2 * bs + torch.randint(1, bs + 1, ()).item()))
    order = torch.randperm(len(specs)).tolist()  # group members are not adjacent in the batch
    specs = [specs[i] for i in order]
    where = {old: new for new, old in enumerate(order)}
    expected = [(tuple(sorted(where[m] for m in mem)), pb) for mem, pb in expected]
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


def _reference(q, k, v, bt, ctx, scale, **kw):
    qsl = torch.arange(q.shape[0] + 1, dtype=torch.int32)
    return naive_attention(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), ctx.cpu(), qsl, scale=scale, **kw)


def _loners(expected, s):
    grouped = {i for mem, _ in expected for i in mem}
    return [i for i in range(s) if i not in grouped]


def test_find_prefix_groups(device):
    (q, k, v, bt, ctx), expected = make_tree(device, torch.float32, bs=8, hq=4, hkv=1, d=16)
    g = find_prefix_groups(bt, ctx, 8)
    assert isinstance(g, PrefixGroups)
    assert sorted(g.groups) == sorted(expected)
    plen = g.seq_prefix_len.tolist()
    for members, nb in expected:
        assert all(plen[i] == nb * 8 for i in members)
    loners = _loners(expected, q.shape[0])
    assert len(loners) == 2 and all(plen[i] == 0 for i in loners)
    assert g.num_chunks == 2 and g.max_chunk_members == 3  # default: one chunk per group here
    g2 = find_prefix_groups(bt, ctx, 8, members_per_chunk=2)
    assert g2.num_chunks == 4 and g2.chunk_count.tolist() == [2, 1, 2, 1]
    assert g2.max_chunk_members == 2
    # capped at the shortest member's full blocks
    ctx2 = ctx.clone()
    ctx2[expected[0][0][1]] = 2 * 8 + 3
    g3 = find_prefix_groups(bt, ctx2, 8)
    assert dict((m, n) for m, n in g3.groups)[expected[0][0]] == 2
    # no group when nothing is shared
    lone = torch.tensor(loners, device=device)
    g4 = find_prefix_groups(bt[lone], ctx[lone], 8)
    assert g4.num_chunks == 0 and g4.groups == []
    with pytest.raises(ValueError, match="min_group"):
        find_prefix_groups(bt, ctx, 8, min_group=1)
    with pytest.raises(ValueError, match="members_per_chunk"):
        find_prefix_groups(bt, ctx, 8, members_per_chunk=0)


CASES = [  # (dtype, bs, Hq, Hkv, D, group sizes, members_per_chunk, prefix_splits, suffix_splits,
    #          _config): GQA 1 / 4 / 8, several chunks per group, several row tiles per chunk
    (torch.float32, 8, 8, 2, 64, (3, 3), 16, None, None, None),
    (torch.float16, 16, 8, 1, 128, (2, 5), 2, 3, 2, None),
    (torch.bfloat16, 8, 4, 4, 80, (6, 2), 4, 1, 1, {"prefix_m": 16}),
    (torch.float32, 32, 16, 2, 256, (3, 4), 3, 2, 1, None),
    (torch.float16, 16, 4, 1, 96, (9, 2), 16, 5, 3, {"prefix_m": 16, "prefix_tile": 16,
                                                     "separate": True}),
    (torch.bfloat16, 8, 8, 1, 64, (5, 3, 2), 64, 2, 2, {"prefix_m": 16, "suffix_tile": 16}),
    (torch.float32, 8, 12, 4, 64, (3, 3), 16, 2, 1, None),  # GQA 3: merge head blocks of 8, 4
    (torch.float16, 8, 8, 2, 64, (4, 2), 16, 3, 2, {"merge_heads": 1}),  # one head a program
    # fp32 partials for 16-bit queries (the default keeps them in the query's dtype), no cap
    (torch.bfloat16, 16, 8, 2, 64, (4, 3), 16, 3, 2, {"half_partials": False, "maxnreg": None}),
    (torch.float16, 8, 4, 1, 128, (5, 2), 4, 2, 3, {"maxnreg": None, "merge_heads": 8}),
]


@pytest.mark.parametrize("dtype,bs,hq,hkv,d,sizes,mpc,ps,ss,cfg", CASES)
def test_shared_prefix_matches_reference(dtype, bs, hq, hkv, d, sizes, mpc, ps, ss, cfg, device):
    (q, k, v, bt, ctx), _ = make_tree(device, dtype, bs=bs, hq=hq, hkv=hkv, d=d,
                                      prefix_blocks=(4, 3, 5)[:len(sizes)], group_sizes=sizes)
    ref = _reference(q, k, v, bt, ctx, d ** -0.5)
    groups = find_prefix_groups(bt, ctx, bs, members_per_chunk=mpc)
    assert len(groups.groups) == len(sizes)
    out = torch.full_like(q, float("nan"))
    shared_prefix_decode(q, k, v, bt, ctx, scale=d ** -0.5, groups=groups, out=out,
                         prefix_splits=ps, suffix_splits=ss, _config=cfg)
    assert rel_err(out.cpu(), ref) < TOL[dtype]
    qsl = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=device)
    paged = paged_attention(q, k, v, bt, ctx, qsl, scale=d ** -0.5)
    assert rel_err(out.cpu(), paged.cpu()) < 2 * TOL[dtype]


@pytest.mark.parametrize("kw", [{"sliding_window": 20}, {"softcap": 2.0},
                                {"sliding_window": 45, "softcap": 10.0}])
def test_shared_prefix_window_softcap(kw, device):
    (q, k, v, bt, ctx), _ = make_tree(device, torch.float32, bs=8, hq=8, hkv=2, d=64)
    ref = _reference(q, k, v, bt, ctx, 0.2, **kw)
    out = torch.full_like(q, float("nan"))
    shared_prefix_decode(q, k, v, bt, ctx, scale=0.2, out=out, prefix_splits=2, **kw)
    assert rel_err(out.cpu(), ref) < 1e-4
    out_t = shared_prefix_decode_torch(q, k, v, bt, ctx, scale=0.2, **kw)
    assert rel_err(out_t.cpu(), ref) < 1e-4


def test_groups_reused_across_layers_and_no_groups(device):
    (q, k, v, bt, ctx), expected = make_tree(device, torch.float32, bs=8, hq=4, hkv=2, d=32)
    groups = find_prefix_groups(bt, ctx, 8)
    for _layer in range(2):  # fresh K/V and queries per layer, same groups
        k = torch.where(torch.isnan(k), k, torch.randn_like(k))
        v = torch.where(torch.isnan(v), v, torch.randn_like(v))
        q = torch.randn_like(q)
        ref = _reference(q, k, v, bt, ctx, 0.1)
        out = shared_prefix_decode(q, k, v, bt, ctx, scale=0.1, groups=groups,
                                   out=torch.full_like(q, float("nan")))
        assert rel_err(out.cpu(), ref) < 1e-4
    # a batch with no shared prefix falls back to plain paged decode
    lone = torch.tensor(_loners(expected, q.shape[0]), device=device)
    ref = _reference(q[lone], k, v, bt[lone], ctx[lone], 0.1)
    out = shared_prefix_decode(q[lone], k, v, bt[lone], ctx[lone], scale=0.1)
    assert rel_err(out.cpu(), ref) < 1e-4


@pytest.mark.parametrize("chunks,members,suffix_splits", [(2, 4, None), (4, 8, 2), (8, 16, 1)])
def test_capacity_padded_groups(chunks, members, suffix_splits, device):
    # What a CUDA graph replays: group tensors padded to a capacity (chunks with no members,
    # more rows per chunk than any group has), launch config from the shapes only
    # (max_prefix_len=None), the same launch reused for other groups of the same capacity.
    for sizes in ((3, 2), (4,)):
        (q, k, v, bt, ctx), _ = make_tree(device, torch.float32, bs=8, hq=4, hkv=2, d=32,
                                          prefix_blocks=(4, 2)[:len(sizes)], group_sizes=sizes)
        lay = layout_groups(group_shared_prefixes(bt.tolist(), ctx.tolist(), 8), q.shape[0], 8)
        assert lay.num_chunks == len(sizes)
        pad = [0] * (chunks - lay.num_chunks)

        def t(x):
            return torch.tensor(x, dtype=torch.int32, device=device)

        groups = PrefixGroups(
            members=t(lay.members), chunk_start=t(lay.chunk_start + pad),
            chunk_count=t(lay.chunk_count + pad), chunk_prefix_len=t(lay.chunk_prefix_len + pad),
            seq_prefix_len=t(lay.seq_prefix_len), groups=None, members_per_chunk=64,
            max_chunk_members=members, max_prefix_len=None, max_suffix_len=None)
        out = torch.full_like(q, float("nan"))
        shared_prefix_decode(q, k, v, bt, ctx, scale=0.1, groups=groups, out=out,
                             suffix_splits=suffix_splits)
        assert rel_err(out.cpu(), _reference(q, k, v, bt, ctx, 0.1)) < 1e-4


def test_shared_prefix_validation(device):
    (q, k, v, bt, ctx), _ = make_tree(device, torch.float32, bs=8, hq=4, hkv=1, d=16)
    with pytest.raises(ValueError, match="decode"):
        shared_prefix_decode(q[:3], k, v, bt, ctx, scale=0.1)
    with pytest.raises(TypeError, match="PrefixGroups"):
        shared_prefix_decode(q, k, v, bt, ctx, scale=0.1, groups=[(0, 1)])
    g = find_prefix_groups(bt[:4], ctx[:4], 8)
    with pytest.raises(ValueError, match="sequences"):
        shared_prefix_decode(q, k, v, bt, ctx, scale=0.1, groups=g)
    with pytest.raises(ValueError, match="prefix_splits"):
        shared_prefix_decode(q, k, v, bt, ctx, scale=0.1, prefix_splits=0)
    with pytest.raises(ValueError, match="suffix_splits"):
        shared_prefix_decode(q, k, v, bt, ctx, scale=0.1, suffix_splits=1.5)
    with pytest.raises(ValueError, match="prefix_m"):
        shared_prefix_decode(q, k, v, bt, ctx, scale=0.1, _config={"prefix_m": 24})
    with pytest.raises(ValueError, match="unknown keys"):
        shared_prefix_decode(q, k, v, bt, ctx, scale=0.1, _config={"block_q": 2})
    with pytest.raises(ValueError, match="merge_heads"):
        shared_prefix_decode(q, k, v, bt, ctx, scale=0.1, _config={"merge_heads": 3})


@pytest.mark.parametrize("dtype,d,partials,maxnreg,merge_heads", [
    (torch.bfloat16, 64, torch.bfloat16, 96, 4), (torch.float16, 128, torch.float16, 128, 8),
    (torch.float32, 64, torch.float32, None, 4), (torch.bfloat16, 256, torch.bfloat16, None, 8)])
def test_launch_defaults(dtype, d, partials, maxnreg, merge_heads, device, monkeypatch):
    # 16-bit partials for 16-bit queries; a register cap for the 4-warp programs (5 or 4 an SM)
    # and, with 4 an SM, prefix programs for two thirds of the slots (NOTES-kernels)
    import sharedecode.kernels.shared_prefix as sp
    (q, k, v, bt, ctx), _ = make_tree(device, dtype, bs=16, hq=8, hkv=2, d=d, group_sizes=(20, 3))
    groups = find_prefix_groups(bt, ctx, 16)
    graphed = dataclasses.replace(groups, max_prefix_len=None, max_suffix_len=None)  # as graphs launch
    c = sp._launch_config(graphed, q.shape[0], 2, 4, max(16, d), dtype, device, None, None, None)
    assert (c["half_partials"], c["maxnreg"], c["merge_heads"]) == \
        (partials != torch.float32, maxnreg, merge_heads)
    base = groups.num_chunks * c["row_tiles"] * 2  # prefix programs per split
    waves = 8 / 3 if maxnreg == 128 else 2
    assert c["prefix_splits"] == -(-int(waves * sp._num_sms(device)) // base)
    seen = []
    real = sp._alloc_scratch
    monkeypatch.setattr(sp, "_alloc_scratch", lambda *a: seen.append(a[-1]) or real(*a))
    shared_prefix_decode(q, k, v, bt, ctx, scale=d ** -0.5, groups=groups)
    assert seen == [partials]


def test_scratch_garbage_is_never_read(device, monkeypatch):
    # split-KV scratch comes from torch.empty: poison it and check nothing unwritten leaks in
    import sharedecode.kernels.paged_attention as pa
    import sharedecode.kernels.shared_prefix as sp

    def poison(alloc):
        return lambda *a, **kw: tuple(x.fill_(float("nan")) for x in alloc(*a, **kw))

    monkeypatch.setattr(sp, "_alloc_scratch", poison(sp._alloc_scratch))
    monkeypatch.setattr(pa, "_alloc_partials", poison(pa._alloc_partials))
    (q, k, v, bt, ctx), _ = make_tree(device, torch.float32, bs=8, hq=4, hkv=2, d=32,
                                      prefix_blocks=(4, 1), group_sizes=(2, 3), loners=3)
    ref = _reference(q, k, v, bt, ctx, 0.1)
    # 7 prefix splits of a 1-block prefix: most prefix splits of that group are empty
    out = shared_prefix_decode(q, k, v, bt, ctx, scale=0.1, prefix_splits=7, suffix_splits=2)
    assert rel_err(out.cpu(), ref) < 1e-4
    qsl = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=device)
    out = paged_attention(q, k, v, bt, ctx, qsl, scale=0.1, num_splits=8)
    assert rel_err(out.cpu(), ref) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shared_prefix_cuda_graph():
    dev = torch.device("cuda")
    (q, k, v, bt, ctx), _ = make_tree(dev, torch.bfloat16, bs=16, hq=32, hkv=8, d=128,
                                      group_sizes=(5, 3))
    groups = find_prefix_groups(bt, ctx, 16)
    out = torch.full_like(q, float("nan"))
    shared_prefix_decode(q, k, v, bt, ctx, scale=0.088, groups=groups, out=out)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        shared_prefix_decode(q, k, v, bt, ctx, scale=0.088, groups=groups, out=out)
    q.copy_(torch.randn_like(q))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out.cpu(), _reference(q, k, v, bt, ctx, 0.088)) < TOL[torch.bfloat16]


def test_cascade_with_pdl(pdl_path, device):
    (q, k, v, bt, ctx), _ = make_tree(device, torch.float32, bs=8, hq=8, hkv=2, d=64)
    ref = _reference(q, k, v, bt, ctx, 0.2)
    for cfg in (None, {"separate": True}):
        out = torch.full_like(q, float("nan"))
        shared_prefix_decode(q, k, v, bt, ctx, scale=0.2, out=out, prefix_splits=2, _config=cfg)
        assert rel_err(out.cpu(), ref) < 1e-4
