"""The Hopper (sm_90a) attention forward (csrc/attention/attention_fwd_sm90*.cu: wgmma + TMA,
warp-specialised), called through ``crosslmm_ops._C.attention_forward`` with
``CROSSLMM_ATTENTION_SM90=1``, against a float64 PyTorch reference computed segment by segment.

Written to be run once on an H100 and read: every check prints its max errors (``pytest -s`` or
``-rA`` shows them), every call asserts through ``_C.attention_forward_kernel_name()`` that the
sm90 kernel really ran, and outputs are NaN-poisoned before each call.

The kernel is new and was only compiled, never run, when this file was written, so the module first
runs a smoke test in a child process with a timeout: a hang (a barrier protocol bug) or a crash
(an illegal instruction, a bad TMA descriptor) then fails ``test_smoke`` with the child's output
and skips the other tests here, instead of hanging or killing the test session.

Error bound (as in test_attention_cuda_kernel.py, after flash-attn's tests): max |ours - ref| <=
2 x max |PyTorch in the kernel's dtype - ref| + 1e-3 x max |ref|.

The (2304, 186624) case (CrossLMM-2B V2V at 256 frames) is marked slow: run it with
``CROSSLMM_RUN_SLOW=1``.
"""

from __future__ import annotations

import functools
import math
import os
import sys

import pytest
import torch

from crosslmm_ops import _backend
from crosslmm_ops.testing import cu_seqlens as cu_seqlens_on
from crosslmm_ops.testing import env_value, sm90_skip_reason

from child_smoke import ChildSmoke

ENV = "CROSSLMM_ATTENTION_SM90"
SM90 = "sm90_wgmma"
HQ, HK = 12, 2  # CrossLMM-2B: 12 query heads, 2 kv heads
DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = ["bf16", "fp16"]


def _extension():
    ext = _backend.extension()
    if ext is None or not hasattr(ext, "attention_forward_kernel_name"):
        return None
    return ext


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(sm90_skip_reason("attention_forward_kernel_name") is not None,
                       reason=str(sm90_skip_reason("attention_forward_kernel_name"))),
]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def sm90_mode(value: str):
    """Set CROSSLMM_ATTENTION_SM90 (read by the extension on every call) for the block."""
    return env_value(ENV, value)


cu_seqlens = functools.partial(cu_seqlens_on, device="cuda")


def make_inputs(lens_q, lens_k, hq, hk, d, dtype):
    q = torch.randn(sum(lens_q), hq, d, device="cuda", dtype=dtype)
    k = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=dtype)
    v = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=dtype)
    return q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k)


def run_forward(q, k, v, cu_q, cu_k, scale, num_splits=0, out=None, mode="1"):
    """One _C.attention_forward call with NaN-poisoned outputs: (out, lse, kernel name)."""
    ext = _extension()
    if out is None:
        out = torch.full(q.shape, math.nan, device="cuda", dtype=q.dtype)
    else:
        out.fill_(math.nan)
    lse = torch.full((q.shape[1], q.shape[0]), math.nan, device="cuda", dtype=torch.float32)
    lens_q = (cu_q[1:] - cu_q[:-1]).tolist()
    lens_k = (cu_k[1:] - cu_k[:-1]).tolist()
    with sm90_mode(mode):
        ext.attention_forward(q, k, v, out, lse, cu_q, cu_k, max(lens_q, default=0),
                              max(lens_k, default=0), scale, num_splits)
        kernel = ext.attention_forward_kernel_name()
    torch.cuda.synchronize()  # a launch failure shows up here, at the call that caused it
    return out, lse, kernel


