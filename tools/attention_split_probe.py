"""GPU time of cross_attention's CUDA forward at explicit key-split counts against the heuristic's
own choice (``num_splits=0``, timed first and again last, so drift shows), with the kernel each
count ran: decode steps (1 query) and T2V (128 queries) against T * 729 keys, and per-frame varlen
V2V (9 queries per frame against its 729 keys); 12 query heads of 128, bf16. Each call is replayed
from a CUDA graph, so host time is not in it.

    python tools/attention_split_probe.py [--hk 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from conftest import graph_ms, warm_up_gpu  # noqa: E402

import crosslmm_ops  # noqa: E402

TOKENS, HEADS, HEAD_DIM = 729, 12, 128


def cases():
    """(name, scope, frames, queries per segment, split counts); 0 is the heuristic."""
    for t in (8, 32, 64, 128, 256):
        yield f"decode T={t}", "global", t, 1, [0, 8, 16, 22, 33, 44, 66, 91, 128, 0]
    for t in (32, 64):
        yield f"t2v T={t}", "global", t, 128, [0, 6, 8, 9, 10, 11, 12, 16, 0]
    for t in (16, 32, 64, 128):
        yield f"per-frame T={t}", "frame", t, 9, [0, 1, 2, 3, 4, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hk", type=int, default=2, help="key/value heads (divides 12)")
    args = parser.parse_args()
    warm_up_gpu()
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}: GPU ms per split count (kernel when not sm90_packed)")
    for name, scope, frames, lq, splits in cases():
        g = torch.Generator(device="cuda").manual_seed(frames)
        kwargs = {}
        if scope == "global":
            q = torch.randn(1, lq, HEADS, HEAD_DIM, generator=g, **bf16)
            k, v = (
                torch.randn(1, frames * TOKENS, args.hk, HEAD_DIM, generator=g, **bf16)
                for _ in "kv"
            )
        else:
            q = torch.randn(frames * lq, HEADS, HEAD_DIM, generator=g, **bf16)
            k, v = (
                torch.randn(frames * TOKENS, args.hk, HEAD_DIM, generator=g, **bf16) for _ in "kv"
            )
            step = torch.arange(frames + 1, device="cuda", dtype=torch.int32)
            kwargs = dict(
                cu_seqlens_q=step * lq,
                cu_seqlens_k=step * TOKENS,
                max_seqlen_q=lq,
                max_seqlen_k=TOKENS,
            )
        line = []
        with torch.no_grad():
            for s in splits:

                def call(s=s):
                    return crosslmm_ops.cross_attention(
                        q, k, v, num_splits=s, backend="cuda", **kwargs
                    )

                call()
                kernel = crosslmm_ops.last_kernel("cross_attention")
                ms = graph_ms(call, rep_ms=40)
                line.append(f"{s}:{ms:.4f}" + ("" if kernel == "sm90_packed" else f"[{kernel}]"))
        print(f"{name:16s} " + " ".join(line), flush=True)


if __name__ == "__main__":
    main()
