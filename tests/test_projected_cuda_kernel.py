"""The CUDA kernels of the projection-fused attention core (csrc/projected/), called through
``crosslmm_ops._C.projected_attention_core_forward(q, x, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
max_seqlen_k, softmax_scale, num_splits, kernel) -> (out, lse)``, against the float64 oracle of
tests/attention_oracle.py: ``softmax(q x^T * scale) x`` is attention with one key head that is
also the value head, ``x``, shared by every query head.

Error bounds are the oracle's (attention_oracle.check_close, after flash-attn's tests, as
tests/test_cross_attention.py): the max error of the kernel against the float64 oracle is at most
2x the max error of plain PyTorch computing the same thing in the kernel's low precision, plus a
rounding-sized floor (1e-5 for the LSE). The binding allocates its
outputs, so they cannot be pre-filled with NaN; instead the caching allocator is handed freshly
freed NaN-filled blocks of the outputs' sizes just before each call (``poison_allocator``), and
every comparison covers every element, with inputs that differ from call to call, so stale values
of an earlier call cannot pass for a result.

Tests that take the ``kernel`` fixture run on both kernels: ``mma_sync`` and ``sm90_cluster`` (the
Hopper kernel, skipped with the reason where it cannot run); every call asserts which kernel ran
(``projected_attention_core_forward_kernel_name``): sm90_cluster where Dv is a multiple of 64 up to
1152, else the binding's mma.sync fallback.

Every test needs a GPU and an extension built with ``projected_attention_core_forward``.
"""

from __future__ import annotations

import functools
import math
import subprocess
import sys

import attention_oracle as oracle
import pytest
import torch
from attention_oracle import check_close, check_lse, rounding

from crosslmm_ops import _backend
from crosslmm_ops.testing import cu_seqlens as cu_seqlens_on


def _extension():
    ext = _backend.extension()
    return ext if ext is not None and hasattr(ext, "projected_attention_core_forward") else None


_needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or _extension() is None,
    reason="needs a CUDA GPU and crosslmm_ops._C built with projected_attention_core_forward",
)


def gpu(test):
    """Marks a test `cuda` and skips it without a GPU or without the binding."""
    return pytest.mark.cuda(_needs_gpu(test))


def _sm90_cluster_missing() -> str:
    """Why the sm90_cluster kernel cannot run here ("" when it can)."""
    ext = _extension()
    if ext is None or not torch.cuda.is_available():
        return "needs a CUDA GPU and the extension"
    if not hasattr(ext, "projected_attention_core_forward_kernel_name"):
        return "the extension predates the kernel argument; rebuild it"
    if "90a" not in ext.cuda_archs().split(","):
        return "the extension holds no sm_90a code (CROSSLMM_CUDA_ARCHS=90a)"
    if torch.cuda.get_device_capability() != (9, 0):
        return "the GPU is not sm_90"
    return ""


KERNELS = [
    pytest.param("mma_sync", id="mma_sync"),
    pytest.param(
        "sm90_cluster",
        id="sm90_cluster",
        marks=pytest.mark.skipif(bool(_sm90_cluster_missing()), reason=_sm90_cluster_missing()),
    ),
]


@pytest.fixture(params=KERNELS)
def kernel(request):
    """The core kernel a test runs on (the binding's ``kernel`` argument)."""
    return request.param


# The decode kernel's shared memory (csrc/projected/projected_params.h, DecodeTile::kSmemBytes).
DECODE_SMEM_BYTES = 207_600


def _decode_kernel_fits() -> bool:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return props.shared_memory_per_block_optin >= DECODE_SMEM_BYTES


def expected_kernel(kernel: str, q: torch.Tensor, max_q: int, max_k: int) -> str:
    """The kernel the binding must report for a call asking for ``kernel``: sm90_cluster where
    asked for and able to run; else, unless "mma_sync" is asked for, the decode kernel for calls
    of one m16 row tile (at most 16 rows a segment) with Dv <= 1152 where its shared memory fits;
    else the general mma.sync kernels."""
    total_q, heads, dv = q.shape
    if total_q == 0 or max_q == 0:
        return "none"
    if kernel == "sm90_cluster" and dv % 64 == 0 and dv <= 1152 and max_k > 0:
        return "sm90_cluster"
    one_tile = min(max_q, total_q) * heads <= 16 and dv <= 1152
    if kernel == "mma_sync" or not one_tile or not _decode_kernel_fits():
        return "mma_sync"
    return "decode_bulk" if kernel == "decode_bulk" else "decode"


DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = ["bf16", "fp16"]
HQ = 12  # CrossLMM-2B: 12 query heads
DV = 1152  # SigLIP width
SCALE = 128**-0.5  # the softmax scale of the original head dim (d = 128), not Dv's
FRAME = 729  # SigLIP tokens per frame
POOLED = 9  # pooled queries per frame (frame-local V2V)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