def reference(q, k, v, cu_q, cu_k, scale, dtype, chunk=512):
    """Dense attention per segment and head with matmuls and softmax in ``dtype``: float64 for the
    oracle, the inputs' dtype for PyTorch's own low-precision error. Returns (out in ``dtype``,
    lse float64 [Hq, total_q]); queries in chunks so that (2304, 186624) fits in memory."""
    hq, hk = q.shape[1], k.shape[1]
    group = hq // hk
    out = torch.zeros(q.shape, device=q.device, dtype=dtype)
    lse = torch.full((hq, q.shape[0]), -math.inf, device=q.device, dtype=torch.float64)
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for b in range(len(bq) - 1):
        q0, q1, k0, k1 = bq[b], bq[b + 1], bk[b], bk[b + 1]
        if q1 == q0 or k1 == k0:
            continue  # no queries, or no keys: out 0, lse -inf
        for h in range(hq):
            kh = k[k0:k1, h // group].to(dtype)
            vh = v[k0:k1, h // group].to(dtype)
            for c0 in range(q0, q1, chunk):
                c1 = min(c0 + chunk, q1)
                s = (q[c0:c1, h].to(dtype) @ kh.T) * scale
                lse[h, c0:c1] = torch.logsumexp(s.double(), dim=-1)
                out[c0:c1, h] = torch.softmax(s, dim=-1) @ vh
    return out, lse


def max_error(actual, expected) -> float:
    if expected.numel() == 0:
        return 0.0
    return (actual.double() - expected.double()).abs().max().item()


def check_close(name, ours, low_precision, ref, factor=2.0) -> str:
    """Asserts the bound of the module docstring; returns a one-line report."""
    assert not torch.isnan(ours).any(), f"{name}: NaN in the kernel's result (an unwritten or " \
                                         f"poisoned element, or a NaN from the kernel)"
    if ref.numel() == 0:
        return f"{name}: empty"
    err, base = max_error(ours, ref), max_error(low_precision, ref)
    floor = 1e-3 * max(ref.abs().max().item(), 1e-2)
    report = f"{name}: max err {err:.3e} (PyTorch {ours.dtype} {base:.3e}, floor {floor:.1e})"
    assert err <= factor * base + floor, report
    return report


def check_lse(ours, low_precision, ref) -> str:
    empty = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(ours), empty), "lse: -inf exactly where a row has no keys"
    keep = ~empty
    return check_close("lse", ours[keep], low_precision[keep], ref[keep])


def check_forward(q, k, v, cu_q, cu_k, scale, num_splits=0, label=""):
    """Runs the sm90 kernel, asserts it ran and matches the reference; returns (out, lse)."""
    out, lse, kernel = run_forward(q, k, v, cu_q, cu_k, scale, num_splits)
    assert kernel == SM90, f"expected the sm90 kernel to run, got {kernel!r}"
    with torch.no_grad():
        out_ref, lse_ref = reference(q, k, v, cu_q, cu_k, scale, torch.float64)
        out_pt, lse_pt = reference(q, k, v, cu_q, cu_k, scale, q.dtype)
    reports = [check_close("out", out, out_pt, out_ref), check_lse(lse, lse_pt, lse_ref)]
    print(f"\n[sm90 {label} {q.dtype} splits={num_splits}] " + "; ".join(reports))
    return out, lse


def segment_lengths(sq: int, sk: int) -> tuple[list[int], list[int]]:
    """The named (Sq, Sk) segment, plus a second, differently sized one when that stays cheap."""
    if sq * sk > 2_000_000:
        return [sq], [sk]
    return [sq, sq // 3 + 1], [sk, sk // 2 + 17]


# ----------------------------------------------------------------------------------------------
# Smoke test in a child process (a hang or crash fails this module instead of the session)
# ----------------------------------------------------------------------------------------------

# (lens_q, lens_k, heads q, heads kv, dtype, num_splits): 1..5 key tiles of 128 (the stage ring
# wraps from 3 on; odd and even counts take different P buffers), masked last tiles, two row
# tiles, explicit and heuristic splits, empty segments, GQA and MHA, fp16.
SMOKE_CASES = [
    ([128], [100], 2, 1, torch.bfloat16, 1),
    ([128], [256], 2, 1, torch.bfloat16, 1),
    ([100], [300], 2, 2, torch.bfloat16, 1),
    ([129], [512], 4, 2, torch.float16, 1),
    ([64], [640], 4, 1, torch.bfloat16, 1),
    ([300], [5000], 12, 2, torch.bfloat16, 0),
    ([9, 0, 5, 3], [729, 40, 0, 1], 12, 2, torch.bfloat16, 0),
    ([200], [1000], 12, 2, torch.float16, 3),
]


def _ranges(values) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    values, parts = sorted(set(values)), []
    for v in values:
        if parts and v == parts[-1][1] + 1:
            parts[-1][1] = v
        else:
            parts.append([v, v])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts) or "-"


def describe_mismatch(out, ref, cu_q, tol) -> str:
    """Where the output is wrong, in the kernel's terms: query rows within their 128-row tile
    (rows 0-63 belong to consumer warpgroup 0, 64-127 to 1), channels (0-63 and 64-127 are the two
    TMA/swizzle halves), heads, segments; NaNs counted apart."""
    bad = ((out.double() - ref.double()).abs() > tol) | torch.isnan(out)  # [tokens, heads, D]
    if not bad.any():
        return "no element beyond tolerance"
    bq = cu_q.tolist()
    tokens, heads, chans = bad.nonzero(as_tuple=True)
    seg = torch.bucketize(tokens, torch.tensor(bq[1:], device=tokens.device), right=True)
    tile_row = (tokens - torch.tensor(bq, device=tokens.device)[seg]) % 128
    return (f"{int(bad.sum())} bad elements ({int(torch.isnan(out).sum())} NaN); tile rows "
            f"{_ranges(tile_row.tolist())}; channels {_ranges(chans.tolist())}; heads "
            f"{_ranges(heads.tolist())}; segments {_ranges(seg.tolist())}")


def _smoke() -> None:
    os.environ[ENV] = "1"
    torch.manual_seed(0)
    for lens_q, lens_k, hq, hk, dtype, splits in SMOKE_CASES:
        q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, hq, hk, 128, dtype)
        label = f"q{lens_q} k{lens_k} {hq}/{hk} {dtype} splits={splits}"
        print(f"smoke {label}: running", flush=True)
        out, lse, kernel = run_forward(q, k, v, cu_q, cu_k, 128 ** -0.5, splits)
        assert kernel == SM90, f"{label}: ran {kernel!r}"
        out_ref, lse_ref = reference(q, k, v, cu_q, cu_k, 128 ** -0.5, torch.float64)
        out_pt, lse_pt = reference(q, k, v, cu_q, cu_k, 128 ** -0.5, dtype)
        try:
            reports = [check_close("out", out, out_pt, out_ref), check_lse(lse, lse_pt, lse_ref)]
        except AssertionError:
            tol = 2 * max_error(out_pt, out_ref) + 1e-3 * max(out_ref.abs().max().item(), 1e-2)
            print(f"smoke {label}: out mismatch: {describe_mismatch(out, out_ref, cu_q, tol)}",
                  flush=True)
            lse_bad = ((lse.double() - lse_ref).abs() > 0.05) | torch.isnan(lse)
            lse_bad &= ~torch.isneginf(lse_ref)
            print(f"smoke {label}: lse bad at heads "
                  f"{_ranges(lse_bad.nonzero(as_tuple=True)[0].tolist())}, tokens "
                  f"{_ranges(lse_bad.nonzero(as_tuple=True)[1].tolist())}", flush=True)
            raise
        print(f"smoke {label}: {'; '.join(reports)}", flush=True)
    print("sm90 smoke: ok", flush=True)


