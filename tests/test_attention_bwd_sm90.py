"""The Hopper (sm_90a) attention backward (csrc/attention/attention_bwd_sm90*.cu: wgmma + TMA dK/dV
and dQ kernels, warp-specialised), called through ``crosslmm_ops._C.attention_backward`` with
``CROSSLMM_ATTENTION_BWD_SM90=1`` (both sm90 kernels) or ``=dkdv`` (sm90 dK/dV, mma.sync dQ),
against a float64 PyTorch reference computed segment by segment and head by head, and against the
mma.sync backward (``=0``).

Written to be run once on an H100 and read: every check prints its max errors (``pytest -s`` or
``-rA`` shows them), every call asserts through ``_C.attention_backward_kernel_name()`` which
backward really ran, and the gradients are NaN-poisoned before each call (an element a kernel
forgets to write fails the NaN check).

The kernels were only compiled, never run, when this file was written, so the module first runs a
smoke test in a child process with a timeout: a hang (a barrier protocol bug) or a crash (an illegal
instruction, a bad TMA descriptor) then fails ``test_smoke`` with the child's output (where the
gradients are wrong: key / row within the kernel's tiles, channel half, head, segment) and skips
the other tests here, instead of hanging or killing the test session.

Error bound (flash-attn's for gradients): max |ours - ref| <= 3 x max |PyTorch in the kernel's dtype
- ref| + 1e-3 x max |ref|, the low-precision PyTorch computing the same formulas with its matmuls
and softmax in bf16 / fp16 (GQA sums over the group in fp32, rounded once, as autograd's
reduction of repeated k / v would).
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

ENV = "CROSSLMM_ATTENTION_BWD_SM90"
SM90 = "sm90_wgmma"
SM90_DKDV = "sm90_dkdv"
HQ, HK = 12, 2  # CrossLMM-2B: 12 query heads, 2 kv heads
DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = ["bf16", "fp16"]
SCALE = 128 ** -0.5


def _extension():
    ext = _backend.extension()
    if ext is None or not hasattr(ext, "attention_backward_kernel_name"):
        return None
    return ext


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(sm90_skip_reason("attention_backward_kernel_name") is not None,
                       reason=str(sm90_skip_reason("attention_backward_kernel_name"))),
]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


cu_seqlens = functools.partial(cu_seqlens_on, device="cuda")


def make_inputs(lens_q, lens_k, hq, hk, dtype):
    """q, k, v, dout (random, never zeros), cu_seqlens_q, cu_seqlens_k."""
    q = torch.randn(sum(lens_q), hq, 128, device="cuda", dtype=dtype)
    k = torch.randn(sum(lens_k), hk, 128, device="cuda", dtype=dtype)
    v = torch.randn(sum(lens_k), hk, 128, device="cuda", dtype=dtype)
    dout = torch.randn(sum(lens_q), hq, 128, device="cuda", dtype=dtype)
    return q, k, v, dout, cu_seqlens(lens_q), cu_seqlens(lens_k)


def lengths(cu: torch.Tensor) -> list[int]:
    return (cu[1:] - cu[:-1]).tolist()


def run_forward(q, k, v, cu_q, cu_k, scale):
    """out and lse from the extension's forward (what autograd would hand the backward)."""
    ext = _extension()
    out = torch.full(q.shape, math.nan, device="cuda", dtype=q.dtype)
    lse = torch.full((q.shape[1], q.shape[0]), math.nan, device="cuda", dtype=torch.float32)
    ext.attention_forward(q, k, v, out, lse, cu_q, cu_k, max(lengths(cu_q), default=0),
                          max(lengths(cu_k), default=0), scale, 0)
    return out, lse


def run_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale, mode="1", grads=None):
    """One _C.attention_backward call with NaN-poisoned gradients: (dq, dk, dv, kernel name).
    ``grads`` (optional) are the output tensors to write, e.g. strided views."""
    ext = _extension()
    if grads is None:
        grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    dq, dk, dv = grads
    for g in grads:
        g.fill_(math.nan)
    with env_value(ENV, mode):
        ext.attention_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k,
                               max(lengths(cu_q), default=0), max(lengths(cu_k), default=0),
                               scale, True)
        kernel = ext.attention_backward_kernel_name()
    torch.cuda.synchronize()  # a launch failure shows up here, at the call that caused it
    return dq, dk, dv, kernel