cu_seqlens = functools.partial(cu_seqlens_on, device="cuda")


def make_inputs(lens_q, lens_k, heads, dv, dtype):
    q = torch.randn(sum(lens_q), heads, dv, device="cuda", dtype=dtype)
    x = torch.randn(sum(lens_k), dv, device="cuda", dtype=dtype)
    return q, x, cu_seqlens(lens_q), cu_seqlens(lens_k)


def max_seqlen(cu: torch.Tensor) -> int:
    return int((cu[1:] - cu[:-1]).max().item()) if cu.numel() > 1 else 0


def poison_allocator(*shapes_dtypes) -> None:
    """Put NaN-filled blocks of the given sizes into the caching allocator's free lists, so the
    binding's next allocations of those sizes most likely receive NaN memory (best effort: the
    allocator may pick another free block of the same size)."""
    blocks = [
        torch.full(shape, math.nan, device="cuda", dtype=dtype) for shape, dtype in shapes_dtypes
    ]
    del blocks


def run(q, x, cu_q, cu_k, scale=SCALE, num_splits=0, max_q=None, max_k=None, kernel="mma_sync"):
    """The kernel, with NaN-poisoned memory offered for its outputs; returns (out, lse) after
    checking that the expected kernel ran."""
    total_q, heads, dv = q.shape
    # (The fp32 split scratch is not poisoned here: compute-sanitizer's initcheck covers it, see
    # scripts/sanitize_kernels.py.)
    poison_allocator(((total_q, heads, dv), q.dtype), ((heads, total_q), torch.float32))
    max_q = max_seqlen(cu_q) if max_q is None else max_q
    max_k = max_seqlen(cu_k) if max_k is None else max_k
    out, lse = _extension().projected_attention_core_forward(
        q, x, cu_q, cu_k, max_q, max_k, scale, num_splits, kernel
    )
    ran = _extension().projected_attention_core_forward_kernel_name()
    assert ran == expected_kernel(kernel, q, max_q, min(max_k, x.shape[0])), (
        f"asked for {kernel}, {ran} ran"
    )
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous(), (
        f"out: shape {tuple(out.shape)} dtype {out.dtype}, expected {tuple(q.shape)} {q.dtype}"
    )
    assert lse.shape == (heads, total_q) and lse.dtype == torch.float32, (
        f"lse: shape {tuple(lse.shape)} dtype {lse.dtype}, expected {(heads, total_q)} float32"
    )
    return out, lse


def reference(q, x, cu_q, cu_k, scale, dtype):
    """softmax(q x^T * scale) x per segment and head, computed in ``dtype`` (float64 for the
    oracle, q's dtype for "plain PyTorch in low precision"): the oracle's attention with
    ``k = v = x`` as one key head (GQA: every query head reads it). (out [total_q, H, Dv] in dtype,
    lse [H, total_q]); a segment without keys gives out = 0, lse = -inf."""
    kv = x.unsqueeze(1)  # [total_k, 1, Dv]
    return oracle.attention(q, kv, kv, cu_q, cu_k, softmax_scale=scale, dtype=dtype)


def _describe(where: int, shape, cu_q: torch.Tensor) -> str:
    """'token t (segment b), head h, channel c' of a flat index into [total_q, H, Dv]."""
    _, heads, dv = shape
    token, rest = divmod(where, heads * dv)
    head, chan = divmod(rest, dv)
    seg = (
        int(
            torch.searchsorted(
                cu_q.cpu(), torch.tensor([token], dtype=torch.int32), right=True
            ).item()
        )
        - 1
    )
    return f"token {token} (segment {seg}), head {head}, channel {chan}"


