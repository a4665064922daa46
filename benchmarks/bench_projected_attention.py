"""Projection-fused attention (``projected_cross_attention``) against the way a user does it today:
cuBLAS projections of ``x`` into K and V (``F.linear``), then the best attention kernel (SDPA's back
ends, and FlashAttention-4 where it is importable). CrossLMM-2B
shapes: SigLIP tokens of width Dv = 1152 (729 per frame), 12 query heads of 128, bf16,
T = 32..256 frames, with **Hk = 2** KV heads (the real Qwen2.5-1.5B of CrossLMM-2B) and **Hk = 12**
(the shape of the peers' rows in docs/performance.md, 12 KV heads).

    pytest benchmarks/bench_projected_attention.py --benchmark-only

Cases (each group holds ours and the peers, timed in one process on the same inputs):

* ``v2v-frame`` - frame-local V2V *including the projections*: the 9 pooled queries of each frame
  against its 729 tokens, every frame in one call. Ours: ``path="fused"`` (no K/V at all). Peers:
  ``F.linear`` K and V, then SDPA (flash / cuDNN / efficient) or FlashAttention-4, batched over
  frames. Target: >= 8x the best peer.
* ``decode`` - one T2V decode step from the cached ``x``: 1 text query against all T * 729 tokens.
  Ours reads ``x`` (the cache every DCAL layer shares); the peers read cached K/V (SDPA flash and
  cuDNN, FlashAttention-4; no projection timed). Target: >= 2.5x SDPA flash. The group name
  carries both caches' memory per layer, measured with ``torch.cuda.max_memory_allocated``: ``x``
  (once for the model) against this layer's K + V (once per DCAL layer: x7 for CrossLMM-2B's 28
  layers, K = 4).
* ``t2v-prefill`` - 128 text queries against all tokens, ours on both paths (``path=fused`` and
  ``path=materialized`` groups) so the cost model's choice, named in the group (``auto: ...``,
  with its predicted ms for both paths), can be checked against the measurements.

GQA peers use SDPA's ``enable_gqa=True`` where the back end takes it, else HF's ``repeat_kv``
(expand + reshape, timed) - the row's ``gqa`` field says which; FlashAttention-4 takes fewer K/V
heads natively. When FlashAttention-4 is not importable the benchmark prints so and has no
``fa4`` columns. FLOPs: ours ``4 * pairs * Hq * Dv``
(core) ``+ 4 * Lq * Hq * d * Dv`` (q~ and output GEMMs); the peers ``4 * Lk * Dv * Hk * d``
(projections) ``+ 4 * pairs * Hq * d`` (attention). Floor = ours: max(FLOPs / matmul rate, bytes /
copy bandwidth) with bytes = x, q, the weights read and the output written once, both rates
measured in the same run.
"""

from __future__ import annotations

import functools
import gc

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    copy_bandwidth_tbs,
    do_bench_ms,
    gpu_synced,
    load_fa4,
    matmul_tflops,
    rotating,
)

import crosslmm_ops
from crosslmm_ops.ops import projected_attention as pa
from crosslmm_ops.testing import fast_backends

_fa4_func = load_fa4("bench_projected_attention")[0]
HAVE_FA4 = _fa4_func is not None

SUITE = "projected_attention"
HQ, D, DV, TOKENS, POOLED, TEXT = 12, 128, 1152, 729, 9, 128
DCAL_LAYERS = 7  # CrossLMM-2B: 28 decoder layers, a DCAL every 4
OURS = ["cuda", "triton"]
SDPA_PEERS = ["flash", "cudnn", "efficient"]
# Attention peers after the projections (and on cached K/V for decode), by name.
ATTENTION_PEERS = [f"sdpa-{p}" for p in SDPA_PEERS] + (["fa4"] if HAVE_FA4 else [])
DECODE_PEERS = ["sdpa-flash", "sdpa-cudnn"] + (["fa4"] if HAVE_FA4 else [])
FRAMES = [32, 64, 128, 256]
KV_HEADS = [2, 12]

# name: (batch, Lq, Lk) per call; every case runs for each T in FRAMES and Hk in KV_HEADS
KINDS = {
    "v2v-frame": lambda t: (t, POOLED, TOKENS),
    "decode": lambda t: (1, 1, t * TOKENS),
    "t2v-prefill": lambda t: (1, TEXT, t * TOKENS),
}


def _layout(kind, frames, hk) -> pa.ProjectedLayout:
    b, lq, lk = KINDS[kind](frames)
    return pa.ProjectedLayout.of_batched(b, HQ, hk, D, DV, lq, lk)


