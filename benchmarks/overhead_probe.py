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

``host`` mode runs on the CPU too (the torch back end there), so that the Python layer of the
short calls can be measured without a GPU: microseconds per call, back to back, of
projected_cross_attention on a decode step (path fused, materialized, auto), on frame-local V2V,
and of cross_attention on the same decode step, with the path, back end and kernel that ran;
``--profile`` adds each call's slowest functions (cProfile) and how its host time splits between
our Python and torch's operators. On the CPU the default shapes are tiny (16 tokens of width 64),
so the torch back end's arithmetic is small beside the host time it measures; on CUDA they are
CrossLMM-2B's (T frames of 729 tokens of width 1152). ``--stub`` replaces the back ends' attention
(the forward of cross_attention and of the projected core) by an allocation of its outputs: what
is left is the host time of our layers around the kernels (checks, planning, layouts, recording,
the projections' torch operators), which on the CPU the torch back end's own loops would hide.

    python benchmarks/overhead_probe.py host [--device cpu|cuda] [--frames 32] [--profile] [--stub]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

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
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def graph_ms(op) -> float:
    from conftest import graph_ms as replayed_ms

    return replayed_ms(op)


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_us(op, device: torch.device, calls: int, repeats: int = 5) -> float:
    """Microseconds per call of ``op`` issued back to back, the best of ``repeats`` runs of
    ``calls`` calls (on CUDA synchronised before and after each run: where the GPU work of a call
    is shorter than its host time, as on a decode step, this is the host time)."""
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            op()
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def _own_code(filename: str) -> bool:
    return "crosslmm_ops" in filename or "overhead_probe" in filename


def host_profile(op, calls: int) -> str:
    """The slowest functions of ``calls`` calls (own time), and how the time splits between
    Python functions (ours and the standard library's / torch's Python) and C functions (torch's
    operators, the extension)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        op()
    profiler.disable()
    stats = pstats.Stats(profiler)
    ours = python = builtin = 0.0
    for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():
        if filename == "~":
            builtin += tottime
        elif _own_code(filename):
            ours += tottime
        else:
            python += tottime
    total = ours + python + builtin
    text = io.StringIO()
    stats.stream = text
    stats.sort_stats("tottime").print_stats(14)
    lines = [line for line in text.getvalue().splitlines() if line.strip()][4:]
    head = (
        f"    under cProfile {total / calls * 1e6:.1f} us/call: our Python "
        f"{ours / calls * 1e6:.1f}, other Python {python / calls * 1e6:.1f}, C functions "
        f"(torch operators, extension) {builtin / calls * 1e6:.1f}"
    )
    return "\n".join([head] + ["    " + line for line in lines])


def stub_back_ends() -> None:
    """Replace the back ends' attention forward by an allocation of its outputs (``--stub``)."""
    from crosslmm_ops.ops import cross_attention as attention
    from crosslmm_ops.ops import projected_attention as projected

    def core(backend, q, x, cu_q, cu_k, max_q, max_k, scale, num_splits):
        lse = torch.empty(q.shape[0] * q.shape[2], q.shape[1], device=q.device)
        return torch.empty_like(q), lse

    def forward(backend, q, k, v, cu_q, cu_k, max_q, max_k, scale, num_splits):
        return torch.empty_like(q), torch.empty(q.shape[1], q.shape[0], device=q.device), "stub"

    projected._core_forward = core
    attention._forward = forward


def host_cases(args) -> None:
    """projected_cross_attention and cross_attention on short calls, host time per call."""
    if args.stub:
        stub_back_ends()
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    tokens = args.tokens if args.tokens else (729 if device.type == "cuda" else 16)
    width = args.width if args.width else (1152 if device.type == "cuda" else 64)
    hk, frames = args.kv_heads, args.frames
    if device.type == "cpu":
        torch.set_num_threads(1)  # the host path is single-threaded; keeps runs comparable

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device=device, dtype=dtype) * scale

    w = dict(
        w_k=randn(hk * HEAD_DIM, width, scale=width**-0.5),
        w_v=randn(hk * HEAD_DIM, width, scale=width**-0.5),
        b_k=randn(hk * HEAD_DIM),
        b_v=randn(hk * HEAD_DIM),
    )
    q_decode = randn(1, 1, HEADS, HEAD_DIM)
    x_decode = randn(1, frames * tokens, width)
    k_decode = randn(1, frames * tokens, hk, HEAD_DIM)
    v_decode = randn(1, frames * tokens, hk, HEAD_DIM)
    q_v2v = randn(frames, 9, HEADS, HEAD_DIM)
    x_v2v = randn(frames, tokens, width)
    projected = crosslmm_ops.projected_cross_attention
    cases = {
        "proj decode fused": lambda: projected(q_decode, x_decode, **w, path="fused"),
        "proj decode materialized": lambda: projected(q_decode, x_decode, **w, path="materialized"),
        "proj decode auto": lambda: projected(q_decode, x_decode, **w),
        "proj v2v-frame fused": lambda: projected(q_v2v, x_v2v, **w, path="fused"),
        "proj v2v-frame materialized": lambda: projected(q_v2v, x_v2v, **w, path="materialized"),
        "cross_attention decode": lambda: crosslmm_ops.cross_attention(
            q_decode, k_decode, v_decode
        ),
    }
    only = set(args.cases.split(",")) if args.cases else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"host time per call on {device} ({name}), "
        f"{args.dtype}, Hq {HEADS} x {HEAD_DIM}, Hk {hk}, {frames} frame(s) of {tokens} tokens "
        f"of width {width}; best of 5 runs of {args.calls} calls"
        + ("; attention stubbed (--stub)" if args.stub else "")
    )
    print(f"{'case':<30} {'us/call':>9}  ran")
    with torch.no_grad():
        for name, op in cases.items():
            if only is not None and not any(o in name for o in only):
                continue
            for _ in range(max(args.calls // 10, 5)):
                op()
            us = host_us(op, device, args.calls)
            op_name = "cross_attention" if name.startswith("cross") else "projected_cross_attention"
            rec = planner.last_record(op_name)
            core = planner.last_record("projected_attention_core")
            ran = f"{rec.backend}" + (f", {rec.path}" if rec.path else "")
            if rec.path == "fused" and core is not None:
                ran += f", core kernel {core.kernel}"
            elif rec.kernel:
                ran += f", kernel {rec.kernel}"
            print(f"{name:<30} {us:9.1f}  {ran}")
            if args.profile:
                print(host_profile(op, args.calls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "mode", nargs="?", default="all", choices=("all", "attention", "projected", "host")
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--frames", type=int, default=None, help="host: frames T (cuda 32, cpu 1)")
    parser.add_argument("--tokens", type=int, default=0, help="host: tokens per frame")
    parser.add_argument("--width", type=int, default=0, help="host: token width Dv")
    parser.add_argument("--kv-heads", type=int, default=2, help="host: Hk")
    parser.add_argument("--calls", type=int, default=2000, help="host: calls per timed run")
    parser.add_argument("--cases", default="", help="host: comma-separated name parts to run")
    parser.add_argument("--profile", action="store_true", help="host: cProfile each case")
    parser.add_argument(
        "--stub", action="store_true", help="host: the back ends' attention only allocates"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.mode == "host":
        if args.frames is None:
            args.frames = 32 if args.device.startswith("cuda") else 1
        host_cases(args)
        return
    ext = _backend.extension()
    print(f"{'case':<24} {'op':>8} {'graph':>8} {'host':>8}  (ms)")
    if args.mode in ("all", "attention"):
        attention_cases(ext)
    if args.mode in ("all", "projected"):
        projected_cases()


if __name__ == "__main__":
    main()
