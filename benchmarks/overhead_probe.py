"""Where the time of a short cross-attention call goes (issue #3: T2V at T=32 measured 0.25 ms in
the benchmark, against 0.11 ms a session earlier, with either CUDA forward kernel).

For each small case it prints, in ms:
  op         the public ``cross_attention`` timed as the benchmark times it (do_bench medians);
  graph      the same call captured in a CUDA graph and replayed: GPU time without host overhead;
  raw        ``_C.attention_forward`` on preallocated outputs (no Python layer of ours);
  host       host time per call of the public op (no synchronisation, 200 calls back to back);
  kernels    the kernels the call launches with their GPU times (torch.profiler).

    python benchmarks/overhead_probe.py [attention|projected]

Also the projection-fused path (projected_cross_attention), and any host-device synchronisation a
call makes (torch.cuda.set_sync_debug_mode).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
import warnings
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import graph_ms  # noqa: E402

import crosslmm_ops  # noqa: E402
from crosslmm_ops import _backend, planner  # noqa: E402

HEADS, HEAD_DIM = 12, 128
CASES = {
    "t2v T=32": (128, 729 * 32),
    "v2v-global T=32": (288, 729 * 32),
    "decode T=32": (1, 729 * 32),
    "t2v T=256": (128, 729 * 256),
}


def bench(fn) -> float:
    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def host_ms(op, calls: int = 200) -> float:
    """Host time per call, calls issued back to back without synchronising."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        op()
    elapsed = (time.perf_counter() - t0) / calls * 1e3
    torch.cuda.synchronize()
    return elapsed


def report(name: str, op, extra: str = "") -> None:
    """One row (op, graph, host) for ``op``, then its slowest Python functions, any host-device
    synchronisation it makes (torch's sync debug mode), and the kernels it launches."""
    with torch.no_grad():
        op()
        t_op, t_graph, t_host = bench(op), graph_ms(op), host_ms(op)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(200):
            op()
        profiler.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(8)
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as syncs:
            warnings.simplefilter("always")
            op()
        torch.cuda.set_sync_debug_mode("default")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                op()
            torch.cuda.synchronize()
    print(f"{name:<24} {t_op:8.4f} {t_graph:8.4f} {t_host:8.4f}  {extra}")
    print("\n".join("    " + line for line in text.getvalue().splitlines()[6:18]))
    for w in syncs:
        print(f"    SYNC: {str(w.message)[:160]}")
    for evt in prof.key_averages():
        if evt.device_type == torch.autograd.DeviceType.CUDA or getattr(evt, "device_time", 0):
            us = getattr(evt, "device_time", None) or getattr(evt, "cuda_time", 0.0)
            print(f"    {evt.key[:90]:<90} x{evt.count:<3} {us:9.1f} us avg")


def attention_cases(ext) -> None:
    for name, (lq, lk) in CASES.items():
        q = torch.randn(1, lq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, lk, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q2, k2, v2 = (t.reshape(-1, HEADS, HEAD_DIM) for t in (q, k, v))
        out = torch.empty_like(q2)
        lse = torch.empty(HEADS, lq, device="cuda", dtype=torch.float32)
        cu_q = torch.tensor([0, lq], device="cuda", dtype=torch.int32)
        cu_k = torch.tensor([0, lk], device="cuda", dtype=torch.int32)

        scale = HEAD_DIM**-0.5
        # The kernel the public op takes for this call, decided by the planner as the op decides
        # it (the extension's own default is mma_sync): raw and op time the same kernel.
        kernel, _ = planner.attention_kernel(q2.device, HEAD_DIM, lq, scale)

        def raw():
            return ext.attention_forward(
                q2, k2, v2, out, lse, cu_q, cu_k, lq, lk, scale, 0, kernel=kernel
            )

        t_raw, t_raw_host = bench(raw), host_ms(raw)
        report(
            name,
            lambda: crosslmm_ops.cross_attention(q, k, v, backend="cuda"),
            f"{ext.attention_forward_kernel_name()}  (raw call {t_raw:.4f} ms, "
            f"host {t_raw_host:.4f} ms)",
        )
        # The peers in the same process, eager and as CUDA-graph replays (their GPU time), so the
        # short calls' ratios do not hinge on how busy the host is.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for peer, enum in (
            ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
            ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
        ):

            def run(enum=enum):
                with sdpa_kernel(enum):
                    return torch.nn.functional.scaled_dot_product_attention(
                        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                    )

            with torch.no_grad():
                run()
                print(f"  {peer:<22} {bench(run):8.4f} {graph_ms(run):8.4f} {host_ms(run):8.4f}")


def projected_cases() -> None:
    """projected_cross_attention on the fused path, CrossLMM-2B shapes (Dv 1152): frame-local V2V
    (9 queries per frame against its 729 tokens) and one decode query against T frames."""
    dv = 1152
    for name, (batch, lq, lk, hk) in {
        "proj v2v-frame T=32 Hk=12": (32, 9, 729, 12),
        "proj v2v-frame T=32 Hk=2": (32, 9, 729, 2),
        "proj decode T=32 Hk=12": (1, 1, 729 * 32, 12),
        "proj decode T=32 Hk=2": (1, 1, 729 * 32, 2),
    }.items():
        t = dict(
            q=torch.randn(batch, lq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16),
            x=torch.randn(batch, lk, dv, device="cuda", dtype=torch.bfloat16),
        )
        for w in ("w_k", "w_v"):
            t[w] = torch.randn(hk * HEAD_DIM, dv, device="cuda", dtype=torch.bfloat16) * dv**-0.5
        for b in ("b_k", "b_v"):
            t[b] = torch.randn(hk * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        report(
            name, lambda: crosslmm_ops.projected_cross_attention(**t, path="fused", backend="cuda")
        )


def main() -> None:
    ext = _backend.extension()
    torch.manual_seed(0)
    print(f"{'case':<24} {'op':>8} {'graph':>8} {'host':>8}  (ms)")
    only = sys.argv[1] if len(sys.argv) > 1 else "all"
    if only in ("all", "attention"):
        attention_cases(ext)
    if only in ("all", "projected"):
        projected_cases()


if __name__ == "__main__":
    main()