def group_name(kind, frames, hk, path=None) -> str:
    layout = _layout(kind, frames, hk)
    fused_ms, mat_ms = pa.COST_MODEL.estimate(layout)
    auto = "fused" if fused_ms <= mat_ms else "materialized"
    name = f"{kind} T={frames} Hk={hk}"
    if path:
        name += f" path={path}"
    name += f" (auto: {auto}; model {fused_ms:.3f} vs {mat_ms:.3f} ms)"
    if kind == "decode":
        x_mb, kv_mb = cache_mb(frames, hk)
        name += (
            f" cache x {x_mb:.0f} MB (whole model) vs K+V {kv_mb:.0f} MB/layer, "
            f"{kv_mb * DCAL_LAYERS:.0f} MB for {DCAL_LAYERS} layers"
        )
    return name


def fused_counts(kind, frames, hk):
    """(FLOPs, bytes) of the fused path: the minimum it must do and move."""
    b, lq, lk = KINDS[kind](frames)
    flops = 4 * b * lq * lk * HQ * DV + 4 * b * lq * HQ * D * DV
    moved = 2 * (b * lk * DV + 2 * b * lq * HQ * D + 2 * hk * D * DV)
    return flops, moved


def materialized_counts(kind, frames, hk, cached_kv=False):
    b, lq, lk = KINDS[kind](frames)
    attn = 4 * b * lq * lk * HQ * D
    kv = 2 * 2 * b * lk * hk * D
    io = 2 * 2 * b * lq * HQ * D
    if cached_kv:
        return attn, kv + io
    return 4 * b * lk * DV * hk * D + attn, 2 * b * lk * DV + 2 * kv + io + 2 * 2 * hk * D * DV


def floor_ms(kind, frames, hk) -> float:
    flops, moved = fused_counts(kind, frames, hk)
    return max(flops / (matmul_tflops() * 1e12), moved / (copy_bandwidth_tbs() * 1e12)) * 1e3


def make_inputs(kind, frames, hk, device="cuda", dtype=torch.bfloat16):
    """q (B, Lq, Hq, d), x (B, Lk, Dv) and the layer's weights and biases (random, scaled so the
    keys are O(1))."""
    b, lq, lk = KINDS[kind](frames)
    q = torch.randn(b, lq, HQ, D, device=device, dtype=dtype)
    x = torch.randn(b, lk, DV, device=device, dtype=dtype)
    w_k, w_v = (torch.randn(hk * D, DV, device=device, dtype=dtype) * DV**-0.5 for _ in "kv")
    b_k, b_v = (torch.randn(hk * D, device=device, dtype=dtype) for _ in "kv")
    return dict(q=q, x=x, w_k=w_k, w_v=w_v, b_k=b_k, b_v=b_v)


# ----------------------------------------------------------------------------------------------
# The peers: projection + attention, or attention on cached K/V
# ----------------------------------------------------------------------------------------------


def _sdpa_backend(name):
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]


def sdpa(name, gqa):
    """SDPA on ``q (B, Lq, Hq, d)``, ``k, v (B, Lk, Hk, d)`` with back end ``name``; ``gqa`` is
    ``"native"`` (``enable_gqa=True``) or ``"repeat_kv"`` (transformers' expand + reshape)."""
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, d) views
        group = q.shape[1] // k.shape[1]
        kw = {}
        if group > 1 and gqa == "native":
            kw["enable_gqa"] = True
        elif group > 1:
            k, v = (t[:, :, None].expand(-1, -1, group, -1, -1).flatten(1, 2) for t in (k, v))
        with sdpa_kernel(_sdpa_backend(name)):
            return F.scaled_dot_product_attention(q, k, v, **kw).transpose(1, 2)

    return run


def fa4(gqa):
    """FlashAttention-4 on ``q (B, Lq, Hq, d)``, ``k, v (B, Lk, Hk, d)``: fewer K/V heads natively
    (``gqa="native"``), or expanded as transformers' ``repeat_kv`` does."""

    def run(q, k, v):
        group = q.shape[2] // k.shape[2]
        if group > 1 and gqa != "native":
            k, v = (t[:, :, :, None].expand(-1, -1, -1, group, -1).flatten(2, 3) for t in (k, v))
        return _fa4_func(q, k, v)[0]  # (out, lse)

    return run


def attention_peer(name, gqa):
    """The attention of peer ``name`` ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "fa4")."""
    return fa4(gqa) if name == "fa4" else sdpa(name.removeprefix("sdpa-"), gqa)


def projected_then(peer, gqa):
    """The user's way today: cuBLAS projections of x into K and V, then the attention of ``peer``
    (see attention_peer)."""
    attend = attention_peer(peer, gqa)

    def run(t):
        k = F.linear(t["x"], t["w_k"], t["b_k"]).unflatten(-1, (-1, D))
        v = F.linear(t["x"], t["w_v"], t["b_v"]).unflatten(-1, (-1, D))
        return attend(t["q"], k, v)

    return run


