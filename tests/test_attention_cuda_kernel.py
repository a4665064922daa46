"""The CUDA attention kernels (csrc/attention/), every one of them, called directly through
``crosslmm_ops._C.attention_forward / attention_backward``, against the float64 oracle of
tests/attention_oracle.py.

Kernels (the entry points' ``kernel`` argument): the forward's mma.sync kernel (every GPU) and sm90
wgmma + TMA kernel (Hopper); the backward's mma.sync kernels, sm90 wgmma dK/dV + dQ kernels, and
sm90 dK/dV with the mma.sync dQ ("sm90_dkdv", a diagnostic that tells the two sm90 kernels apart).
The tests that are the same for every kernel are parametrised over the kernel; each kernel keeps
its own list of cases (the sm90 kernels take head dim 128 only and are tested at their tile
edges). Every call asserts, through the name the extension returns, that the kernel asked for
really ran, and outputs are poisoned with NaN before it, so an element a kernel forgets to write
fails. Each check prints its errors (``pytest -s`` or ``-rA`` shows them).

The sm90 kernels' own tests (a smoke test in a child process, the kernel choice, TMA strides,
values past a segment's end, a fresh thread, the public API) are in test_attention_sm90.py and
test_attention_bwd_sm90.py; their smoke tests gate the sm90 cases here: when a smoke test fails
(a hang, a crash, wrong numbers) these cases are skipped instead of running the kernel in-process.

Error bounds (attention_oracle.check_close, after flash-attn's tests): the max error of the kernel
against the float64 oracle is at most 2x (forward) / 3x (gradients) the max error of plain PyTorch
computing the same thing in the kernel's low precision, plus 1e-3 of the reference's magnitude.

Every test needs a GPU and an extension built with the attention kernels; the (2304, 186624) cases
(CrossLMM-2B V2V at 256 frames) are marked slow: run them with ``CROSSLMM_RUN_SLOW=1``.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import math
import subprocess
import sys

import attention_oracle as oracle
import pytest
import torch
from attention_oracle import check_close, check_lse, max_err

from crosslmm_ops import _backend
from crosslmm_ops.testing import cu_seqlens as cu_seqlens_on
from crosslmm_ops.testing import sm90_skip_reason


def extension():
    ext = _backend.extension()
    return ext if ext is not None and hasattr(ext, "attention_forward") else None


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available() or extension() is None,
        reason="needs a CUDA GPU and crosslmm_ops._C built with attention_forward",
    ),
]

DTYPES = [torch.bfloat16, torch.float16]
HQ, HK = 12, 2  # CrossLMM-2B: 12 query heads, 2 kv heads
V2V_256 = (2304, 186624)  # CrossLMM-2B's V2V at 256 frames: 2304 pooled queries, 256 * 729 keys

# The kernels, by the names the extension returns (what ran), and the ``kernel`` argument that
# asks for each (where an sm90 kernel cannot run, the extension runs the mma.sync one instead).
MMA, SM90, SM90_DKDV = "mma_sync", "sm90_wgmma", "sm90_dkdv"
SM90_PACKED = "sm90_packed"  # forward only: wgmma on the mma.sync kernel's GQA-packed plan
KERNEL_ARGUMENT = {
    MMA: "mma_sync",
    SM90: "sm90",
    SM90_DKDV: "sm90_dkdv",
    SM90_PACKED: "sm90_packed",
}


# ----------------------------------------------------------------------------------------------
# Calling the kernels
# ----------------------------------------------------------------------------------------------


cu_seqlens = functools.partial(cu_seqlens_on, device="cuda")


def make_inputs(lens_q, lens_k, hq, hk, d, dtype):
    q = torch.randn(sum(lens_q), hq, d, device="cuda", dtype=dtype)
    k = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=dtype)
    v = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=dtype)
    return q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k)


def segment_lengths(sq: int, sk: int) -> tuple[list[int], list[int]]:
    """The named (Sq, Sk) segment, plus a second, differently sized one when that stays cheap."""
    if sq * sk > 2_000_000:
        return [sq], [sk]
    return [sq, sq // 3 + 1], [sk, sk // 2 + 17]


def longest(cu: torch.Tensor) -> int:
    return max((cu[1:] - cu[:-1]).tolist(), default=0)


def assert_ran(ran: str, kernel: str) -> None:
    assert ran == kernel, f"expected the {kernel} kernel to run, got {ran!r}"


def run_forward(q, k, v, cu_q, cu_k, scale, num_splits=0, out=None, kernel=MMA):
    """One ``_C.attention_forward`` call asking for ``kernel`` (always named, as the library names
    the planner's choice; ``None``: the extension's default) with NaN-poisoned outputs: (out, lse,
    the kernel that ran)."""
    if out is None:
        out = torch.full(q.shape, math.nan, device="cuda", dtype=q.dtype)
    else:
        out.fill_(math.nan)
    lse = torch.full((q.shape[1], q.shape[0]), math.nan, device="cuda", dtype=torch.float32)
    choice = {} if kernel is None else {"kernel": KERNEL_ARGUMENT[kernel]}
    ran = extension().attention_forward(
        q, k, v, out, lse, cu_q, cu_k, longest(cu_q), longest(cu_k), scale, num_splits, **choice
    )
    torch.cuda.synchronize()  # a launch failure shows up here, at the call that caused it
    return out, lse, ran


def run_backward(
    dout, q, k, v, out, lse, cu_q, cu_k, scale, kernel=MMA, grads=None, deterministic=False
):
    """One ``_C.attention_backward`` call asking for ``kernel`` with NaN-poisoned gradients:
    (dq, dk, dv, the kernel that ran). ``grads`` (optional) are the tensors to write, e.g. strided
    views."""
    if grads is None:
        grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    for g in grads:
        g.fill_(math.nan)
    choice = {} if kernel is None else {"kernel": KERNEL_ARGUMENT[kernel]}
    ran = extension().attention_backward(
        dout,
        q,
        k,
        v,
        out,
        lse,
        *grads,
        cu_q,
        cu_k,
        longest(cu_q),
        longest(cu_k),
        scale,
        deterministic,
        **choice,
    )
    torch.cuda.synchronize()
    return (*grads, ran)


def check_forward(q, k, v, cu_q, cu_k, scale, num_splits=0, kernel=MMA, label=""):
    """Runs ``kernel``, asserts it ran and matches the oracle; returns (out, lse)."""
    out, lse, ran = run_forward(q, k, v, cu_q, cu_k, scale, num_splits, kernel=kernel)
    assert_ran(ran, kernel)
    with torch.no_grad():
        ref_out, ref_lse = oracle.attention(q, k, v, cu_q, cu_k, softmax_scale=scale)
        low_out, low_lse = oracle.attention(q, k, v, cu_q, cu_k, softmax_scale=scale, dtype=q.dtype)
    reports = [
        check_close("out", out, low_out, ref_out, factor=2),
        check_lse(lse, low_lse, ref_lse),
    ]
    print(f"\n[{kernel} {label} {q.dtype} splits={num_splits}] " + "; ".join(reports))
    return out, lse


def check_backward(q, k, v, cu_q, cu_k, scale, kernel=MMA, dout=None, grads=None, label=""):
    """Runs the ``kernel`` backward (on the out and lse of the extension's forward), asserts it ran
    and matches the oracle (an sm90 backward also prints its distance to the mma.sync one);
    returns (dq, dk, dv)."""
    out, lse, _ = run_forward(q, k, v, cu_q, cu_k, scale)
    if dout is None:
        dout = torch.randn_like(out)
    dq, dk, dv, ran = run_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale, kernel, grads)
    assert_ran(ran, kernel)
    ref = oracle.attention_grads(dout, q, k, v, cu_q, cu_k, softmax_scale=scale)
    low = oracle.attention_grads(dout, q, k, v, cu_q, cu_k, softmax_scale=scale, dtype=q.dtype)
    reports = [
        check_close(name, ours, lo, r, factor=3)
        for name, ours, lo, r in zip(("dq", "dk", "dv"), (dq, dk, dv), low, ref)
    ]
    if kernel != MMA:
        *mma, mma_ran = run_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale, MMA)
        assert mma_ran == MMA
        reports.append(
            "vs mma.sync: "
            + ", ".join(
                f"{n} {max_err(a, b):.2e}" for n, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), mma)
            )
        )
    print(f"\n[{kernel} backward {label} {q.dtype}] " + "; ".join(reports))
    return dq, dk, dv


def ranges(values) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    values, parts = sorted(set(values)), []
    for v in values:
        if parts and v == parts[-1][1] + 1:
            parts[-1][1] = v
        else:
            parts.append([v, v])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts) or "-"


def describe_mismatch(result, ref, cu, tol, tile) -> str:
    """Where an output or gradient ``[tokens, heads, D]`` is wrong, in an sm90 kernel's terms:
    token within its ``tile`` (out, dQ: 128-row tiles, rows 0-63 consumer warpgroup 0, 64-127
    warpgroup 1; dK/dV: 128-key tiles, likewise), channels (0-63 and 64-127 are the two TMA /
    swizzle halves), heads, segments; NaNs counted apart."""
    bad = ((result.double() - ref.double()).abs() > tol) | torch.isnan(result)
    if not bad.any():
        return "no element beyond tolerance"
    bounds = cu.tolist()
    tokens, heads, chans = bad.nonzero(as_tuple=True)
    seg = torch.bucketize(tokens, torch.tensor(bounds[1:], device=tokens.device), right=True)
    tile_row = (tokens - torch.tensor(bounds, device=tokens.device)[seg]) % tile
    return (
        f"{int(bad.sum())} bad of {result.numel()} ({int(torch.isnan(result).sum())} NaN); "
        f"tile rows {ranges(tile_row.tolist())}; channels {ranges(chans.tolist())}; heads "
        f"{ranges(heads.tolist())}; segments {ranges(seg.tolist())}"
    )


# ----------------------------------------------------------------------------------------------
# Parametrising over the kernels
# ----------------------------------------------------------------------------------------------


def require(kernel: str) -> None:
    """Skips an sm90 case where the sm90 kernels cannot run, or where their smoke test (in a child
    process, see test_attention_sm90.py) failed."""
    if kernel == MMA:
        return
    backward = kernel not in (SM90, SM90_PACKED)
    why = sm90_skip_reason(
        "attention_backward_kernel_name" if backward else "attention_forward_kernel_name"
    )
    if why is not None:
        pytest.skip(why)
    smoke = importlib.import_module(
        "test_attention_bwd_sm90" if backward else "test_attention_sm90"
    )
    if smoke.smoke_error() is not None:
        pytest.skip(
            f"the sm90 smoke test failed (see {smoke.__name__}.py::test_smoke); not "
            f"running the kernel in-process"
        )


def _id(value) -> str:
    if isinstance(value, torch.dtype):
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}[value]
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(x, int) for x in value):
        return f"{value[0]}x{value[1]}"
    if isinstance(value, tuple):
        return "/".join(_id(x) for x in value)
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def per_kernel(argnames: str, cases: dict):
    """``parametrize("kernel," + argnames)`` over each kernel's own cases (tuples, or
    ``pytest.param`` for marked ones)."""
    params = []
    for kernel, kernel_cases in cases.items():
        for case in kernel_cases:
            values, marks = (case.values, case.marks) if hasattr(case, "marks") else (case, ())
            values = values if isinstance(values, tuple) else (values,)
            params.append(
                pytest.param(
                    kernel, *values, marks=marks, id="-".join([kernel] + [_id(x) for x in values])
                )
            )
    return pytest.mark.parametrize("kernel," + argnames, params)


slow = pytest.mark.slow
# (Sq, Sk) of the first segment. mma.sync: decode, V2V per frame, Sq != Sk both ways, a long key
# set, CrossLMM-2B's V2V at 32 frames (288 pooled queries against 32 * 729 keys). sm90 forward:
# one and two 128-row tiles, 128-key tiles; its backward also Sq and Sk swapped and (576, 46656).
SHAPES = [(1, 339), (3, 799), (9, 729), (113, 203), (203, 113), (16, 20000), (288, 23328)]
SM90_SHAPES = [(1, 339), (9, 729), (113, 203), (128, 128), (300, 5000)]
SM90_BWD_SHAPES = [(1, 339), (9, 729), (113, 203), (128, 128), (300, 5000), (576, 46656)]
SM90_BWD_SHAPES += [(sk, sq) for sq, sk in SM90_BWD_SHAPES if sq != sk and sq * sk <= 2_000_000]


# ----------------------------------------------------------------------------------------------
# Forward against the oracle
# ----------------------------------------------------------------------------------------------


@per_kernel(
    "shape,dtype,head_dim",
    {
        MMA: list(itertools.product(SHAPES, DTYPES, [64, 128])),
        SM90: list(itertools.product(SM90_SHAPES, DTYPES, [128]))
        + [pytest.param(V2V_256, dtype, 128, marks=slow) for dtype in DTYPES],
        SM90_PACKED: list(itertools.product(SHAPES + [(10, 729), (11, 65)], DTYPES, [128])),
    },
)
def test_forward(kernel, shape, dtype, head_dim):
    require(kernel)
    q, k, v, cu_q, cu_k = make_inputs(*segment_lengths(*shape), HQ, HK, head_dim, dtype)
    check_forward(q, k, v, cu_q, cu_k, head_dim**-0.5, kernel=kernel, label=f"{shape}")


# mma.sync: up to 16 splits merge with a warp per row, more with a CTA per row (17, 40 on the
# long keys).
@per_kernel(
    "shape,num_splits",
    {
        MMA: list(
            itertools.product([(1, 339), (9, 729), (203, 113), (16, 20000)], [0, 1, 3, 7, 17, 40])
        ),
        SM90: list(itertools.product([(9, 729), (300, 5000), (1, 3000)], [0, 1, 2, 3, 7])),
        SM90_PACKED: list(
            itertools.product([(1, 339), (9, 729), (16, 20000)], [0, 1, 3, 7, 17, 40])
        ),
    },
)
def test_forward_num_splits(kernel, shape, num_splits):
    require(kernel)
    q, k, v, cu_q, cu_k = make_inputs(*segment_lengths(*shape), HQ, HK, 128, torch.bfloat16)
    check_forward(q, k, v, cu_q, cu_k, 128**-0.5, num_splits, kernel=kernel, label=f"{shape}")


HEADS = [(12, 2), (4, 4), (6, 1)]
# Each kernel's GQA problem (lens_q, lens_k, head dim, scale): group 6 and 1 (no packing) and
# multi-query (group 6 over one kv head); the sm90 forward's 170 queries span two row tiles.
GQA_FORWARD = {
    MMA: ([9, 70], [729, 130], 64, 0.125),
    SM90: ([9, 170], [729, 130], 128, 0.07),
    SM90_PACKED: ([9, 70], [729, 130], 128, 0.07),
}


@per_kernel(
    "heads,dtype",
    {
        MMA: [(h, torch.float16) for h in HEADS],
        SM90: list(itertools.product(HEADS, DTYPES)),
        SM90_PACKED: list(itertools.product(HEADS, DTYPES)),
    },
)
def test_forward_gqa_groups(kernel, heads, dtype):
    require(kernel)
    lens_q, lens_k, d, scale = GQA_FORWARD[kernel]
    q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, heads[0], heads[1], d, dtype)
    check_forward(q, k, v, cu_q, cu_k, scale, kernel=kernel, label=f"heads {heads}")


# Segments: ordinary, no queries, no keys, both empty, tile edges (64/65, 128/129 rows and keys),
# one query; the sm90 forward also 256/257 and one key.
VARLEN = {
    MMA: ([5, 0, 7, 0, 64, 1, 129, 33], [100, 50, 0, 0, 65, 1, 300, 128]),
    SM90: (
        [5, 0, 7, 0, 64, 1, 129, 33, 128, 257, 3],
        [100, 50, 0, 0, 65, 1, 300, 128, 129, 256, 1],
    ),
    SM90_PACKED: ([5, 0, 7, 0, 64, 1, 129, 33, 3], [100, 50, 0, 0, 65, 1, 300, 128, 1]),
}


@per_kernel(
    "head_dim,dtype,num_splits",
    {
        MMA: list(itertools.product([64, 128], [torch.bfloat16], [0, 1, 3])),
        SM90: list(itertools.product([128], DTYPES, [0, 1, 3])),
        SM90_PACKED: list(itertools.product([128], DTYPES, [0, 1, 3])),
    },
)
def test_forward_varlen_empty_segments(kernel, head_dim, dtype, num_splits):
    require(kernel)
    lens_q, lens_k = VARLEN[kernel]
    q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, HQ, HK, head_dim, dtype)
    out, lse = check_forward(
        q, k, v, cu_q, cu_k, head_dim**-0.5, num_splits, kernel=kernel, label="varlen"
    )
    # The segment with 7 queries and no keys: out exactly 0, lse exactly -inf.
    no_keys = slice(sum(lens_q[:2]), sum(lens_q[:3]))
    assert torch.all(out[no_keys] == 0)
    assert torch.all(torch.isneginf(lse[:, no_keys]))


def test_all_segments_without_keys():
    q, k, v, cu_q, cu_k = make_inputs([3, 4], [0, 0], HQ, HK, 64, torch.float16)
    out, lse, _ = run_forward(q, k, v, cu_q, cu_k, 0.125)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


def strided_problem(lens_q, lens_k, d):
    """q as a channel slice of a wider tensor, k and v as halves of a fused kv tensor."""
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, HQ, 2 * d, device="cuda", dtype=torch.bfloat16)[..., d:]
    kv = torch.randn(tk, 2 * HK, d, device="cuda", dtype=torch.bfloat16)
    k, v = kv[:, :HK], kv[:, HK:]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    return q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k)


NON_CONTIGUOUS_LENS_Q = {MMA: [9, 40], SM90: [9, 140], SM90_PACKED: [9, 40]}


@per_kernel(
    "head_dim,num_splits",
    {
        MMA: list(itertools.product([64, 128], [0, 3])),
        SM90: [(128, 0)],
        SM90_PACKED: [(128, 0), (128, 3)],
    },
)
def test_forward_non_contiguous(kernel, head_dim, num_splits):
    """q and out as channel slices of wider tensors, k and v as halves of a fused kv tensor (the
    sm90 kernel's TMA maps take the tensors' own strides): the bits of contiguous copies."""
    require(kernel)
    lens_q = NON_CONTIGUOUS_LENS_Q[kernel]
    q, k, v, cu_q, cu_k = strided_problem(lens_q, [729, 333], head_dim)
    scale = head_dim**-0.5
    # out as the middle third of a wider buffer: token stride 3 * HQ * d
    out = torch.empty(sum(lens_q), 3, HQ, head_dim, device="cuda", dtype=torch.bfloat16)[:, 1]
    out, lse, ran = run_forward(q, k, v, cu_q, cu_k, scale, num_splits, out=out, kernel=kernel)
    out_c, lse_c, ran_c = run_forward(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, scale, num_splits, kernel=kernel
    )
    assert_ran(ran, kernel)
    assert_ran(ran_c, kernel)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    check_forward(q, k, v, cu_q, cu_k, scale, num_splits, kernel=kernel, label="non-contiguous")


DETERMINISM = {
    MMA: ([9, 288, 1], [729, 4000, 64]),
    SM90: ([300, 9], [5000, 729]),
    SM90_PACKED: ([9, 288, 1], [729, 4000, 64]),
}


@pytest.mark.parametrize("kernel", [MMA, SM90, SM90_PACKED])
def test_forward_is_deterministic(kernel):
    require(kernel)
    q, k, v, cu_q, cu_k = make_inputs(*DETERMINISM[kernel], HQ, HK, 128, torch.bfloat16)
    first = run_forward(q, k, v, cu_q, cu_k, 128**-0.5, kernel=kernel)
    second = run_forward(q, k, v, cu_q, cu_k, 128**-0.5, kernel=kernel)
    assert_ran(first[2], kernel)
    assert_ran(second[2], kernel)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# ----------------------------------------------------------------------------------------------
# Backward against the oracle
# ----------------------------------------------------------------------------------------------


@per_kernel(
    "shape,dtype,head_dim",
    {
        MMA: list(itertools.product(SHAPES, DTYPES, [64, 128])),
        SM90: list(itertools.product(SM90_BWD_SHAPES, DTYPES, [128]))
        + [pytest.param(V2V_256, torch.bfloat16, 128, marks=slow)],
        SM90_DKDV: list(itertools.product([(9, 729), (300, 5000)], [torch.bfloat16], [128])),
    },
)
def test_backward(kernel, shape, dtype, head_dim):
    require(kernel)
    q, k, v, cu_q, cu_k = make_inputs(*segment_lengths(*shape), HQ, HK, head_dim, dtype)
    check_backward(q, k, v, cu_q, cu_k, head_dim**-0.5, kernel=kernel, label=f"{shape}")


# Each kernel's GQA problem (lens_q, lens_k, scale), head dim 128.
GQA_BACKWARD = {MMA: ([9, 70], [729, 130], 128**-0.5), SM90: ([9, 170], [729, 130], 0.07)}


@per_kernel(
    "heads,dtype",
    {
        MMA: [((4, 4), torch.bfloat16), ((6, 1), torch.bfloat16)],
        SM90: list(itertools.product(HEADS, DTYPES)),
    },
)
def test_backward_gqa_groups(kernel, heads, dtype):
    require(kernel)
    lens_q, lens_k, scale = GQA_BACKWARD[kernel]
    q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, heads[0], heads[1], 128, dtype)
    check_backward(q, k, v, cu_q, cu_k, scale, kernel=kernel, label=f"heads {heads}")


# Segments without queries (segment 1: dk = dv = 0 for its keys) and without keys (segment 2:
# dq = 0) between ordinary ones; the sm90 backward's lengths are no multiple of any tile.
VARLEN_BACKWARD = {
    MMA: VARLEN[MMA],
    SM90: ([9, 0, 5, 0, 70, 3, 200], [729, 40, 0, 0, 300, 1, 1000]),
}


@per_kernel(
    "head_dim,dtype",
    {MMA: [(64, torch.bfloat16), (128, torch.bfloat16)], SM90: [(128, dtype) for dtype in DTYPES]},
)
def test_backward_varlen_empty_segments(kernel, head_dim, dtype):
    require(kernel)
    q, k, v, cu_q, cu_k = make_inputs(*VARLEN_BACKWARD[kernel], HQ, HK, head_dim, dtype)
    dq, dk, dv = check_backward(q, k, v, cu_q, cu_k, head_dim**-0.5, kernel=kernel, label="varlen")
    bq, bk = cu_q.tolist(), cu_k.tolist()
    assert torch.all(dk[bk[1] : bk[2]] == 0) and torch.all(dv[bk[1] : bk[2]] == 0)
    assert torch.all(dq[bq[2] : bq[3]] == 0)


@pytest.mark.parametrize("num_splits", [0, 3])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_backward_non_contiguous_mma_sync(head_dim, num_splits):
    """The mma.sync backward on test_forward_non_contiguous's strided inputs, with a strided dout
    and the strided forward's out and lse: the bits of contiguous copies. (The sm90 backward's
    strided case, gradients written into strided views, is test_attention_bwd_sm90.py's.)"""
    q, k, v, cu_q, cu_k = strided_problem([9, 40], [729, 333], head_dim)
    scale = head_dim**-0.5
    out = torch.empty(q.shape[0], 3, HQ, head_dim, device="cuda", dtype=torch.bfloat16)[:, 1]
    out, lse, _ = run_forward(q, k, v, cu_q, cu_k, scale, num_splits, out=out, kernel=MMA)
    out_c, lse_c, _ = run_forward(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, scale, num_splits, kernel=MMA
    )
    dout = torch.randn(q.shape[0], HQ, 2 * head_dim, device="cuda", dtype=torch.bfloat16)
    dout = dout[..., :head_dim]
    *grads, ran = run_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale, MMA)
    *grads_c, _ = run_backward(
        dout.contiguous(),
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        out_c,
        lse_c,
        cu_q,
        cu_k,
        scale,
        MMA,
    )
    assert_ran(ran, MMA)
    for g, g_c in zip(grads, grads_c):
        assert torch.equal(g, g_c)


