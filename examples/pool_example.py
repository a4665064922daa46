"""Token pooling as CrossLMM uses it: SigLIP features of a video, pooled per frame before the
projector, on every back end this machine has, with the gradient flowing back to the encoder.

    python examples/pool_example.py [--frames 16] [--device cuda]
"""

import argparse
import time

import torch

import crosslmm_ops
from crosslmm_ops.testing import fast_backends


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    # A SigLIP so400m/14 @ 384 px frame is a 27x27 grid of 1152-wide tokens: x is [B, T, N, D].
    x = torch.randn(1, args.frames, 27 * 27, 1152, device=device, dtype=dtype, requires_grad=True)
    print(
        f"vision features {tuple(x.shape)} {x.dtype} on {device}: {args.frames * 729} visual tokens"
    )

    backends = ["torch"] + [b for b in fast_backends(device) if device.type == "cuda"]
    settings = {
        "CrossLMM, 9 tokens/frame (avg 9x9)": dict(mode="avg", kernel_size=9),
        "81 tokens/frame (avg 3x3)": dict(mode="avg", kernel_size=3),
        "LLaVA-OneVision, 196 tokens/frame (bilinear 14x14)": dict(mode="bilinear", output_size=14),
        "1 token/frame (mean)": dict(mode="adaptive", output_size=1),
        "9 tokens/frame, frames pooled in pairs": dict(
            mode="avg", kernel_size=9, temporal_stride=2
        ),
    }
    for label, kw in settings.items():
        reference = None
        cells = []
        for backend in backends:
            x.grad = None
            t0 = time.perf_counter()
            pooled = crosslmm_ops.token_pool(x, (27, 27), backend=backend, **kw)
            pooled.float().square().mean().backward()  # a stand-in loss: gradients reach x
            if device.type == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
            ran = crosslmm_ops.last_backend("token_pool")
            if reference is None:
                reference = (pooled.detach().float(), x.grad.float())
                cells.append(f"{ran} {ms:.1f} ms")
            else:
                err = max(
                    (pooled.detach().float() - reference[0]).abs().max().item(),
                    (x.grad.float() - reference[1]).abs().max().item(),
                )
                cells.append(f"{ran} {ms:.1f} ms (max diff vs torch {err:.1e})")
        tokens = pooled.shape[1] * pooled.shape[2]
        print(
            f"  {label:<52} -> {tuple(pooled.shape)}, {tokens} tokens "
            f"({args.frames * 729 / tokens:.0f}x fewer) | fwd+bwd: " + ", ".join(cells)
        )


if __name__ == "__main__":
    main()