def first_working(make_fn, inputs):
    """The peer's callable with native GQA if its back end takes it, else with repeat_kv; or
    ``(None, None, error)`` when it cannot run this shape at all."""
    error = None
    for gqa in ("native", "repeat_kv"):
        fn = make_fn(gqa)
        try:
            with torch.no_grad():
                fn(inputs[0])
            return fn, gqa, None
        except RuntimeError as exc:  # this back end rejects the shape or the GQA layout
            error = str(exc)[:200]
    return None, None, error


def ours(backend, path):
    def run(t):
        return pa.projected_cross_attention(**t, path=path, backend=backend)

    return run


# ----------------------------------------------------------------------------------------------
# Cache memory (decode)
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def cache_mb(frames, hk) -> tuple[float, float]:
    """``torch.cuda.max_memory_allocated`` growth, in MB, from creating each decode cache:
    ``x`` (shared by every DCAL layer) and one layer's K and V projected from it."""

    def peak_growth(make):
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        kept = make()
        torch.cuda.synchronize()
        grown = torch.cuda.max_memory_allocated() - base
        return grown / 2**20, kept

    t = make_inputs("decode", frames, hk)
    del t["x"]
    # cuBLAS's workspace exists before anything is measured
    F.linear(torch.randn(1, DV, device="cuda", dtype=torch.bfloat16), t["w_k"])
    x_mb, x = peak_growth(
        lambda: torch.randn(1, frames * TOKENS, DV, device="cuda", dtype=torch.bfloat16)
    )
    kv_mb, _ = peak_growth(
        lambda: (F.linear(x, t["w_k"], t["b_k"]), F.linear(x, t["w_v"], t["b_v"]))
    )
    return x_mb, kv_mb


# ----------------------------------------------------------------------------------------------
# The benchmarks
# ----------------------------------------------------------------------------------------------


def _skip_unavailable(impl):
    if impl in OURS and impl not in fast_backends("cuda"):
        pytest.skip(f"{impl} back end not available")


def _time(benchmark, fn, inputs):
    state = {"i": 0}

    def step():
        out = fn(inputs[state["i"] % len(inputs)])
        state["i"] += 1
        return out

    with torch.no_grad():
        ms = do_bench_ms(step)
        benchmark.pedantic(gpu_synced(lambda t: fn(t), inputs), rounds=10, warmup_rounds=2)
    return ms


def _inputs(kind, frames, hk, with_kv=False):
    each = 2 * (KINDS[kind](frames)[0] * KINDS[kind](frames)[2] * DV)  # x's bytes
    if with_kv:
        b, _, lk = KINDS[kind](frames)
        each = 2 * 2 * b * lk * hk * D

    def make():
        t = make_inputs(kind, frames, hk)
        if with_kv:  # the decode peers' cache: K and V projected once, outside the timing
            t["k"] = F.linear(t["x"], t["w_k"], t["b_k"]).unflatten(-1, (hk, D))
            t["v"] = F.linear(t["x"], t["w_v"], t["b_v"]).unflatten(-1, (hk, D))
            del t["x"]
        return t

    return rotating(make, each)


def _record(record, benchmark, group, impl, ms, flops, moved, floor, unit, **extra):
    rate = (flops / ms / 1e9) if unit == "TFLOP/s" else (moved / ms / 1e9)
    benchmark.extra_info.update(ms_median=ms, rate=rate, unit=unit)
    record(
        suite=SUITE,
        group=group,
        backend=impl,
        ms=ms,
        rate=rate,
        unit=unit,
        tflops=flops / ms / 1e9,
        tbs=moved / ms / 1e9,
        floor_ms=floor,
        flops=flops,
        bytes=moved,
        **extra,
    )


