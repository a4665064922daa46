"""The projection-fused attention core's two CUDA kernels side by side: ``mma_sync`` and the Hopper
``sm90_cluster`` (csrc/projected/), called through ``crosslmm_ops._C`` directly.

    python benchmarks/projected_core_kernels.py [--frames 64 256] [--splits 0 1 2]
        [--json benchmarks/results/projected_core_kernels.json]

Frame-local V2V of CrossLMM-2B: per frame, 9 pooled queries x 12 heads = 108 rows against that
frame's 729 SigLIP tokens, Dv = 1152, bf16, one segment per frame, T frames in one call. FLOPs
4 * rows * keys * Dv per frame (S = q x^T and P x); medians of triton.testing.do_bench (CUDA
events). Every timed call asserts which kernel ran
(``projected_attention_core_forward_kernel_name``): sm90_cluster needs an sm_90 GPU and an
extension built with 90a. Target (issue #19): sm90_cluster >= 450 TFLOP/s at T = 256. Also prints
the max difference between the kernels' outputs (a sanity check, not the test:
tests/test_projected_cuda_kernel.py).
"""

from __future__ import annotations

import argparse
import json

import torch
from conftest import do_bench_ms

from crosslmm_ops import _backend

HQ, DV, TOKENS, POOLED = 12, 1152, 729, 9
SCALE = 128**-0.5
KERNELS = ("mma_sync", "sm90_cluster")


def frame_local_inputs(frames: int, dtype: torch.dtype):
    q = torch.randn(frames * POOLED, HQ, DV, device="cuda", dtype=dtype)
    x = torch.randn(frames * TOKENS, DV, device="cuda", dtype=dtype)
    cu_q = torch.arange(0, frames + 1, device="cuda", dtype=torch.int32) * POOLED
    cu_k = torch.arange(0, frames + 1, device="cuda", dtype=torch.int32) * TOKENS
    return q, x, cu_q, cu_k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--splits", type=int, nargs="+", default=[0])
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    ext = _backend.extension()
    assert ext is not None and hasattr(ext, "projected_attention_core_forward_kernel_name"), (
        "needs crosslmm_ops._C built with the projected core's kernel argument"
    )
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    sm90 = "90a" in ext.cuda_archs().split(",") and torch.cuda.get_device_capability() == (9, 0)
    kernels = KERNELS if sm90 else KERNELS[:1]
    if not sm90:
        print("sm90_cluster skipped: needs an sm_90 GPU and an extension built with 90a")
    print(f"device {torch.cuda.get_device_name()}, {args.dtype}, Dv {DV}, {HQ} heads x {POOLED}")
    rows = []
    for frames in args.frames:
        q, x, cu_q, cu_k = frame_local_inputs(frames, dtype)
        flops = 4.0 * frames * POOLED * HQ * TOKENS * DV
        outs = {}
        for kernel in kernels:
            for splits in args.splits:

                def call(kernel=kernel, splits=splits):
                    return ext.projected_attention_core_forward(
                        q, x, cu_q, cu_k, POOLED, TOKENS, SCALE, splits, kernel
                    )

                outs[kernel] = call()[0]
                ran = ext.projected_attention_core_forward_kernel_name()
                assert ran == kernel, f"asked for {kernel}, {ran} ran"
                ms = do_bench_ms(call)
                tflops = flops / ms / 1e9
                row = dict(frames=frames, kernel=kernel, splits=splits, ms=ms, tflops=tflops)
                rows.append(row)
                print(
                    f"T={frames:4d}  {kernel:13s} splits {splits:3d}  {ms:8.4f} ms  "
                    f"{tflops:7.1f} TFLOP/s"
                )
        if len(outs) == 2:
            diff = (outs["mma_sync"].float() - outs["sm90_cluster"].float()).abs().max().item()
            print(f"T={frames:4d}  max |mma_sync - sm90_cluster| = {diff:.3e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
