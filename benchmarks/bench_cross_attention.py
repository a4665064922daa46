"""Cross-attention: ours (cuda, triton) against SDPA's flash, cuDNN and efficient back ends,
FlexAttention, and flash-attn and FlashAttention-4 when they are importable (said otherwise),
on CrossLMM-2B's shapes: 12 heads of 128, keys = all original tokens (T * 729), bf16.

    pytest benchmarks/bench_cross_attention.py --benchmark-only

Rows: V2V global (T*9 pooled queries against every key), T2V (128 text queries), decode (1 query),
V2V per frame (9 queries of a frame against its 729 keys, all frames batched), forward and
forward+backward. FLOPs = 4*Lq*Lk*H*d forward (2.5x that for backward); bytes = Q, K, V read once
and O written once; floor = max(FLOPs / matmul rate, bytes / copy bandwidth), both measured now.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import copy_bandwidth_tbs, do_bench_ms, gpu_synced, load_fa4, matmul_tflops

import crosslmm_ops
from crosslmm_ops.testing import fast_backends

HEADS, HEAD_DIM, TOKENS_PER_FRAME, POOLED_PER_FRAME = 12, 128, 729, 9

try:
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore

    HAVE_FLASH_ATTN = True
except ImportError:
    HAVE_FLASH_ATTN = False
    print(
        "bench_cross_attention: flash-attn is not importable here; its column is skipped "
        "(SDPA's flash back end is FlashAttention-2's kernel)"
    )

_fa4_func = load_fa4("bench_cross_attention")[0]
HAVE_FA4 = _fa4_func is not None

CASES = {  # name: (batch, Lq, Lk, frames)
    **{
        f"v2v-global T={t}": (1, POOLED_PER_FRAME * t, TOKENS_PER_FRAME * t, t)
        for t in (32, 64, 128, 256)
    },
    **{f"t2v T={t}": (1, 128, TOKENS_PER_FRAME * t, t) for t in (32, 256)},
    **{f"decode T={t}": (1, 1, TOKENS_PER_FRAME * t, t) for t in (32, 256)},
    "v2v-per-frame T=256": (256, POOLED_PER_FRAME, TOKENS_PER_FRAME, 256),
}
FWD_BWD_CASES = ["v2v-global T=64", "v2v-global T=256"]
OURS = ["cuda", "triton"]
PEERS = (
    ["sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex"]
    + (["flash-attn"] if HAVE_FLASH_ATTN else [])
    + (["fa4"] if HAVE_FA4 else [])
)


def _sdpa(backend_enum):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):  # ours take (B, S, H, D); SDPA wants (B, H, S, D): views, no copies
        with sdpa_kernel(backend_enum):
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            ).transpose(1, 2)

    return run


_FLEX = {}


def _flex(q, k, v):
    from torch.nn.attention.flex_attention import flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def attention_fn(name):
    from torch.nn.attention import SDPBackend

    if name in OURS:
        return lambda q, k, v: crosslmm_ops.cross_attention(q, k, v, backend=name)
    if name == "sdpa-flash":
        return _sdpa(SDPBackend.FLASH_ATTENTION)
    if name == "sdpa-cudnn":
        return _sdpa(SDPBackend.CUDNN_ATTENTION)
    if name == "sdpa-efficient":
        return _sdpa(SDPBackend.EFFICIENT_ATTENTION)
    if name == "flex":
        return _flex
    if name == "flash-attn":
        return _flash_attn_func
    if name == "fa4":  # returns (out, lse)
        return lambda q, k, v: _fa4_func(q, k, v)[0]
    raise ValueError(name)


def make_inputs(case, requires_grad=False):
    batch, lq, lk, _ = CASES[case]
    shape_q, shape_kv = (batch, lq, HEADS, HEAD_DIM), (batch, lk, HEADS, HEAD_DIM)

    def make(s):
        return torch.randn(s, device="cuda", dtype=torch.bfloat16, requires_grad=requires_grad)

    return make(shape_q), make(shape_kv), make(shape_kv)


def floor_ms(case, backward=False):
    batch, lq, lk, _ = CASES[case]
    flops = 4 * batch * lq * lk * HEADS * HEAD_DIM * (3.5 if backward else 1.0)
    moved = 2 * batch * HEADS * HEAD_DIM * (2 * lq + 2 * lk) * (2 if backward else 1)
    return (
        max(flops / (matmul_tflops() * 1e12), moved / (copy_bandwidth_tbs() * 1e12)) * 1e3,
        flops,
        moved,
    )


def _skip_unavailable(name):
    if name in OURS and name not in fast_backends("cuda"):
        pytest.skip(f"{name} back end not available")
    if name == "flex" and os.environ.get("CROSSLMM_BENCH_FLEX", "1") == "0":
        pytest.skip("FlexAttention disabled (CROSSLMM_BENCH_FLEX=0)")


@pytest.mark.parametrize("impl", OURS + PEERS)
@pytest.mark.parametrize("case", list(CASES))
def bench_forward(benchmark, record, case, impl):
    _skip_unavailable(impl)
    fn = attention_fn(impl)
    q, k, v = make_inputs(case)
    try:
        with torch.no_grad():
            fn(q, k, v)
    except RuntimeError as exc:  # a peer that does not support the shape: say so, do not hide it
        record(
            suite="cross_attention",
            group=f"fwd {case}",
            backend=impl,
            ms=float("nan"),
            rate=float("nan"),
            unit="TFLOP/s",
            error=str(exc)[:200],
        )
        pytest.skip(f"{impl} cannot run {case}: {exc}")
    if impl in OURS:
        assert crosslmm_ops.last_backend("cross_attention") == impl
    floor, flops, moved = floor_ms(case)
    with torch.no_grad():
        ms = do_bench_ms(lambda: fn(q, k, v))
        benchmark.pedantic(gpu_synced(lambda _: fn(q, k, v), [None]), rounds=10, warmup_rounds=2)
    benchmark.extra_info.update(ms_median=ms, tflops=flops / ms / 1e9, tbs=moved / ms / 1e9)
    record(
        suite="cross_attention",
        group=f"fwd {case}",
        backend=impl,
        ms=ms,
        rate=flops / ms / 1e9,
        unit="TFLOP/s",
        tbs=moved / ms / 1e9,
        floor_ms=floor,
        flops=flops,
        bytes=moved,
    )


@pytest.mark.parametrize(
    "impl", OURS + ["sdpa-flash", "sdpa-cudnn"] + (["fa4"] if HAVE_FA4 else [])
)
@pytest.mark.parametrize("case", FWD_BWD_CASES)
def bench_forward_backward(benchmark, record, case, impl):
    _skip_unavailable(impl)
    fn = attention_fn(impl)
    q, k, v = make_inputs(case, requires_grad=True)
    grad = torch.randn_like(q)

    def step():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), grad)

    try:
        step()
    except RuntimeError as exc:
        pytest.skip(f"{impl} cannot run {case} forward+backward: {exc}")
    if impl in OURS:  # the backward must run where the forward did
        assert crosslmm_ops.last_backend("cross_attention") == impl
        assert crosslmm_ops.last_backend("cross_attention_backward") == impl
    floor, flops, moved = floor_ms(case, backward=True)
    ms = do_bench_ms(step)
    benchmark.pedantic(gpu_synced(lambda _: step(), [None]), rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(ms_median=ms, tflops=flops / ms / 1e9)
    record(
        suite="cross_attention",
        group=f"fwd+bwd {case}",
        backend=impl,
        ms=ms,
        rate=flops / ms / 1e9,
        unit="TFLOP/s",
        floor_ms=floor,
        flops=flops,
        bytes=moved,
    )