@per_kernel(
    "problem,deterministic",
    {
        MMA: [(DETERMINISM[MMA], False), (DETERMINISM[MMA], True)],
        SM90: [(tuple(segment_lengths(*shape)), True) for shape in [(576, 46656), (9, 729)]],
    },
)
def test_backward_is_deterministic(kernel, problem, deterministic):
    """Two calls give bitwise-equal gradients (no kernel uses atomics; the sm90 dQ key splits are
    summed in a fixed order)."""
    require(kernel)
    q, k, v, cu_q, cu_k = make_inputs(*problem, HQ, HK, 128, torch.bfloat16)
    scale = 128**-0.5
    out, lse, _ = run_forward(q, k, v, cu_q, cu_k, scale)
    dout = torch.randn_like(out)
    first = run_backward(
        dout, q, k, v, out, lse, cu_q, cu_k, scale, kernel, deterministic=deterministic
    )
    second = run_backward(
        dout, q, k, v, out, lse, cu_q, cu_k, scale, kernel, deterministic=deterministic
    )
    assert_ran(first[3], kernel)
    assert_ran(second[3], kernel)
    for name, a, b in zip(("dq", "dk", "dv"), first[:3], second[:3]):
        assert torch.equal(a, b), f"{name} differs between two calls"


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def _bad_call(**changes):
    lens = [4, 5]
    q, k, v, cu_q, cu_k = make_inputs(lens, lens, 4, 2, 64, torch.float16)
    args = dict(
        q=q,
        k=k,
        v=v,
        out=torch.empty_like(q),
        lse=torch.empty(4, q.shape[0], device="cuda", dtype=torch.float32),
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=5,
        max_seqlen_k=5,
        softmax_scale=0.125,
        num_splits=0,
    )
    args.update(changes)
    extension().attention_forward(**args)


