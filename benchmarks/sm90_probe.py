"""Quick probe of the Hopper (sm_90a) attention forward against the mma.sync kernel and SDPA.

    python benchmarks/sm90_probe.py [--frames 128 256] [--json benchmarks/results/sm90_probe.json]

CrossLMM-2B's V2V global cross-attention: Lq = 9 T pooled queries against Lk = 729 T
keys, 12 query heads of 128, bf16, non-causal, one segment. Ours run through
``crosslmm_ops._C.attention_forward`` with ``CROSSLMM_ATTENTION_SM90=1`` (sm90) and ``=0``
(mma.sync), on GQA 12/2 (the model's kv heads) and on 12/12 (the same work as SDPA, which gets 12
kv heads); SDPA runs its cuDNN and flash back ends on (1, 12, L, 128) views. Also sweeps the sm90
kernel's key splits, so the split heuristic can be checked. FLOPs = 4 Lq Lk H d; medians of
triton.testing.do_bench (CUDA events if Triton is missing). Prints TFLOP/s and the ratio to cuDNN
(target: >= 1.1x, i.e. >= 600 TFLOP/s on an H100).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys

import torch
import torch.nn.functional as F

ENV = "CROSSLMM_ATTENTION_SM90"
HEADS, HEAD_DIM = 12, 128


def bench_ms(fn) -> float:
    try:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=50, rep=300))
    except Exception:  # no Triton: CUDA events, median of 50
        for _ in range(10):
            fn()
        times = []
        for _ in range(50):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]


def ours(ext, q, k, v, mode: str, num_splits: int = 0):
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], device="cuda", dtype=torch.float32)
    cu_q = torch.tensor([0, q.shape[0]], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, k.shape[0]], device="cuda", dtype=torch.int32)
    scale = q.shape[-1] ** -0.5

    def run():
        os.environ[ENV] = mode
        ext.attention_forward(q, k, v, out, lse, cu_q, cu_k, q.shape[0], k.shape[0], scale,
                              num_splits)

    run()
    torch.cuda.synchronize()
    return run, out, ext.attention_forward_kernel_name()


def sdpa(backend, q, k, v):
    from torch.nn.attention import sdpa_kernel

    qt, kt, vt = (t.unsqueeze(0).transpose(1, 2) for t in (q, k, v))  # (1, H, L, D) views

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt)

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--splits", type=int, nargs="*", default=[1, 2, 3, 4, 6, 8, 11, 16],
                        help="explicit key splits to time for the sm90 kernel (0 = heuristic "
                             "is always timed)")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("sm90_probe: no CUDA GPU")
        return 1
    from crosslmm_ops import _backend

    ext = _backend.extension()
    if ext is None or not hasattr(ext, "attention_forward_kernel_name"):
        print("sm90_probe: crosslmm_ops._C is not built, or built without the sm90 forward")
        return 1
    name = torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}, extension archs {ext.cuda_archs()}")
    from torch.nn.attention import SDPBackend

    results = []
    for frames in args.frames:
        lq, lk = 9 * frames, 729 * frames
        flops = 4 * lq * lk * HEADS * HEAD_DIM
        torch.manual_seed(0)
        q = torch.randn(lq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k12 = torch.randn(lk, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v12 = torch.randn(lk, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k2, v2 = k12[:, :2].contiguous(), v12[:, :2].contiguous()
        print(f"\nV2V global T={frames}: Lq {lq}, Lk {lk}, {flops / 1e12:.2f} TFLOP")
        rows = []

        def record(label, fn, kernel="", quiet=False):
            try:
                ms = bench_ms(fn)
            except RuntimeError as exc:
                print(f"  {label:28s} failed: {str(exc)[:120]}")
                rows.append(dict(frames=frames, impl=label, ms=math.nan, tflops=math.nan,
                                 error=str(exc)[:300]))
                return math.nan
            tflops = flops / ms / 1e9
            rows.append(dict(frames=frames, impl=label, ms=ms, tflops=tflops, kernel=kernel))
            if not quiet:
                print(f"  {label:28s} {ms:8.3f} ms  {tflops:6.1f} TFLOP/s  {kernel}")
            return tflops

        check = {}
        for kv, (k, v) in (("12/2", (k2, v2)), ("12/12", (k12, v12))):
            fn, out, kernel = ours(ext, q, k, v, "1")
            check[kv] = out.clone()
            record(f"sm90 GQA {kv}", fn, kernel)
            fn, out, kernel = ours(ext, q, k, v, "0")
            record(f"mma.sync GQA {kv}", fn, kernel)
            diff = (check[kv].float() - out.float()).abs().max().item()
            print(f"    sm90 vs mma.sync max |diff| {diff:.3e}")
        cudnn = record("SDPA cuDNN (12 kv heads)", sdpa(SDPBackend.CUDNN_ATTENTION, q, k12, v12))
        record("SDPA flash (12 kv heads)", sdpa(SDPBackend.FLASH_ATTENTION, q, k12, v12))
        ref = sdpa(SDPBackend.CUDNN_ATTENTION, q, k12, v12)().squeeze(0).transpose(0, 1)
        print(f"    sm90 (12/12) vs SDPA cuDNN max |diff| "
              f"{(check['12/12'].float() - ref.float()).abs().max().item():.3e}")
        best = 0.0
        sweep = []
        for splits in args.splits:
            fn, _, kernel = ours(ext, q, k2, v2, "1", splits)
            tflops = record(f"sm90 GQA 12/2 num_splits={splits}", fn, kernel, quiet=True)
            best = max(best, tflops)
            sweep.append(f"{splits}:{tflops:.0f}")
        print(f"  sm90 GQA 12/2 TFLOP/s by num_splits: {' '.join(sweep)}")
        sm90 = next(r["tflops"] for r in rows if r["impl"] == "sm90 GQA 12/12")
        if cudnn == cudnn and cudnn > 0:
            print(f"  sm90 (12/12, heuristic splits) / cuDNN = {sm90 / cudnn:.2f}x "
                  f"(target >= 1.1x); best explicit split on 12/2: {best:.1f} TFLOP/s")
        results.extend(rows)

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        with open(args.json, "w") as fh:
            json.dump(dict(gpu=name, torch=torch.__version__, triton=triton_version,
                           python=platform.python_version(), results=results), fh, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
