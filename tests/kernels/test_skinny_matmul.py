"""Skinny GEMM (y = x @ W^T + b, few rows) and its gated variant (y = (silu(gate) * up) @ W^T + b)
against a float64 reference, through the Triton interpreter on CPU (conftest.py;
SHAREDECODE_TEST_CUDA=1 runs the same on the GPU).

Outputs and split-K scratch are poisoned with NaN before every launch, so an element the kernels
fail to write shows up as NaN; shapes are chosen so N and K are not multiples of the blocks.
"""
import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager

import sharedecode.kernels.skinny_matmul as sm
from sharedecode.kernels.skinny_matmul import (MAX_ROWS, SkinnyConfig, choose_config, skinny_linear,
                                               skinny_linear_torch, skinny_silu_linear,
                                               skinny_silu_linear_torch)

# ||y - ref|| / ||ref||: fp32 uses an exact (ieee) dot; half types are dominated by output rounding
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, N, K): every M class, N and K off the block multiples, and exact multiples
SHAPES = [(1, 48, 96), (3, 70, 200), (8, 16, 64), (16, 70, 96), (1, 16, 200), (16, 48, 64)]
# explicit configs: one K slice, split K (with a ragged last slice for K = 200 / 96), wide block
CONFIGS = {
    "heuristic": None,
    "split": SkinnyConfig(block_n=16, block_k=32, split_k=3, num_stages=2),
    "wide": SkinnyConfig(block_n=64, block_k=64, split_k=1, num_warps=2, num_stages=3),
}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the wrapper allocates (output, fp32 partials) starts as NaN."""
    real = sm._alloc

    def poisoned(shape, dtype, device):
        return real(shape, dtype, device).fill_(float("nan"))

    monkeypatch.setattr(sm, "_alloc", poisoned)


def reference(x, w, b=None):
    y = x.double() @ w.double().t()
    return y if b is None else y + b.double()


def rel_err(y, ref):
    assert not torch.isnan(y).any(), "output has NaN (an element left unwritten)"
    return ((y.double() - ref).norm() / ref.norm()).item()


def rand(*shape, dtype, device):
    return torch.randn(*shape, device=device).to(dtype)


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"M{m}N{n}K{k}" for m, n, k in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, shape, bias, config, device):
    m, n, k = shape
    x = rand(m, k, dtype=dtype, device=device)
    w = rand(n, k, dtype=dtype, device=device)
    b = rand(n, dtype=dtype, device=device) if bias else None
    y = skinny_linear(x, w, b, config=CONFIGS[config])
    assert y.shape == (m, n) and y.dtype == dtype and y.device == x.device and y.is_contiguous()
    assert rel_err(y, reference(x, w, b)) < TOL[dtype]


def test_split_plan_really_splits():
    # the "split" config above must exercise the partials + reduction path, ragged last slice too
    cfg = CONFIGS["split"]
    assert sm._split_plan(200, cfg) == (96, 3)   # slices 96, 96, 8
    assert sm._split_plan(96, cfg) == (32, 3)    # even slices: no K mask
    assert sm._split_plan(64, cfg) == (32, 2)    # K too short for 3 slices of whole tiles
    assert sm._split_plan(20, cfg) == (32, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", ["heuristic", "split"])
def test_strided_x_and_weight(dtype, config, device):
    m, n, k = 5, 40, 136
    base = rand(2 * m, k + 24, dtype=dtype, device=device)
    w_base = rand(n, k + 8, dtype=dtype, device=device)
    b_base = rand(2 * n, dtype=dtype, device=device)
    w = w_base[:, 3:3 + k]            # row stride k + 8, misaligned start
    b = b_base[::2]                   # strided bias
    cases = {
        "every other row": base[::2, :k],
        "column window": base[:m, 7:7 + k],
        "transposed": rand(k, m, dtype=dtype, device=device).t(),   # stride along K != 1
    }
    for name, x in cases.items():
        assert not x.is_contiguous()
        y = skinny_linear(x, w, b, config=CONFIGS[config])
        assert rel_err(y, reference(x, w, b)) < TOL[dtype], name


def test_every_row_count(device):
    # all M in 1..16 with one weight: the padded rows of the dot never leak into the output
    w = rand(24, 80, dtype=torch.float32, device=device)
    x = rand(MAX_ROWS, 80, dtype=torch.float32, device=device)
    for m in range(1, MAX_ROWS + 1):
        y = skinny_linear(x[:m], w)
        assert rel_err(y, reference(x[:m], w)) < TOL[torch.float32], m


def test_split_k_is_deterministic_and_matches_no_split(device):
    x = rand(4, 200, dtype=torch.bfloat16, device=device)
    w = rand(48, 200, dtype=torch.bfloat16, device=device)
    a = skinny_linear(x, w, config=CONFIGS["split"])
    assert torch.equal(a, skinny_linear(x, w, config=CONFIGS["split"]))
    one = skinny_linear(x, w, config=SkinnyConfig(block_n=16, block_k=32, split_k=1))
    # same fp32 sums in another order: agree up to one bf16 rounding step
    torch.testing.assert_close(a, one, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("bias", [False, True])
def test_split_k_summed_in_the_kernel_equals_the_sum_kernel(bias, device):
    """The last K slice of a column block to finish sums the slices (the default): the same bits
    as the separate sum kernel, every arrival counter back at zero after each launch (a counter
    left behind would stop the next launch's sum, leaving the poisoned output NaN)."""
    from sharedecode.kernels import paged_attention as pa

    x = torch.randn(5, 200, device=device)
    w = torch.randn(70, 200, device=device)
    b = torch.randn(70, device=device) if bias else None
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    for _ in range(2):
        folded = skinny_linear(x, w, b, config=CONFIGS["split"])
        assert rel_err(folded, ref) < 1e-5
        assert all(int(c.count_nonzero()) == 0 for c in pa._arrivals.values())
    sm.SUM_SPLITS_IN_KERNEL = False
    try:
        separate = skinny_linear(x, w, b, config=CONFIGS["split"])
    finally:
        sm.SUM_SPLITS_IN_KERNEL = True
    assert torch.equal(folded, separate)


def test_torch_reference(device):
    for dtype in DTYPES:
        x = rand(3, 70, dtype=dtype, device=device)
        w = rand(20, 70, dtype=dtype, device=device)
        b = rand(20, dtype=dtype, device=device)
        y = skinny_linear_torch(x, w, b)
        assert y.dtype == dtype and rel_err(y, reference(x, w, b)) < TOL[dtype]


def test_choose_config():
    # the decode shapes of M1 / M2 on a 132-SM Hopper: about one program per SM, tiles >= 16 KB
    for m in (1, 8, 16):
        for n, k in [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (32000, 2048),
                     (6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]:
            cfg = choose_config(m, n, k, 132)
            cfg.check()
            _, splits = sm._split_plan(k, cfg)
            assert splits == cfg.split_k, cfg
            assert 132 // 2 - 4 <= -(-n // cfg.block_n) * splits, (m, n, k, cfg)
            assert cfg.block_n >= 32 and cfg.block_n * cfg.block_k * 2 >= 16384, cfg
            assert splits == 1 or k // splits >= 8 * cfg.block_k, cfg
    # what the H200 sweep favoured (kernels/skinny_matmul.py: choose_config)
    assert choose_config(1, 2048, 8192, 132) == SkinnyConfig(128, 128, 8, 4, 4)   # split K
    assert choose_config(1, 32000, 2048, 132) == SkinnyConfig(128, 128, 1, 4, 4)  # many rows
    assert choose_config(1, 3072, 2048, 132) == SkinnyConfig(32, 256, 1, 4, 4)    # small: no split
    # the same bytes per tile in fp32; fewer stages where shared memory is short
    assert choose_config(1, 32000, 2048, 132, elem_bytes=4).block_k == 64
    assert choose_config(1, 32000, 2048, 132, max_smem=100 * 1024).num_stages == 3
    # gated: each stage also holds the up tile (3 stages of 128 x 128 W + 2 x 16 x 128 x, bf16)
    assert choose_config(1, 2048, 8192, 132, max_smem=3 * 144 * 256).num_stages == 4
    assert choose_config(1, 2048, 8192, 132, max_smem=3 * 144 * 256, gated=True).num_stages == 3
    assert choose_config(1, 2048, 8192, 132, gated=True) == choose_config(1, 2048, 8192, 132)
    # tiny shapes: blocks shrink to the matrix, never below the 16 of tl.dot
    assert choose_config(1, 5, 3, 8) == SkinnyConfig(16, 16, 1, 4, 4)
    with pytest.raises(ValueError, match="num_sms"):
        choose_config(1, 16, 16, 0)


def test_validation(device):
    x = rand(2, 32, dtype=torch.float32, device=device)
    w = rand(16, 32, dtype=torch.float32, device=device)
    b = rand(16, dtype=torch.float32, device=device)
    for fn in (skinny_linear, skinny_linear_torch):
        with pytest.raises(TypeError, match="x must be a tensor"):
            fn(x.tolist(), w)
        with pytest.raises(TypeError, match="bias must be a tensor"):
            fn(x, w, 1.0)
        with pytest.raises(ValueError, match="x must be"):
            fn(x[0], w)                                          # 1-D
        with pytest.raises(ValueError, match="x must be"):
            fn(rand(MAX_ROWS + 1, 32, dtype=torch.float32, device=device), w)
        with pytest.raises(ValueError, match="x must be"):
            fn(x[:0], w)                                         # no rows
        with pytest.raises(ValueError, match="weight must be"):
            fn(x, w[0])
        with pytest.raises(ValueError, match="K differs"):
            fn(x, w[:, :31])
        with pytest.raises(TypeError, match="dtypes differ"):
            fn(x, w.half())
        with pytest.raises(TypeError, match="dtypes differ"):
            fn(x, w, b.double())
        with pytest.raises(TypeError, match="not supported"):
            fn(x.double(), w.double())
        with pytest.raises(ValueError, match="bias must be"):
            fn(x, w, b[:15])
        with pytest.raises(ValueError, match="weight is on meta"):
            fn(x, w.to("meta"))
    with pytest.raises(ValueError, match="contiguous along K"):
        skinny_linear(x, rand(32, 16, dtype=torch.float32, device=device).t())
    with pytest.raises(TypeError, match="config must be"):
        skinny_linear(x, w, config={"block_n": 32})
    for bad in (SkinnyConfig(block_n=8), SkinnyConfig(block_k=48), SkinnyConfig(split_k=0),
                SkinnyConfig(num_warps=3), SkinnyConfig(num_stages=0)):
        with pytest.raises(ValueError, match="config."):
            skinny_linear(x, w, config=bad)


def test_custom_op_under_torch_compile(device):
    """The op is opaque to torch.compile: one graph (fullgraph), the op called inside it.
    inductor with the op alone (no C++ kernel to build: the op is an extern call), and aot_eager
    for the op between other ops (inductor would compile C++ for those: ~30 s on a CPU runner)."""
    torch._dynamo.reset()
    x = rand(3, 64, dtype=torch.float32, device=device)
    w = rand(48, 64, dtype=torch.float32, device=device)
    b = rand(48, dtype=torch.float32, device=device)

    def just_op(x, w, b):
        return torch.ops.sharedecode.skinny_linear(x, w, b)

    def mixed(x, w, b):
        return torch.relu(torch.ops.sharedecode.skinny_linear(x[::2] * 2.0, w, None)) + b

    traced = []

    def recording(graph_module, example_inputs):
        traced.append(graph_module.code)
        return aot_eager(graph_module, example_inputs)

    y = torch.compile(just_op, fullgraph=True, backend="inductor")(x, w, b)
    assert rel_err(y, reference(x, w, b)) < TOL[torch.float32]
    y = torch.compile(mixed, fullgraph=True, backend=recording)(x, w, b)
    ref = torch.relu(reference(x[::2] * 2.0, w)) + b.double()
    assert rel_err(y, ref) < TOL[torch.float32]
    assert len(traced) == 1 and traced[0].count("sharedecode.skinny_linear") == 1


def test_custom_op_opcheck(device):
    x = rand(3, 64, dtype=torch.float32, device=device)
    w = rand(48, 64, dtype=torch.float32, device=device)
    b = rand(48, dtype=torch.float32, device=device)
    op = torch.ops.sharedecode.skinny_linear.default
    torch.library.opcheck(op, (x, w, b))
    torch.library.opcheck(op, (x, w, None))


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("shape", [(3, 70, 200), (16, 48, 64), (1, 16, 32)], ids=["ragged", "even", "one-tile"])
def test_pdl_path_matches_reference(pdl_path, shape, config, device):
    """With PDL each program loads its first weight tile before waiting for the previous kernel
    (a peeled first iteration): the same result, split K and a single K tile included."""
    m, n, k = shape
    x = rand(m, k, dtype=torch.float32, device=device)
    w = rand(n, k, dtype=torch.float32, device=device)
    b = rand(n, dtype=torch.float32, device=device)
    assert rel_err(skinny_linear(x, w, b, config=CONFIGS[config]), reference(x, w, b)) < TOL[torch.float32]


# ----------------------------------------------------------------------------------------------
# gated: y = (silu(gate) * up) @ W^T (+ b), gate_up [M, 2I] = gate | up
# ----------------------------------------------------------------------------------------------
def gated_product(gate_up, i):
    """silu(gate) * up in float64, rounded once to gate_up's dtype (what the kernel dots)."""
    gate, up = gate_up[:, :i].double(), gate_up[:, i:].double()
    return (gate * torch.sigmoid(gate) * up).to(gate_up.dtype)


def gated_reference(gate_up, w, b=None):
    return reference(gated_product(gate_up, w.shape[1]), w, b)


I_GATED = 200  # not a multiple of any block_k: a ragged last tile; "split" makes 3 slices (96, 96, 8)


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_matches_reference(dtype, m, bias, config, device):
    n = 70
    gate_up = rand(m, 2 * I_GATED, dtype=dtype, device=device)
    w = rand(n, I_GATED, dtype=dtype, device=device)
    b = rand(n, dtype=dtype, device=device) if bias else None
    y = skinny_silu_linear(gate_up, w, b, config=CONFIGS[config])
    assert y.shape == (m, n) and y.dtype == dtype and y.is_contiguous()
    assert rel_err(y, gated_reference(gate_up, w, b)) < TOL[dtype]


def test_gated_uses_gate_and_up_halves_as_such(device):
    # swapped halves, or either half alone, are far off: the test above can tell them apart
    gate_up = rand(4, 2 * 64, dtype=torch.float32, device=device)
    w = rand(24, 64, dtype=torch.float32, device=device)
    y = skinny_silu_linear(gate_up, w).double()
    ref = gated_reference(gate_up, w)
    assert rel_err(y, ref) < TOL[torch.float32]
    gate, up = gate_up[:, :64], gate_up[:, 64:]
    for wrong in (gated_reference(torch.cat([up, gate], 1), w), reference(gate, w), reference(up, w),
                  reference(torch.nn.functional.silu(gate), w)):
        assert rel_err(y, wrong) > 0.1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gated_rounds_the_product_once_to_the_dtype(dtype, device):
    """silu(gate) * up is rounded to the dtype before the dot, as the elementwise kernel it replaces
    stores it: with W summing pairs of columns (exact in fp32), y is the rounded pairs' sum
    rounded, which the unrounded product's sum is not."""
    if dtype == torch.bfloat16 and device.type != "cuda":
        pytest.skip("the Triton interpreter truncates fp32 -> bf16 casts (triton 3.9): GPU only")
    i, m = 64, 16
    gate_up = rand(m, 2 * i, dtype=dtype, device=device)
    w = torch.eye(i, device=device) + torch.eye(i, device=device).roll(1, dims=1)
    y = skinny_silu_linear(gate_up, w.to(dtype))
    h = gated_product(gate_up, i).double()
    once = (h @ w.double().t()).to(dtype)
    gate, up = gate_up[:, :i].double(), gate_up[:, i:].double()
    unrounded = ((gate * torch.sigmoid(gate) * up) @ w.double().t()).to(dtype)
    assert (unrounded != once).sum() > 0.05 * once.numel()      # the two differ ...
    # ... and y is the rounded one, up to an fp32 silu landing on the other side of a rounding
    # boundary now and then (none in 1024 here on CPU)
    assert (y != once).sum() <= 0.005 * once.numel()


@pytest.mark.parametrize("sum_here", [True, False], ids=["summed-in-kernel", "sum-kernel"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_gated_split_k(sum_here, bias, monkeypatch, device):
    """Split K over I (3 slices, the last one ragged): each slice gates its own columns; the
    slices are summed by the last program to finish or by the separate sum kernel, the same bits."""
    from sharedecode.kernels import paged_attention as pa

    cfg = CONFIGS["split"]
    assert sm._split_plan(I_GATED, cfg) == (96, 3)
    gate_up = rand(5, 2 * I_GATED, dtype=torch.float32, device=device)
    w = rand(70, I_GATED, dtype=torch.float32, device=device)
    b = rand(70, dtype=torch.float32, device=device) if bias else None
    monkeypatch.setattr(sm, "SUM_SPLITS_IN_KERNEL", sum_here)
    y = skinny_silu_linear(gate_up, w, b, config=cfg)
    assert rel_err(y, gated_reference(gate_up, w, b)) < TOL[torch.float32]
    assert all(int(c.count_nonzero()) == 0 for c in pa._arrivals.values())
    monkeypatch.setattr(sm, "SUM_SPLITS_IN_KERNEL", not sum_here)
    assert torch.equal(y, skinny_silu_linear(gate_up, w, b, config=cfg))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", ["heuristic", "split"])
def test_gated_strided_gate_up(dtype, config, device):
    m, n, i = 5, 40, 136
    base = rand(2 * m, 2 * i + 24, dtype=dtype, device=device)
    w = rand(n, i, dtype=dtype, device=device)
    b = rand(n, dtype=dtype, device=device)
    nan_after = base.clone()
    nan_after[:, 2 * i:] = float("nan")  # the ragged last tile's loads must stop at 2I (0 * NaN)
    cases = {
        "every other row": base[::2, :2 * i],
        "column window": base[:m, 7:7 + 2 * i],
        "transposed": rand(2 * i, m, dtype=dtype, device=device).t(),   # stride along I != 1
        "fused output rows": rand(m, 3 * i, dtype=dtype, device=device)[:, i:],  # row stride 3I
        "NaN past the end": nan_after[:m, :2 * i],
    }
    for name, gate_up in cases.items():
        assert not gate_up.is_contiguous()
        y = skinny_silu_linear(gate_up, w, b, config=CONFIGS[config])
        assert rel_err(y, gated_reference(gate_up, w, b)) < TOL[dtype], name


def test_gated_pdl_path_matches_reference(pdl_path, device):
    for i in (200, 16):  # ragged tiles; a single tile (the peeled first iteration only)
        gate_up = rand(3, 2 * i, dtype=torch.float32, device=device)
        w = rand(48, i, dtype=torch.float32, device=device)
        b = rand(48, dtype=torch.float32, device=device)
        for config in CONFIGS.values():
            y = skinny_silu_linear(gate_up, w, b, config=config)
            assert rel_err(y, gated_reference(gate_up, w, b)) < TOL[torch.float32], (i, config)


def test_gated_torch_reference(device):
    for dtype in DTYPES:
        gate_up = rand(3, 2 * 70, dtype=dtype, device=device)
        w = rand(20, 70, dtype=dtype, device=device)
        b = rand(20, dtype=dtype, device=device)
        y = skinny_silu_linear_torch(gate_up, w, b)
        assert y.dtype == dtype and rel_err(y, gated_reference(gate_up, w, b)) < TOL[dtype]


def test_gated_validation(device):
    gate_up = rand(2, 64, dtype=torch.float32, device=device)
    w = rand(16, 32, dtype=torch.float32, device=device)
    b = rand(16, dtype=torch.float32, device=device)
    for fn in (skinny_silu_linear, skinny_silu_linear_torch):
        with pytest.raises(TypeError, match="gate_up must be a tensor"):
            fn(gate_up.tolist(), w)
        with pytest.raises(TypeError, match="weight must be a tensor"):
            fn(gate_up, None)
        with pytest.raises(TypeError, match="bias must be a tensor"):
            fn(gate_up, w, 1.0)
        with pytest.raises(ValueError, match=r"gate_up must be \[M, 2I\] with"):
            fn(gate_up[0], w)                                    # 1-D
        with pytest.raises(ValueError, match=r"gate_up must be \[M, 2I\] with"):
            fn(rand(MAX_ROWS + 1, 64, dtype=torch.float32, device=device), w)
        with pytest.raises(ValueError, match=r"gate_up must be \[M, 2I\] with"):
            fn(gate_up[:0], w)                                   # no rows
        with pytest.raises(ValueError, match="weight must be"):
            fn(gate_up, w[0])
        with pytest.raises(ValueError, match=r"gate_up must be \[M, 2I\] \(gate \| up\)"):
            fn(gate_up[:, :63], w[:, :31])                       # odd width
        with pytest.raises(ValueError, match=r"gate_up must be \[M, 2I\] \(gate \| up\)"):
            fn(gate_up, w[:, :31])                               # 2 * 31 != 64
        with pytest.raises(ValueError, match=r"gate_up must be \[M, 2I\] \(gate \| up\)"):
            fn(gate_up[:, :32], w)                               # ungated width: K == I
        with pytest.raises(ValueError, match="I and N must be positive"):
            fn(gate_up[:, :0], w[:, :0])
        with pytest.raises(TypeError, match="dtypes differ: gate_up"):
            fn(gate_up, w.half())
        with pytest.raises(TypeError, match="dtypes differ: gate_up"):
            fn(gate_up, w, b.double())
        with pytest.raises(TypeError, match="gate_up dtype .* not supported"):
            fn(gate_up.double(), w.double())
        with pytest.raises(ValueError, match="bias must be"):
            fn(gate_up, w, b[:15])
        with pytest.raises(ValueError, match="weight is on meta, gate_up on"):
            fn(gate_up, w.to("meta"))
    with pytest.raises(ValueError, match="contiguous along K"):
        skinny_silu_linear(gate_up, rand(32, 16, dtype=torch.float32, device=device).t())
    with pytest.raises(TypeError, match="config must be"):
        skinny_silu_linear(gate_up, w, config={"block_n": 32})
    with pytest.raises(ValueError, match="config.split_k"):
        skinny_silu_linear(gate_up, w, config=SkinnyConfig(split_k=0))


def test_gated_custom_op(device):
    """opcheck (schema, fake, autograd registration), and one opaque call in a fullgraph compile."""
    torch._dynamo.reset()
    gate_up = rand(3, 2 * 64, dtype=torch.float32, device=device)
    w = rand(48, 64, dtype=torch.float32, device=device)
    b = rand(48, dtype=torch.float32, device=device)
    op = torch.ops.sharedecode.skinny_silu_linear.default
    torch.library.opcheck(op, (gate_up, w, b))
    torch.library.opcheck(op, (gate_up, w, None))
    traced = []

    def recording(graph_module, example_inputs):
        traced.append(graph_module.code)
        return aot_eager(graph_module, example_inputs)

    def mlp_tail(gate_up, w, b):
        return torch.ops.sharedecode.skinny_silu_linear(gate_up * 2.0, w, b) + 1.0

    y = torch.compile(mlp_tail, fullgraph=True, backend=recording)(gate_up, w, b)
    assert rel_err(y, gated_reference(gate_up * 2.0, w, b) + 1.0) < TOL[torch.float32]
    assert len(traced) == 1 and traced[0].count("sharedecode.skinny_silu_linear") == 1