_SMOKE = ChildSmoke(__file__, "sm90 smoke: ok", tail=6000)


def smoke_error() -> str | None:
    """Runs the smoke test in a child process once per session: None if it passed, else why not."""
    return _SMOKE.error()


def test_smoke():
    """First in the file: the one test that fails when the kernel hangs or crashes (the others are
    then skipped, so a broken kernel costs one failure, not --maxfail)."""
    error = smoke_error()
    if error is not None:
        pytest.fail(f"sm90 smoke test failed in a child process:\n{error}", pytrace=False)
    print("\n" + _SMOKE.log)


@pytest.fixture(autouse=True)
def _needs_smoke(request):
    if request.node.name != "test_smoke" and smoke_error() is not None:
        pytest.skip("the sm90 smoke test failed (see test_smoke); not running the kernel in-process")
    yield


# ----------------------------------------------------------------------------------------------
# Against the float64 reference
# ----------------------------------------------------------------------------------------------

SHAPES = [(1, 339), (9, 729), (113, 203), (128, 128), (300, 5000)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{sq}x{sk}" for sq, sk in SHAPES])
def test_forward(shape, dtype):
    lens_q, lens_k = segment_lengths(*shape)
    q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, HQ, HK, 128, dtype)
    check_forward(q, k, v, cu_q, cu_k, 128 ** -0.5, label=f"{shape}")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward_v2v_256_frames(dtype):
    """CrossLMM-2B's V2V at 256 frames: 2304 pooled queries against 256 * 729 keys."""
    q, k, v, cu_q, cu_k = make_inputs([2304], [186624], HQ, HK, 128, dtype)
    check_forward(q, k, v, cu_q, cu_k, 128 ** -0.5, label="(2304, 186624)")


