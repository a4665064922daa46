"""Where a CrossLMM-2B decode step's time goes (issue #19 item 5: the fused decode step at >= 85% of
its bandwidth floor).

For each T (default 32 and 256): the projection-fused core alone (``_C.projected_attention_core_
forward``: 1 query x 12 heads against T * 729 keys of width 1152) on the decode kernel
(csrc/projected/projected_decode_kernel.cuh) with cp.async loads (``kernel="decode"``, what
``"auto"`` picks), with bulk-copy loads (``"decode_bulk"``) and on the general 32-key kernel
(``"mma_sync"``), all in this process; then the public op as benchmarks/peers.py's ``projected
decode`` row times it (q~ fold, core, combine, Wv, bias, lse shift) on the three
(``CROSSLMM_PROJECTED_KERNEL``, read on every call); then the GPU kernels of 5 public calls
(torch.profiler), so the time outside the core is visible.

Floor: bytes of x / the copy bandwidth measured now with a device-to-device copy of x's size
(bandwidth = (read + written bytes) / time, as benchmarks/conftest.py). Times are
``triton.testing.do_bench`` medians; inputs are rotated so their total exceeds the 50 MB L2.

    python tools/projected_decode_probe.py [--frames 32 256] [--dtype bf16] [--no-profile]
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch

VAR = "CROSSLMM_PROJECTED_KERNEL"
HQ, D, DV, TOKENS, HK = 12, 128, 1152, 729, 2


def do_bench_ms(fn, rep_ms=200):
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def copy_tbs(nbytes: int) -> float:
    src = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    ms = do_bench_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e12


KERNELS = (("decode, cp.async", "decode"), ("decode, bulk", "decode_bulk"), ("general", "mma_sync"))


def with_kernel(value: str, fn, *args):
    """fn(*args) with CROSSLMM_PROJECTED_KERNEL set (the op reads it on every call)."""
    os.environ[VAR] = value
    try:
        return fn(*args)
    finally:
        os.environ.pop(VAR, None)


def bench(fn, rep_ms):
    fn()
    return do_bench_ms(fn, rep_ms)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--rep-ms", type=int, default=300)
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16

    import crosslmm_ops
    from crosslmm_ops import _backend
    from crosslmm_ops.ops import projected_attention as pa

    ext = _backend.extension()
    assert ext is not None and hasattr(ext, "projected_attention_core_forward"), "no extension"
    print(f"device: {torch.cuda.get_device_name()}, {args.dtype}")
    torch.manual_seed(0)
    for frames in args.frames:
        keys = frames * TOKENS
        x_bytes = keys * DV * 2
        tbs = copy_tbs(x_bytes)
        floor = x_bytes / (tbs * 1e12) * 1e3
        copies = max(1, min(8, -(-(200 * 2**20) // x_bytes)))
        xs = [torch.randn(keys, DV, device="cuda", dtype=dtype) for _ in range(copies)]
        qs = [torch.randn(1, HQ, DV, device="cuda", dtype=dtype) for _ in range(copies)]
        cu_q = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0, keys], dtype=torch.int32, device="cuda")
        print(
            f"\nT={frames}: x {x_bytes / 1e9:.3f} GB, copy {tbs:.2f} TB/s, floor {floor:.4f} ms "
            f"({copies} rotated inputs)"
        )

        for name, value in KERNELS:
            core_args = itertools.cycle(
                [
                    (q, x, cu_q, cu_k, 1, keys, D**-0.5, 0, value)
                    for q, x in zip(qs, xs, strict=True)
                ]
            )

            def core():
                return ext.projected_attention_core_forward(*next(core_args))

            ms = bench(core, args.rep_ms)
            print(f"  core, {name:16s}: {ms:.4f} ms = {floor / ms:6.1%} of the floor")
        # Same function: the kernels agree to rounding.
        one = (qs[0], xs[0], cu_q, cu_k, 1, keys, D**-0.5, 0)
        b = ext.projected_attention_core_forward(*one, "mma_sync")
        for name, value in KERNELS[:2]:
            a = ext.projected_attention_core_forward(*one, value)
            diff = (a[0].float() - b[0].float()).abs().max().item()
            same = torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            print(f"  {name} vs general: max |out diff| {diff:.3e}, bitwise equal {same}")

        # The public op (benchmarks/peers.py's projected decode row, with rotated inputs).
        ts = []
        for x in xs:
            w_k, w_v = (
                torch.randn(HK * D, DV, device="cuda", dtype=dtype) * DV**-0.5 for _ in "kv"
            )
            b_k, b_v = (torch.randn(HK * D, device="cuda", dtype=dtype) for _ in "kv")
            q = torch.randn(1, 1, HQ, D, device="cuda", dtype=dtype)
            ts.append(dict(q=q, x=x.view(1, keys, DV), w_k=w_k, w_v=w_v, b_k=b_k, b_v=b_v))
        public_args = itertools.cycle(ts)

        def public():
            return pa.projected_cross_attention(**next(public_args), path="fused", backend="cuda")

        with torch.no_grad():
            for name, value in KERNELS:
                ms = with_kernel(value, bench, public, args.rep_ms)
                assert crosslmm_ops.last_path("projected_cross_attention") == "fused"
                print(
                    f"  public op, {name:16s}: {ms:.4f} ms = {floor / ms:6.1%} of the floor "
                    "(x only; peers.py's floor adds q, weights, out)"
                )
            os.environ.pop(VAR, None)
            if not args.no_profile:
                from torch.profiler import ProfilerActivity, profile

                public()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        public()
                    torch.cuda.synchronize()
                print("  GPU kernels of 5 public calls (kernel auto):")
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
                print("\n".join("    " + line for line in table.splitlines()))
        del xs, qs, ts
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
