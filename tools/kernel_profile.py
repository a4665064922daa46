"""Which kernels one call of an op launches, and how its time splits between them and the host:
per case, the call's median time (CUDA events over back-to-back calls) next to the GPU time of
each kernel it launched (torch.profiler), so a gap between the two is host time the GPU waits on.

    python tools/kernel_profile.py [case ...]     (no case: all; --list names them)
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

import crosslmm_ops

N, HEADS, HEAD_DIM, DIM = 729, 12, 128, 1152


def _randn(*shape, grad=False):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_(grad)


def per_frame(hk, frames=256, lq=9):
    q, k, v = (
        _randn(frames * lq, HEADS, HEAD_DIM),
        _randn(frames * N, hk, HEAD_DIM),
        _randn(frames * N, hk, HEAD_DIM),
    )
    cu_q = torch.arange(frames + 1, device="cuda", dtype=torch.int32) * lq
    cu_k = torch.arange(frames + 1, device="cuda", dtype=torch.int32) * N
    return lambda: crosslmm_ops.cross_attention(
        q,
        k,
        v,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=lq,
        max_seqlen_k=N,
        backend="cuda",
    )


def v2v(frames, hk, backward=False):
    q = _randn(1, frames * 9, HEADS, HEAD_DIM, grad=backward)
    k = _randn(1, frames * N, hk, HEAD_DIM, grad=backward)
    v = _randn(1, frames * N, hk, HEAD_DIM, grad=backward)
    if not backward:
        return lambda: crosslmm_ops.cross_attention(q, k, v, backend="cuda")
    dout = torch.randn_like(q)

    def step():
        out = crosslmm_ops.cross_attention(q, k, v, backend="cuda")
        torch.autograd.grad(out, (q, k, v), dout)

    return step


def pool(frames=256, **kw):
    x = _randn(1, frames, N, DIM)
    return lambda: crosslmm_ops.token_pool(x, 27, backend="cuda", **kw)


CASES = {
    "per-frame-hk2": lambda: per_frame(2),
    "per-frame-hk12": lambda: per_frame(12),
    "v2v-t32": lambda: v2v(32, 2),
    "v2v-t64": lambda: v2v(64, 2),
    "fwdbwd-t64-hk2": lambda: v2v(64, 2, backward=True),
    "pool-mean1": lambda: pool(mode="adaptive", output_size=1),
    "pool-max3": lambda: pool(mode="max", kernel_size=3),
    "pool-avg3": lambda: pool(mode="avg", kernel_size=3),
}


def profile_case(name: str) -> None:
    fn = CASES[name]()
    with torch.no_grad() if "fwdbwd" not in name else torch.enable_grad():
        fn()
        call_ms = float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
        torch.cuda.synchronize()
        reps = 20
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
    kernels = defaultdict(lambda: [0, 0.0])
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            kernels[evt.name][0] += 1
            kernels[evt.name][1] += getattr(evt, "device_time_total", None) or evt.cuda_time_total
    gpu_us = sum(t for _, t in kernels.values()) / reps
    print(f"\n== {name}: call {call_ms * 1e3:.1f} us, kernels {gpu_us:.1f} us per call")
    for kname, (count, total) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
        print(f"  {total / reps:9.1f} us  x{count / reps:4.1f}  {kname[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="*")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        print("\n".join(CASES))
        return
    for name in args.cases or CASES:
        profile_case(name)


if __name__ == "__main__":
    main()
