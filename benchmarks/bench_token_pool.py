"""Token pooling: cuda and triton against the torch path (view -> permute -> pool -> permute ->
contiguous) at CrossLMM shapes (T = 32..256 frames of 27x27 SigLIP tokens, D = 1152, bf16),
forward and backward, with achieved TB/s against the device-to-device copy measured in the same run.

    pytest benchmarks/bench_token_pool.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import copy_bandwidth_tbs, do_bench_ms, gpu_synced, rotating

import crosslmm_ops

GRID, DIM = 27, 1152
FRAMES = [32, 64, 128, 256]
# (label, token_pool kwargs, the torch function on [B*T, D, H, W])
MODES = [
    ("avg3x3s3", dict(mode="avg", kernel_size=3), lambda t: F.avg_pool2d(t, 3)),
    ("avg9x9s9", dict(mode="avg", kernel_size=9), lambda t: F.avg_pool2d(t, 9)),
    ("adaptive4x4", dict(mode="adaptive", output_size=4), lambda t: F.adaptive_avg_pool2d(t, 4)),
    (
        "bilinear14x14",
        dict(mode="bilinear", output_size=14),
        lambda t: F.interpolate(t, (14, 14), mode="bilinear", align_corners=False),
    ),
    ("mean1", dict(mode="adaptive", output_size=1), lambda t: F.adaptive_avg_pool2d(t, 1)),
    ("max3x3s3", dict(mode="max", kernel_size=3), lambda t: F.max_pool2d(t, 3)),
]
BACKENDS = ["cuda", "triton", "torch-path"]


def torch_path(x, fn):
    B, T, N, D = x.shape
    out = fn(x.view(B * T, GRID, GRID, D).permute(0, 3, 1, 2))
    return out.permute(0, 2, 3, 1).reshape(B, T, -1, D).contiguous()


def make_fn(backend, kw, torch_fn):
    if backend == "torch-path":
        return lambda x: torch_path(x, torch_fn)
    return lambda x: crosslmm_ops.token_pool(x, GRID, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frames", FRAMES)
@pytest.mark.parametrize("mode", range(len(MODES)), ids=[m[0] for m in MODES])
def bench_forward(benchmark, record, mode, frames, backend):
    label, kw, torch_fn = MODES[mode]
    fn = make_fn(backend, kw, torch_fn)
    nbytes = frames * GRID * GRID * DIM * 2
    xs = rotating(
        lambda: torch.randn(1, frames, GRID * GRID, DIM, device="cuda", dtype=torch.bfloat16),
        nbytes,
    )
    out = fn(xs[0])
    if backend != "torch-path":
        assert crosslmm_ops.last_backend("token_pool") == backend
    moved = nbytes + out.numel() * out.element_size()
    state = {"i": 0}

    def one():
        state["i"] += 1
        return fn(xs[state["i"] % len(xs)])

    ms = do_bench_ms(one)
    copy = copy_bandwidth_tbs()
    benchmark.extra_info.update(ms_median=ms, tbs=moved / ms / 1e9, copy_tbs=copy)
    benchmark.pedantic(gpu_synced(fn, xs), rounds=10, warmup_rounds=2)
    record(
        suite="token_pool",
        group=f"fwd {label} T={frames}",
        backend=backend,
        ms=ms,
        rate=moved / ms / 1e9,
        unit="TB/s",
        floor_ms=moved / (copy * 1e12) * 1e3,
        bytes=moved,
        copy_tbs=copy,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frames", [64, 256])
@pytest.mark.parametrize("mode", [0, 3, 5], ids=[MODES[i][0] for i in (0, 3, 5)])
def bench_backward(benchmark, record, mode, frames, backend):
    label, kw, torch_fn = MODES[mode]
    fn = make_fn(backend, kw, torch_fn)
    x = torch.randn(
        1, frames, GRID * GRID, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True
    )
    out = fn(x)
    grad = torch.randn_like(out)
    # Bytes: grad_out read, grad_x written (+ the int32 winners for max).
    moved = grad.numel() * 2 + x.numel() * 2 + (grad.numel() * 4 if kw["mode"] == "max" else 0)

    def step():
        torch.autograd.grad(out, x, grad, retain_graph=True)

    ms = do_bench_ms(step)
    copy = copy_bandwidth_tbs()
    benchmark.extra_info.update(ms_median=ms, tbs=moved / ms / 1e9, copy_tbs=copy)
    benchmark.pedantic(gpu_synced(lambda _: step(), [None]), rounds=10, warmup_rounds=2)
    if backend != "torch-path":
        assert crosslmm_ops.last_backend("token_pool_backward") == backend
    record(
        suite="token_pool",
        group=f"bwd {label} T={frames}",
        backend=backend,
        ms=ms,
        rate=moved / ms / 1e9,
        unit="TB/s",
        floor_ms=moved / (copy * 1e12) * 1e3,
        bytes=moved,
        copy_tbs=copy,
    )