def reference_grads(dout, q, k, v, cu_q, cu_k, scale, dtype, chunk=1024):
    """dq, dk, dv of softmax(q k^T scale) v per segment and head, with the matmuls and softmax in
    ``dtype`` (float64: the oracle; the inputs' dtype: PyTorch's own low-precision error). The
    forward is recomputed here in the same dtype (out for Delta, P from the softmax). dk / dv are
    summed over the GQA group in float32 (float64 for the oracle) and rounded once. Queries in
    chunks so that (576, 46656) stays small."""
    hq, hk = q.shape[1], k.shape[1]
    group = hq // hk
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dq = torch.zeros(q.shape, device=q.device, dtype=dtype)
    dk = torch.zeros(k.shape, device=q.device, dtype=acc)
    dv = torch.zeros(v.shape, device=q.device, dtype=acc)
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for b in range(len(bq) - 1):
        q0, q1, k0, k1 = bq[b], bq[b + 1], bk[b], bk[b + 1]
        if q1 == q0 or k1 == k0:
            continue  # no queries: dk = dv = 0; no keys: dq = 0
        for h in range(hq):
            kh = k[k0:k1, h // group].to(dtype)
            vh = v[k0:k1, h // group].to(dtype)
            for c0 in range(q0, q1, chunk):
                c1 = min(c0 + chunk, q1)
                qh, doh = q[c0:c1, h].to(dtype), dout[c0:c1, h].to(dtype)
                p = torch.softmax((qh @ kh.T) * scale, dim=-1)
                out = p @ vh
                delta = (doh * out).sum(-1, keepdim=True)
                ds = p * (doh @ vh.T - delta)
                dq[c0:c1, h] = (ds @ kh) * scale
                dk[k0:k1, h // group] += ((ds.T @ qh) * scale).to(acc)
                dv[k0:k1, h // group] += (p.T @ doh).to(acc)
    return dq, dk.to(dtype), dv.to(dtype)


def max_error(actual, expected) -> float:
    if expected.numel() == 0:
        return 0.0
    return (actual.double() - expected.double()).abs().max().item()


def check_close(name, ours, low_precision, ref, factor=3.0) -> str:
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


def check_backward(dout, q, k, v, cu_q, cu_k, scale=SCALE, mode="1", label="", grads=None,
                   compare_mma=True):
    """Runs the sm90 backward, asserts it ran and matches the float64 reference (and prints its
    distance to the mma.sync backward); returns (dq, dk, dv)."""
    out, lse = run_forward(q, k, v, cu_q, cu_k, scale)
    dq, dk, dv, kernel = run_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale, mode, grads)
    expected = SM90 if mode == "1" else SM90_DKDV
    assert kernel == expected, f"expected the {expected} backward to run, got {kernel!r}"
    with torch.no_grad():
        ref = reference_grads(dout, q, k, v, cu_q, cu_k, scale, torch.float64)
        low = reference_grads(dout, q, k, v, cu_q, cu_k, scale, q.dtype)
    reports = []
    for name, ours, lo, r in zip(("dq", "dk", "dv"), (dq, dk, dv), low, ref):
        reports.append(check_close(name, ours, lo, r))
    if compare_mma:
        mq, mk, mv, mkernel = run_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale, "0")
        assert mkernel == "mma_sync"
        reports.append("vs mma.sync: " + ", ".join(
            f"{n} {max_error(a, b):.2e}" for n, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv),
                                                             (mq, mk, mv))))
    print(f"\n[{kernel} {label} {q.dtype}] " + "; ".join(reports))
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Smoke test in a child process (a hang or crash fails this module instead of the session)
# ----------------------------------------------------------------------------------------------

