"""Where the time of a short cross-attention call goes (issue #3: T2V at T=32 measured 0.25 ms in
the benchmark, against 0.11 ms a session earlier, with either CUDA forward kernel).

For each small case it prints, in ms:
  op         the public ``cross_attention`` timed as the benchmark times it (do_bench medians);
  graph      the same call captured in a CUDA graph and replayed: GPU time without host overhead;
  raw        ``_C.attention_forward`` on preallocated outputs (no Python layer of ours);
  host       host time per call of the public op (no synchronisation, 200 calls back to back);
  kernels    the kernels the call launches with their GPU times (torch.profiler).

    python benchmarks/overhead_probe.py
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch
from triton.testing import do_bench

import crosslmm_ops
from crosslmm_ops import _backend

HEADS, HEAD_DIM = 12, 128
CASES = {"t2v T=32": (128, 729 * 32), "v2v-global T=32": (288, 729 * 32),
         "decode T=32": (1, 729 * 32), "t2v T=256": (128, 729 * 256)}


def bench(fn) -> float:
    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def main() -> None:
    ext = _backend.extension()
    torch.manual_seed(0)
    print(f"{'case':<18} {'op':>8} {'graph':>8} {'raw':>8} {'host':>8}  kernel")
    for name, (lq, lk) in CASES.items():
        q = torch.randn(1, lq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, lk, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        op = lambda: crosslmm_ops.cross_attention(q, k, v, backend="cuda")  # noqa: E731
        with torch.no_grad():
            op()
            t_op = bench(op)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                op()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                op()
            t_graph = bench(graph.replay)
            q2, k2, v2 = (t.reshape(-1, HEADS, HEAD_DIM) for t in (q, k, v))
            out = torch.empty_like(q2)
            lse = torch.empty(HEADS, lq, device="cuda", dtype=torch.float32)
            cu_q = torch.tensor([0, lq], device="cuda", dtype=torch.int32)
            cu_k = torch.tensor([0, lk], device="cuda", dtype=torch.int32)
            raw = lambda: ext.attention_forward(q2, k2, v2, out, lse, cu_q, cu_k, lq, lk,  # noqa
                                                HEAD_DIM ** -0.5, 0)
            t_raw = bench(raw)
            kernel = ext.attention_forward_kernel_name()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                op()
            t_host = (time.perf_counter() - t0) / 200 * 1e3
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                raw()
            t_raw_host = (time.perf_counter() - t0) / 200 * 1e3
            torch.cuda.synchronize()
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(200):
                op()
            profiler.disable()
            torch.cuda.synchronize()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(8)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    op()
                torch.cuda.synchronize()
        print(f"{name:<18} {t_op:8.4f} {t_graph:8.4f} {t_raw:8.4f} {t_host:8.4f}  {kernel}"
              f"  (raw call host {t_raw_host:.4f} ms)")
        print("\n".join("    " + line for line in text.getvalue().splitlines()[6:18]))
        for evt in prof.key_averages():
            if evt.device_type == torch.autograd.DeviceType.CUDA or getattr(evt, "device_time", 0):
                us = getattr(evt, "device_time", None) or getattr(evt, "cuda_time", 0.0)
                print(f"    {evt.key[:90]:<90} x{evt.count:<3} {us:9.1f} us avg")


if __name__ == "__main__":
    main()