def test_bad_input_raises():
    """The checks run in a child process (this file run as a script): a failed check must come
    back as a RuntimeError, and a crash must fail this test rather than end the test session."""
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert "bad input checks: ok" in proc.stdout


def _bad_input_checks():
    def t(*shape, dtype=torch.float16):
        return torch.randn(*shape, device="cuda", dtype=dtype)

    with pytest.raises(RuntimeError, match="head dim"):
        q = t(9, 4, 96)
        _bad_call(q=q, k=t(9, 2, 96), v=t(9, 2, 96), out=torch.empty_like(q))
    with pytest.raises(RuntimeError, match="multiple of num_heads_k"):
        q = t(9, 3, 64)
        _bad_call(q=q, out=torch.empty_like(q), lse=torch.empty(3, 9, device="cuda"))
    with pytest.raises(RuntimeError, match="dtype"):
        _bad_call(k=t(9, 2, 64, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        q = t(9, 4, 64, dtype=torch.float32)
        _bad_call(
            q=q,
            k=t(9, 2, 64, dtype=torch.float32),
            v=t(9, 2, 64, dtype=torch.float32),
            out=torch.empty_like(q),
        )
    with pytest.raises(RuntimeError, match="channel"):
        _bad_call(v=t(9, 2, 128)[..., ::2])
    with pytest.raises(RuntimeError, match="lse"):
        _bad_call(lse=torch.empty(9, 4, device="cuda"))
    with pytest.raises(RuntimeError, match="cu_seqlens_q"):
        _bad_call(cu_seqlens_q=cu_seqlens([4, 5]).long())
    with pytest.raises(RuntimeError, match="CUDA"):
        _bad_call(q=torch.randn(9, 4, 64, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="num_splits"):
        _bad_call(num_splits=-1)
    with pytest.raises(RuntimeError, match="kernel must be 'mma_sync', 'sm90' or 'sm90_packed'"):
        _bad_call(kernel="sm90_dkdv")  # a backward-only choice
    # head dim 96 in the backward too
    q, k, v = t(9, 4, 96), t(9, 2, 96), t(9, 2, 96)
    cu = cu_seqlens([4, 5])
    with pytest.raises(RuntimeError, match="head dim"):
        extension().attention_backward(
            torch.randn_like(q),
            q,
            k,
            v,
            torch.randn_like(q),
            torch.zeros(4, 9, device="cuda"),
            torch.empty_like(q),
            torch.empty_like(k),
            torch.empty_like(v),
            cu,
            cu,
            5,
            5,
            0.1,
            False,
        )
    q, k, v = t(9, 4, 64), t(9, 2, 64), t(9, 2, 64)
    with pytest.raises(RuntimeError, match="kernel must be 'mma_sync', 'sm90' or 'sm90_dkdv'"):
        extension().attention_backward(
            torch.randn_like(q),
            q,
            k,
            v,
            torch.randn_like(q),
            torch.zeros(4, 9, device="cuda"),
            torch.empty_like(q),
            torch.empty_like(k),
            torch.empty_like(v),
            cu,
            cu,
            5,
            5,
            0.1,
            False,
            kernel="yes",
        )


if __name__ == "__main__":  # the child process of test_bad_input_raises
    _bad_input_checks()
    print("bad input checks: ok")