def check(q, x, cu_q, cu_k, scale=SCALE, num_splits=0, label="", kernel="mma_sync"):
    """Kernel vs the float64 oracle, bounded by plain PyTorch's error in q's dtype (the oracle in
    q's dtype). Returns the kernel's (out, lse)."""
    out, lse = run(q, x, cu_q, cu_k, scale, num_splits, kernel=kernel)
    label = f"{kernel} {label}"
    torch.cuda.synchronize()
    with torch.no_grad():
        ref_out, ref_lse = reference(q, x, cu_q, cu_k, scale, torch.float64)
        low_out, low_lse = reference(q, x, cu_q, cu_k, scale, q.dtype)
    ctx = (
        f"[{label} q {tuple(q.shape)} {q.dtype}, x {tuple(x.shape)}, segments q "
        f"{(cu_q[1:] - cu_q[:-1]).tolist()[:12]} k {(cu_k[1:] - cu_k[:-1]).tolist()[:12]}, "
        f"scale {scale:.4g}, num_splits {num_splits}, kernel {kernel}]"
    )

    nan = torch.isnan(out)
    assert not nan.any(), (
        f"{ctx} out has {int(nan.sum())} NaN elements (unwritten?), first at "
        f"{_describe(int(nan.flatten().nonzero()[0]), q.shape, cu_q)}"
    )
    bad_lse = torch.isnan(lse).nonzero()[:5].tolist()
    assert not bad_lse, f"{ctx} lse has NaN (unwritten?) at (head, token) {bad_lse}"
    try:
        check_close(f"{ctx} out", out, low_out, ref_out, factor=2, floor=rounding(ref_out, q.dtype))
    except AssertionError as error:
        where = int((out.double() - ref_out).abs().flatten().argmax())
        raise AssertionError(
            f"{error}; worst at {_describe(where, q.shape, cu_q)}: kernel "
            f"{out.flatten()[where].item():.6g}, reference {ref_out.flatten()[where].item():.6g}"
        ) from None

    mismatch = torch.isneginf(lse) != torch.isneginf(ref_lse)
    assert not mismatch.any(), (
        f"{ctx} lse must be -inf exactly for rows without keys; wrong at "
        f"(head, token) {mismatch.nonzero()[:5].tolist()}"
    )
    try:
        check_lse(lse, low_lse, ref_lse, factor=2, floor=1e-5)
    except AssertionError as error:
        raise AssertionError(f"{ctx} {error}") from None
    return out, lse


# ----------------------------------------------------------------------------------------------
# Odd sizes against the reference
# ----------------------------------------------------------------------------------------------

# (query tokens, key tokens) per segment: tails of the 16-key tiles (1, 15, 17, 729), rows past the
# end of a 16- or 32-row tile (12 heads x 3 tokens = 36 rows), one query, more queries than keys.
VARLEN_Q = [1, 3, 9, 2, 40, 1]
VARLEN_K = [729, 17, 1, 15, 300, 2000]


@pytest.mark.parametrize("dv", [64, 200, 1152, 1160, 2048])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@gpu
def test_forward_odd_sizes(dtype, dv, kernel):
    """Dv 64 and 200 (fewer than 8 busy warps, 200 % 16 = 8: a half-filled last k-step), 1152
    (SigLIP), 1160 and 2048 (the large-Dv bucket, 16-row tiles only)."""
    q, x, cu_q, cu_k = make_inputs(VARLEN_Q, VARLEN_K, HQ, dv, dtype)
    check(q, x, cu_q, cu_k, label=f"Dv {dv}", kernel=kernel)


@pytest.mark.parametrize("heads", [1, 5, 12, 16])
@pytest.mark.parametrize("lq", [1, 2, 3, 7])
@gpu
def test_forward_rows_per_segment(heads, lq, kernel):
    """Rows per segment = lq * heads from 1 to 112: one 16-row tile, just over it (17..), two
    32-row tiles and a partial one."""
    lens_q, lens_k = [lq, lq, lq], [333, 16, 1000]
    q, x, cu_q, cu_k = make_inputs(lens_q, lens_k, heads, DV, torch.bfloat16)
    check(q, x, cu_q, cu_k, label=f"{heads} heads x {lq} queries", kernel=kernel)


@pytest.mark.parametrize("scale", [1152**-0.5, 1.0, -0.05])
@gpu
def test_forward_scales(scale, kernel):
    """A flat softmax (1/sqrt(Dv)), a near one-hot one (logits ~ 30) and a negative scale."""
    q, x, cu_q, cu_k = make_inputs([1, 9], [5000, 729], HQ, DV, torch.float16)
    check(q, x, cu_q, cu_k, scale=scale, label=f"scale {scale}", kernel=kernel)


@gpu
def test_forward_late_maximum(kernel):
    """The largest score of each row lies in the last key tile of a long segment, so the online
    softmax must rescale everything accumulated before it."""
    q, x, cu_q, cu_k = make_inputs([1, 2], [4000, 3001], HQ, DV, torch.bfloat16)
    heads = q[0, :10].float()
    x[3990:4000] = (8 * heads / heads.norm(dim=-1, keepdim=True)).to(x.dtype)
    x[-1] = q[-1, 0]
    check(q, x, cu_q, cu_k, label="late maximum", kernel=kernel)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@gpu
