"""Compile the skinny GEMM kernel for the H100 (sm_90) without a GPU: plain and gated (silu(gate) *
up folded into the x load, see _load_x), bf16, with the configs choose_config gives the M1 down
projection (K = I = 8192, split K summed in the kernel) and o_proj (K = 2048, one slice), PDL off
and on, specialised as the JIT would for a contiguous batch of 8 (16-byte aligned pointers, ints %
16, stride 1 a constant). Prints the stages reached and the cubin's resources (triton's cuobjdump).

    python bench/compile_check_skinny.py
"""
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler import compile as tcompile

from sharedecode.kernels.skinny_matmul import _skinny_kernel, _split_plan, choose_config

POINTERS = {"X": "*bf16", "W": "*bf16", "BIAS": "*bf16", "Y": "*bf16", "P": "*fp32", "ARRIVALS": "*i32"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def check(gated: bool, N: int, K: int, pdl: bool, M: int = 8) -> None:
    cfg = choose_config(M, N, K, 132, gated=gated)
    k_per_split, splits = _split_plan(K, cfg)
    x_cols = 2 * K if gated else K
    ints = dict(M=M, N=N, K=K, k_per_split=k_per_split, k_iters=k_per_split // cfg.block_k,
                stride_xm=x_cols, stride_xk=1, stride_wn=K, stride_b=N, stride_ym=N)
    constexprs = dict(BLOCK_M=16, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PARTIAL=splits > 1,
                      HAS_BIAS=False, EVEN_K=splits * k_per_split == K, PREC=None, DOT_F32=False,
                      SUM_HERE=splits > 1, PDL=pdl, GATED=gated, FENCE=True)
    constexprs.update({k: 1 for k, v in ints.items() if v == 1 and k != "M"})  # M: do_not_specialize
    signature = {**POINTERS, **{k: "i32" for k in ints}, **{k: "constexpr" for k in constexprs}}
    aligned = [*POINTERS, *(k for k, v in ints.items() if v % 16 == 0 and k != "M")]
    attrs = {(_skinny_kernel.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned}
    src = ASTSource(fn=_skinny_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = tcompile(src, target=GPUTarget("cuda", 90, 32),
                      options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    stages = " -> ".join(s for s in ("ttir", "ttgir", "llir", "ptx", "cubin") if s in kernel.asm)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True,
                               text=True).stdout
    resources = " ".join(re.findall(r"(?:REG|STACK|SHARED|LOCAL):\d+", usage))
    async_copies = kernel.asm["ttgir"].count("async_copy_global_to_local")
    # silu's exps per thread and x tile: 16 x BLOCK_K / (32 x num_warps) in the load's layout (the
    # FENCE), num_warps times that in the dot operand's; PDL's peeled first tile has its own
    exps = kernel.asm["ptx"].count("ex2.approx")
    print(f"GATED={gated:d} PDL={pdl:d} N={N} K={K} {cfg}: {stages}; {resources}; "
          f"metadata.shared {kernel.metadata.shared} B; {async_copies} async copies in TTGIR; "
          f"{exps} ex2 in PTX")


if __name__ == "__main__":
    for gated in (False, True):
        for N, K in ((2048, 8192), (2048, 2048)):  # M1 down_proj (K = I), o_proj
            for pdl in (False, True):
                check(gated, N, K, pdl)
