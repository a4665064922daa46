"""The Hopper (sm_90a) attention forward (csrc/attention/attention_fwd_sm90*.cu: wgmma + TMA,
warp-specialised), called through ``crosslmm_ops._C.attention_forward``: what only this kernel
has. Its tests against the float64 oracle that every kernel shares (shapes, splits, GQA, empty
segments, strides, determinism) are test_attention_cuda_kernel.py's, parametrised over the kernel.

Written to be run on an H100 and read: every check prints its max errors (``pytest -s`` or ``-rA``
shows them), every call asserts which kernel ran (the name the extension returns), and outputs are
NaN-poisoned before each call.

The module first runs a smoke test in a child process with a timeout: a hang (a barrier protocol
bug) or a crash (an illegal instruction, a bad TMA descriptor) then fails ``test_smoke`` with the
child's output and skips the other sm90 forward tests, here and in test_attention_cuda_kernel.py,
instead of hanging or killing the test session.

Error bound (tests/attention_oracle.py, after flash-attn's tests): max |ours - ref| <=
2 x max |PyTorch in the kernel's dtype - ref| + 1e-3 x max |ref|.
"""

from __future__ import annotations

import math
import sys

import attention_oracle as oracle
import pytest
import torch
from attention_oracle import check_close, check_lse, magnitude_floor, max_err
from child_smoke import ChildSmoke
from test_attention_cuda_kernel import (
    HK,
    HQ,
    MMA,
    SM90,
    SM90_PACKED,
    cu_seqlens,
    describe_mismatch,
    extension,
    make_inputs,
    ranges,
    run_forward,
    segment_lengths,
)

from crosslmm_ops.testing import env_value, sm90_skip_reason

ENV = "CROSSLMM_ATTENTION_SM90"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        sm90_skip_reason("attention_forward_kernel_name") is not None,
        reason=str(sm90_skip_reason("attention_forward_kernel_name")),
    ),
]


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


# The packed sm90 forward (short GQA-packed query sets, cp.async ring): a frame's 9 queries, a
# decode step, two 64-row tiles, ring wrap (1..13 key tiles of 64), masked last tiles, splits.
PACKED_SMOKE_CASES = [
    ([9], [729], 12, 2, torch.bfloat16, 1),
    ([1], [100], 12, 2, torch.bfloat16, 1),
    ([11, 0, 3], [65, 7, 0], 12, 2, torch.float16, 1),
    ([1], [3000], 12, 2, torch.bfloat16, 0),
    ([16, 9], [2000, 729], 12, 2, torch.bfloat16, 3),
]


def _smoke() -> None:
    torch.manual_seed(0)
    cases = [(case, SM90) for case in SMOKE_CASES]
    cases += [(case, SM90_PACKED) for case in PACKED_SMOKE_CASES]
    for (lens_q, lens_k, hq, hk, dtype, splits), kernel in cases:
        q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, hq, hk, 128, dtype)
        label = f"{kernel} q{lens_q} k{lens_k} {hq}/{hk} {dtype} splits={splits}"
        print(f"smoke {label}: running", flush=True)
        out, lse, ran = run_forward(q, k, v, cu_q, cu_k, 128**-0.5, splits, kernel=kernel)
        assert ran == kernel, f"{label}: ran {ran!r}"
        out_ref, lse_ref = oracle.attention(q, k, v, cu_q, cu_k, softmax_scale=128**-0.5)
        out_pt, lse_pt = oracle.attention(q, k, v, cu_q, cu_k, softmax_scale=128**-0.5, dtype=dtype)
        try:
            reports = [
                check_close("out", out, out_pt, out_ref, factor=2),
                check_lse(lse, lse_pt, lse_ref),
            ]
        except AssertionError:
            tol = 2 * max_err(out_pt, out_ref) + magnitude_floor(out_ref)
            print(
                f"smoke {label}: out mismatch: {describe_mismatch(out, out_ref, cu_q, tol, 128)}",
                flush=True,
            )
            lse_bad = ((lse.double() - lse_ref).abs() > 0.05) | torch.isnan(lse)
            lse_bad &= ~torch.isneginf(lse_ref)
            print(
                f"smoke {label}: lse bad at heads "
                f"{ranges(lse_bad.nonzero(as_tuple=True)[0].tolist())}, tokens "
                f"{ranges(lse_bad.nonzero(as_tuple=True)[1].tolist())}",
                flush=True,
            )
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
        pytest.skip(
            "the sm90 smoke test failed (see test_smoke); not running the kernel in-process"
        )
    yield


# ----------------------------------------------------------------------------------------------
# What only the sm90 forward has (its cases against the oracle: test_attention_cuda_kernel.py)
# ----------------------------------------------------------------------------------------------