def test_forward_rising_maximum(dtype, num_splits, kernel):
    """Scores that climb tile after tile at a different rate per head. sm90_cluster moves a
    row's reference max only when a tile's max passes it by more than 2^8 (log2 units 8): heads
    climbing 2 per 32-key tile keep their reference for four tiles while P grows to 2^8 exactly,
    then move it; heads climbing 10 move it on every tile; heads climbing 0.5 never after the
    first. One warp's rows mix all three, so some rows rescale O where others keep it."""
    q, x, cu_q, cu_k = make_inputs([2, 9], [1500, FRAME], HQ, DV, dtype)
    # Key 32 t + 2 h + 1 of the first segment scores 20 + slope_h * t * ln 2 for the first
    # query's head h and 0 for its other heads (x's row made orthogonal to those queries, then
    # moved along the dual basis), so each head's running max climbs by exactly slope_h per tile.
    first = q[0].float()  # [H, Dv]
    dual = torch.linalg.pinv(first)  # [Dv, H]: first[h] . dual[:, g] = (h == g)
    t, h = torch.meshgrid(torch.arange(16), torch.arange(HQ), indexing="ij")
    keys = (32 * t + 2 * h + 1).flatten().cuda()
    slopes = torch.tensor([2.0, 10.0, 0.5]).repeat(HQ // 3)
    logits = torch.zeros(keys.numel(), HQ, device="cuda")  # the first query's, per planted key
    logits[torch.arange(keys.numel()), h.flatten()] = (
        (20.0 + slopes * t * math.log(2)).flatten().cuda()
    )
    xf = x.float()
    xf[keys] += (logits / SCALE - xf[keys] @ first.T) @ dual.T
    x = xf.to(dtype)
    check(q, x, cu_q, cu_k, num_splits=num_splits, label="rising maximum", kernel=kernel)


# Tile edges of both kernels: rows per segment around sm90_cluster's 64-row tiles (and the mma.sync
# kernel's 16/32) with one head, keys around the 32-key tiles; the same with 3 heads (rows = 3 x
# queries: 3, 27, 63, 66, 129, 195).
EDGE_Q = [1, 9, 63, 64, 65, 129]
EDGE_K = [1, 31, 32, 33, 729, 1000]


@pytest.mark.parametrize("num_splits", [1, 3, 0])
@pytest.mark.parametrize("dv", [1152, 512])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@gpu
def test_tile_edges(dtype, dv, num_splits, kernel):
    q, x, cu_q, cu_k = make_inputs(EDGE_Q, EDGE_K, 1, dv, dtype)
    check(q, x, cu_q, cu_k, num_splits=num_splits, label="edges, 1 head", kernel=kernel)
    lens_q = [1, 9, 21, 22, 43, 65]
    q, x, cu_q, cu_k = make_inputs(lens_q, EDGE_K[::-1], 3, dv, dtype)
    check(q, x, cu_q, cu_k, num_splits=num_splits, label="edges, 3 heads", kernel=kernel)


# Keys per segment giving 1 to 6 key tiles of 32 (full and partial last tiles): with one split each
# count the kernels' pipelines have a separate path for (sm90_cluster: 1, 2, then odd and even
# counts with and without a steady iteration); with two splits also 0 and every split of them.
TILE_COUNT_K = [31, 64, 65, 128, 160, 161]


@pytest.mark.parametrize("num_splits", [1, 2])
@pytest.mark.parametrize("dv", [1152, 640])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@gpu
def test_key_tile_counts(dtype, dv, num_splits, kernel):
    """Every key-tile count from 0 to 6 per split, with 70 rows a segment (two 64-row tiles), at
    Dv 1152 and 640 (sm90_cluster: 10 of 18 atoms loaded, CTA 1's consumer 1 all zero fill)."""
    lens_q = [70] * len(TILE_COUNT_K)
    q, x, cu_q, cu_k = make_inputs(lens_q, TILE_COUNT_K, 1, dv, dtype)
    check(q, x, cu_q, cu_k, num_splits=num_splits, label="key tile counts", kernel=kernel)


@gpu
def test_sm90_cluster_agrees_with_mma_sync():
    """Both kernels compute the same function on frame-local V2V (within the bf16 rounding of
    their different summation orders)."""
    if _sm90_cluster_missing():
        pytest.skip(_sm90_cluster_missing())
    q, x, cu_q, cu_k = make_inputs([9] * 16, [FRAME] * 16, HQ, DV, torch.bfloat16)
    a, a_lse = run(q, x, cu_q, cu_k, kernel="mma_sync")
    b, b_lse = run(q, x, cu_q, cu_k, kernel="sm90_cluster")
    ulp = torch.finfo(torch.bfloat16).eps * a.float().abs().max().item()
    assert (a.float() - b.float()).abs().max().item() <= 4 * ulp
    assert torch.allclose(a_lse, b_lse, rtol=0, atol=1e-4)


@gpu
def test_public_op_records_the_planned_kernel():
    """projected_cross_attention on the CUDA back end runs the kernel the planner chose for the
    core and records it (planner.last_kernel); explain() names the same one."""
    import crosslmm_ops
    from crosslmm_ops import planner

    frames, hk, group, d = 4, 2, 6, 128
    q = torch.randn(frames, POOLED, hk * group, d, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(frames, FRAME, DV, device="cuda", dtype=torch.bfloat16)
    w_k = torch.randn(hk * d, DV, device="cuda", dtype=torch.bfloat16) / DV**0.5
    w_v = torch.randn(hk * d, DV, device="cuda", dtype=torch.bfloat16) / DV**0.5
    plan = crosslmm_ops.explain(
        crosslmm_ops.projected_cross_attention,
        q,
        x,
        w_k,
        w_v,
        path="fused",
        backend="cuda",
        print_plan=False,
    )
    crosslmm_ops.projected_cross_attention(q, x, w_k, w_v, path="fused", backend="cuda")
    torch.cuda.synchronize()
    chosen = planner.projected_core_kernel(x.device, DV, POOLED * hk * group)[0]
    assert plan.kernel == chosen
    # "auto": the mma.sync kernels' launch plan, the general kernel for 108-row segments.
    ran = planner.last_kernel("projected_attention_core")
    assert ran == (chosen if chosen != "auto" else "mma_sync")
    if not _sm90_cluster_missing():
        assert chosen == "sm90_cluster", "frame-local V2V (108 rows, Dv 1152) on sm_90"


# ----------------------------------------------------------------------------------------------
# Key splits
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_splits", [0, 1, 2, 3, 7, 64, 256, 5000])
@gpu
def test_num_splits(num_splits, kernel):
    """Explicit splits (clamped to the key tiles and to 256), including more splits than a short
    segment has tiles (empty splits must merge as nothing)."""
    q, x, cu_q, cu_k = make_inputs([1, 1, 9, 1], [20000, 40, 729, 1], HQ, DV, torch.bfloat16)
    check(q, x, cu_q, cu_k, num_splits=num_splits, label="splits", kernel=kernel)


@gpu
def test_splits_agree(kernel):
    """Any split count computes the same function: results within a few ulps of each other."""
    q, x, cu_q, cu_k = make_inputs([1, 3], [30000, 7000], HQ, DV, torch.bfloat16)
    base, base_lse = run(q, x, cu_q, cu_k, num_splits=1, kernel=kernel)
    for splits in (2, 5, 33, 0):
        out, lse = run(q, x, cu_q, cu_k, num_splits=splits, kernel=kernel)
        err = (out.float() - base.float()).abs().max().item()
        ulp = torch.finfo(torch.bfloat16).eps * base.float().abs().max().item()
        assert err <= 4 * ulp + 1e-3, f"num_splits {splits} vs 1: out differs by {err:.3e}"
        assert torch.allclose(lse, base_lse, rtol=0, atol=1e-4), (
            f"num_splits {splits} vs 1: lse differs by {(lse - base_lse).abs().max().item():.3e}"
        )


# ----------------------------------------------------------------------------------------------
# Empty segments, non-contiguous inputs, determinism
# ----------------------------------------------------------------------------------------------

# Segments: ordinary, no queries, no keys, both empty, a tile edge, one query against one key.
EMPTY_Q = [5, 0, 7, 0, 16, 1]
EMPTY_K = [100, 50, 0, 0, 32, 1]


@pytest.mark.parametrize("num_splits", [0, 1, 3])
@pytest.mark.parametrize("dv", [64, 1152])
@gpu
def test_empty_segments(dv, num_splits, kernel):
    q, x, cu_q, cu_k = make_inputs(EMPTY_Q, EMPTY_K, HQ, dv, torch.bfloat16)
    out, lse = check(q, x, cu_q, cu_k, num_splits=num_splits, label="empty segments", kernel=kernel)
    no_keys = slice(sum(EMPTY_Q[:2]), sum(EMPTY_Q[:3]))  # 7 queries without keys
    assert torch.all(out[no_keys] == 0), "a segment without keys must give out = 0 exactly"
    assert torch.all(torch.isneginf(lse[:, no_keys])), "a segment without keys must give lse = -inf"


@pytest.mark.parametrize("num_splits", [0, 4])
@gpu
def test_no_keys_at_all(num_splits, kernel):
    for lens_k in ([0, 0], []):
        lens_q = [3, 4] if lens_k else []
        q = torch.randn(sum(lens_q) or 5, HQ, 64, device="cuda", dtype=torch.float16)
        x = torch.randn(0, 64, device="cuda", dtype=torch.float16)
        cu_q = cu_seqlens(lens_q if lens_q else [5])
        cu_k = cu_seqlens(lens_k if lens_k else [0])
        out, lse = run(q, x, cu_q, cu_k, num_splits=num_splits, kernel=kernel)
        assert torch.all(out == 0) and torch.all(torch.isneginf(lse)), "no keys: out 0, lse -inf"


@gpu
def test_no_queries(kernel):
    q = torch.randn(0, HQ, 64, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(30, 64, device="cuda", dtype=torch.bfloat16)
    out, lse = run(q, x, cu_seqlens([0, 0]), cu_seqlens([10, 20]), kernel=kernel)
    assert out.shape == (0, HQ, 64) and lse.shape == (HQ, 0)


@pytest.mark.parametrize("num_splits", [0, 3])
@pytest.mark.parametrize("dv", [200, 1152])
@gpu
def test_non_contiguous(dv, num_splits, kernel):
    """q with heads outermost in memory ([H, tokens, Dv] transposed), q at an odd channel offset of
    a wider tensor (strides not multiples of 8: copied once), x every other row of a buffer: the
    same bits as contiguous inputs, and correct."""
    lens_q, lens_k = [9, 1, 40], [729, 3000, 333]
    tq, tk = sum(lens_q), sum(lens_k)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    x_wide = torch.randn(tk, 2, dv, device="cuda", dtype=torch.bfloat16)
    x = x_wide[:, 1]
    q_heads_outer = torch.randn(HQ, tq, dv, device="cuda", dtype=torch.bfloat16).transpose(0, 1)
    q_odd = torch.randn(tq, HQ, dv + 3, device="cuda", dtype=torch.bfloat16)[..., 3:]
    assert not (x.is_contiguous() or q_heads_outer.is_contiguous() or q_odd.is_contiguous())
    for q in (q_heads_outer, q_odd):
        out, lse = run(q, x, cu_q, cu_k, num_splits=num_splits, kernel=kernel)
        out_c, lse_c = run(
            q.contiguous(), x.contiguous(), cu_q, cu_k, num_splits=num_splits, kernel=kernel
        )
        assert torch.equal(out, out_c), "non-contiguous inputs must give the contiguous bits"
        assert torch.equal(lse, lse_c)
        check(q, x, cu_q, cu_k, num_splits=num_splits, label="non-contiguous", kernel=kernel)


@gpu
def test_deterministic(kernel):
    q, x, cu_q, cu_k = make_inputs([1, 9, 40], [20000, 729, 1000], HQ, DV, torch.bfloat16)
    first = run(q, x, cu_q, cu_k, kernel=kernel)
    for _ in range(2):
        again = run(q, x, cu_q, cu_k, kernel=kernel)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1]), (
            "repeated calls must give the same bits"
        )


@gpu
def test_loose_max_seqlen(kernel):
    """max_seqlen_q / max_seqlen_k larger than any segment (even than the totals) are allowed."""
    q, x, cu_q, cu_k = make_inputs([3, 5], [100, 40], HQ, 64, torch.float16)
    # The split heuristic reads max_seqlen_k, so fix the splits: then the results are bitwise equal.
    for splits in (1, 3):
        out, lse = run(q, x, cu_q, cu_k, num_splits=splits, max_q=1000, max_k=10**6, kernel=kernel)
        ref, ref_lse = run(q, x, cu_q, cu_k, num_splits=splits, kernel=kernel)
        assert torch.equal(out, ref) and torch.equal(lse, ref_lse), splits


# ----------------------------------------------------------------------------------------------
# CrossLMM-2B's shapes (Dv 1152, 12 heads)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "frames", [[256], [32, 64, 5, 128, 1, 200, 97, 256]], ids=["T256-batch1", "batch8"]
)
@gpu
def test_decode_real_size(frames, dtype, kernel):
    """T2V decode: one query (12 rows) per sequence against all T * 729 tokens of its video."""
    lens_k = [t * FRAME for t in frames]
    q, x, cu_q, cu_k = make_inputs([1] * len(frames), lens_k, HQ, DV, dtype)
    check(q, x, cu_q, cu_k, label="decode", kernel=kernel)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("frames", [32, 256])
