"""Naive float64 references and random paged-KV cases for the kernel tests."""
import math

import torch

# ||out - ref|| / ||ref|| bounds per dtype
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def rel_err(out, ref):
    assert not torch.isnan(out).any(), "output has NaN (unwritten or poisoned)"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def naive_attention(query, k_cache, v_cache, block_tables, context_lens, query_start_loc, *,
                    scale, sliding_window=None, softcap=None):
    """One query at a time, float64, straight from the definition."""
    q64 = query.double()
    t, hq, d = query.shape
    _, bs, hkv, _ = k_cache.shape
    g = hq // hkv
    out = torch.zeros(t, hq, d, dtype=torch.float64)
    qsl = query_start_loc.tolist()
    for s, c in enumerate(context_lens.tolist()):
        ql = qsl[s + 1] - qsl[s]
        slots = [block_tables[s, p // bs].item() * bs + p % bs for p in range(c)]
        k = k_cache.reshape(-1, hkv, d)[slots].double()
        v = v_cache.reshape(-1, hkv, d)[slots].double()
        for j in range(ql):
            pos = c - ql + j
            lo = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
            for h in range(hq):
                sc = k[lo:pos + 1, h // g] @ q64[qsl[s] + j, h] * scale
                if softcap is not None:
                    sc = softcap * torch.tanh(sc / softcap)
                out[qsl[s] + j, h] = torch.softmax(sc, 0) @ v[lo:pos + 1, h // g]
    return out


def make_case(specs, hq, hkv, d, bs, dtype, device, *, share=True, extra_blocks=3):
    """specs: list of (q_len, context_len). Returns query, k_cache, v_cache, block_tables,
    context_lens, query_start_loc. Blocks are scattered at random; if share, sequences 1.. share
    leading full blocks with sequence 0 where lengths allow; unused table entries are -1 and
    slots not holding a sequence's token are NaN (they must never be read into the result)."""
    nbs = [math.ceil(c / bs) for _, c in specs]
    max_blocks = max(nbs) + 1
    total = sum(nbs) + extra_blocks
    perm = torch.randperm(total).tolist()
    tables, used = [], 0
    for i, nb in enumerate(nbs):
        row = perm[used:used + nb]
        used += nb
        if share and i > 0:
            shared = min(specs[0][1] // bs, specs[i][1] // bs, torch.randint(0, nb + 1, ()).item())
            row[:shared] = tables[0][:shared]
        tables.append(row)
    bt = torch.full((len(specs), max_blocks), -1, dtype=torch.int32)
    for i, row in enumerate(tables):
        bt[i, :len(row)] = torch.tensor(row, dtype=torch.int32)
    k = torch.full((total, bs, hkv, d), float("nan"), dtype=torch.float32)
    v = torch.full_like(k, float("nan"))
    for i, (_, c) in enumerate(specs):
        for p in range(c):
            b, o = tables[i][p // bs], p % bs
            if torch.isnan(k[b, o]).all():
                k[b, o] = torch.randn(hkv, d)
                v[b, o] = torch.randn(hkv, d)
    t = sum(q for q, _ in specs)
    q = torch.randn(t, hq, d)
    qsl = torch.tensor([0] + [sum(x for x, _ in specs[:i + 1]) for i in range(len(specs))],
                       dtype=torch.int32)
    ctx = torch.tensor([c for _, c in specs], dtype=torch.int32)
    return (q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), bt.to(device),
            ctx.to(device), qsl.to(device))
