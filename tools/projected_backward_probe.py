"""The projection-fused core's backward on CUDA (csrc/projected/projected_backward*) against the
Triton one, on CrossLMM-2B's rows: frame-local V2V (9 queries x 12 heads per frame against its 729
tokens) and global V2V (every query of the video against every token), Hk = 2, bf16, Dv = 1152.
Each row prints both back ends' time in ms and TFLOP/s (backward FLOPs = 2.5 x the forward's
4 * rows * keys * Dv), asserts which back end ran (planner.last_backend), and the largest
difference between their gradients relative to the gradient's magnitude.

    python tools/projected_backward_probe.py [--rows local256,global64] [--splits 0]

Both back ends are called through the op's own backward (``_core_backward_impl``, what autograd
runs), on the CUDA forward's output and LSE; ``CROSSLMM_PROJECTED_BWD_CUDA=0`` routes it to Triton.
"""

from __future__ import annotations

import argparse
import os

import torch

from crosslmm_ops import environment, planner
from crosslmm_ops.ops import projected_attention as pa

DV = 1152
HQ = 12
FRAME = 729
QUERIES_PER_FRAME = 9
SCALE = 128**-0.5
ROWS = {  # name: (frames, frame-local)
    "local256": (256, True),
    "local64": (64, True),
    "global64": (64, False),
    "global16": (16, False),
}


def time_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median of `reps` timed calls (CUDA events), after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def probe(name: str, frames: int, local: bool, hk: int, splits: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    if local:
        lens_q, lens_k = [QUERIES_PER_FRAME] * frames, [FRAME] * frames
    else:
        lens_q, lens_k = [QUERIES_PER_FRAME * frames], [FRAME * frames]
    group = HQ // hk
    bf16 = torch.bfloat16
    q = torch.randn(hk, sum(lens_q), group, DV, device="cuda", dtype=bf16, generator=g)
    x = torch.randn(sum(lens_k), DV, device="cuda", dtype=bf16, generator=g)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], device="cuda").int()
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], device="cuda").int()
    mq, mk = max(lens_q), max(lens_k)
    out, lse = pa._core_forward("cuda", q, x, cu_q, cu_k, mq, mk, SCALE, splits)
    dout = torch.randn(out.shape, device="cuda", dtype=bf16, generator=g)
    flops = 2.5 * 4 * sum(a * HQ * b for a, b in zip(lens_q, lens_k)) * DV

    def backward():
        return pa._core_backward_impl(
            dout, None, q, x, out, lse, cu_q, cu_k, mq, mk, SCALE, splits, "cuda"
        )

    results = {}
    for backend in ("cuda", "triton"):
        if backend == "triton":
            os.environ[environment.PROJECTED_BWD_CUDA_VAR] = "0"
        try:
            grads = backward()
            ran = planner.last_backend("projected_attention_core_backward")
            assert ran == backend, f"{name}: asked for {backend}, {ran} ran"
            ms = time_ms(backward)
        finally:
            os.environ.pop(environment.PROJECTED_BWD_CUDA_VAR, None)
        results[backend] = grads
        print(
            f"{name:>10} Hk={hk} {backend:>6}: {ms:8.3f} ms  {flops / ms / 1e9:7.1f} TFLOP/s",
            flush=True,
        )
    for i, grad in enumerate(("dq", "dx")):
        a, b = results["cuda"][i].float(), results["triton"][i].float()
        rel = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
        print(f"{name:>10} {grad}: max |cuda - triton| / max |triton| = {rel:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="local256,global64", help=",".join(ROWS))
    parser.add_argument("--hk", type=int, default=2)
    parser.add_argument("--splits", type=int, default=0, help="num_splits (0 = heuristic)")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a GPU"
    assert planner.projected_backward_backend("cuda", torch.device("cuda"))[0] == "cuda", (
        "the extension has no projected_attention_core_backward: rebuild it"
    )
    for name in args.rows.split(","):
        probe(name, *ROWS[name], args.hk, args.splits)


if __name__ == "__main__":
    main()
