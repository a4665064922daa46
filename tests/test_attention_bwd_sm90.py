"""The Hopper (sm_90a) attention backward (csrc/attention/attention_bwd_sm90*.cu: wgmma + TMA dK/dV
and dQ kernels, warp-specialised), called through ``crosslmm_ops._C.attention_backward``: what
only these kernels have. Their tests against the float64 oracle that every kernel shares (shapes
with Sq and Sk swapped, GQA, empty segments, determinism, and the sm90 dK/dV kernel with the
mma.sync dQ, "sm90_dkdv") are test_attention_cuda_kernel.py's, parametrised over the kernel; every
sm90 check there also prints its distance to the mma.sync backward.

Written to be run on an H100 and read: every check prints its max errors (``pytest -s`` or ``-rA``
shows them), every call asserts which backward ran (the name the extension returns), and the
gradients are NaN-poisoned before each call (an element a kernel forgets to write fails the NaN
check).

The module first runs a smoke test in a child process with a timeout: a hang (a barrier protocol
bug) or a crash (an illegal instruction, a bad TMA descriptor) then fails ``test_smoke`` with the
child's output (where the gradients are wrong: key / row within the kernel's tiles, channel half,
head, segment) and skips the other sm90 backward tests, here and in test_attention_cuda_kernel.py,
instead of hanging or killing the test session.

Error bound (tests/attention_oracle.py, flash-attn's for gradients): max |ours - ref| <= 3 x max
|PyTorch in the kernel's dtype - ref| + 1e-3 x max |ref|, the low-precision PyTorch being autograd
through the oracle computed in bf16 / fp16.
"""

from __future__ import annotations

import sys

import attention_oracle as oracle
import pytest
import torch
from attention_oracle import check_close, magnitude_floor, max_err
from child_smoke import ChildSmoke
from test_attention_cuda_kernel import (
    HK,
    HQ,
    MMA,
    SM90,
    SM90_DKDV,
    check_backward,
    cu_seqlens,
    describe_mismatch,
    extension,
    make_inputs,
    run_backward,
    run_forward,
)

from crosslmm_ops.testing import env_value, sm90_skip_reason

ENV = "CROSSLMM_ATTENTION_BWD_SM90"
DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = ["bf16", "fp16"]
SCALE = 128**-0.5

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        sm90_skip_reason("attention_backward_kernel_name") is not None,
        reason=str(sm90_skip_reason("attention_backward_kernel_name")),
    ),
]


# ----------------------------------------------------------------------------------------------
# Smoke test in a child process (a hang or crash fails this module instead of the session)
# ----------------------------------------------------------------------------------------------

# (lens_q, lens_k, heads q, heads kv, dtype, kernel). dK/dV: 1..3 key tiles of 128, query tiles of
# 64 rows per head of the group (the 2-stage ring wraps from the 3rd tile), partial query tiles
# (zeroed rows), masked keys. dQ: 1..3 row tiles of 128, 64-key tiles (3-stage ring), masked last
# key tiles, key splits (few CTAs against many keys), empty segments of both kinds, GQA and MHA.
SMOKE_CASES = [
    ([64], [128], 1, 1, torch.bfloat16, SM90_DKDV),
    ([64], [128], 1, 1, torch.bfloat16, SM90),
    ([100], [300], 2, 2, torch.bfloat16, SM90),
    ([129], [200], 4, 2, torch.float16, SM90),
    ([64], [5000], 2, 1, torch.bfloat16, SM90),
    ([300], [1000], 12, 2, torch.bfloat16, SM90),
    ([9, 0, 5, 3], [729, 40, 0, 1], 12, 2, torch.bfloat16, SM90),
]


def _smoke() -> None:
    torch.manual_seed(0)
    for lens_q, lens_k, hq, hk, dtype, kernel in SMOKE_CASES:
        q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, hq, hk, 128, dtype)
        dout = torch.randn_like(q)
        label = f"q{lens_q} k{lens_k} {hq}/{hk} {dtype} {kernel}"
        print(f"smoke {label}: running", flush=True)
        out, lse, _ = run_forward(q, k, v, cu_q, cu_k, SCALE)
        dq, dk, dv, ran = run_backward(dout, q, k, v, out, lse, cu_q, cu_k, SCALE, kernel)
        assert ran == kernel, f"{label}: ran {ran!r}"
        ref = oracle.attention_grads(dout, q, k, v, cu_q, cu_k, softmax_scale=SCALE)
        low = oracle.attention_grads(dout, q, k, v, cu_q, cu_k, softmax_scale=SCALE, dtype=dtype)
        reports, failed = [], []
        for name, ours, lo, r, cu in zip(
            ("dq", "dk", "dv"), (dq, dk, dv), low, ref, (cu_q, cu_k, cu_k)
        ):
            try:
                reports.append(check_close(name, ours, lo, r, factor=3))
            except AssertionError as exc:
                tol = 3 * max_err(lo, r) + magnitude_floor(r)
                print(
                    f"smoke {label}: {exc}\n    {name} mismatch: "
                    f"{describe_mismatch(ours, r, cu, tol, 128)}",
                    flush=True,
                )
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
        pytest.fail(f"sm90 backward smoke test failed in a child process:\n{error}", pytrace=False)
    print("\n" + _SMOKE.log)


