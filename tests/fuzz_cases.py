"""Random cases for every op and module, shared by the hypothesis tests (tests/test_fuzz.py) and the
time-bounded GPU campaign (scripts/fuzz_campaign.py), so both draw the same kinds of problems and
check them with the same helpers as the per-op tests (imported from those tests, not copied) and
against the same oracle and error bound (tests/attention_oracle.py).

A case is drawn through a *drawer* with three methods, ``integers(lo, hi)`` (inclusive),
``sampled_from(seq)`` and ``booleans()``: the campaign passes :class:`RandomDrawer` (a seeded
``random.Random``: one integer seed reproduces the case), the hypothesis tests an adapter over
hypothesis' ``draw`` (so failures shrink). Each ``draw_<op>(d, backend, limits)`` draws only cases
valid for ``backend`` (dtype, head dim, width), and ``run_<op>(backend, case, device)`` builds the
inputs from ``case["seed"]`` and checks them, raising ``AssertionError`` on a mismatch.

Sizes come from a :class:`Limits` profile: :data:`CPU_LIMITS` keeps problems small for the Triton
interpreter; :data:`GPU_LIMITS` draws real lengths (Sq, Sk up to a few thousand, rarely tens of
thousands) but takes the values that become Triton ``constexpr`` (head dim, Dv, heads per group)
from short lists, so a few hundred distinct shapes reuse a few dozen compiled kernels.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable

import attention_oracle as oracle
import torch
from attention_oracle import check_close, check_lse, rounding
from test_cross_attention import check_backend as check_attention
from test_nn import Ref, positions_of, randomize, ref_branch, ref_dcal
from test_projected_attention import check_public as check_projected
from test_projected_attention import problem as projected_problem
from test_token_pool import check_backend as check_pool

import crosslmm_ops
from crosslmm_ops import (
    PoolSpec,
    _backend,
    attention_weights,
    cross_attention,
    flash_attn_func,
    flash_attn_varlen_func,
    merge_attention_states,
)
from crosslmm_ops.nn import (
    CrossAttention,
    DualCrossAttention,
    T2VCrossAttention,
    V2VCrossAttention,
    VisionMemory,
)
from crosslmm_ops.ops.projected_attention import last_path
from crosslmm_ops.testing import cu_seqlens, env_value, non_contiguous, poison_outputs

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


# ----------------------------------------------------------------------------------------------
# Drawers and size profiles
# ----------------------------------------------------------------------------------------------


class RandomDrawer:
    """The drawer interface over a seeded ``random.Random``."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def integers(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def sampled_from(self, seq):
        seq = list(seq)
        return seq[self.rng.randrange(len(seq))]

    def booleans(self) -> bool:
        return self.rng.random() < 0.5


@dataclasses.dataclass(frozen=True)
class Limits:
    max_q: int  # query tokens per segment
    max_k: int  # key tokens per segment
    big_q: int  # ... in a rare large draw
    big_k: int
    head_dims: tuple  # cross_attention head dims for the torch / triton back ends
    dtypes: tuple  # dtypes for torch / triton (cuda: fp16 / bf16 only)
    widths: tuple  # Dv of projected_cross_attention and of the modules' vision tokens
    grid: int  # largest token grid side of token_pool
    tokens_per_frame: tuple  # N of the modules
    hidden: tuple  # modules' hidden sizes
    modules_fast_dtype: torch.dtype  # dtype of the modules on the triton / cuda back ends


CPU_LIMITS = Limits(
    max_q=20,
    max_k=70,
    big_q=20,
    big_k=70,
    head_dims=(8, 24, 40, 64),
    dtypes=(F32, F16),
    widths=(16, 24, 40),
    grid=10,
    tokens_per_frame=(4, 6),
    hidden=(24, 36),
    modules_fast_dtype=F32,
)
GPU_LIMITS = Limits(
    max_q=300,
    max_k=3000,
    big_q=2304,
    big_k=24000,
    head_dims=(40, 64, 128),
    dtypes=(BF16, F16, F32),
    widths=(64, 200, 1152),
    grid=29,
    tokens_per_frame=(6, 49, 729),
    hidden=(96, 256),
    modules_fast_dtype=BF16,
)
CUDA_HEAD_DIMS = (64, 128)
CUDA_DTYPES = (BF16, F16)


def limits_for(device: str) -> Limits:
    return GPU_LIMITS if torch.device(device).type == "cuda" else CPU_LIMITS


