"""What the Triton attention forward compiles to on sm_90a, without a GPU: the kernel compiled
for a Hopper target with the specialisation Triton gives it at run time on the peers benchmark's
shapes (16-byte-aligned pointers, strides divisible by 16, one m-block and one split as
constants), then its instruction mix (wgmma or mma.sync, cp.async or plain loads), shared memory
and, where ``ptxas`` is found, registers. The CUDA kernel it is compared with:
``nvcc -Xptxas -v`` (see csrc/attention/README.md).

Without those run-time hints Triton cannot vectorise the loads and compiles something else
(2-byte loads, no cp.async ring), so this is not the same as compiling the kernel bare.

    python tools/triton_kernel_summary.py [--block-m 64] [--block-n 64] [--warps 4] [--stages 3]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from crosslmm_ops.triton.cross_attention import _attn_fwd_kernel

# The kernel's arguments, in order, with the types the bf16 launcher passes.
SIGNATURE = {
    **{name: "*bf16" for name in ("Q", "K", "V", "Out")},
    "Lse": "*fp32",
    "cu_q": "*i32",
    "cu_k": "*i32",
    **{name: "i32" for name in ("sq_t", "sq_h", "sk_t", "sk_h", "sv_t", "sv_h")},
    **{name: "i32" for name in ("so_s", "so_t", "so_h", "sl_s", "sl_h")},
    # 1 on the per-frame rows: Triton makes an integer argument equal to 1 a constant.
    "num_m_blocks": "constexpr",
    "num_splits": "constexpr",
    "head_dim": "i32",
    "group": "i32",
    "scale_log2": "fp32",
    **{name: "constexpr" for name in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "PRECISION")},
}
# Divisible by 16 on the per-frame rows (12 query heads, 2 KV heads, head dim 128; a zero stride
# counts as divisible), as Triton finds them at run time.
DIVISIBLE_BY_16 = (
    "Q K V Out Lse cu_q cu_k sq_t sq_h sk_t sk_h sv_t sv_h so_s so_t so_h sl_s sl_h head_dim"
).split()
PATTERNS = (
    "wgmma.mma_async",
    "mma.sync",
    "cp.async.cg",
    "cp.async.bulk",
    "ld.global",
    "ldmatrix",
    "st.shared",
    "bar.sync",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-m", type=int, default=64)
    parser.add_argument("--block-n", type=int, default=64)
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=3)
    args = parser.parse_args()
    names = list(SIGNATURE)
    constants = dict(
        num_m_blocks=1,
        num_splits=1,
        BLOCK_M=args.block_m,
        BLOCK_N=args.block_n,
        BLOCK_D=128,
        PRECISION="tf32",
    )
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in DIVISIBLE_BY_16}
    source = ASTSource(fn=_attn_fwd_kernel, signature=SIGNATURE, constexprs=constants, attrs=attrs)
    kernel = triton.compile(
        source,
        target=GPUTarget("cuda", 90, 128),
        options=dict(num_warps=args.warps, num_stages=args.stages),
    )
    ptx = kernel.asm["ptx"]
    print(f"triton {triton.__version__}, sm_90a, {vars(args)}")
    print(f"shared memory: {kernel.metadata.shared} bytes")
    for pattern in PATTERNS:
        print(f"  {pattern:18s} {len(re.findall(re.escape(pattern), ptx))}")
    ptxas = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "ptxas")
    ptxas = ptxas if os.path.exists(ptxas) else shutil.which("ptxas")
    if ptxas is None:
        print("ptxas not found: no register count")
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        report = subprocess.run(
            [ptxas, "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True,
            text=True,
        )
    print("\n".join(line for line in report.stderr.splitlines() if "registers" in line))


if __name__ == "__main__":
    main()