@pytest.mark.parametrize("num_splits", [0, 1, 2, 3, 7])
@pytest.mark.parametrize("shape", [(9, 729), (300, 5000), (1, 3000)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_num_splits(shape, num_splits):
    lens_q, lens_k = segment_lengths(*shape)
    q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, HQ, HK, 128, torch.bfloat16)
    check_forward(q, k, v, cu_q, cu_k, 128 ** -0.5, num_splits, label=f"{shape}")


@pytest.mark.parametrize("heads", [(12, 2), (4, 4), (6, 1)], ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gqa_groups(heads, dtype):
    q, k, v, cu_q, cu_k = make_inputs([9, 170], [729, 130], heads[0], heads[1], 128, dtype)
    check_forward(q, k, v, cu_q, cu_k, 0.07, label=f"heads {heads}")


# Segments: ordinary, no queries, no keys, both empty, tile edges (64/65, 128/129, 256/257 rows
# and keys), one query, one key.
VARLEN_Q = [5, 0, 7, 0, 64, 1, 129, 33, 128, 257, 3]
VARLEN_K = [100, 50, 0, 0, 65, 1, 300, 128, 129, 256, 1]


@pytest.mark.parametrize("num_splits", [0, 1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_empty_segments(dtype, num_splits):
    q, k, v, cu_q, cu_k = make_inputs(VARLEN_Q, VARLEN_K, HQ, HK, 128, dtype)
    out, lse = check_forward(q, k, v, cu_q, cu_k, 128 ** -0.5, num_splits, label="varlen")
    no_keys = slice(sum(VARLEN_Q[:2]), sum(VARLEN_Q[:3]))  # 7 queries, no keys
    assert torch.all(out[no_keys] == 0)
    assert torch.all(torch.isneginf(lse[:, no_keys]))


def test_non_contiguous():
    """q and out as channel slices of wider tensors, k and v as halves of a fused kv tensor (TMA
    maps with the tensors' own strides): same bits as contiguous copies."""
    lens_q, lens_k = [9, 140], [729, 333]
    tq, tk, d = sum(lens_q), sum(lens_k), 128
    q = torch.randn(tq, HQ, 2 * d, device="cuda", dtype=torch.bfloat16)[..., d:]
    kv = torch.randn(tk, 2 * HK, d, device="cuda", dtype=torch.bfloat16)
    k, v = kv[:, :HK], kv[:, HK:]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    out = torch.empty(tq, 3, HQ, d, device="cuda", dtype=torch.bfloat16)[:, 1]
    out, lse, kernel = run_forward(q, k, v, cu_q, cu_k, d ** -0.5, out=out)
    assert kernel == SM90
    out_c, lse_c, kernel_c = run_forward(q.contiguous(), k.contiguous(), v.contiguous(), cu_q,
                                         cu_k, d ** -0.5)
    assert kernel_c == SM90
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    check_forward(q, k, v, cu_q, cu_k, d ** -0.5, label="non-contiguous")


def test_head_major_layout():
    """q, k, v as [H, tokens, D] buffers viewed as [tokens, H, D] (head stride > token stride).
    TMA may or may not take these strides; either kernel must give the right answer."""
    lens_q, lens_k = [70, 9], [400, 729]
    q = torch.randn(HQ, sum(lens_q), 128, device="cuda", dtype=torch.bfloat16).transpose(0, 1)
    k = torch.randn(HK, sum(lens_k), 128, device="cuda", dtype=torch.bfloat16).transpose(0, 1)
    v = torch.randn(HK, sum(lens_k), 128, device="cuda", dtype=torch.bfloat16).transpose(0, 1)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    out, lse, kernel = run_forward(q, k, v, cu_q, cu_k, 128 ** -0.5)
    print(f"\n[sm90 head-major layout] kernel that ran: {kernel}")
    out_ref, lse_ref = reference(q, k, v, cu_q, cu_k, 128 ** -0.5, torch.float64)
    out_pt, lse_pt = reference(q, k, v, cu_q, cu_k, 128 ** -0.5, q.dtype)
    print(check_close("out", out, out_pt, out_ref), check_lse(lse, lse_pt, lse_ref))


@pytest.mark.parametrize("shape", [(113, 203), (300, 5000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_agrees_with_mma_sync(shape):
    """The same inputs through both kernels: both close to float64, and close to each other."""
    lens_q, lens_k = segment_lengths(*shape)
    q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, HQ, HK, 128, torch.bfloat16)
    out90, lse90, kernel90 = run_forward(q, k, v, cu_q, cu_k, 128 ** -0.5, mode="1")
    out80, lse80, kernel80 = run_forward(q, k, v, cu_q, cu_k, 128 ** -0.5, mode="0")
    assert (kernel90, kernel80) == (SM90, "mma_sync")
    out_ref, lse_ref = reference(q, k, v, cu_q, cu_k, 128 ** -0.5, torch.float64)
    e90, e80 = max_error(out90, out_ref), max_error(out80, out_ref)
    print(f"\n[sm90 vs mma.sync {shape}] out err sm90 {e90:.3e}, mma.sync {e80:.3e}, between "
          f"{max_error(out90, out80):.3e}; lse between {max_error(lse90, lse80):.3e}")
    assert e90 <= 2 * e80 + 1e-3


def test_deterministic():
    q, k, v, cu_q, cu_k = make_inputs([300, 9], [5000, 729], HQ, HK, 128, torch.bfloat16)
    first = run_forward(q, k, v, cu_q, cu_k, 128 ** -0.5)
    second = run_forward(q, k, v, cu_q, cu_k, 128 ** -0.5)
    assert first[2] == second[2] == SM90
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("where", ["k", "v"])
def test_other_segments_values_do_not_leak(where):
    """The last key tile of segment 0 also covers the first keys of segment 1 (TMA boxes are not
    cut at segment ends). An inf/NaN there must not reach segment 0: scores are masked, and V rows
    past the segment end are zeroed before P V (0 * inf would be NaN)."""
    lens_q, lens_k = [50, 40], [200, 300]
    q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, HQ, HK, 128, torch.bfloat16)
    target = k if where == "k" else v
    target[200:240] = math.inf  # keys 0..39 of segment 1, inside segment 0's second tile
    target[241, 1, 5] = math.nan
    out, lse, kernel = run_forward(q, k, v, cu_q, cu_k, 128 ** -0.5)
    assert kernel == SM90
    assert torch.isfinite(out[:50]).all() and torch.isfinite(lse[:, :50]).all(), \
        f"values of segment 1's {where} leaked into segment 0"
    out_ref, _ = reference(q[:50], k[:200], v[:200], cu_seqlens([50]), cu_seqlens([200]),
                           128 ** -0.5, torch.float64)
    print(f"\n[sm90 leak {where}] segment 0 max err {max_error(out[:50], out_ref):.3e}")
    assert max_error(out[:50], out_ref) < 0.02


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------


def test_dispatch_modes():
    q, k, v, cu_q, cu_k = make_inputs([9], [729], HQ, HK, 128, torch.bfloat16)
    q2, k2, v2, cu_q2, cu_k2 = make_inputs([300], [729], HQ, HK, 128, torch.bfloat16)
    scale = 128 ** -0.5
    assert run_forward(q, k, v, cu_q, cu_k, scale, mode="0")[2] == "mma_sync"
    assert run_forward(q, k, v, cu_q, cu_k, scale, mode="1")[2] == SM90
    assert run_forward(q, k, v, cu_q, cu_k, scale, mode="auto")[2] == "mma_sync"  # 9 queries
    assert run_forward(q2, k2, v2, cu_q2, cu_k2, scale, mode="auto")[2] == SM90
    # Not for the sm90 kernel: head dim 64, a non-positive scale.
    q64, k64, v64, cu_q64, cu_k64 = make_inputs([300], [729], HQ, HK, 64, torch.bfloat16)
    assert run_forward(q64, k64, v64, cu_q64, cu_k64, 0.125, mode="1")[2] == "mma_sync"
    out, lse, kernel = run_forward(q2, k2, v2, cu_q2, cu_k2, -scale, mode="1")
    assert kernel == "mma_sync"
    with pytest.raises(RuntimeError, match=ENV):
        run_forward(q, k, v, cu_q, cu_k, scale, mode="yes")
    print(f"\n[sm90 dispatch] unset -> {run_forward(q2, k2, v2, cu_q2, cu_k2, scale, mode='')[2]}")


def test_through_public_api_with_backward():
    """crosslmm_ops.cross_attention on the CUDA back end with the sm90 forward: out, lse and the
    gradients (mma.sync backward, which reads the sm90 forward's out and lse) against float64."""
    import crosslmm_ops

    lens_q, lens_k = [200, 9], [1000, 729]
    q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, HQ, HK, 128, torch.bfloat16)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with sm90_mode("1"):
        out, lse = crosslmm_ops.cross_attention(*leaves, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                                return_lse=True, backend="cuda")
        assert _extension().attention_forward_kernel_name() == SM90
    assert crosslmm_ops.last_backend("cross_attention") == "cuda"
    dout = torch.randn_like(out)
    out.backward(dout)
    grads = [t.grad for t in leaves]

    def ref_grads(dtype):
        rl = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o, l = crosslmm_ops.cross_attention_reference(*rl, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                                      return_lse=True, compute_dtype=dtype)
        o.backward(dout.to(dtype))
        return o.detach(), l.detach(), [t.grad for t in rl]

    o64, l64, g64 = ref_grads(torch.float64)
    o16, l16, g16 = ref_grads(torch.bfloat16)
    reports = [check_close("out", out, o16, o64), check_close("lse", lse, l16, l64)]
    for name, ours, low, ref in zip(("dq", "dk", "dv"), grads, g16, g64):
        reports.append(check_close(name, ours, low, ref, factor=3.0))
    print("\n[sm90 public API] " + "; ".join(reports))


def test_fresh_thread():
    """A thread that has made no CUDA runtime call of its own, with every buffer already in the
    caching allocator, still gets the sm90 kernel: its TMA encoding (a driver call) needs a
    current context, which attention.cu now makes current itself (CUDA_ERROR_INVALID_CONTEXT sent
    autograd's backward thread to the mma.sync kernels before)."""
    import threading

    lens_q, lens_k = [200], [729]
    q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, 4, 2, 128, torch.bfloat16)
    expected, _, kernel = run_forward(q, k, v, cu_q, cu_k, 128 ** -0.5, num_splits=1)
    assert kernel == SM90
    # Preallocated, NaN-filled outputs: the thread itself only makes the extension call (any
    # allocation or copy of its own would be a runtime call and make the context current).
    out = torch.full_like(q, math.nan)
    lse = torch.full((q.shape[1], q.shape[0]), math.nan, device="cuda", dtype=torch.float32)
    torch.cuda.synchronize()
    seen = {}

    def worker():
        try:
            _extension().attention_forward(q, k, v, out, lse, cu_q, cu_k, 200, 729,
                                           128 ** -0.5, 1)
            seen["kernel"] = _extension().attention_forward_kernel_name()
        except BaseException as exc:  # noqa: BLE001 - reported below
            seen["error"] = exc

    with sm90_mode("1"):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    torch.cuda.synchronize()
    assert "error" not in seen, seen.get("error")
    assert seen["kernel"] == SM90
    assert torch.equal(out, expected)  # the same kernel and split: bitwise the same result


if __name__ == "__main__" and "--smoke" in sys.argv:  # the child process of smoke_error()
    try:
        _smoke()
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        sys.exit(1)