# (lens_q, lens_k, heads q, heads kv, dtype, mode). dK/dV: 1..3 key tiles of 128, query tiles of
# 64 rows per head of the group (the 2-stage ring wraps from the 3rd tile), partial query tiles
# (zeroed rows), masked keys. dQ: 1..3 row tiles of 128, 64-key tiles (3-stage ring), masked last
# key tiles, key splits (few CTAs against many keys), empty segments of both kinds, GQA and MHA.
SMOKE_CASES = [
    ([64], [128], 1, 1, torch.bfloat16, "dkdv"),
    ([64], [128], 1, 1, torch.bfloat16, "1"),
    ([100], [300], 2, 2, torch.bfloat16, "1"),
    ([129], [200], 4, 2, torch.float16, "1"),
    ([64], [5000], 2, 1, torch.bfloat16, "1"),
    ([300], [1000], 12, 2, torch.bfloat16, "1"),
    ([9, 0, 5, 3], [729, 40, 0, 1], 12, 2, torch.bfloat16, "1"),
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


def describe_mismatch(grad, ref, cu, tol, tile) -> str:
    """Where a gradient is wrong, in the kernel's terms: token within its tile (dK/dV: 128-key
    tiles, keys 0-63 consumer warpgroup 0, 64-127 warpgroup 1; dQ: 128-row tiles, likewise),
    channels (0-63 and 64-127 are the two TMA / swizzle halves), heads, segments; NaNs apart."""
    bad = ((grad.double() - ref.double()).abs() > tol) | torch.isnan(grad)
    if not bad.any():
        return "no element beyond tolerance"
    bounds = cu.tolist()
    tokens, heads, chans = bad.nonzero(as_tuple=True)
    seg = torch.bucketize(tokens, torch.tensor(bounds[1:], device=tokens.device), right=True)
    tile_row = (tokens - torch.tensor(bounds, device=tokens.device)[seg]) % tile
    return (f"{int(bad.sum())} bad of {grad.numel()} ({int(torch.isnan(grad).sum())} NaN); tile "
            f"rows {_ranges(tile_row.tolist())}; channels {_ranges(chans.tolist())}; heads "
            f"{_ranges(heads.tolist())}; segments {_ranges(seg.tolist())}")


def _smoke() -> None:
    torch.manual_seed(0)
    for lens_q, lens_k, hq, hk, dtype, mode in SMOKE_CASES:
        q, k, v, dout, cu_q, cu_k = make_inputs(lens_q, lens_k, hq, hk, dtype)
        label = f"q{lens_q} k{lens_k} {hq}/{hk} {dtype} mode={mode}"
        print(f"smoke {label}: running", flush=True)
        out, lse = run_forward(q, k, v, cu_q, cu_k, SCALE)
        dq, dk, dv, kernel = run_backward(dout, q, k, v, out, lse, cu_q, cu_k, SCALE, mode)
        assert kernel == (SM90 if mode == "1" else SM90_DKDV), f"{label}: ran {kernel!r}"
        ref = reference_grads(dout, q, k, v, cu_q, cu_k, SCALE, torch.float64)
        low = reference_grads(dout, q, k, v, cu_q, cu_k, SCALE, dtype)
        reports, failed = [], []
        for name, ours, lo, r, cu in zip(("dq", "dk", "dv"), (dq, dk, dv), low, ref,
                                         (cu_q, cu_k, cu_k)):
            try:
                reports.append(check_close(name, ours, lo, r))
            except AssertionError as exc:
                tol = 3 * max_error(lo, r) + 1e-3 * max(r.abs().max().item(), 1e-2)
                print(f"smoke {label}: {exc}\n    {name} mismatch: "
                      f"{describe_mismatch(ours, r, cu, tol, 128)}", flush=True)
                failed.append(name)
        if failed:
            raise AssertionError(f"smoke {label}: wrong {failed}")
        print(f"smoke {label}: {'; '.join(reports)}", flush=True)
    print("sm90 bwd smoke: ok", flush=True)


_SMOKE = ChildSmoke(__file__, "sm90 bwd smoke: ok")


def smoke_error() -> str | None:
    """Runs the smoke test in a child process once per session: None if it passed, else why not."""
    return _SMOKE.error()


def test_smoke():
    """First in the file: the one test that fails when a kernel hangs or crashes (the others are
    then skipped, so a broken kernel costs one failure, not --maxfail)."""
    error = smoke_error()
    if error is not None:
        pytest.fail(f"sm90 backward smoke test failed in a child process:\n{error}",
                    pytrace=False)
    print("\n" + _SMOKE.log)


@pytest.fixture(autouse=True)
def _needs_smoke(request):
    if request.node.name != "test_smoke" and smoke_error() is not None:
        pytest.skip("the sm90 backward smoke test failed (see test_smoke); not running the "
                    "kernels in-process")
    yield


# ----------------------------------------------------------------------------------------------
# Against the float64 reference
# ----------------------------------------------------------------------------------------------

SHAPES = [(1, 339), (9, 729), (113, 203), (128, 128), (300, 5000), (576, 46656)]
SWAPPED = [(sk, sq) for sq, sk in SHAPES if sq != sk and sq * sk <= 2_000_000]


def segment_lengths(sq: int, sk: int) -> tuple[list[int], list[int]]:
    """The named (Sq, Sk) segment, plus a second, differently sized one when that stays cheap."""
    if sq * sk > 2_000_000:
        return [sq], [sk]
    return [sq, sq // 3 + 1], [sk, sk // 2 + 17]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES + SWAPPED, ids=lambda s: f"{s[0]}x{s[1]}")
def test_backward(shape, dtype):
    lens_q, lens_k = segment_lengths(*shape)
    q, k, v, dout, cu_q, cu_k = make_inputs(lens_q, lens_k, HQ, HK, dtype)
    check_backward(dout, q, k, v, cu_q, cu_k, label=f"{shape}")


@pytest.mark.parametrize("shape", [(9, 729), (300, 5000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_backward_dkdv_only(shape):
    """CROSSLMM_ATTENTION_BWD_SM90=dkdv: the sm90 dK/dV kernel with the mma.sync dQ kernel (tells
    the two sm90 kernels apart when one is wrong)."""
    lens_q, lens_k = segment_lengths(*shape)
    q, k, v, dout, cu_q, cu_k = make_inputs(lens_q, lens_k, HQ, HK, torch.bfloat16)
    check_backward(dout, q, k, v, cu_q, cu_k, mode="dkdv", label=f"{shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_empty_segments(dtype):
    """Segments without queries (dk = dv = 0 for their keys) and without keys (dq = 0), between
    ordinary ones, lengths that are no multiple of any tile."""
    lens_q = [9, 0, 5, 0, 70, 3, 200]
    lens_k = [729, 40, 0, 0, 300, 1, 1000]
    q, k, v, dout, cu_q, cu_k = make_inputs(lens_q, lens_k, HQ, HK, dtype)
    dq, dk, dv = check_backward(dout, q, k, v, cu_q, cu_k, label="varlen")
    bq, bk = cu_q.tolist(), cu_k.tolist()
    assert torch.all(dk[bk[1]:bk[2]] == 0) and torch.all(dv[bk[1]:bk[2]] == 0)
    assert torch.all(dq[bq[2]:bq[3]] == 0)


@pytest.mark.parametrize("heads", [(12, 2), (4, 4), (6, 1)], ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gqa_groups(heads, dtype):
    q, k, v, dout, cu_q, cu_k = make_inputs([9, 170], [729, 130], heads[0], heads[1], dtype)
    check_backward(dout, q, k, v, cu_q, cu_k, scale=0.07, label=f"heads {heads}")


def test_negative_scale():
    """The backward has no row-max step, so any finite scale is allowed (unlike the sm90 forward,
    which then falls back to mma.sync for out / lse)."""
    q, k, v, dout, cu_q, cu_k = make_inputs([130], [700], HQ, HK, torch.bfloat16)
    check_backward(dout, q, k, v, cu_q, cu_k, scale=-0.05, label="scale -0.05")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_contiguous(dtype):
    """q / k / v slices of fused tensors (head and token strides != contiguous), dout transposed
    from a head-major buffer, gradients written into strided views."""
    lens_q, lens_k = [150, 40], [900, 333]
    tq, tk = sum(lens_q), sum(lens_k)
    qx = torch.randn(tq, HQ, 256, device="cuda", dtype=dtype)
    kv = torch.randn(tk, HK, 2, 128, device="cuda", dtype=dtype)
    q, k, v = qx[..., 64:192], kv[:, :, 0], kv[:, :, 1]
    dout = torch.randn(HQ, tq, 128, device="cuda", dtype=dtype).transpose(0, 1)
    assert not any(t.is_contiguous() for t in (q, k, v, dout))
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    dq_buf = torch.empty(tq, HQ, 192, device="cuda", dtype=dtype)
    dkv_buf = torch.empty(tk, HK, 2, 128, device="cuda", dtype=dtype)
    grads = (dq_buf[..., 32:160], dkv_buf[:, :, 1], dkv_buf[:, :, 0])
    check_backward(dout, q, k, v, cu_q, cu_k, label="non-contiguous", grads=grads)


@pytest.mark.parametrize("shape", [(576, 46656), (9, 729)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_deterministic(shape):
    """Two calls give bitwise-equal gradients (no atomics; the dQ key splits are summed in a fixed
    order)."""
    lens_q, lens_k = segment_lengths(*shape)
    q, k, v, dout, cu_q, cu_k = make_inputs(lens_q, lens_k, HQ, HK, torch.bfloat16)
    out, lse = run_forward(q, k, v, cu_q, cu_k, SCALE)
    first = run_backward(dout, q, k, v, out, lse, cu_q, cu_k, SCALE)
    second = run_backward(dout, q, k, v, out, lse, cu_q, cu_k, SCALE)
    assert first[3] == second[3] == SM90
    for name, a, b in zip(("dq", "dk", "dv"), first[:3], second[:3]):
        assert torch.equal(a, b), f"{name} differs between two calls"


@pytest.mark.slow
def test_backward_v2v_256_frames():
    """CrossLMM-2B's V2V at 256 frames: 2304 pooled queries against 256 * 729 keys."""
    q, k, v, dout, cu_q, cu_k = make_inputs([2304], [186624], HQ, HK, torch.bfloat16)
    check_backward(dout, q, k, v, cu_q, cu_k, label="(2304, 186624)")


def test_dispatch():
    """"0" runs mma.sync; "auto" keeps short query sets (< 64) on mma.sync and takes long ones;
    head dim 64 never takes the sm90 path; a bad value is an error naming the variable; unset is
    the default (printed)."""
    q, k, v, dout, cu_q, cu_k = make_inputs([9], [729], HQ, HK, torch.bfloat16)
    out, lse = run_forward(q, k, v, cu_q, cu_k, SCALE)
    assert run_backward(dout, q, k, v, out, lse, cu_q, cu_k, SCALE, "0")[3] == "mma_sync"
    assert run_backward(dout, q, k, v, out, lse, cu_q, cu_k, SCALE, "auto")[3] == "mma_sync"
    q2, k2, v2, dout2, cu_q2, cu_k2 = make_inputs([200], [729], HQ, HK, torch.bfloat16)
    out2, lse2 = run_forward(q2, k2, v2, cu_q2, cu_k2, SCALE)
    assert run_backward(dout2, q2, k2, v2, out2, lse2, cu_q2, cu_k2, SCALE, "auto")[3] == SM90
    q64 = torch.randn(200, HQ, 64, device="cuda", dtype=torch.bfloat16)
    k64 = torch.randn(729, HK, 64, device="cuda", dtype=torch.bfloat16)
    v64, do64 = torch.randn_like(k64), torch.randn_like(q64)
    out64, lse64 = run_forward(q64, k64, v64, cu_q2, cu_k2, 0.125)
    assert run_backward(do64, q64, k64, v64, out64, lse64, cu_q2, cu_k2, 0.125, "1")[3] == \
        "mma_sync"
    with pytest.raises(RuntimeError, match=ENV):
        run_backward(dout, q, k, v, out, lse, cu_q, cu_k, SCALE, "yes")
    default = run_backward(dout2, q2, k2, v2, out2, lse2, cu_q2, cu_k2, SCALE, None)[3]
    print(f"\n[sm90 bwd dispatch] unset -> {default}")


def test_through_public_api():
    """crosslmm_ops.cross_attention on the CUDA back end with the sm90 backward: gradients through
    autograd against float64."""
    import crosslmm_ops

    lens_q, lens_k = [200, 9], [1000, 729]
    q, k, v, dout, cu_q, cu_k = make_inputs(lens_q, lens_k, HQ, HK, torch.bfloat16)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ext = _extension()
    calls = []  # (kernel name, tensor arguments' (shape, strides, address % 16)) of each backward
    original = ext.attention_backward

    def logged(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((ext.attention_backward_kernel_name(), ext.attention_backward_sm90_declined(),
                      [(tuple(a.shape), a.stride(), a.data_ptr() % 16, a.dtype)
                       for a in args if isinstance(a, torch.Tensor)]))
        return result

    ext.attention_backward = logged
    try:
        with env_value(ENV, "1"):
            out = crosslmm_ops.cross_attention(*leaves, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                               backend="cuda")
            out.backward(dout)
    finally:
        ext.attention_backward = original
    assert crosslmm_ops.last_backend("cross_attention_backward") == "cuda", \
        crosslmm_ops.last_backend("cross_attention_backward")
    assert [call[0] for call in calls] == [SM90], calls
    ref = reference_grads(dout, q, k, v, cu_q, cu_k, SCALE, torch.float64)
    low = reference_grads(dout, q, k, v, cu_q, cu_k, SCALE, torch.bfloat16)
    reports = [check_close(n, t.grad, lo, r)
               for n, t, lo, r in zip(("dq", "dk", "dv"), leaves, low, ref)]
    print("\n[sm90 bwd public API] " + "; ".join(reports))


if __name__ == "__main__" and "--smoke" in sys.argv:  # the child process of smoke_error()
    try:
        _smoke()
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        sys.exit(1)