@gpu
def test_frame_local_real_size(frames, dtype, kernel):
    """Frame-local V2V: 9 pooled queries (108 rows) per frame against the frame's 729 tokens."""
    q, x, cu_q, cu_k = make_inputs([9] * frames, [FRAME] * frames, HQ, DV, dtype)
    check(q, x, cu_q, cu_k, label="frame-local", kernel=kernel)


@gpu
def test_long_query_prefill(kernel):
    """T2V prefill: 128 text queries (1536 rows) against T = 32 frames of tokens."""
    q, x, cu_q, cu_k = make_inputs([128], [32 * FRAME], HQ, DV, torch.bfloat16)
    check(q, x, cu_q, cu_k, label="prefill", kernel=kernel)


@pytest.mark.slow
@gpu
def test_long_query_prefill_t256(kernel):
    q, x, cu_q, cu_k = make_inputs([128], [256 * FRAME], HQ, DV, torch.bfloat16)
    check(q, x, cu_q, cu_k, label="prefill T=256", kernel=kernel)


# ----------------------------------------------------------------------------------------------
# The decode kernel (csrc/projected/projected_decode_kernel.cuh): one m16 row tile, Dv <= 1152,
# picked by the launch plan (kernel "auto") where its 207.6 KB fit (H100/H200), with cp.async
# loads; kernel "decode_bulk" gives it bulk-copy (TMA) loads, "mma_sync" keeps the general 32-key
# kernel. Where the decode kernel does not fit (an A100), every choice runs the general kernels.
# ----------------------------------------------------------------------------------------------