def small_limits(limits: Limits) -> Limits:
    """``limits`` with short lengths (at most 16 queries and 64 keys per segment, no large draw)
    but the same head dims, widths and dtypes, hence the same Triton ``constexpr`` values: the
    campaign's warm-up draws compile the kernels its timed cases then use."""
    return dataclasses.replace(
        limits,
        max_q=min(limits.max_q, 16),
        max_k=min(limits.max_k, 64),
        big_q=min(limits.big_q, 16),
        big_k=min(limits.big_k, 64),
    )


def backend_dtypes(backend: str, limits: Limits) -> tuple:
    if backend == "cuda":
        return CUDA_DTYPES
    if backend == "triton" and limits is CPU_LIMITS:
        return (F32, F16)  # the interpreter has no bf16 dot
    return limits.dtypes


def _lengths(d, limits: Limits, *, allow_zero: bool, count: int, big: bool) -> tuple[list, list]:
    lo = 0 if allow_zero else 1
    mq, mk = (limits.big_q, limits.big_k) if big else (limits.max_q, limits.max_k)
    # Segment lengths 0 and 1 are the edge cases: draw them often, not 2/max of the time.
    pick = lambda top: d.sampled_from([lo, 1, d.integers(lo, top)])  # noqa: E731
    return [pick(mq) for _ in range(count)], [pick(mk) for _ in range(count)]


def _big(d) -> bool:
    """A rare large draw (1 in 20)."""
    return d.integers(0, 19) == 0