def test_head_major_layout():
    """q, k, v as [H, tokens, D] buffers viewed as [tokens, H, D] (head stride > token stride).
    TMA may or may not take these strides; either kernel must give the right answer."""
    lens_q, lens_k = [70, 9], [400, 729]
    q = torch.randn(HQ, sum(lens_q), 128, device="cuda", dtype=torch.bfloat16).transpose(0, 1)
    k = torch.randn(HK, sum(lens_k), 128, device="cuda", dtype=torch.bfloat16).transpose(0, 1)
    v = torch.randn(HK, sum(lens_k), 128, device="cuda", dtype=torch.bfloat16).transpose(0, 1)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    out, lse, kernel = run_forward(q, k, v, cu_q, cu_k, 128**-0.5, kernel=SM90)
    print(f"\n[sm90 head-major layout] kernel that ran: {kernel}")
    out_ref, lse_ref = oracle.attention(q, k, v, cu_q, cu_k, softmax_scale=128**-0.5)
    out_pt, lse_pt = oracle.attention(q, k, v, cu_q, cu_k, softmax_scale=128**-0.5, dtype=q.dtype)
    print(check_close("out", out, out_pt, out_ref, factor=2), check_lse(lse, lse_pt, lse_ref))


@pytest.mark.parametrize("shape", [(113, 203), (300, 5000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_agrees_with_mma_sync(shape):
    """The same inputs through both kernels: both close to float64, and close to each other."""
    lens_q, lens_k = segment_lengths(*shape)
    q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, HQ, HK, 128, torch.bfloat16)
    out90, lse90, kernel90 = run_forward(q, k, v, cu_q, cu_k, 128**-0.5, kernel=SM90)
    out80, lse80, kernel80 = run_forward(q, k, v, cu_q, cu_k, 128**-0.5, kernel=MMA)
    assert (kernel90, kernel80) == (SM90, MMA)
    out_ref, _ = oracle.attention(q, k, v, cu_q, cu_k, softmax_scale=128**-0.5)
    e90, e80 = max_err(out90, out_ref), max_err(out80, out_ref)
    print(
        f"\n[sm90 vs mma.sync {shape}] out err sm90 {e90:.3e}, mma.sync {e80:.3e}, between "
        f"{max_err(out90, out80):.3e}; lse between {max_err(lse90, lse80):.3e}"
    )
    assert e90 <= 2 * e80 + 1e-3


@pytest.mark.parametrize(
    "lens_q,hq,hk,packed",
    [
        ([288], 12, 2, 6),  # V2V at T=32: 14 tiles of 21 tokens x 6 heads per group, not 36
        ([300, 17], 12, 2, 6),  # a partial last tile; a second, short segment
        ([129], 4, 2, 2),  # 64 tokens x 2 heads fill 128 rows exactly
        ([128], 12, 2, 1),  # one full tile per head already: not packed
        ([1152], 12, 2, 1),  # 9 full tiles per head: packing (55 per group) would not help
    ],
    ids=lambda x: str(x),
)
def test_gqa_packing_where_it_gives_fewer_tiles(lens_q, hq, hk, packed):
    """The sm90 forward packs a GQA group's heads into a tile's rows (whole tokens per tile)
    exactly where that gives fewer tiles than one head per tile, and is right either way."""
    lens_k = [2000] * len(lens_q)
    q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, hq, hk, 128, torch.bfloat16)
    for splits in (1, 0):
        out, lse, kernel = run_forward(q, k, v, cu_q, cu_k, 128**-0.5, splits, kernel=SM90)
        assert kernel == SM90
        assert extension().attention_forward_rows_per_query() == packed
        out_ref, lse_ref = oracle.attention(q, k, v, cu_q, cu_k, softmax_scale=128**-0.5)
        out_pt, lse_pt = oracle.attention(
            q, k, v, cu_q, cu_k, softmax_scale=128**-0.5, dtype=q.dtype
        )
        print(
            f"\n[sm90 packing {lens_q} {hq}/{hk} splits={splits}]",
            check_close("out", out, out_pt, out_ref, factor=2),
            check_lse(lse, lse_pt, lse_ref),
        )


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
    out, lse, kernel = run_forward(q, k, v, cu_q, cu_k, 128**-0.5, kernel=SM90)
    assert kernel == SM90
    assert torch.isfinite(out[:50]).all() and torch.isfinite(lse[:, :50]).all(), (
        f"values of segment 1's {where} leaked into segment 0"
    )
    out_ref, _ = oracle.attention(
        q[:50], k[:200], v[:200], cu_seqlens([50]), cu_seqlens([200]), softmax_scale=128**-0.5
    )
    print(f"\n[sm90 leak {where}] segment 0 max err {max_err(out[:50], out_ref):.3e}")
    assert max_err(out[:50], out_ref) < 0.02


# ----------------------------------------------------------------------------------------------
# The kernel choice
# ----------------------------------------------------------------------------------------------


def test_kernel_choice():
    """The extension runs the kernel asked for where it can ('sm90' with head dim 64 or a
    non-positive scale runs mma.sync); when to ask for which is crosslmm_ops.planner's
    (test_planner.py, with the GPU facts stubbed), checked here end to end through the public API:
    CROSSLMM_ATTENTION_SM90 "0" never, "1" always, "auto" (and unset) from 64 queries a segment
    on; a bad value is an error naming the variable."""
    import crosslmm_ops

    q, k, v, cu_q, cu_k = make_inputs([9], [729], HQ, HK, 128, torch.bfloat16)
    q2, k2, v2, cu_q2, cu_k2 = make_inputs([300], [729], HQ, HK, 128, torch.bfloat16)
    scale = 128**-0.5
    assert run_forward(q, k, v, cu_q, cu_k, scale, kernel=MMA)[2] == MMA
    assert run_forward(q, k, v, cu_q, cu_k, scale, kernel=SM90)[2] == SM90
    q64, k64, v64, cu_q64, cu_k64 = make_inputs([300], [729], HQ, HK, 64, torch.bfloat16)
    assert run_forward(q64, k64, v64, cu_q64, cu_k64, 0.125, kernel=SM90)[2] == MMA
    assert run_forward(q2, k2, v2, cu_q2, cu_k2, -scale, kernel=SM90)[2] == MMA

    def planned(mode, q, k, v, cu_q, cu_k):
        with env_value(ENV, mode):
            crosslmm_ops.cross_attention(
                q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="cuda"
            )
        return crosslmm_ops.last_kernel("cross_attention")

    short, long = (q, k, v, cu_q, cu_k), (q2, k2, v2, cu_q2, cu_k2)
    assert planned("0", *long) == MMA
    assert planned("1", *short) == SM90
    assert planned("auto", *short) == "sm90_packed"  # 9 queries: GQA-packed wgmma tiles
    assert planned("auto", *long) == SM90
    assert planned(None, *long) == SM90
    with pytest.raises(ValueError, match=ENV):
        planned("yes", *short)


def test_through_public_api_with_backward():
    """crosslmm_ops.cross_attention on the CUDA back end with the sm90 forward: out, lse and the
    gradients (computed by the backward from the sm90 forward's out and lse) against float64."""
    import crosslmm_ops

    lens_q, lens_k = [200, 9], [1000, 729]
    q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, HQ, HK, 128, torch.bfloat16)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with env_value(ENV, "1"):
        out, lse = crosslmm_ops.cross_attention(
            *leaves, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True, backend="cuda"
        )
        assert extension().attention_forward_kernel_name() == SM90
    assert crosslmm_ops.last_backend("cross_attention") == "cuda"
    dout = torch.randn_like(out)
    out.backward(dout)
    grads = [t.grad for t in leaves]
    scale = 128**-0.5
    with torch.no_grad():
        o64, l64 = oracle.attention(q, k, v, cu_q, cu_k, softmax_scale=scale)
        o16, l16 = oracle.attention(q, k, v, cu_q, cu_k, softmax_scale=scale, dtype=torch.bfloat16)
    g64 = oracle.attention_grads(dout, q, k, v, cu_q, cu_k, softmax_scale=scale)
    g16 = oracle.attention_grads(
        dout, q, k, v, cu_q, cu_k, softmax_scale=scale, dtype=torch.bfloat16
    )
    reports = [check_close("out", out, o16, o64, factor=2), check_lse(lse, l16, l64)]
    for name, ours, low, ref in zip(("dq", "dk", "dv"), grads, g16, g64):
        reports.append(check_close(name, ours, low, ref, factor=3))
    print("\n[sm90 public API] " + "; ".join(reports))