# Key counts around the 16-key slots and 32-key tiles: one key, a slot's tail, one and two tiles
# and one key either side of them, and a long tail.
DECODE_KEYS = [1, 31, 32, 33, 63, 64, 65, 1000]
DECODE_KERNELS = ["decode", "decode_bulk"]


@pytest.mark.parametrize("num_splits", [1, 3, 0])
@pytest.mark.parametrize("keys", DECODE_KEYS)
@pytest.mark.parametrize("heads", [1, 5, 12])
@pytest.mark.parametrize("dv", [1152, 200])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kernel", DECODE_KERNELS)
@gpu
def test_decode_kernel_shapes(kernel, dtype, dv, heads, keys, num_splits):
    """One query x 1..12 heads (one m16 tile) against 1..1000 keys, with Dv 1152 (8 busy warps)
    and 200 (7 warps, a half k-step, zero columns [200, 208)), explicit and heuristic splits (more
    splits than tiles leave empty splits), against the float64 oracle; a second segment shifts
    the keys off 32-key alignment in x."""
    q, x, cu_q, cu_k = make_inputs([1, 1], [keys, 7], heads, dv, dtype)
    check(q, x, cu_q, cu_k, num_splits=num_splits, label=f"{keys} keys", kernel=kernel)


@pytest.mark.parametrize("num_splits", [1, 3, 0])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@gpu
def test_decode_kernel_matches_general(dtype, num_splits):
    """The decode kernel (both load paths, and "auto") and the general 32-key kernel do the same
    operations in the same order within a split (the decode kernel cuts splits at 16 keys, the
    general one at 32): their results agree to rounding (the bounds of test_splits_agree) and
    match the oracle, on a batch of decode steps with empty and short segments."""
    lens_k = [5000, 0, 33, 1, 729]
    q, x, cu_q, cu_k = make_inputs([1] * len(lens_k), lens_k, HQ, DV, dtype)
    old, old_lse = run(q, x, cu_q, cu_k, num_splits=num_splits, kernel="mma_sync")
    for kernel in ["auto", *DECODE_KERNELS]:
        new, new_lse = run(q, x, cu_q, cu_k, num_splits=num_splits, kernel=kernel)
        err = (new.float() - old.float()).abs().max().item()
        ulp = torch.finfo(dtype).eps * old.float().abs().max().item()
        assert err <= 4 * ulp + 1e-3, f"{kernel} vs mma_sync: out differs by {err:.3e}"
        same_inf = torch.isneginf(new_lse) == torch.isneginf(old_lse)
        assert same_inf.all(), f"{kernel} vs mma_sync: -inf lse rows differ"
        finite = ~torch.isneginf(old_lse)
        assert torch.allclose(new_lse[finite], old_lse[finite], rtol=0, atol=1e-4), kernel
        check(q, x, cu_q, cu_k, num_splits=num_splits, label="decode batch", kernel=kernel)