@pytest.mark.parametrize("impl", OURS + [f"proj+{p}" for p in ATTENTION_PEERS])
@pytest.mark.parametrize("hk", KV_HEADS)
@pytest.mark.parametrize("frames", FRAMES)
def bench_v2v_frame_local(benchmark, record, frames, hk, impl):
    """Frame-local V2V including the K/V projections (ours never makes K or V)."""
    _skip_unavailable(impl)
    inputs = _inputs("v2v-frame", frames, hk)
    group = group_name("v2v-frame", frames, hk)
    gqa = None
    if impl in OURS:
        fn = ours(impl, "fused")
        with torch.no_grad():
            fn(inputs[0])
        assert crosslmm_ops.last_backend("projected_attention_core") == impl
        flops, moved = fused_counts("v2v-frame", frames, hk)
    else:
        fn, gqa, error = first_working(
            lambda g: projected_then(impl.removeprefix("proj+"), g), inputs
        )
        if fn is None:
            record(
                suite=SUITE,
                group=group,
                backend=impl,
                ms=float("nan"),
                rate=float("nan"),
                unit="TFLOP/s",
                error=error,
            )
            pytest.skip(f"{impl} cannot run {group}: {error}")
        flops, moved = materialized_counts("v2v-frame", frames, hk)
    ms = _time(benchmark, fn, inputs)
    _record(
        record,
        benchmark,
        group,
        impl,
        ms,
        flops,
        moved,
        floor_ms("v2v-frame", frames, hk),
        "TFLOP/s",
        gqa=gqa,
    )


@pytest.mark.parametrize("impl", OURS + DECODE_PEERS)
@pytest.mark.parametrize("hk", KV_HEADS)
@pytest.mark.parametrize("frames", FRAMES)
def bench_t2v_decode(benchmark, record, frames, hk, impl):
    """One decode step: ours from the cached x, the peers from cached K/V."""
    _skip_unavailable(impl)
    group = group_name("decode", frames, hk)
    x_mb, kv_mb = cache_mb(frames, hk)
    print(
        f"\n{group}: cache per layer: x {x_mb:.1f} MB (shared by all {DCAL_LAYERS} DCAL "
        f"layers) vs K+V {kv_mb:.1f} MB; whole model: {x_mb:.1f} MB vs "
        f"{kv_mb * DCAL_LAYERS:.1f} MB"
    )
    gqa = None
    if impl in OURS:
        inputs = _inputs("decode", frames, hk)
        fn = ours(impl, "fused")
        with torch.no_grad():
            fn(inputs[0])
        assert crosslmm_ops.last_backend("projected_attention_core") == impl
        flops, moved = fused_counts("decode", frames, hk)
    else:
        inputs = _inputs("decode", frames, hk, with_kv=True)
        fn, gqa, error = first_working(
            lambda g: lambda t, a=attention_peer(impl, g): a(t["q"], t["k"], t["v"]), inputs
        )
        if fn is None:
            record(
                suite=SUITE,
                group=group,
                backend=impl,
                ms=float("nan"),
                rate=float("nan"),
                unit="TB/s",
                error=error,
            )
            pytest.skip(f"{impl} cannot run {group}: {error}")
        flops, moved = materialized_counts("decode", frames, hk, cached_kv=True)
    ms = _time(benchmark, fn, inputs)
    _record(
        record,
        benchmark,
        group,
        impl,
        ms,
        flops,
        moved,
        floor_ms("decode", frames, hk),
        "TB/s",
        gqa=gqa,
        cache_x_mb=x_mb,
        cache_kv_mb_per_layer=kv_mb,
    )


PREFILL_FRAMES = [32, 256]


@pytest.mark.parametrize("impl", OURS + [f"proj+{p}" for p in ATTENTION_PEERS])
@pytest.mark.parametrize("path", ["fused", "materialized"])
@pytest.mark.parametrize("hk", KV_HEADS)
@pytest.mark.parametrize("frames", PREFILL_FRAMES)
def bench_t2v_prefill(benchmark, record, frames, hk, path, impl):
    """128 text queries, ours on each path; the group names the cost model's choice."""
    _skip_unavailable(impl)
    inputs = _inputs("t2v-prefill", frames, hk)
    group = group_name("t2v-prefill", frames, hk, path)
    gqa = None
    if impl in OURS:
        fn = ours(impl, path)
        with torch.no_grad():
            fn(inputs[0])
        op = "projected_attention_core" if path == "fused" else "cross_attention"
        assert crosslmm_ops.last_backend(op) == impl and pa.last_path() == path
        flops, moved = (fused_counts if path == "fused" else materialized_counts)(
            "t2v-prefill", frames, hk
        )
    else:
        fn, gqa, error = first_working(
            lambda g: projected_then(impl.removeprefix("proj+"), g), inputs
        )
        if fn is None:
            record(
                suite=SUITE,
                group=group,
                backend=impl,
                ms=float("nan"),
                rate=float("nan"),
                unit="TFLOP/s",
                error=error,
            )
            pytest.skip(f"{impl} cannot run {group}: {error}")
        flops, moved = materialized_counts("t2v-prefill", frames, hk)
    ms = _time(benchmark, fn, inputs)
    _record(
        record,
        benchmark,
        group,
        impl,
        ms,
        flops,
        moved,
        floor_ms("t2v-prefill", frames, hk),
        "TFLOP/s",
        gqa=gqa,
    )