@pytest.fixture(autouse=True)
def _needs_smoke(request):
    if request.node.name != "test_smoke" and smoke_error() is not None:
        pytest.skip(
            "the sm90 backward smoke test failed (see test_smoke); not running the "
            "kernels in-process"
        )
    yield


# ----------------------------------------------------------------------------------------------
# What only the sm90 backward has (its cases against the oracle: test_attention_cuda_kernel.py)
# ----------------------------------------------------------------------------------------------


def test_negative_scale():
    """The backward has no row-max step, so any finite scale is allowed (unlike the sm90 forward,
    which then falls back to mma.sync for out / lse)."""
    q, k, v, cu_q, cu_k = make_inputs([130], [700], HQ, HK, 128, torch.bfloat16)
    check_backward(q, k, v, cu_q, cu_k, -0.05, kernel=SM90, label="scale -0.05")


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
    check_backward(
        q, k, v, cu_q, cu_k, SCALE, kernel=SM90, dout=dout, grads=grads, label="non-contiguous"
    )


def test_kernel_choice():
    """The extension runs the backward asked for where it can ('sm90' with head dim 64 runs
    mma.sync); when to ask for which is crosslmm_ops.planner's (test_planner.py, with the GPU facts
    stubbed), checked here end to end through the public API: CROSSLMM_ATTENTION_BWD_SM90 "0"
    never, "1" always, "dkdv" the sm90 dK/dV kernel with the mma.sync dQ, "auto" (and unset) from
    64 queries a segment on; a bad value is an error naming the variable."""
    import crosslmm_ops

    q, k, v, cu_q, cu_k = make_inputs([9], [729], HQ, HK, 128, torch.bfloat16)
    dout = torch.randn_like(q)
    out, lse, _ = run_forward(q, k, v, cu_q, cu_k, SCALE)
    for kernel in (MMA, SM90, SM90_DKDV):
        assert run_backward(dout, q, k, v, out, lse, cu_q, cu_k, SCALE, kernel)[3] == kernel
    q2, k2, v2, cu_q2, cu_k2 = make_inputs([200], [729], HQ, HK, 128, torch.bfloat16)
    q64 = torch.randn(200, HQ, 64, device="cuda", dtype=torch.bfloat16)
    k64 = torch.randn(729, HK, 64, device="cuda", dtype=torch.bfloat16)
    v64, do64 = torch.randn_like(k64), torch.randn_like(q64)
    out64, lse64, _ = run_forward(q64, k64, v64, cu_q2, cu_k2, 0.125)
    assert run_backward(do64, q64, k64, v64, out64, lse64, cu_q2, cu_k2, 0.125, SM90)[3] == MMA

    def planned(mode, q, k, v, cu_q, cu_k):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        with env_value(ENV, mode):
            out = crosslmm_ops.cross_attention(
                *leaves, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="cuda"
            )
            out.backward(torch.randn_like(out))
        return crosslmm_ops.last_kernel("cross_attention_backward")

    short, long = (q, k, v, cu_q, cu_k), (q2, k2, v2, cu_q2, cu_k2)
    assert planned("0", *long) == MMA
    assert planned("1", *short) == SM90
    assert planned("dkdv", *short) == SM90_DKDV
    assert planned("auto", *short) == MMA  # 9 queries
    assert planned("auto", *long) == SM90
    assert planned(None, *long) == SM90
    with pytest.raises(ValueError, match=ENV):
        planned("yes", *short)


def test_through_public_api():
    """crosslmm_ops.cross_attention on the CUDA back end with the sm90 backward: gradients through
    autograd against float64."""
    import crosslmm_ops

    lens_q, lens_k = [200, 9], [1000, 729]
    q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, HQ, HK, 128, torch.bfloat16)
    dout = torch.randn_like(q)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ext = extension()
    calls = []  # (kernel name, tensor arguments' (shape, strides, address % 16)) of each backward
    original = ext.attention_backward

    def logged(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(
            (
                ext.attention_backward_kernel_name(),
                ext.attention_backward_sm90_declined(),
                [
                    (tuple(a.shape), a.stride(), a.data_ptr() % 16, a.dtype)
                    for a in args
                    if isinstance(a, torch.Tensor)
                ],
            )
        )
        return result

    ext.attention_backward = logged
    try:
        with env_value(ENV, "1"):
            out = crosslmm_ops.cross_attention(
                *leaves, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="cuda"
            )
            out.backward(dout)
    finally:
        ext.attention_backward = original
    assert crosslmm_ops.last_backend("cross_attention_backward") == "cuda", (
        crosslmm_ops.last_backend("cross_attention_backward")
    )
    assert [call[0] for call in calls] == [SM90], calls
    ref = oracle.attention_grads(dout, q, k, v, cu_q, cu_k, softmax_scale=SCALE)
    low = oracle.attention_grads(
        dout, q, k, v, cu_q, cu_k, softmax_scale=SCALE, dtype=torch.bfloat16
    )
    reports = [
        check_close(n, t.grad, lo, r, factor=3)
        for n, t, lo, r in zip(("dq", "dk", "dv"), leaves, low, ref)
    ]
    print("\n[sm90 bwd public API] " + "; ".join(reports))


if __name__ == "__main__" and "--smoke" in sys.argv:  # the child process of smoke_error()
    try:
        _smoke()
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        sys.exit(1)