@pytest.mark.parametrize("num_splits", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kernel", DECODE_KERNELS)
@gpu
def test_decode_kernel_t256(kernel, dtype, num_splits):
    """CrossLMM-2B's decode step at T = 256: 12 rows against 186,624 keys (132 splits on an
    H100 with the heuristic, one long split with 1), against the oracle, and bitwise repeatable."""
    q, x, cu_q, cu_k = make_inputs([1], [256 * FRAME], HQ, DV, dtype)
    out, lse = check(q, x, cu_q, cu_k, num_splits=num_splits, label="T=256", kernel=kernel)
    for _ in range(2):
        again, again_lse = run(q, x, cu_q, cu_k, num_splits=num_splits, kernel=kernel)
        assert torch.equal(out, again) and torch.equal(lse, again_lse), "not deterministic"


@pytest.mark.parametrize("kernel", DECODE_KERNELS)
@gpu
def test_decode_kernel_deterministic(kernel):
    """Repeated calls give the same bits (splits combine in a fixed order; the combine's
    programmatic dependent launch on sm_90 must not change that)."""
    q, x, cu_q, cu_k = make_inputs([1, 1, 1], [20000, 65, 1], HQ, DV, torch.bfloat16)
    for splits in (0, 3):
        first = run(q, x, cu_q, cu_k, num_splits=splits, kernel=kernel)
        for _ in range(3):
            again = run(q, x, cu_q, cu_k, num_splits=splits, kernel=kernel)
            assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1]), splits