def _strided(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a non-contiguous view along its first dimension (from the heads back) longer than
    1; a tensor with no such dimension stays as it is (every view of it is contiguous)."""
    for dim in range(t.dim() - 2, -1, -1):
        if t.shape[dim] > 1 and t.numel() > 0:
            return non_contiguous(t, dim=dim)
    return t


def describe(case: dict) -> dict:
    """``case`` with dtypes as strings (for JSON reports and hypothesis notes)."""
    return {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in case.items()}


# ----------------------------------------------------------------------------------------------
# cross_attention
# ----------------------------------------------------------------------------------------------


def draw_attention(d, backend: str, limits: Limits) -> dict:
    varlen = d.booleans()
    big = _big(d)
    if varlen:
        lens_q, lens_k = _lengths(d, limits, allow_zero=True, count=d.integers(1, 4), big=big)
        batch = None
    else:
        batch = d.integers(1, 3)
        lens_q, lens_k = _lengths(d, limits, allow_zero=False, count=1, big=big)
    heads = CUDA_HEAD_DIMS if backend == "cuda" else limits.head_dims
    return dict(
        varlen=varlen,
        batch=batch,
        lens_q=lens_q,
        lens_k=lens_k,
        hk=d.sampled_from([1, 2, 3]),
        group=d.sampled_from([1, 2, 4]),
        d=d.sampled_from(heads),
        dtype=d.sampled_from(backend_dtypes(backend, limits)),
        num_splits=d.integers(0, 5),
        strided=d.booleans(),
        epilogue=d.sampled_from([None, "scalar", "per-head"]),
        lse_grad=d.booleans(),
        seed=d.integers(0, 2**31 - 1),
    )


def attention_inputs(case: dict, device: str):
    torch.manual_seed(case["seed"])
    hq, hk, dim, dtype = case["hk"] * case["group"], case["hk"], case["d"], case["dtype"]
    if case["varlen"]:
        shape_q, shape_k = (sum(case["lens_q"]), hq, dim), (sum(case["lens_k"]), hk, dim)
    else:
        shape_q = (case["batch"], case["lens_q"][0], hq, dim)
        shape_k = (case["batch"], case["lens_k"][0], hk, dim)
    q, k, v = (torch.randn(s, dtype=dtype, device=device) for s in (shape_q, shape_k, shape_k))
    if case["strided"]:  # heads (or tokens) strided, channels contiguous: slices of wider tensors
        q, k, v = (_strided(t) for t in (q, k, v))
    gate = residual = None
    if case.get("epilogue"):
        gate = torch.randn((hq,) if case["epilogue"] == "per-head" else (), device=device)
        residual = torch.randn(shape_q, dtype=dtype, device=device)
    cu_q = cu_seqlens(case["lens_q"], device) if case["varlen"] else None
    cu_k = cu_seqlens(case["lens_k"], device) if case["varlen"] else None
    return q, k, v, cu_q, cu_k, gate, residual


def run_attention(backend: str, case: dict, device: str) -> None:
    q, k, v, cu_q, cu_k, gate, residual = attention_inputs(case, device)
    check_attention(
        backend,
        q,
        k,
        v,
        cu_q=cu_q,
        cu_k=cu_k,
        num_splits=case["num_splits"],
        gate=gate,
        residual=residual,
        lse_grad=case["lse_grad"],
    )


# ----------------------------------------------------------------------------------------------
# token_pool
# ----------------------------------------------------------------------------------------------


def draw_pool(d, backend: str, limits: Limits) -> dict:
    """A valid pooling problem (windows that fit the padded grid; PoolSpec checks the rest)."""
    while True:
        h, w = d.integers(1, limits.grid), d.integers(1, limits.grid)
        mode = d.sampled_from(["avg", "max", "adaptive", "bilinear"])
        if mode in ("avg", "max"):
            kh, kw_ = d.integers(1, min(h, 6) + 1), d.integers(1, min(w, 6) + 1)
            kw = dict(
                kernel_size=(kh, kw_),
                stride=(d.integers(1, 4), d.integers(1, 4)),
                padding=(d.integers(0, kh // 2), d.integers(0, kw_ // 2)),
                ceil_mode=d.booleans(),
            )
            if mode == "avg":
                kw["count_include_pad"] = d.booleans()
        else:
            kw = dict(output_size=(d.integers(1, h + 3), d.integers(1, w + 3)))
            if mode == "bilinear":
                kw["align_corners"] = d.booleans()
        kw["temporal_stride"] = d.integers(1, 3)
        try:
            PoolSpec.make((h, w), mode, **kw)
            break
        except ValueError:
            continue  # e.g. a window larger than the padded grid: draw again
    # The torch back end is the reference itself: fuzz its layouts in float32 only.
    dtypes = (F32,) if backend == "torch" else backend_dtypes(backend, limits)
    if backend == "cuda":
        dtypes = (BF16, F16, F32)  # the pooling kernels take fp32 too
    return dict(
        grid=(h, w),
        mode=mode,
        kw=kw,
        frames=d.integers(1, 5),
        lead=d.sampled_from([(), (2,)]),
        channels=d.integers(1, 70),
        dtype=d.sampled_from(dtypes),
        strided=d.booleans(),
        seed=d.integers(0, 2**31 - 1),
    )


def run_pool(backend: str, case: dict, device: str) -> None:
    torch.manual_seed(case["seed"])
    h, w = case["grid"]
    x = torch.randn(
        *case["lead"], case["frames"], h * w, case["channels"], dtype=case["dtype"], device=device
    )
    if case["strided"]:
        x = _strided(x)
    check_pool(backend, x, case["grid"], case["mode"], case["kw"])


# ----------------------------------------------------------------------------------------------
# projected_cross_attention: both paths forced, norms, biases, segments, splits
# ----------------------------------------------------------------------------------------------


def projected_available(backend: str, path: str) -> bool:
    """Whether the CUDA extension has the kernels ``path`` needs (Triton and torch always do)."""
    if backend != "cuda":
        return True
    name = "projected_attention_core_forward" if path == "fused" else "attention_forward"
    return hasattr(_backend.extension(), name)


def draw_projected(d, backend: str, limits: Limits) -> dict:
    paths = [p for p in ("fused", "materialized") if projected_available(backend, p)]
    path = d.sampled_from(paths)
    varlen = d.booleans()
    big = _big(d)
    if varlen:
        lens = _lengths(d, limits, allow_zero=True, count=d.integers(1, 4), big=big)
        batch = None
    else:
        lq, lk = _lengths(d, limits, allow_zero=False, count=1, big=big)
        lens, batch = None, (d.integers(1, 3), lq[0], lk[0])
    # Materialised K/V on the CUDA kernels: their head dims; otherwise keep d small (it only
    # enters the projections on the fused path).
    heads = (
        CUDA_HEAD_DIMS
        if backend == "cuda" and path == "materialized"
        else tuple(h for h in limits.head_dims if h <= 64)
        + ((128,) if limits is GPU_LIMITS else ())
    )
    hk, group = d.sampled_from([(1, 1), (2, 2), (1, 4), (2, 3), (3, 1)])
    norm = d.sampled_from([None, "layernorm", "rmsnorm"])
    # One key per segment (dq, dW_k exactly 0 in theory, a float32 residue in practice) is drawn
    # as often as any other length: check_public's rounding-noise floor allows for the residue.
    dtype = d.sampled_from(backend_dtypes(backend, limits))
    return dict(
        path=path,
        varlen=varlen,
        batch=batch,
        lens=lens,
        hk=hk,
        group=group,
        d=d.sampled_from(heads),
        dv=d.sampled_from(limits.widths),
        dtype=dtype,
        norm=norm,
        biases=d.booleans(),
        norm_params=d.booleans() or norm is None,
        num_splits=d.integers(0, 5),
        strided=d.booleans(),
        lse_grad=d.booleans(),
        seed=d.integers(0, 2**31 - 1),
    )


def run_projected(backend: str, case: dict, device: str) -> None:
    torch.manual_seed(case["seed"])
    tensors, packed = projected_problem(
        batch=case["batch"],
        lens=case["lens"],
        hq=case["hk"] * case["group"],
        hk=case["hk"],
        d=case["d"],
        dv=case["dv"],
        dtype=case["dtype"],
        device=device,
        biases=case["biases"],
        norm_params=case["norm_params"],
    )
    if case["strided"]:
        tensors["q"], tensors["x"] = _strided(tensors["q"]), _strided(tensors["x"])
    lens = case["lens"] or ([case["batch"][1]], [case["batch"][2]])
    pairs = sum(a * b for a, b in zip(*lens))
    # check_public differentiates the reference, which has no graph when no query sees a key:
    # check the forward there, and that the gradients are zeros, here.
    check_projected(
        backend,
        tensors,
        packed,
        path=case["path"],
        norm=case["norm"],
        num_splits=case["num_splits"],
        lse_grad=case["lse_grad"],
        check_grad=pairs > 0,
    )
    if pairs == 0 and tensors["q"].numel():
        leaves = {n: t.detach().requires_grad_(True) for n, t in tensors.items()}
        with poison_outputs():
            out = crosslmm_ops.projected_cross_attention(
                **leaves, **packed, norm=case["norm"], path=case["path"], backend=backend
            )
            grads = torch.autograd.grad(
                out.float().sum(), list(leaves.values()), allow_unused=True, materialize_grads=True
            )
        assert torch.equal(out, torch.zeros_like(out)), "no keys: the output must be 0"
        for name, gr in zip(leaves, grads):
            assert torch.equal(gr, torch.zeros_like(gr)), f"no keys: d{name} must be 0"


# ----------------------------------------------------------------------------------------------
# merge_attention_states (partials from a back end), attention_weights, the flash-attn shims
# ----------------------------------------------------------------------------------------------


def draw_merge(d, backend: str, limits: Limits) -> dict:
    case = draw_attention(d, backend, limits)
    case.update(
        varlen=True,
        batch=None,
        epilogue=None,
        strided=False,
        parts=d.integers(1, 4),
        cut_seed=d.integers(0, 2**31 - 1),
        stacked=d.booleans(),
    )
    if len(case["lens_q"]) == 1 and case["lens_q"][0] == 0:
        case["lens_q"] = [1]
    return case


def run_merge(backend: str, case: dict, device: str) -> None:
    """Attention over each segment's keys cut into ``parts`` ranges (some empty), merged by
    their LSEs, against the float64 reference over all keys: forward, LSE, and the gradients of
    q, k, v through the merge (each partial's LSE gradient reaches its kernel's backward)."""
    q, k, v, cu_q, cu_k, _, _ = attention_inputs(case, device)
    dtype = q.dtype
    rng = random.Random(case["cut_seed"])
    bounds = cu_k.tolist()
    cuts = []  # per part: per segment (start, end) in the packed keys
    for seg in range(len(bounds) - 1):
        a, b = bounds[seg], bounds[seg + 1]
        points = sorted([a, b] + [rng.randint(a, b) for _ in range(case["parts"] - 1)])
        cuts.append(list(zip(points, points[1:])))
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    ref = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    low = [t.detach().requires_grad_(True) for t in (q, k, v)]
    outs, lses = [], []
    with poison_outputs():
        for part in range(case["parts"]):
            ranges = [c[part] for c in cuts]
            rows = (
                torch.cat([torch.arange(a, b, device=device) for a, b in ranges])
                if ranges
                else torch.zeros(0, dtype=torch.long, device=device)
            )
            cu_part = cu_seqlens([b - a for a, b in ranges], device)
            o, l = cross_attention(
                leaves[0],
                leaves[1][rows],
                leaves[2][rows],
                cu_seqlens_q=cu_q,
                cu_seqlens_k=cu_part,
                return_lse=True,
                backend=backend,
                num_splits=case["num_splits"],
            )
            outs.append(o)
            lses.append(l)
    assert crosslmm_ops.last_backend("cross_attention") == backend
    if case["stacked"]:
        out, lse = merge_attention_states(torch.stack(outs), torch.stack(lses))
    else:
        out, lse = merge_attention_states(outs, lses)
    ref_out, ref_lse = oracle.attention(*ref, cu_q, cu_k)
    low_out, low_lse = oracle.attention(*low, cu_q, cu_k, dtype=dtype)
    assert out.dtype == dtype and out.shape == ref_out.shape and lse.shape == ref_lse.shape
    # Each partial is rounded to the dtype before the merge: one more rounding than the full call.
    check_close("out", out, low_out, ref_out, factor=2, floor=2 * rounding(ref_out, dtype))
    check_lse(lse, low_lse, ref_lse, factor=2, floor=1e-5)
    finite = torch.isfinite(ref_lse)
    g = torch.randn_like(ref_out)
    g_lse = torch.randn_like(ref_lse)

    def grads(o, l, ts):
        loss = (o * g.to(o.dtype)).sum() + (l.where(finite, 0) * g_lse.to(l.dtype)).sum()
        if not loss.requires_grad:
            return [torch.zeros_like(t) for t in ts]
        return torch.autograd.grad(loss, ts, allow_unused=True, materialize_grads=True)

    expected, lowg = grads(ref_out, ref_lse, ref), grads(low_out, low_lse, low)
    with poison_outputs():
        actual = grads(out, lse, leaves)
    mags = [t.detach().abs().max().item() if t.numel() else 0.0 for t in (g, q, k, v)]
    # The float32 cancellation floor of dS = P (dO.v - Delta) (see test_cross_attention).
    cancel = 8 * torch.finfo(F32).eps * mags[0] * mags[3] * q.shape[-1] * max(mags[1:3])
    # dv = P^T dO sums over a segment's queries. The backward recomputes P = exp(s - lse) in
    # float32 from the merged LSE, a relative error of ~2 eps per P; autograd through the
    # reference reuses its own P. Independent across queries, the difference grows like
    # sqrt(queries): 4 of those standard deviations (a 197-query, 1-key float32 segment of the
    # GPU campaign was 1.24x over the bound without it).
    if cu_q is None:
        queries = q.shape[1]  # batched (B, Sq, H, D)
    else:
        queries = int((cu_q[1:] - cu_q[:-1]).max().item()) if cu_q.numel() > 1 else 0
    queries = max(queries, 1)
    p_noise = 8 * torch.finfo(F32).eps * mags[0] * queries**0.5
    for name, a, e, lo in zip(("dq", "dk", "dv"), actual, expected, lowg):
        # Partials of fewer keys each round differently from the one full call: 3x + 2 roundings.
        floor = 2 * rounding(e, dtype) + (cancel if name != "dv" else p_noise)
        check_close(name, a, lo, e, factor=3, floor=floor)


def draw_weights(d, backend: str, limits: Limits) -> dict:
    case = draw_attention(d, "torch", limits)
    case.update(
        epilogue=None,
        n_index=d.integers(1, 4),
        index_seed=d.integers(0, 2**31 - 1),
        with_lse=d.booleans(),
        block_size=d.sampled_from([1, 7, 64, 4096]),
        scale=d.sampled_from([None, 0.3]),
    )
    if sum(case["lens_q"]) == 0:
        case["lens_q"] = [1] + case["lens_q"][1:]
    return case


def run_weights(backend: str, case: dict, device: str) -> None:
    """attention_weights (plain torch ops, no back end) against the oracle's probabilities from
    the same inputs, every layout; with the LSE given or recomputed."""
    q, k, _, cu_q, cu_k, _, _ = attention_inputs(case, device)
    rng = random.Random(case["index_seed"])
    limit = q.shape[1] if not case["varlen"] else q.shape[0]
    idx = [rng.randrange(-limit, limit) for _ in range(case["n_index"])]
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k) if case["varlen"] else {}
    lse = None
    if case["with_lse"]:
        _, lse = cross_attention(
            q, k, k, softmax_scale=case["scale"], return_lse=True, **kw, backend="torch"
        )
    probs = attention_weights(
        q,
        k,
        softmax_scale=case["scale"],
        query_index=idx,
        lse=lse,
        block_size=case["block_size"],
        **kw,
    )
    ref = oracle.probabilities(q, k, cu_q, cu_k, query_index=idx, softmax_scale=case["scale"])
    assert probs.shape == ref.shape, (probs.shape, ref.shape)
    # attention_weights computes in float32 (float64 for float64): plain PyTorch in that dtype is
    # the baseline. The floors keep within the old absolute bound (2e-5; 1e-10 in float64):
    # float32's error on probabilities <= 1 is ~1e-6, so 2x it + 1e-5 stays below 2e-5.
    acc = F64 if q.dtype == F64 else F32
    low = oracle.probabilities(
        q, k, cu_q, cu_k, query_index=idx, softmax_scale=case["scale"], dtype=acc
    )
    check_close("probs", probs, low, ref, factor=2, floor=5e-11 if acc == F64 else 1e-5)


def draw_flash(d, backend: str, limits: Limits) -> dict:
    case = draw_attention(d, backend, limits)
    case.update(
        epilogue=None,
        scale=d.sampled_from([None, 0.2]),
        probs=d.booleans(),
        deterministic=d.booleans(),
    )
    return case


def run_flash(backend: str, case: dict, device: str) -> None:
    """flash_attn_func / flash_attn_varlen_func (the back end via CROSSLMM_BACKEND, as a user of
    the shims would pick it) give exactly cross_attention's results and return tuple, forward and
    backward; cross_attention itself is fuzzed against the reference."""
    q, k, v, cu_q, cu_k, _, _ = attention_inputs(case, device)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    direct = [t.detach().requires_grad_(True) for t in (q, k, v)]
    kw = dict(
        softmax_scale=case["scale"],
        deterministic=case["deterministic"],
        return_attn_probs=case["probs"],
    )
    with env_value(_backend.ENV_VAR, backend), poison_outputs():
        if case["varlen"]:
            mq, mk = max(case["lens_q"]), max(case["lens_k"])
            result = flash_attn_varlen_func(*leaves, cu_q, cu_k, mq, mk, **kw)
        else:
            result = flash_attn_func(*leaves, **kw)
    assert crosslmm_ops.last_backend("cross_attention") == backend
    packed = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k) if case["varlen"] else {}
    with poison_outputs():
        out, lse = cross_attention(
            *direct,
            softmax_scale=case["scale"],
            return_lse=True,
            deterministic=case["deterministic"],
            backend=backend,
            **packed,
        )
    if case["probs"]:
        assert isinstance(result, tuple) and len(result) == 3 and result[2] is None
        got_out, got_lse = result[:2]
        assert torch.equal(got_lse, lse), "lse"
    else:
        assert isinstance(result, torch.Tensor)
        got_out = result
    assert torch.equal(got_out, out), "out"
    g = torch.randn_like(out)
    a = torch.autograd.grad((got_out * g).sum(), leaves, allow_unused=True, materialize_grads=True)
    e = torch.autograd.grad((out * g).sum(), direct, allow_unused=True, materialize_grads=True)
    for name, x, y in zip(("dq", "dk", "dv"), a, e):
        assert torch.equal(x, y), name


# ----------------------------------------------------------------------------------------------
# The modules against test_nn's float64 composition
# ----------------------------------------------------------------------------------------------

MODULE_KINDS = ("dcal", "v2v", "t2v", "generic")


def draw_module(d, backend: str, limits: Limits) -> dict:
    kind = d.sampled_from(MODULE_KINDS)
    hk = d.sampled_from([1, 2])
    heads = hk * d.sampled_from([1, 2, 3])
    kv_path = d.sampled_from(
        [p for p in ("fused", "materialized") if projected_available(backend, p)]
    )
    if backend == "cuda" and kv_path == "materialized":
        head_dim = d.sampled_from(CUDA_HEAD_DIMS)
    else:
        head_dim = d.sampled_from([8, 10] if limits is CPU_LIMITS else [40, 64, 128])
    frames = [d.sampled_from([0, 1, d.integers(0, 3)]) for _ in range(d.integers(1, 3))]
    pooled = d.integers(1, 3)
    case = dict(
        kind=kind,
        hidden=d.sampled_from(limits.hidden),
        vision=d.sampled_from(limits.widths),
        heads=heads,
        kv_heads=hk,
        head_dim=head_dim,
        frames=frames,
        tokens=d.sampled_from(limits.tokens_per_frame),
        pooled=pooled,
        text=d.integers(0, 5),
        gap=d.integers(0, 2),
        pad=d.integers(0, 2),
        scope=d.sampled_from(["global", "frame"]),
        share_kv=d.booleans(),
        share_gate=d.booleans(),
        bias=d.booleans(),
        vision_norm=d.sampled_from([None, "rmsnorm", "layernorm"]),
        query_norm=d.sampled_from([None, "rmsnorm", "layernorm"]),
        branches=d.sampled_from(["both", "v2v", "t2v"]),
        kv_path=kv_path,
        from_features=d.booleans(),
        dtype=F64 if backend == "torch" else limits.modules_fast_dtype,
        seed=d.integers(0, 2**31 - 1),
    )
    if backend == "cuda" and kind == "generic":
        case["kind"] = "dcal"
    return case


def _module(case: dict, backend: str):
    common = dict(
        bias=case["bias"],
        vision_norm=case["vision_norm"],
        query_norm=case["query_norm"],
        kv_path=case["kv_path"],
        backend=backend,
    )
    shape = (case["hidden"], case["vision"], case["heads"], case["kv_heads"], case["head_dim"])
    kind = case["kind"]
    if kind == "dcal":
        branches = case["branches"]
        return DualCrossAttention(
            *shape,
            v2v=branches != "t2v",
            t2v=branches != "v2v",
            v2v_scope=case["scope"],
            share_kv=case["share_kv"],
            share_gate=case["share_gate"],
            **common,
        )
    if kind == "v2v":
        return V2VCrossAttention(*shape, scope=case["scope"], **common)
    if kind == "t2v":
        return T2VCrossAttention(*shape, **common)
    return CrossAttention(*shape, **common)


def _module_batch(case: dict):
    """Features per sample, hidden states and masks: each sample's ``T_b * n`` pooled positions
    after ``gap`` text tokens, then ``text`` tokens, then ``pad`` padding (neither)."""
    frames, n = case["frames"], case["pooled"]
    L = case["gap"] + max(frames) * n + case["text"] + case["pad"] + 1
    feats = [torch.randn(t, case["tokens"], case["vision"], dtype=F64) for t in frames]
    h = torch.randn(len(frames), L, case["hidden"], dtype=F64)
    visual = torch.zeros(len(frames), L, dtype=torch.bool)
    text = torch.zeros(len(frames), L, dtype=torch.bool)
    for b, t in enumerate(frames):
        visual[b, case["gap"] : case["gap"] + t * n] = True
        text[b, : case["gap"]] = True
        end = case["gap"] + t * n
        text[b, end : end + case["text"]] = True
    return feats, h, visual, text


def _memory(case: dict, feats, dtype, device):
    feats = [f.to(device, dtype) for f in feats]
    if case["from_features"]:
        frames, T = case["frames"], max(case["frames"])
        padded = torch.randn(
            len(frames), max(T, 1), case["tokens"], case["vision"], dtype=dtype, device=device
        )
        mask = torch.zeros(len(frames), max(T, 1), dtype=torch.bool)
        for b, f in enumerate(feats):
            padded[b, : f.shape[0]] = f
            mask[b, : f.shape[0]] = True
        return VisionMemory.from_features(padded, case["pooled"], mask.to(device)), feats
    return VisionMemory.from_list(feats, case["pooled"]), feats


def _call(module, case, h, memory, visual, text):
    kind = case["kind"]
    if kind == "dcal":
        return module(h, memory, visual, text)
    if kind == "v2v":
        return module(h, memory, visual)
    if kind == "t2v":
        return module(h, memory, text)
    return module(h, memory)


def _expected(case, ref: Ref, module, h, feats, visual, text):
    cfg = dict(
        heads=case["heads"],
        kv_heads=case["kv_heads"],
        head_dim=case["head_dim"],
        eps=1e-6,
        pooled=case["pooled"],
        query_norm=case["query_norm"],
        vision_norm=case["vision_norm"],
    )
    if case["kind"] == "dcal":
        return ref_dcal(ref, module, h, feats, visual, text, cfg=cfg)
    scope = case["scope"] if case["kind"] == "v2v" else "global"
    mask = {"v2v": visual, "t2v": text}.get(case["kind"])
    rows = positions_of(mask) if mask is not None else [list(range(h.shape[1]))] * h.shape[0]
    return h + ref_branch(ref.sub(""), h, feats, rows, scope=scope, **cfg)


def run_module(backend: str, case: dict, device: str) -> None:
    """torch back end, float64: forward and every gradient (hidden states, tokens, parameters)
    against test_nn's dense float64 composition. triton / cuda, low precision: forward and the
    hidden states' gradient against the same composition, within 2x (3x for the gradient) the
    error of the same module on plain PyTorch in that precision, plus a rounding of the output."""
    torch.manual_seed(case["seed"])
    base = randomize(_module(case, "torch").double())
    with torch.no_grad():  # non-zero gates: the attention must show in the output
        for name, p in base.named_parameters():
            if name.endswith("alpha"):
                p.copy_(torch.empty_like(p).uniform_(0.3, 1.0))
    feats, h, visual, text = _module_batch(case)
    ref = Ref(base)
    ref_feats = [f.detach().clone().requires_grad_() for f in feats]
    ref_h = h.detach().clone().requires_grad_()
    expected = _expected(case, ref, base, ref_h, ref_feats, visual, text)
    g = torch.randn_like(expected)

    def run(dtype, which):
        module = _module(case, which).to(device, dtype)  # cast first: load without rounding
        module.load_state_dict(base.state_dict())
        x = h.to(device, dtype).requires_grad_()
        leaves = [f.detach().to(device).requires_grad_() for f in feats]
        memory, _ = _memory(case, leaves, dtype, device)
        with poison_outputs(), crosslmm_ops.record_backends() as log:
            out = _call(module, case, x, memory, visual.to(device), text.to(device))
        return module, x, out, log, leaves

    if backend == "torch":
        module, x, out, log, leaves = run(F64, "torch")
        assert all(b == "torch" for _, b in log), log
        if log:
            assert last_path() == case["kv_path"]
        torch.testing.assert_close(out.cpu(), expected.detach(), atol=1e-10, rtol=1e-10)
        expected.backward(g)
        with poison_outputs():
            out.backward(g.to(device))
        for name, p in module.named_parameters():
            e = ref.params[name].grad
            a = p.grad
            if e is None:
                assert a is None or not a.any(), name
                continue
            assert a is not None, f"no gradient reached {name}"
            torch.testing.assert_close(a.cpu(), e, atol=1e-9, rtol=1e-9, msg=name)
        torch.testing.assert_close(x.grad.cpu(), ref_h.grad, atol=1e-9, rtol=1e-9)
        for b, (leaf, r) in enumerate(zip(leaves, ref_feats)):
            e = r.grad if r.grad is not None else torch.zeros_like(r)
            a = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            torch.testing.assert_close(a.cpu(), e, atol=1e-9, rtol=1e-9, msg=f"features[{b}]")
        return
    dtype = case["dtype"]
    expected.backward(g)
    results = {}
    for which in ("torch", backend):
        module, x, out, log, _ = run(dtype, which)
        with poison_outputs():
            out.backward(g.to(device, dtype))
        results[which] = (out.detach().double().cpu(), x.grad.double().cpu(), log)
    low_out, low_dx, _ = results["torch"]
    out, dx, log = results[backend]
    assert {b for _, b in log} <= {backend}, log
    eps = torch.finfo(dtype).eps
    e_out, e_dx = expected.detach(), ref_h.grad
    check_close("out", out, low_out, e_out, factor=2, floor=2 * eps * e_out.abs().max().item())
    check_close("dx", dx, low_dx, e_dx, factor=3, floor=2 * eps * e_dx.abs().max().item())


# ----------------------------------------------------------------------------------------------
# The table the campaign and the tests walk
# ----------------------------------------------------------------------------------------------

OPS: dict[str, tuple[Callable, Callable]] = {
    "cross_attention": (draw_attention, run_attention),
    "token_pool": (draw_pool, run_pool),
    "projected_cross_attention": (draw_projected, run_projected),
    "merge_attention_states": (draw_merge, run_merge),
    "attention_weights": (draw_weights, run_weights),
    "flash_attn": (draw_flash, run_flash),
    "modules": (draw_module, run_module),
}
# attention_weights is plain torch ops whatever the device: one "back end".
BACKENDS_OF = {name: ("torch", "triton", "cuda") for name in OPS}
BACKENDS_OF["attention_weights"] = ("torch",)


def runnable_backends(op: str, device: str) -> list[str]:
    """The back ends ``op`` can be checked on here (torch always; triton / cuda when they run on
    ``device`` and the extension has the op's kernels)."""
    dev = torch.device(device)
    out = []
    for name in BACKENDS_OF[op]:
        if name == "torch":
            out.append(name)
        elif name == "triton" and _backend.triton_runnable(dev)[0]:
            out.append(name)
        elif name == "cuda" and _backend.cuda_runnable(dev)[0]:
            ext = _backend.extension()
            if op == "token_pool":
                out.append(name)
            elif op in ("projected_cross_attention", "modules"):
                if any(projected_available(name, p) for p in ("fused", "materialized")):
                    out.append(name)
            elif hasattr(ext, "attention_forward"):
                out.append(name)
    return out
