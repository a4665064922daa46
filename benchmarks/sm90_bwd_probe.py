"""Quick probe of the Hopper (sm_90a) attention backward against the mma.sync backward and SDPA.

    python benchmarks/sm90_bwd_probe.py [--frames 64 256]
        [--json benchmarks/results/sm90_bwd_probe.json]

CrossLMM-2B's V2V global cross-attention: Lq = 9 T pooled queries against Lk = 729 T
keys, 12 query heads of 128, bf16, non-causal, one segment. Ours through ``crosslmm_ops._C``
(``attention_forward`` + ``attention_backward``, no autograd overhead) with
``CROSSLMM_ATTENTION_BWD_SM90`` = ``1`` (sm90 dK/dV + sm90 dQ), ``dkdv`` (sm90 dK/dV + mma.sync dQ)
and ``0`` (mma.sync), on GQA 12/2 (the model's kv heads; the 12/12 row does the same FLOPs with
6x the K/V traffic, as SDPA gets 12 kv heads). SDPA cuDNN and flash through autograd on
(1, 12, L, 128) views: backward only = ``torch.autograd.grad`` of a retained graph. FLOPs: forward
4 Lq Lk H d, backward 2.5x that. Medians of triton.testing.do_bench (CUDA events without Triton).
Also prints the max difference between the sm90 and mma.sync gradients (a sanity check, not the
test: tests/test_attention_bwd_sm90.py). Target: fwd+bwd >= SDPA cuDNN.
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

ENV = "CROSSLMM_ATTENTION_BWD_SM90"
HEADS, HEAD_DIM = 12, 128


def bench_ms(fn) -> float:
    try:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=20, rep=120))
    except ImportError:  # no Triton: CUDA events, median of 20
        for _ in range(3):
            fn()
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]


class Ours:
    """Raw extension calls on one segment; out / lse from one forward, reused by backward()."""

    def __init__(self, ext, q, k, v, dout):
        self.ext, self.q, self.k, self.v, self.dout = ext, q, k, v, dout
        self.cu_q = torch.tensor([0, q.shape[0]], device="cuda", dtype=torch.int32)
        self.cu_k = torch.tensor([0, k.shape[0]], device="cuda", dtype=torch.int32)
        self.scale = q.shape[-1] ** -0.5
        self.out = torch.empty_like(q)
        self.lse = torch.empty(q.shape[1], q.shape[0], device="cuda", dtype=torch.float32)
        self.dq, self.dk, self.dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self.forward()

    def forward(self):
        self.ext.attention_forward(self.q, self.k, self.v, self.out, self.lse, self.cu_q, self.cu_k,
                                   self.q.shape[0], self.k.shape[0], self.scale, 0)

    def backward(self):
        self.ext.attention_backward(self.dout, self.q, self.k, self.v, self.out, self.lse, self.dq,
                                    self.dk, self.dv, self.cu_q, self.cu_k, self.q.shape[0],
                                    self.k.shape[0], self.scale, True)

    def both(self):
        self.forward()
        self.backward()


def kernel_breakdown(fn, reps: int = 3) -> str:
    """Per-kernel GPU time of ``fn`` (mean over ``reps`` calls) from torch.profiler, e.g. to split
    the backward into Delta / dK-dV / dQ / dQ-sum; '' when the profiler is unavailable."""
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        parts = []
        for evt in prof.key_averages():
            us = getattr(evt, "device_time_total", None)
            if us is None:
                us = getattr(evt, "cuda_time_total", 0.0)
            if us > 0:
                name = evt.key.split("<")[0].split("(")[0].replace("void ", "")
                name = name.replace("crosslmm::attention::", "")
                parts.append((us / reps / 1e3, name))
        return ", ".join(f"{name} {ms:.3f} ms" for ms, name in sorted(parts, reverse=True))
    except Exception as exc:  # a diagnostic only: never fail the probe on it
        return f"(profiler failed: {str(exc)[:80]})"


def sdpa_fns(backend, q, k, v, dout):
    """(backward-only fn, fwd+bwd fn) for an SDPA back end, or raises RuntimeError."""
    from torch.nn.attention import sdpa_kernel

    qt, kt, vt = (t.unsqueeze(0).transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    dot = dout.unsqueeze(0).transpose(1, 2)
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(qt, kt, vt)

    def bwd():
        torch.autograd.grad(out, (qt, kt, vt), dot, retain_graph=True)

    def both():
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(qt, kt, vt)
        torch.autograd.grad(o, (qt, kt, vt), dot)

    bwd()  # raises here when the back end cannot run these shapes
    torch.cuda.synchronize()
    return bwd, both


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("sm90_bwd_probe: no CUDA GPU")
        return 1
    from crosslmm_ops import _backend

    ext = _backend.extension()
    if ext is None or not hasattr(ext, "attention_backward_kernel_name"):
        print("sm90_bwd_probe: crosslmm_ops._C is not built, or built without the sm90 backward")
        return 1
    name = torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}, extension archs {ext.cuda_archs()}")
    from torch.nn.attention import SDPBackend

    results = []
    for frames in args.frames:
        lq, lk = 9 * frames, 729 * frames
        fwd_flops = 4 * lq * lk * HEADS * HEAD_DIM
        bwd_flops = 2.5 * fwd_flops
        torch.manual_seed(0)
        q = torch.randn(lq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k12 = torch.randn(lk, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v12 = torch.randn(lk, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        dout = torch.randn(lq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k2, v2 = k12[:, :2].contiguous(), v12[:, :2].contiguous()
        print(f"\nV2V global T={frames}: Lq {lq}, Lk {lk}; backward {bwd_flops / 1e12:.2f} TFLOP, "
              f"fwd+bwd {(fwd_flops + bwd_flops) / 1e12:.2f} TFLOP")
        rows = []

        def record(label, what, fn, flops, kernel=""):
            try:
                ms = bench_ms(fn)
            except RuntimeError as exc:
                print(f"  {what:8s} {label:34s} failed: {str(exc)[:120]}")
                rows.append(dict(frames=frames, what=what, impl=label, ms=math.nan,
                                 tflops=math.nan, error=str(exc)[:300]))
                return math.nan
            tflops = flops / (ms * 1e-3) / 1e12
            print(f"  {what:8s} {label:34s} {ms:8.3f} ms  {tflops:6.1f} TFLOP/s  {kernel}")
            rows.append(dict(frames=frames, what=what, impl=label, ms=ms, tflops=tflops,
                             kernel=kernel))
            return ms

        ours_gqa = Ours(ext, q, k2, v2, dout)
        ours_mha = Ours(ext, q, k12, v12, dout)
        grads = {}
        for mode, label in (("1", "ours sm90 (GQA 12/2)"), ("dkdv", "ours sm90 dK/dV + mma dQ"),
                            ("0", "ours mma.sync (GQA 12/2)")):
            os.environ[ENV] = mode
            ours_gqa.backward()
            torch.cuda.synchronize()
            kernel = ext.attention_backward_kernel_name()
            grads[mode] = tuple(t.clone() for t in (ours_gqa.dq, ours_gqa.dk, ours_gqa.dv))
            record(label, "bwd", ours_gqa.backward, bwd_flops, kernel)
            record(label, "fwd+bwd", ours_gqa.both, fwd_flops + bwd_flops, kernel)
            print(f"      kernels: {kernel_breakdown(ours_gqa.backward)}")
        os.environ[ENV] = "1"
        ours_mha.backward()
        torch.cuda.synchronize()
        kernel = ext.attention_backward_kernel_name()
        record("ours sm90 (MHA 12/12)", "bwd", ours_mha.backward, bwd_flops, kernel)
        record("ours sm90 (MHA 12/12)", "fwd+bwd", ours_mha.both, fwd_flops + bwd_flops, kernel)
        for mode in ("1", "dkdv"):
            diffs = ", ".join(
                f"{n} {(a.double() - b.double()).abs().max().item():.2e}"
                for n, a, b in zip(("dq", "dk", "dv"), grads[mode], grads["0"]))
            print(f"  max |{mode} - mma.sync|: {diffs}")
        del ours_mha

        for backend, label in ((SDPBackend.CUDNN_ATTENTION, "SDPA cuDNN (12 kv heads)"),
                               (SDPBackend.FLASH_ATTENTION, "SDPA flash (12 kv heads)")):
            try:
                bwd, both = sdpa_fns(backend, q, k12, v12, dout)
            except RuntimeError as exc:
                print(f"  {label:43s} failed: {str(exc)[:120]}")
                continue
            record(label, "bwd", bwd, bwd_flops)
            record(label, "fwd+bwd", both, fwd_flops + bwd_flops)
            del bwd, both
            torch.cuda.empty_cache()

        def ms_of(what, impl):
            return next((r["ms"] for r in rows if r["what"] == what and r["impl"] == impl),
                        math.nan)

        for what in ("bwd", "fwd+bwd"):
            ref = ms_of(what, "SDPA cuDNN (12 kv heads)")
            mine = ms_of(what, "ours sm90 (GQA 12/2)")
            print(f"  {what}: sm90 / cuDNN speed ratio {ref / mine:.2f}x (target >= 1.0)")
        results.extend(rows)
        del q, k12, v12, k2, v2, dout, ours_gqa
        torch.cuda.empty_cache()

    os.environ.pop(ENV, None)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(gpu=name, torch=torch.__version__, python=platform.python_version(),
                           results=results), f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
