import pytest
import torch

from kernel_ref import TOL, make_case, naive_attention, rel_err
from sharedecode.kernels.paged_attention import (choose_num_splits, paged_attention,
                                                 paged_attention_torch)

# (q_len, context_len) per sequence
MODES = {
    "prefill": [(13, 13), (5, 5), (24, 24)],
    "chunked": [(7, 30), (1, 9), (16, 40)],          # suffix after a cached prefix
    "decode": [(1, 1), (1, 37), (1, 16), (1, 50)],
    "mixed": [(1, 33), (9, 9), (1, 20), (5, 21)],
}
# (Hq, Hkv, D, block_size): GQA ratios 1, 4, 8; head dims 64, 80, 96, 128, 256
SHAPES = [(4, 4, 64, 16), (8, 2, 80, 8), (8, 1, 128, 32), (16, 2, 256, 16), (4, 1, 96, 8)]


def _run(fn, case, poison=True, **kw):
    q = case[0]
    out = torch.full_like(q, float("nan")) if poison else None
    return fn(*case, out=out, **kw)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_torch_reference_matches_naive(mode, dtype, device):
    case = make_case(MODES[mode], 8, 2, 32, 8, dtype, device)
    for kw in ({}, {"sliding_window": 6}, {"softcap": 2.5}):
        ref = naive_attention(*[x.cpu() for x in case], scale=0.2, **kw)
        out = _run(paged_attention_torch, case, scale=0.2, **kw)
        assert out.dtype == dtype
        assert rel_err(out.cpu(), ref) < TOL[dtype]


CASES = [  # (mode, shape index, dtype): every mode, shape and dtype appears, not the product
    ("prefill", 0, torch.float32), ("prefill", 1, torch.float16), ("prefill", 2, torch.bfloat16),
    ("chunked", 1, torch.float32), ("chunked", 3, torch.float16), ("chunked", 4, torch.bfloat16),
    ("decode", 0, torch.float16), ("decode", 2, torch.float32), ("decode", 3, torch.bfloat16),
    ("decode", 4, torch.float32), ("mixed", 1, torch.bfloat16), ("mixed", 2, torch.float16),
    ("mixed", 4, torch.float32), ("prefill", 3, torch.float32),
]


@pytest.mark.parametrize("mode,shape,dtype", CASES)
def test_triton_matches_reference(mode, shape, dtype, device):
    hq, hkv, d, bs = SHAPES[shape]
    case = make_case(MODES[mode], hq, hkv, d, bs, dtype, device)
    ref = naive_attention(*[x.cpu() for x in case], scale=d ** -0.5)
    out = _run(paged_attention, case, scale=d ** -0.5)
    assert out.shape == case[0].shape and out.dtype == dtype
    assert rel_err(out.cpu(), ref) < TOL[dtype]