def test_fresh_thread():
    """A thread that has made no CUDA runtime call of its own, with every buffer already in the
    caching allocator, still gets the sm90 kernel: its TMA encoding (a driver call) needs a
    current context, which attention.cu now makes current itself (CUDA_ERROR_INVALID_CONTEXT sent
    autograd's backward thread to the mma.sync kernels before)."""
    import threading

    lens_q, lens_k = [200], [729]
    q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, 4, 2, 128, torch.bfloat16)
    expected, _, kernel = run_forward(q, k, v, cu_q, cu_k, 128**-0.5, num_splits=1, kernel=SM90)
    assert kernel == SM90
    # Preallocated, NaN-filled outputs: the thread itself only makes the extension call (any
    # allocation or copy of its own would be a runtime call and make the context current).
    out = torch.full_like(q, math.nan)
    lse = torch.full((q.shape[1], q.shape[0]), math.nan, device="cuda", dtype=torch.float32)
    torch.cuda.synchronize()
    seen = {}

    def worker():
        try:
            extension().attention_forward(
                q, k, v, out, lse, cu_q, cu_k, 200, 729, 128**-0.5, 1, kernel="sm90"
            )
            seen["kernel"] = extension().attention_forward_kernel_name()
        except BaseException as exc:  # noqa: BLE001 - reported below
            seen["error"] = exc

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
