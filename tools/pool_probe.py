"""Where token pooling's time goes on a GPU: for each mode at CrossLMM's shape ([1, T, 729, 1152]
bf16), the call as a user makes it (CUDA events over back-to-back calls), the same call replayed
from a CUDA graph (GPU time only: no Python or launch cost between kernels), and the torch path,
each as TB/s (input read + output written) beside the device copy bandwidth.

    python tools/pool_probe.py [--frames 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

import crosslmm_ops

# The modes and the torch path of the pooling benchmark, so that both measure the same calls.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_token_pool import DIM, GRID, MODES, torch_path  # noqa: E402


def copy_bandwidth_tbs() -> float:
    """Device-to-device copy of 512 MiB: bytes read + written per second, in TB/s."""
    src = torch.randn(2**28, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 4 * src.numel() / ms / 1e9


def graph_ms(fn, x) -> float:
    """GPU time of fn(x) replayed from a CUDA graph (10 calls per replay)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn(x)
    return float(do_bench(graph.replay, warmup=10, rep=200, return_mode="median")) / 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    copy_tbs = copy_bandwidth_tbs()
    x = torch.randn(1, args.frames, GRID * GRID, DIM, device="cuda", dtype=torch.bfloat16)
    rows = []
    print(f"copy bandwidth {copy_tbs:.2f} TB/s; T={args.frames}")
    print(
        f"{'mode':<15}{'call ms':>9}{'graph ms':>9}{'torch ms':>9}"
        f"{'call %':>8}{'graph %':>8}{'torch %':>8}"
    )
    for label, kw, torch_fn in MODES:
        ours = lambda t, kw=kw: crosslmm_ops.token_pool(t, GRID, backend="cuda", **kw)  # noqa: E731
        out = ours(x)
        assert crosslmm_ops.last_backend("token_pool") == "cuda"
        moved = x.numel() * 2 + out.numel() * 2
        call = float(do_bench(lambda: ours(x), return_mode="median"))
        graph = graph_ms(ours, x)
        ref = float(do_bench(lambda: torch_path(x, torch_fn), return_mode="median"))
        pct = [moved / ms / 1e9 / copy_tbs * 100 for ms in (call, graph, ref)]
        print(
            f"{label:<15}{call:9.3f}{graph:9.3f}{ref:9.3f}"
            f"{pct[0]:7.0f}%{pct[1]:7.0f}%{pct[2]:7.0f}%"
        )
        rows.append(dict(mode=label, call_ms=call, graph_ms=graph, torch_ms=ref, bytes=moved))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    gpu=torch.cuda.get_device_name(),
                    copy_tbs=copy_tbs,
                    frames=args.frames,
                    rows=rows,
                ),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