@pytest.mark.parametrize("mode", ["chunked", "decode", "mixed"])
@pytest.mark.parametrize("kw", [{"sliding_window": 7}, {"softcap": 1.5},
                                {"sliding_window": 16, "softcap": 30.0}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_window_and_softcap(mode, kw, dtype, device):
    case = make_case(MODES[mode], 8, 2, 64, 8, dtype, device)
    ref = naive_attention(*[x.cpu() for x in case], scale=0.3, **kw)
    out = _run(paged_attention, case, scale=0.3, **kw)
    assert rel_err(out.cpu(), ref) < TOL[dtype]


@pytest.mark.parametrize("num_splits", [2, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_kv(num_splits, dtype, device):
    # few long sequences; 8 splits of a 45-token context leave some splits empty
    case = make_case([(1, 45), (1, 130), (1, 3)], 8, 2, 64, 16, dtype, device)
    for kw in ({}, {"sliding_window": 20}):
        ref = naive_attention(*[x.cpu() for x in case], scale=0.125, **kw)
        out = _run(paged_attention, case, scale=0.125, num_splits=num_splits, **kw)
        assert rel_err(out.cpu(), ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_merge_in_the_kernel_matches_the_merge_kernel(dtype, device):
    """The last split program to arrive merges the splits (the default); the separate merge
    kernel gives the same output, and every arrival counter is back at zero after each launch, so
    the next launches (other batch sizes, other head counts) start clean."""
    from sharedecode.kernels import paged_attention as pa

    for seqs, hq, hkv, splits in (([(1, 45), (1, 130), (1, 3)], 8, 2, 4), ([(1, 70)] * 5, 4, 4, 3),
                                  ([(1, 200), (1, 9)], 8, 1, 8)):
        case = make_case(seqs, hq, hkv, 64, 16, dtype, device)
        ref = naive_attention(*[x.cpu() for x in case], scale=0.125)
        for _ in range(2):  # twice: the second launch finds the counters the first left
            folded = _run(paged_attention, case, scale=0.125, num_splits=splits)
            assert rel_err(folded.cpu(), ref) < TOL[dtype]
            assert all(int(c.count_nonzero()) == 0 for c in pa._arrivals.values())
        separate = _run(paged_attention, case, scale=0.125, num_splits=splits,
                        _config={"merge_here": False})
        torch.testing.assert_close(folded, separate)  # (one merge each: at most rounding apart)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_writes_the_new_keys_and_values_itself(num_splits, dtype, device):
    """new_kv: the kernel attends to each sequence's new K/V (from the inputs) and stores them into
    their slots in the same launch. The caches hold NaN at the new slots before the call, so a
    kernel that read them would poison the output; a padding row (slot -1) stores nothing, even
    with garbage keys (its own output is unspecified)."""
    case = make_case([(1, 45), (1, 130), (1, 3), (1, 16), (1, 33)], 8, 2, 64, 16, dtype, device, share=False)
    q, k_cache, v_cache, bt, ctx, qsl = case
    ref = naive_attention(*[x.cpu() for x in case], scale=0.125)
    pos = (ctx - 1).long()
    slots = bt[torch.arange(len(pos)), pos // 16].long() * 16 + pos % 16
    new_k, new_v = k_cache.flatten(0, 1)[slots].clone(), v_cache.flatten(0, 1)[slots].clone()
    before_k, before_v = k_cache.clone(), v_cache.clone()
    padding = 4  # its slot already holds its key; the row's garbage must not be written
    new_k[padding], new_v[padding] = 1e4, -1e4
    slots[padding] = -1
    for row in range(len(pos)):
        if row != padding:
            k_cache.view(-1, *k_cache.shape[2:])[slots[row]] = float("nan")
            v_cache.view(-1, *v_cache.shape[2:])[slots[row]] = float("nan")
    out = _run(paged_attention, case, scale=0.125, num_splits=num_splits, new_kv=(new_k, new_v, slots))
    real = [row for row in range(len(pos)) if row != padding]
    assert rel_err(out[real].cpu(), ref[real]) < TOL[dtype]
    assert torch.equal(k_cache.isnan(), before_k.isnan()) and torch.equal(v_cache.isnan(), before_v.isnan())
    finite = ~before_k.isnan()
    assert torch.equal(k_cache[finite], before_k[finite]) and torch.equal(v_cache[finite], before_v[finite])


def test_new_kv_is_validated(device):
    case = make_case(MODES["decode"], 4, 2, 64, 8, torch.float32, device)
    q, k_cache = case[0], case[1]
    key = torch.zeros(q.shape[0], 2, 64, device=device)
    slots = torch.zeros(q.shape[0], dtype=torch.int64, device=device)
    with pytest.raises(TypeError, match="new_kv"):
        paged_attention(*case, scale=0.1, new_kv=[key, key, slots])
    with pytest.raises(ValueError, match="key"):
        paged_attention(*case, scale=0.1, new_kv=(key[:, :1], key, slots))
    prefill = make_case(MODES["prefill"], 4, 2, 64, 8, torch.float32, device)
    rows = prefill[0].shape[0]
    with pytest.raises(ValueError, match="decode"):
        paged_attention(*prefill, scale=0.1, new_kv=(torch.zeros(rows, 2, 64, device=device),
                                                     torch.zeros(rows, 2, 64, device=device),
                                                     torch.zeros(rows, dtype=torch.int64, device=device)))


def test_merge_here_needs_a_split_decode_batch(device):
    from sharedecode.kernels.paged_attention import _launch_paged

    case = make_case(MODES["mixed"], 4, 2, 64, 8, torch.float32, device)
    with pytest.raises(ValueError, match="merge_here"):
        _launch_paged(*case, torch.empty_like(case[0]), 0.1, None, None, 1, merge_here=True)


def test_split_kv_auto_and_hint(device):
    assert choose_num_splits(1, 2, torch.device("cpu")) > 1
    assert choose_num_splits(1, 2, torch.device("cpu"), max_context_len=60) == 1
    assert choose_num_splits(1, 2, torch.device("cpu"), max_context_len=512) == 8
    assert choose_num_splits(512, 8, torch.device("cpu")) == 1
    case = make_case([(1, 70), (1, 90)], 4, 1, 64, 16, torch.float32, device)
    ref = naive_attention(*[x.cpu() for x in case], scale=0.1)
    for hint in (None, 90, 4096):
        out = _run(paged_attention, case, scale=0.1, max_context_len=hint)
        assert rel_err(out.cpu(), ref) < 1e-4


def test_prefill_block_q_tiles(device):
    # a long prompt with many query blocks and a sequence with zero new tokens
    case = make_case([(40, 40), (0, 10), (3, 19)], 4, 2, 64, 8, torch.float32, device)
    ref = naive_attention(*[x.cpu() for x in case], scale=0.1)
    for cfg in ({"block_q": 4, "tile_n": 16}, {"block_q": 8, "tile_n": 32}, {}):
        out = _run(paged_attention, case, scale=0.1, _config=cfg)
        assert rel_err(out.cpu(), ref) < 1e-4


@pytest.mark.parametrize("mode", ["chunked", "decode", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_k_loaded_as_rows(mode, dtype, device):
    """K loaded [N, D] and transposed in the dot computes the same attention."""
    case = make_case(MODES[mode], 8, 2, 80, 16, dtype, device)
    ref = naive_attention(*[x.cpu() for x in case], scale=0.2, sliding_window=9)
    for splits in (1, 3):
        if splits > 1 and mode != "decode":
            continue
        out = _run(paged_attention, case, scale=0.2, sliding_window=9, num_splits=splits,
                   _config={"k_rows": True})
        assert rel_err(out.cpu(), ref) < TOL[dtype]


def test_torch_and_triton_agree_fp32(device):
    case = make_case(MODES["mixed"], 8, 2, 80, 16, torch.float32, device)
    a = paged_attention_torch(*case, scale=0.1, softcap=5.0)
    b = paged_attention(*case, scale=0.1, softcap=5.0)
    assert rel_err(b, a) < 1e-5


def test_validation(device):
    q, k, v, bt, ctx, qsl = make_case([(1, 9)], 4, 2, 64, 8, torch.float32, device)
    for fn in (paged_attention, paged_attention_torch):
        with pytest.raises(ValueError, match="query must be"):
            fn(q[0], k, v, bt, ctx, qsl, scale=0.1)
        with pytest.raises(ValueError, match="multiple of KV heads"):
            fn(q[:, :3].contiguous(), k, v, bt, ctx, qsl, scale=0.1)
        with pytest.raises(TypeError, match="dtype"):
            fn(q.half(), k, v, bt, ctx, qsl, scale=0.1)
        with pytest.raises(ValueError, match="query_start_loc"):
            fn(q, k, v, bt, ctx, qsl[:1], scale=0.1)
        with pytest.raises(ValueError, match="head_dim"):
            fn(q[..., :32].contiguous(), k, v, bt, ctx, qsl, scale=0.1)
        with pytest.raises(ValueError, match="sliding_window"):
            fn(q, k, v, bt, ctx, qsl, scale=0.1, sliding_window=0)
        with pytest.raises(ValueError, match="softcap"):
            fn(q, k, v, bt, ctx, qsl, scale=0.1, softcap=-1.0)
        with pytest.raises(ValueError, match="out must match"):
            fn(q, k, v, bt, ctx, qsl, scale=0.1, out=torch.empty(2, 4, 64, device=device))
        with pytest.raises(TypeError, match="scale"):
            fn(q, k, v, bt, ctx, qsl, scale=torch.tensor(0.1))
    with pytest.raises(ValueError, match="context_len"):
        paged_attention_torch(q, k, v, bt, ctx * 0, qsl, scale=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_cuda_graph():
    dev = torch.device("cuda")
    case = make_case([(1, 300), (1, 77), (1, 1000)], 32, 8, 128, 16, torch.bfloat16, dev)
    out = torch.full_like(case[0], float("nan"))
    paged_attention(*case, scale=0.088, out=out, max_context_len=1024)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention(*case, scale=0.088, out=out, max_context_len=1024)
    case[0].copy_(torch.randn_like(case[0]))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = naive_attention(*[x.cpu() for x in case], scale=0.088)
    assert rel_err(out.cpu(), ref) < 2e-2


@pytest.mark.parametrize("num_splits", [1, 4])
def test_pdl_launch(pdl_path, num_splits, device):
    """With programmatic dependent launch (waits for the previous kernel first, lets the next
    launch after the tile loop) the kernel computes the same: decode with and without the folded
    merge, and a prefill batch."""
    for mode in ("decode", "mixed"):
        case = make_case(MODES[mode], 8, 2, 64, 16, torch.float32, device)
        ref = naive_attention(*[x.cpu() for x in case], scale=0.125)
        out = _run(paged_attention, case, scale=0.125, num_splits=num_splits if mode == "decode" else None)
        assert rel_err(out.cpu(), ref) < TOL[torch.float32]
