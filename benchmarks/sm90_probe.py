"""Quick probe of the Hopper (sm_90a) attention kernels, forward or backward, against the mma.sync
kernels and SDPA.

    python benchmarks/sm90_probe.py [--frames 128 256] [--json benchmarks/results/sm90_probe.json]
    python benchmarks/sm90_probe.py --direction backward [--frames 64 256]
        [--json benchmarks/results/sm90_probe_backward.json]

CrossLMM-2B's V2V global cross-attention: Lq = 9 T pooled queries against Lk = 729 T keys, 12 query
heads of 128, bf16, non-causal, one segment. Ours run through ``crosslmm_ops._C`` directly (no
autograd overhead) on GQA 12/2 (the model's kv heads) and on 12/12 (the same work as SDPA, which
gets 12 kv heads: the same FLOPs with 6x the K/V traffic); SDPA runs its cuDNN and flash back ends
on (1, 12, L, 128) views. FLOPs: forward 4 Lq Lk H d, backward 2.5x that. Medians of
triton.testing.do_bench (CUDA events without Triton).

``--direction forward``: ``attention_forward`` with ``CROSSLMM_ATTENTION_SM90=1`` (sm90) and ``=0``
(mma.sync), and a sweep of the sm90 kernel's key splits, so the split heuristic can be checked.
Target: >= 1.1x cuDNN, i.e. >= 600 TFLOP/s on an H100.

``--direction backward``: ``attention_forward`` + ``attention_backward`` with
``CROSSLMM_ATTENTION_BWD_SM90`` = ``1`` (sm90 dK/dV + sm90 dQ), ``dkdv`` (sm90 dK/dV + mma.sync dQ)
and ``0`` (mma.sync), each with its per-kernel times; SDPA's backward alone is
``torch.autograd.grad`` of a retained graph. Also prints the max difference between the sm90 and
mma.sync gradients (a sanity check, not the test: tests/test_attention_bwd_sm90.py).
Target: fwd+bwd >= SDPA cuDNN.
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

FORWARD_ENV = "CROSSLMM_ATTENTION_SM90"
BACKWARD_ENV = "CROSSLMM_ATTENTION_BWD_SM90"
HEADS, HEAD_DIM = 12, 128
# Per direction: the default video lengths, the extension binding the probe needs, and the timing
# budget (do_bench's warm-up and repetition in ms; the number of timed calls without Triton).
DIRECTIONS = {
    "forward": dict(
        frames=[128, 256], binding="attention_forward_kernel_name", warmup=50, rep=300, calls=50
    ),
    "backward": dict(
        frames=[64, 256], binding="attention_backward_kernel_name", warmup=20, rep=120, calls=20
    ),
}


def bench_ms(fn, *, warmup: int, rep: int, calls: int) -> float:
    try:
        import triton.testing
    except ImportError:  # no Triton: CUDA events, the median of ``calls``
        for _ in range(max(calls // 5, 3)):
            fn()
        times = []
        for _ in range(calls):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep))


class Rows:
    """The timed rows of one video length, each printed as it is measured."""

    def __init__(self, frames: int, timing: dict):
        self.frames, self.timing, self.rows = frames, timing, []

    def time(
        self, what: str, label: str, fn, flops: float, kernel: str = "", quiet: bool = False
    ) -> dict:
        try:
            ms = bench_ms(fn, **self.timing)
        except RuntimeError as exc:
            print(f"  {what:8s} {label:34s} failed: {str(exc)[:120]}")
            row = dict(
                frames=self.frames,
                what=what,
                impl=label,
                ms=math.nan,
                tflops=math.nan,
                error=str(exc)[:300],
            )
        else:
            row = dict(
                frames=self.frames,
                what=what,
                impl=label,
                ms=ms,
                tflops=flops / ms / 1e9,
                kernel=kernel,
            )
            if not quiet:
                print(
                    f"  {what:8s} {label:34s} {ms:8.3f} ms  {row['tflops']:6.1f} TFLOP/s  {kernel}"
                )
        self.rows.append(row)
        return row

    def get(self, what: str, impl: str, key: str) -> float:
        return next(
            (r[key] for r in self.rows if r["what"] == what and r["impl"] == impl), math.nan
        )


def inputs(frames: int) -> dict:
    """q and 12 kv heads of K and V (and their 2-head GQA slices), and an output gradient."""
    lq, lk = 9 * frames, 729 * frames
    torch.manual_seed(0)
    t = {
        name: torch.randn(length, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        for name, length in (("q", lq), ("k12", lk), ("v12", lk), ("dout", lq))
    }
    t["k2"], t["v2"] = t["k12"][:, :2].contiguous(), t["v12"][:, :2].contiguous()
    return t


def _segment(q, k):
    """cu_seqlens of one segment each, and the softmax scale."""
    cu_q = torch.tensor([0, q.shape[0]], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, k.shape[0]], device="cuda", dtype=torch.int32)
    return cu_q, cu_k, q.shape[-1] ** -0.5


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


def ours_forward(ext, q, k, v, mode: str, num_splits: int = 0):
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], device="cuda", dtype=torch.float32)
    cu_q, cu_k, scale = _segment(q, k)

    def run():
        os.environ[FORWARD_ENV] = mode
        ext.attention_forward(
            q, k, v, out, lse, cu_q, cu_k, q.shape[0], k.shape[0], scale, num_splits
        )

    run()
    torch.cuda.synchronize()
    return run, out, ext.attention_forward_kernel_name()


def sdpa_forward(backend, q, k, v):
    from torch.nn.attention import sdpa_kernel

    qt, kt, vt = (t.unsqueeze(0).transpose(1, 2) for t in (q, k, v))  # (1, H, L, D) views

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt)

    return run


def probe_forward(ext, rows: Rows, t: dict, splits: list[int]) -> None:
    from torch.nn.attention import SDPBackend

    q, k12, v12, k2, v2 = t["q"], t["k12"], t["v12"], t["k2"], t["v2"]
    flops = 4 * q.shape[0] * k12.shape[0] * HEADS * HEAD_DIM
    print(
        f"\nV2V global T={rows.frames}: Lq {q.shape[0]}, Lk {k12.shape[0]}, "
        f"{flops / 1e12:.2f} TFLOP"
    )
    check = {}
    for kv, (k, v) in (("12/2", (k2, v2)), ("12/12", (k12, v12))):
        fn, out, kernel = ours_forward(ext, q, k, v, "1")
        check[kv] = out.clone()
        rows.time("fwd", f"sm90 GQA {kv}", fn, flops, kernel)
        fn, out, kernel = ours_forward(ext, q, k, v, "0")
        rows.time("fwd", f"mma.sync GQA {kv}", fn, flops, kernel)
        diff = (check[kv].float() - out.float()).abs().max().item()
        print(f"    sm90 vs mma.sync max |diff| {diff:.3e}")
    cudnn = rows.time(
        "fwd",
        "SDPA cuDNN (12 kv heads)",
        sdpa_forward(SDPBackend.CUDNN_ATTENTION, q, k12, v12),
        flops,
    )["tflops"]
    rows.time(
        "fwd",
        "SDPA flash (12 kv heads)",
        sdpa_forward(SDPBackend.FLASH_ATTENTION, q, k12, v12),
        flops,
    )
    ref = sdpa_forward(SDPBackend.CUDNN_ATTENTION, q, k12, v12)().squeeze(0).transpose(0, 1)
    print(
        f"    sm90 (12/12) vs SDPA cuDNN max |diff| "
        f"{(check['12/12'].float() - ref.float()).abs().max().item():.3e}"
    )
    best, sweep = 0.0, []
    for n in splits:
        fn, _, kernel = ours_forward(ext, q, k2, v2, "1", n)
        tflops = rows.time("fwd", f"sm90 GQA 12/2 num_splits={n}", fn, flops, kernel, quiet=True)[
            "tflops"
        ]
        best = max(best, tflops)
        sweep.append(f"{n}:{tflops:.0f}")
    print(f"  sm90 GQA 12/2 TFLOP/s by num_splits: {' '.join(sweep)}")
    sm90 = rows.get("fwd", "sm90 GQA 12/12", "tflops")
    if cudnn == cudnn and cudnn > 0:
        print(
            f"  sm90 (12/12, heuristic splits) / cuDNN = {sm90 / cudnn:.2f}x "
            f"(target >= 1.1x); best explicit split on 12/2: {best:.1f} TFLOP/s"
        )


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------


class OursBackward:
    """Raw extension calls on one segment; out / lse from one forward, reused by backward()."""

    def __init__(self, ext, q, k, v, dout):
        self.ext, self.q, self.k, self.v, self.dout = ext, q, k, v, dout
        self.cu_q, self.cu_k, self.scale = _segment(q, k)
        self.out = torch.empty_like(q)
        self.lse = torch.empty(q.shape[1], q.shape[0], device="cuda", dtype=torch.float32)
        self.dq, self.dk, self.dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self.forward()

    def forward(self):
        self.ext.attention_forward(
            self.q,
            self.k,
            self.v,
            self.out,
            self.lse,
            self.cu_q,
            self.cu_k,
            self.q.shape[0],
            self.k.shape[0],
            self.scale,
            0,
        )

    def backward(self):
        self.ext.attention_backward(
            self.dout,
            self.q,
            self.k,
            self.v,
            self.out,
            self.lse,
            self.dq,
            self.dk,
            self.dv,
            self.cu_q,
            self.cu_k,
            self.q.shape[0],
            self.k.shape[0],
            self.scale,
            True,
        )

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


def sdpa_backward(backend, q, k, v, dout):
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


def probe_backward(ext, rows: Rows, t: dict) -> None:
    from torch.nn.attention import SDPBackend

    q, k12, v12, k2, v2, dout = t["q"], t["k12"], t["v12"], t["k2"], t["v2"], t["dout"]
    fwd_flops = 4 * q.shape[0] * k12.shape[0] * HEADS * HEAD_DIM
    bwd_flops = 2.5 * fwd_flops
    print(
        f"\nV2V global T={rows.frames}: Lq {q.shape[0]}, Lk {k12.shape[0]}; backward "
        f"{bwd_flops / 1e12:.2f} TFLOP, fwd+bwd {(fwd_flops + bwd_flops) / 1e12:.2f} TFLOP"
    )
    ours_gqa = OursBackward(ext, q, k2, v2, dout)
    ours_mha = OursBackward(ext, q, k12, v12, dout)
    grads = {}
    for mode, label in (
        ("1", "ours sm90 (GQA 12/2)"),
        ("dkdv", "ours sm90 dK/dV + mma dQ"),
        ("0", "ours mma.sync (GQA 12/2)"),
    ):
        os.environ[BACKWARD_ENV] = mode
        ours_gqa.backward()
        torch.cuda.synchronize()
        kernel = ext.attention_backward_kernel_name()
        grads[mode] = tuple(g.clone() for g in (ours_gqa.dq, ours_gqa.dk, ours_gqa.dv))
        rows.time("bwd", label, ours_gqa.backward, bwd_flops, kernel)
        rows.time("fwd+bwd", label, ours_gqa.both, fwd_flops + bwd_flops, kernel)
        print(f"      kernels: {kernel_breakdown(ours_gqa.backward)}")
    os.environ[BACKWARD_ENV] = "1"
    ours_mha.backward()
    torch.cuda.synchronize()
    kernel = ext.attention_backward_kernel_name()
    rows.time("bwd", "ours sm90 (MHA 12/12)", ours_mha.backward, bwd_flops, kernel)
    rows.time("fwd+bwd", "ours sm90 (MHA 12/12)", ours_mha.both, fwd_flops + bwd_flops, kernel)
    for mode in ("1", "dkdv"):
        diffs = ", ".join(
            f"{n} {(a.double() - b.double()).abs().max().item():.2e}"
            for n, a, b in zip(("dq", "dk", "dv"), grads[mode], grads["0"])
        )
        print(f"  max |{mode} - mma.sync|: {diffs}")
    del ours_mha

    for backend, label in (
        (SDPBackend.CUDNN_ATTENTION, "SDPA cuDNN (12 kv heads)"),
        (SDPBackend.FLASH_ATTENTION, "SDPA flash (12 kv heads)"),
    ):
        try:
            bwd, both = sdpa_backward(backend, q, k12, v12, dout)
        except RuntimeError as exc:
            print(f"  {label:43s} failed: {str(exc)[:120]}")
            continue
        rows.time("bwd", label, bwd, bwd_flops)
        rows.time("fwd+bwd", label, both, fwd_flops + bwd_flops)
        del bwd, both
        torch.cuda.empty_cache()

    for what in ("bwd", "fwd+bwd"):
        ref = rows.get(what, "SDPA cuDNN (12 kv heads)", "ms")
        mine = rows.get(what, "ours sm90 (GQA 12/2)", "ms")
        print(f"  {what}: sm90 / cuDNN speed ratio {ref / mine:.2f}x (target >= 1.0)")


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--direction",
        choices=sorted(DIRECTIONS),
        default="forward",
        help="which kernels to time (default: forward)",
    )
    parser.add_argument(
        "--frames",
        type=int,
        nargs="+",
        default=None,
        help="video lengths (default: 128 256 forward, 64 256 backward)",
    )
    parser.add_argument(
        "--splits",
        type=int,
        nargs="*",
        default=[1, 2, 3, 4, 6, 8, 11, 16],
        help="forward: explicit key splits to time for the sm90 kernel (0 = "
        "heuristic is always timed)",
    )
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    if args.frames is None:
        args.frames = DIRECTIONS[args.direction]["frames"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    direction = DIRECTIONS[args.direction]
    if not torch.cuda.is_available():
        print("sm90_probe: no CUDA GPU")
        return 1
    from crosslmm_ops import _backend

    ext = _backend.extension()
    if ext is None or not hasattr(ext, direction["binding"]):
        print(
            f"sm90_probe: crosslmm_ops._C is not built, or built without the sm90 {args.direction}"
        )
        return 1
    name = torch.cuda.get_device_name()
    print(
        f"{name}, torch {torch.__version__}, extension archs {ext.cuda_archs()}, {args.direction}"
    )
    timing = {key: direction[key] for key in ("warmup", "rep", "calls")}
    env = FORWARD_ENV if args.direction == "forward" else BACKWARD_ENV
    saved = os.environ.get(env)
    results = []
    try:
        for frames in args.frames:
            rows = Rows(frames, timing)
            if args.direction == "forward":
                probe_forward(ext, rows, inputs(frames), args.splits)
            else:
                probe_backward(ext, rows, inputs(frames))
            results.extend(rows.rows)
            torch.cuda.empty_cache()
    finally:
        if saved is None:
            os.environ.pop(env, None)
        else:
            os.environ[env] = saved

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        with open(args.json, "w") as fh:
            json.dump(
                dict(
                    gpu=name,
                    torch=torch.__version__,
                    triton=triton_version,
                    python=platform.python_version(),
                    direction=args.direction,
                    results=results,
                ),
                fh,
                indent=1,
            )
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