@pytest.mark.parametrize("kernel", ["mma_sync", *DECODE_KERNELS])
@gpu
def test_kernel_choice_on_other_shapes(kernel):
    """Every kernel choice computes the same function where the decode kernel cannot run (several
    row tiles, the 2048 bucket): the general kernels run."""
    q, x, cu_q, cu_k = make_inputs([1, 9], [1000, 729], HQ, DV, torch.bfloat16)
    check(q, x, cu_q, cu_k, label="two row tiles", kernel=kernel)
    q, x, cu_q, cu_k = make_inputs([1], [1000], HQ, 2048, torch.bfloat16)
    check(q, x, cu_q, cu_k, label="Dv 2048", kernel=kernel)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    _backend.extension() is None
    or not hasattr(_backend.extension(), "projected_attention_core_forward"),
    reason="crosslmm_ops._C not built with projected_attention_core_forward",
)
def test_binding_rejects_cpu_tensors():
    """Runs without a GPU (CI): the binding exists, and its first check comes back as a
    RuntimeError naming the argument (through bindings.cpp's guarded wrapper), not a crash."""
    q = torch.randn(9, 4, 64, dtype=torch.float16)
    x = torch.randn(9, 64, dtype=torch.float16)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="q must be a CUDA tensor"):
        _backend.extension().projected_attention_core_forward(q, x, cu, cu, 5, 5, 0.125, 0)


@gpu
def test_bad_input_raises():
    """The checks run in a child process (this file run as a script): a failed check must come
    back as a RuntimeError naming the argument, and a crash must fail this test rather than end
    the test session."""
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert "bad input checks: ok" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def _bad_input_checks():
    def t(*shape, dtype=torch.float16, device="cuda"):
        return torch.randn(*shape, device=device, dtype=dtype)

    def call(**changes):
        args = dict(
            q=t(9, 4, 64),
            x=t(9, 64),
            cu_seqlens_q=cu_seqlens([4, 5]),
            cu_seqlens_k=cu_seqlens([4, 5]),
            max_seqlen_q=5,
            max_seqlen_k=5,
            softmax_scale=0.125,
            num_splits=0,
        )
        args.update(changes)
        return _extension().projected_attention_core_forward(**args)

    cases = [
        (dict(q=t(9, 4, 60), x=t(9, 60)), "multiple of 8"),
        (dict(q=t(9, 4, 2056), x=t(9, 2056)), "at most 2048"),
        (dict(x=t(9, 72)), "width Dv"),
        (dict(x=t(9, 64, dtype=torch.bfloat16)), "x must have dtype"),
        (
            dict(q=t(9, 4, 64, dtype=torch.float32), x=t(9, 64, dtype=torch.float32)),
            "float16 or bfloat16",
        ),
        (dict(q=t(9, 4, 64, device="cpu")), "q must be a CUDA tensor"),
        (dict(x=t(9, 64, device="cpu")), "x must be a CUDA tensor"),
        (dict(x=t(9, 1, 64)), "x must have 2 dimensions"),
        (dict(q=t(9, 64)), "q must have 3 dimensions"),
        (dict(q=t(9, 4, 128)[..., ::2]), "channel"),
        (dict(x=t(9, 128)[:, ::2]), "channel"),
        (dict(cu_seqlens_q=cu_seqlens([4, 5]).long()), "cu_seqlens_q must have dtype int32"),
        (dict(cu_seqlens_k=cu_seqlens([4, 5]).cpu()), "cu_seqlens_k must be on"),
        (dict(cu_seqlens_k=cu_seqlens([4, 2, 3])), "same length"),
        (dict(num_splits=-1), "num_splits"),
        (dict(softmax_scale=math.inf), "softmax_scale"),
        (dict(max_seqlen_k=-1), "max_seqlen"),
        (dict(kernel="tma"), "kernel must be"),
    ]
    for changes, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call(**changes)
    out, lse = call()  # and the unchanged call works
    torch.cuda.synchronize()
    assert out.shape == (9, 4, 64) and lse.shape == (4, 9)


if __name__ == "__main__":  # the child process of test_bad_input_raises
    _bad_input_checks()
    print("bad input checks: ok")
